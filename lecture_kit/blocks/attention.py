"""Causal multi-head softmax attention: the baseline the recurrent layers are measured against."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import positive_int
from .base import SequenceLayer, rotary


class KVCache(NamedTuple):
    """What softmax attention remembers: every key and value so far, O(t) in the sequence length."""
    keys: torch.Tensor     # [B, t, H, D], rotated
    values: torch.Tensor   # [B, t, H, D]


class SoftmaxAttentionLayer(SequenceLayer):
    """Causal multi-head softmax attention, the baseline: u [B, T, d_model] → same; H heads of D = d_model/H.

        q, k = rotary(u W_q), rotary(u W_k)            [B, T, H, D]   the same rotation as MultiScaleRetention
        v = u W_v
        o_t = Σ_{j≤t} softmax_j(q_tᵀ k_j / √D) v_j       torch's scaled_dot_product_attention, is_causal
        out = o W_o

    No biases, no norm, no gate.  Its cache is a ``KVCache`` of every (rotated) key and value so far:
    it grows by 2·H·D numbers per token, where the recurrent layers' caches stay the same size.
    """
    _growing_dim = 1

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        owner = type(self).__name__
        self.d_model = positive_int(owner, "d_model", d_model)
        self.n_heads = positive_int(owner, "n_heads", n_heads)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"{owner}: n_heads = {n_heads} must divide d_model = {d_model} into heads of an even "
                             f"size (for the rotation)")
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, u, start: int):
        """u [B, T, d_model], its first token at position ``start`` → rotated q, k and v, [B, T, H, D] each."""
        positions = torch.arange(start, start + u.shape[1], device=u.device)
        q, k, v = (proj(u).unflatten(-1, (self.n_heads, self.head_dim))
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return rotary(q, positions), rotary(k, positions), v

    def _attend(self, q, keys, values, causal: bool):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                           is_causal=causal)
        return self.out_proj(o.transpose(1, 2).flatten(-2))

    def _sequence(self, u, output_cache):
        q, k, v = self._qkv(u, 0)
        return self._attend(q, k, v, causal=True), (KVCache(k, v) if output_cache else None)

    def _step(self, u_t, cache: KVCache):
        q, k, v = self._qkv(u_t[:, None], cache.keys.shape[1])
        cache = KVCache(torch.cat([cache.keys, k], dim=1), torch.cat([cache.values, v], dim=1))
        return self._attend(q, *cache, causal=False)[:, 0], cache        # the new token sees every key

    def _empty_cache(self, batch: int) -> KVCache:
        empty = self.k_proj.weight.new_zeros(batch, 0, self.n_heads, self.head_dim)
        return KVCache(empty, empty)

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The attention matrices [B, H, T, T]: softmax over j ≤ i of q_iᵀ k_j / √D, zero above the diagonal."""
        self._check_sequence("hidden_attention", u)
        q, k, _ = self._qkv(u, 0)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(self.head_dim)
        T = u.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)


