"""The gated linear attention layer (Yang et al. 2023; fla's ``GatedLinearAttention``; notebooks 03d and 04d)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .. import gla
from .._validate import compute_dtype, positive_float, positive_int
from ._validate import head_dim
from .base import HeadNorm, Mixer, RecurrentCache, SequenceLayer


class GLALayer(SequenceLayer):
    """The gated linear attention layer (Yang et al. 2023; fla's ``GatedLinearAttention``; notebooks 03d and 04d):
    u [B, T, d_model] → [B, T, d_model].

        q, k, v = u W_q, u W_k, u W_v                 [B, T, H, K], [B, T, H, K], [B, T, H, V]
        log α = logsigmoid(u W_1 W_2 + b) / τ          [B, T, H, K]   gate of rank r = 16, temperature τ = 16
        o = GLA(q, k, v, log α)                        S_t = diag(α_t) S_{t−1} + k_t v_tᵀ, o_t = K^{−1/2} S_tᵀ q_t
        out = (swish(u W_r) ∘ RMSNorm_head(o)) W_o     RMSNorm over each head's V channels, with a weight

    K = expand_k·d_model/H, V = expand_v·d_model/H (fla: expand_k = 0.5, expand_v = 1, 4 heads).  Only
    the gate's up-projection W_2 has a bias.  The norm's weight is per channel (fla shares one [V]
    weight across heads).  The cache is a ``RecurrentCache(S [B, H, K, V], None, t)``.
    """

    def __init__(self, d_model: int, n_heads: int, *, expand_k: float = 0.5, expand_v: float = 1,
                 gate_low_rank: int = 16, gate_temperature: float = 16, chunk_size: int = 64,
                 norm_eps: float = 1e-5):
        super().__init__()
        owner = type(self).__name__
        self.d_model = positive_int(owner, "d_model", d_model)
        self.n_heads = positive_int(owner, "n_heads", n_heads)
        self.key_dim = head_dim(owner, "expand_k", expand_k, d_model, n_heads)       # K
        self.value_dim = head_dim(owner, "expand_v", expand_v, d_model, n_heads)     # V
        positive_int(owner, "gate_low_rank", gate_low_rank)
        self.gate_temperature = positive_float(owner, "gate_temperature", gate_temperature)
        H, K, V = n_heads, self.key_dim, self.value_dim
        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, H * K, bias=False)
        self.v_proj = nn.Linear(d_model, H * V, bias=False)
        self.gate_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank, bias=False), nn.Linear(gate_low_rank, H * K))
        self.r_proj = nn.Linear(d_model, H * V, bias=False)
        self.mixer = Mixer(gla, chunk_size)
        self.norm = HeadNorm(H, V, kind="rms", eps=positive_float(owner, "norm_eps", norm_eps, zero_ok=True))
        self.out_proj = nn.Linear(H * V, d_model, bias=False)

    def _mixer_inputs(self, u):
        """u [B, T, d_model] → q, k [B, T, H, K], v [B, T, H, V], log α [B, T, H, K] (fp32; fp64)."""
        heads = lambda t, d: t.unflatten(-1, (self.n_heads, d))            # noqa: E731
        log_alpha = F.logsigmoid(self.gate_proj(u).to(compute_dtype(u.dtype))) / self.gate_temperature
        return (heads(self.q_proj(u), self.key_dim), heads(self.k_proj(u), self.key_dim),
                heads(self.v_proj(u), self.value_dim), heads(log_alpha, self.key_dim))

    def _readout(self, o, u):
        """o [B, T, H, V] → (swish(u W_r) ∘ RMSNorm_head(o)) W_o [B, T, d_model]."""
        return self.out_proj(F.silu(self.r_proj(u)) * self.norm(o.flatten(-2)))

    def _sequence(self, u, output_cache):
        o, S = self.mixer(*self._mixer_inputs(u), output_final_state=output_cache)
        return self._readout(o, u), (RecurrentCache(S, None, u.shape[1]) if output_cache else None)

    def _step(self, u_t, cache: RecurrentCache):
        u = u_t[:, None]
        o, S = gla.recurrent(*self._mixer_inputs(u), initial_state=cache.state, output_final_state=True)
        return self._readout(o, u)[:, 0], RecurrentCache(S, None, cache.position + 1)

    def _empty_cache(self, batch: int) -> RecurrentCache:
        return RecurrentCache(self._zero_state(self.q_proj, batch, self.n_heads, self.key_dim, self.value_dim), None, 0)

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The GLA matrices [B, H, T, T] for input u: P_ij = K^{−1/2} Σ_d q_id k_jd exp(b_id − b_jd) (j ≤ i),
        b = cumsum(log α), so that o[:, :, h] = P[:, h] @ v[:, :, h] before the norm (``gla.matrix``)."""
        self._check_sequence("hidden_attention", u)
        q, k, _, g = self._mixer_inputs(u)
        return gla.matrix(q, k, g)


