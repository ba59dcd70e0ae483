"""RetNet's multi-scale retention layer (Sun et al. 2023, §2.2; notebooks 03d and 04d)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import retnet
from .._validate import compute_dtype, positive_float, positive_int
from ._validate import head_dim
from .base import HeadNorm, Mixer, RecurrentCache, SequenceLayer, rotary


class MultiScaleRetention(SequenceLayer):
    """RetNet's multi-scale retention (Sun et al. 2023, §2.2; notebooks 03d and 04d): u [B, T, d_model] → same.

        q, k = rotary(u W_q), rotary(u W_k)          [B, T, H, K]   token n turned by n·θ (``rotary``)
        v, g = u W_v, u W_g                           [B, T, H, V],  [B, T, H·V]
        o = Retention(q, k, v; γ)                     S_n = γ_h S_{n−1} + k_n v_nᵀ,  o_n = K^{−1/2} S_nᵀ q_n
        out = (swish(g) ∘ GroupNorm(o)) W_o           GroupNorm: RMSNorm over each head's V channels, no affine

    with a fixed decay per head, γ_h = 1 − 2^{−5−h} (h = 0 … H−1), passed to ``lecture_kit.retnet`` as
    ``log_gamma``; K = expand_k·d_model/H (even, for the rotation) and V = expand_v·d_model/H
    (torchscale's and fla's defaults: expand_k = 1, expand_v = 2).  No biases.

    Against torchscale's ``MultiScaleRetention``: the same rotation (``theta_shift``, whose frequencies
    ``rotary`` states) and RMSNorm(elementwise_affine=False) group norm; its k·K^{−1/2} is our score
    scale.  We omit the paper's score normalisations (notebook 03d): they are per-row positive
    scalings that the group norm removes up to its eps, and leaving them out makes forward, prefill and
    step compute exactly the same function.  The cache is a ``RecurrentCache(S [B, H, K, V], None, t)``:
    t is the position, hence the rotation, of the next token.
    """

    def __init__(self, d_model: int, n_heads: int, *, expand_k: float = 1, expand_v: float = 2,
                 chunk_size: int = 64, norm_eps: float = 1e-6):
        super().__init__()
        owner = type(self).__name__
        self.d_model = positive_int(owner, "d_model", d_model)
        self.n_heads = positive_int(owner, "n_heads", n_heads)
        self.key_dim = head_dim(owner, "expand_k", expand_k, d_model, n_heads, even=True)      # K
        self.value_dim = head_dim(owner, "expand_v", expand_v, d_model, n_heads)               # V
        H, K, V = n_heads, self.key_dim, self.value_dim
        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, H * K, bias=False)
        self.v_proj = nn.Linear(d_model, H * V, bias=False)
        self.g_proj = nn.Linear(d_model, H * V, bias=False)
        self.mixer = Mixer(retnet, chunk_size)
        norm_eps = positive_float(owner, "norm_eps", norm_eps, zero_ok=True)
        self.norm = HeadNorm(H, V, kind="rms", affine=False, eps=norm_eps)
        self.out_proj = nn.Linear(H * V, d_model, bias=False)

    @property
    def log_gamma(self) -> torch.Tensor:
        """log γ_h = log(1 − 2^{−5−h}) [H], in fp32 (fp64 for an fp64 layer): never rounded to bf16."""
        w = self.q_proj.weight
        h = torch.arange(self.n_heads, dtype=compute_dtype(w.dtype), device=w.device)
        return torch.log1p(-torch.exp2(-5 - h))

    def _mixer_inputs(self, u, start: int):
        """u [B, T, d_model], its first token at position ``start`` → rotated q, k [B, T, H, K], v [B, T, H, V]."""
        positions = torch.arange(start, start + u.shape[1], device=u.device)
        q, k = (rotary(proj(u).unflatten(-1, (self.n_heads, self.key_dim)), positions)
                for proj in (self.q_proj, self.k_proj))
        return q, k, self.v_proj(u).unflatten(-1, (self.n_heads, self.value_dim))

    def _readout(self, o, u):
        """o [B, T, H, V] → (swish(u W_g) ∘ GroupNorm(o)) W_o [B, T, d_model]."""
        return self.out_proj(F.silu(self.g_proj(u)) * self.norm(o.flatten(-2)))

    def _sequence(self, u, output_cache):
        o, S = self.mixer(*self._mixer_inputs(u, 0), self.log_gamma, output_final_state=output_cache)
        return self._readout(o, u), (RecurrentCache(S, None, u.shape[1]) if output_cache else None)

    def _step(self, u_t, cache: RecurrentCache):
        u = u_t[:, None]
        o, S = retnet.recurrent(*self._mixer_inputs(u, cache.position), self.log_gamma,
                                initial_state=cache.state, output_final_state=True)
        return self._readout(o, u)[:, 0], RecurrentCache(S, None, cache.position + 1)

    def _empty_cache(self, batch: int) -> RecurrentCache:
        return RecurrentCache(self._zero_state(self.q_proj, batch, self.n_heads, self.key_dim, self.value_dim), None, 0)

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The retention matrices [B, H, T, T] for input u [B, T, d_model]: M_nm = K^{−1/2} q_nᵀ k_m γ^{n−m}
        (n ≥ m), so that o[:, :, h] = M[:, h] @ v[:, :, h] before the group norm (``retnet.matrix``)."""
        self._check_sequence("hidden_attention", u)
        q, k, _ = self._mixer_inputs(u, 0)
        return retnet.matrix(q, k, self.log_gamma)


