"""RWKV-7's two layers: time mixing, the generalised delta rule (Peng et al. 2025), and channel mixing,
its feed-forward (notebooks 03c and 04d); and the token shift both read."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import rwkv7
from .._validate import Signature, compute_dtype, positive_float, positive_int
from ._validate import layer_ratios
from .base import HeadNorm, Mixer, RecurrentCache, SequenceLayer

#: The positional inputs of ``lecture_kit.rwkv7``'s forms, as ``RWKV7TimeMix`` computes them (from
#: ``rwkv7.SPEC``): r, w (log decay ∈ (−0.61, 0), fp32), k (the replacement key k̃), v, a = −κ̂, b = κ̂ ∘ a_icl.
RWKV7Inputs = rwkv7.SPEC.Inputs


def token_shift(u: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """u [B, T, C] → u delayed by one token [B, T, C]: row t holds u_{t−1}, row 0 holds ``previous``
    [B, C] (the last token of what came before; zeros, RWKV's padding, for an empty past)."""
    sig = Signature("token_shift")
    sig.tensor("u", u, "B T C")
    sig.optional("previous", previous, "B C")
    first = torch.zeros_like(u[:, :1]) if previous is None else previous[:, None]
    return torch.cat([first, u[:, :-1]], dim=1)


def _rwkv_rank(d_model: int, factor: float) -> int:
    """RWKV-7's suggested LoRA rank: max(32, round(factor·√d_model / 32)·32)."""
    return max(32, int(round(factor * d_model ** 0.5 / 32)) * 32)


def _rwkv_mix_init(d_model: int, powers: torch.Tensor) -> torch.Tensor:
    """Token-shift lerps μ = 1 − (c / d_model)^p for channels c = 0 … d_model − 1: [len(powers), d_model]."""
    return 1 - (torch.arange(d_model) / d_model)[None, :] ** powers[:, None]


class RWKV7TimeMix(SequenceLayer):
    """RWKV-7's time mixing (Peng et al. 2025; ``RWKV_Tmix_x070`` of BlinkDL's rwkv_v7_demo.py; notebooks 03c and 04d):
    u [B, T, d_model] → [B, T, d_model], with H heads of N = head_size channels, C = H·N.

        x^◇ = u_t + (u_{t−1} − u_t) ∘ μ_◇              ◇ ∈ {r, w, k, v, a, g}: token shift, static lerps
        r, k, v = x^r W_r, x^k W_k, x^v W_v            [B, T, H, N]
        w = −e^{−1/2} σ(w_0 + tanh(x^w W_1) W_2)        log decay ∈ (−0.61, 0): decay e^w ∈ (0.545, 1)
        a_icl = σ(a_0 + x^a A_1 A_2)                   in-context learning rate ∈ (0, 1)
        g = σ(x^g G_1) G_2                             output gate
        κ̂ = normalize_head(k ∘ ξ)                      removal key, unit length per head
        k̃ = k ∘ (1 + (a_icl − 1) ∘ α)                  replacement key
        o = RWKV7(r, w, k̃, v, a = −κ̂, b = κ̂ ∘ a_icl)   lecture_kit.rwkv7, state S_t [N, N] per head:
                        S_t = (diag(e^{w_t}) − (κ̂_t ∘ a_icl,t) κ̂_tᵀ) S_{t−1} + k̃_t v_tᵀ,   o_t = S_tᵀ r_t
        y = GroupNorm_head(o) + (Σ_c r_c k̃_c ρ_c)_head v    per-head LayerNorm, eps 64e-5; the "bonus"
        out = (y ∘ g) W_o

    ξ, α [C] are ``k_k``, ``k_a``; ρ [H, N] is ``r_k``; μ [6, d_model] is ``mu`` (rows r, w, k, v, a, g).
    The low ranks default to the reference's max(32, round(f·√d_model/32)·32), f = 2.5 (decay, a), 5 (gate).

    What differs from the reference:
    - the value residual (v ← v + (v⁽⁰⁾ − v) ∘ σ(ν_0 + x^v V_1 V_2), with layer 0's values v⁽⁰⁾) is
      omitted: every layer uses its own v.
    - initialisation follows the reference (lerps, w_0, a_0, ξ, α, ρ by ``layer_id`` of ``n_layers``;
      W_2, A_2, G_2 by its ``ortho_init(·, 0.1)``), except that W_1, A_1, G_1 and W_o, which it zeroes,
      are drawn (W_1, A_1, G_1 like W_2; W_o PyTorch's default), so that every parameter has a gradient
      at step 0.
    The cache is a ``RecurrentCache(S [B, H, N, N], u_t [B, d_model], t)``: the state and the last input,
    which the next token's shift reads.
    """

    def __init__(self, d_model: int, n_heads: int, head_size: int = 64, *, layer_id: int = 0, n_layers: int = 1,
                 decay_low_rank: int | None = None, a_low_rank: int | None = None, gate_low_rank: int | None = None,
                 chunk_size: int = 16, norm_eps: float = 64e-5):
        super().__init__()
        owner = type(self).__name__
        self.d_model = positive_int(owner, "d_model", d_model)
        self.n_heads = positive_int(owner, "n_heads", n_heads)
        self.head_size = positive_int(owner, "head_size", head_size)
        ratio_0_to_1, ratio_1_to_0 = layer_ratios(owner, layer_id, n_layers)
        ranks = {name: _rwkv_rank(d_model, f) if r is None else positive_int(owner, name, r)
                 for name, r, f in (("decay_low_rank", decay_low_rank, 2.5), ("a_low_rank", a_low_rank, 2.5),
                                    ("gate_low_rank", gate_low_rank, 5.0))}
        H, N, C = n_heads, head_size, n_heads * head_size
        self.layer_id = layer_id

        c = torch.arange(C, dtype=torch.float64)
        linear = c / max(C - 1, 1) - 0.5                                       # −0.5 … 0.5 across channels
        zigzag = ((c % N) - (N - 1) / 2) / max((N - 1) / 2, 1)                 # −1 … 1 within each head
        zigzag = zigzag * zigzag.abs()
        decay_ramp = -6 + 6 * (c / max(C - 1, 1)) ** (1 + ratio_0_to_1 ** 0.3)

        def orthogonal(rows, cols, scale=0.1):      # the reference's ortho_init
            gain = scale * (math.sqrt(rows / cols) if rows > cols else 1)
            return nn.Parameter(nn.init.orthogonal_(torch.empty(rows, cols), gain=gain))

        def lora(rank):
            return orthogonal(d_model, rank), orthogonal(rank, C)

        self.mu = nn.Parameter(_rwkv_mix_init(d_model, ratio_1_to_0 * torch.tensor([0.2, 0.9, 0.7, 0.7, 0.9, 0.2])))
        self.r_proj = nn.Linear(d_model, C, bias=False)
        self.k_proj = nn.Linear(d_model, C, bias=False)
        self.v_proj = nn.Linear(d_model, C, bias=False)
        for proj, bound in ((self.r_proj, 0.5), (self.k_proj, 0.05), (self.v_proj, 0.5)):
            nn.init.uniform_(proj.weight, -bound / d_model ** 0.5, bound / d_model ** 0.5)
        self.w0 = nn.Parameter((decay_ramp + 0.5 + 2.5 * zigzag).float())
        self.w1, self.w2 = lora(ranks["decay_low_rank"])
        self.a0 = nn.Parameter((-0.19 + 0.3 * zigzag + 0.4 * linear).float())
        self.a1, self.a2 = lora(ranks["a_low_rank"])
        self.g1, self.g2 = lora(ranks["gate_low_rank"])
        self.k_k = nn.Parameter((0.71 - 0.1 * linear).float())              # ξ
        self.k_a = nn.Parameter(torch.full((C,), 1.02))                      # α
        self.r_k = nn.Parameter(torch.full((H, N), -0.04))                   # ρ
        self.mixer = Mixer(rwkv7, chunk_size)
        self.norm = HeadNorm(H, N, kind="layer", eps=positive_float(owner, "norm_eps", norm_eps, zero_ok=True))
        self.out_proj = nn.Linear(C, d_model, bias=False)

    def _mixer_inputs(self, u, previous):
        """u [B, T, d_model] after the token ``previous`` [B, d_model] (None: none)
        → (RWKV7Inputs, the output gate g [B, T, C])."""
        heads = lambda t: t.unflatten(-1, (self.n_heads, self.head_size))    # noqa: E731
        lerps = torch.lerp(u[..., None, :], token_shift(u, previous)[..., None, :], self.mu)
        xr, xw, xk, xv, xa, xg = lerps.unbind(-2)
        r, k, v = heads(self.r_proj(xr)), heads(self.k_proj(xk)), heads(self.v_proj(xv))
        d = (self.w0 + torch.tanh(xw @ self.w1) @ self.w2).to(compute_dtype(u.dtype))
        w = -math.exp(-0.5) * torch.sigmoid(d)
        a_icl = heads(torch.sigmoid(self.a0 + xa @ self.a1 @ self.a2))
        kappa = F.normalize(k * heads(self.k_k), dim=-1)
        k_tilde = k * (1 + (a_icl - 1) * heads(self.k_a))
        gate = torch.sigmoid(xg @ self.g1) @ self.g2
        return RWKV7Inputs(r, heads(w), k_tilde, v, -kappa, kappa * a_icl), gate

    def _readout(self, o, inputs: RWKV7Inputs, gate):
        """o [B, T, H, N] → ((GroupNorm(o) + bonus) ∘ g) W_o [B, T, d_model]."""
        bonus = (inputs.r * inputs.k * self.r_k).sum(-1, keepdim=True) * inputs.v
        return self.out_proj((self.norm(o.flatten(-2)) + bonus.flatten(-2)) * gate)

    def _sequence(self, u, output_cache):
        inputs, gate = self._mixer_inputs(u, None)
        o, S = self.mixer(*inputs, output_final_state=output_cache)
        return self._readout(o, inputs, gate), (RecurrentCache(S, u[:, -1], u.shape[1]) if output_cache else None)

    def _step(self, u_t, cache: RecurrentCache):
        inputs, gate = self._mixer_inputs(u_t[:, None], cache.last)
        o, S = rwkv7.recurrent(*inputs, initial_state=cache.state, output_final_state=True)
        return self._readout(o, inputs, gate)[:, 0], RecurrentCache(S, u_t, cache.position + 1)

    def _empty_cache(self, batch: int) -> RecurrentCache:
        state = self._zero_state(self.r_proj, batch, self.n_heads, self.head_size, self.head_size)
        return RecurrentCache(state, self.r_proj.weight.new_zeros(batch, self.d_model), 0)

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The WKV matrices [B, H, T, T] for input u: A_tj = r_tᵀ G_t ⋯ G_{j+1} k̃_j (j ≤ t),
        G_s = diag(e^{w_s}) + b_s a_sᵀ, so that o[:, :, h] = A[:, h] @ v[:, :, h] before the norm and
        the bonus (``rwkv7.matrix``)."""
        self._check_sequence("hidden_attention", u)
        return rwkv7.matrix(*rwkv7.SPEC.matrix_args(self._mixer_inputs(u, None)[0]))


class RWKV7ChannelMix(SequenceLayer):
    """RWKV-7's channel mixing, its feed-forward (``RWKV_CMix_x070``; notebooks 03c and 04d): u [B, T, d_model] → same.

        x^k = u_t + (u_{t−1} − u_t) ∘ μ_k               token shift, one static lerp
        out = relu(x^k W_k)² W_v                        W_k: d_model → expand·d_model (squared ReLU)

    Initialisation as the reference (μ_k = 1 − (c/d_model)^{(1 − layer_id/n_layers)⁴}, W_k uniform
    ±0.5/√d_model) except W_v, which it zeroes: PyTorch's default here.  The cache is a
    ``RecurrentCache(None, u_t [B, d_model], t)``: just the last input.
    """

    def __init__(self, d_model: int, expand: int = 4, *, layer_id: int = 0, n_layers: int = 1):
        super().__init__()
        owner = type(self).__name__
        self.d_model = positive_int(owner, "d_model", d_model)
        positive_int(owner, "expand", expand)
        _, ratio_1_to_0 = layer_ratios(owner, layer_id, n_layers)
        self.mu_k = nn.Parameter(_rwkv_mix_init(d_model, torch.tensor([ratio_1_to_0 ** 4]))[0])
        self.key = nn.Linear(d_model, expand * d_model, bias=False)
        nn.init.uniform_(self.key.weight, -0.5 / d_model ** 0.5, 0.5 / d_model ** 0.5)
        self.value = nn.Linear(expand * d_model, d_model, bias=False)

    def _mix(self, u, previous):
        return self.value(torch.relu(self.key(torch.lerp(u, token_shift(u, previous), self.mu_k))).square())

    def _sequence(self, u, output_cache):
        return self._mix(u, None), (RecurrentCache(None, u[:, -1], u.shape[1]) if output_cache else None)

    def _step(self, u_t, cache: RecurrentCache):
        return self._mix(u_t[:, None], cache.last)[:, 0], RecurrentCache(None, u_t, cache.position + 1)

    def _empty_cache(self, batch: int) -> RecurrentCache:
        return RecurrentCache(None, self.key.weight.new_zeros(batch, self.d_model), 0)


