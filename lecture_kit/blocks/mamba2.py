"""The Mamba-2 block (Dao & Gu 2024, §7; notebooks 03b and 04d).  For an input u [B, T, d_model], with
E = expand·d_model = H·P inner channels, H heads of P channels, G groups of B/C of size N:

    z, xBC, dt_raw = in_proj(u)                    z [B, T, E],  xBC [B, T, E + 2GN],  dt_raw [B, T, H]
    xBC = SiLU(causal depthwise conv1d(xBC))       one length-d_conv filter per channel, along time
    x, B, C = split(xBC)                           x [B, T, H, P],  B, C [B, T, G, N]
    Δ = softplus(dt_raw + dt_bias)                 Δ [B, T, H] > 0
    A = −exp(A_log)                                A [H] < 0
    y = SSD(x, Δ, A, B, C) + D x                   lecture_kit.ssd:  y = M x + D x
    out = out_proj(RMSNorm_G(y ∘ SiLU(z)))         gated RMSNorm (norm_before_gate=False), per group

z, xBC and Δ come out of one projection, *in parallel*: unlike Mamba-1, B, C and Δ are functions of
the block's input, not of x.  The mixer's matrix M = L ∘ (C Bᵀ) · diag(Δ) [B, H, T, T] is the block's
"hidden attention" (Ali et al. 2024; notebook 05d): one T×T matrix per head, shared by its P channels;
the token mixer as a whole is M + D·I.

Initialisation (mamba_ssm's ``Mamba2``): A ~ U[1, 16] stored as A_log = log(−A) (so A stays
negative whatever the optimiser does); Δ at dt_raw = 0 log-uniform in [1e-3, 1e-1], i.e.
dt_bias = softplus⁻¹(Δ) = Δ + log(1 − e^{−Δ}); D = 1; norm weight 1.  Decay parameters are used in
fp32 (fp64 for an fp64 block), whatever the activations' dtype.

Inference is token by token with a constant-size cache: the last d_conv − 1 inputs of the
convolution and the SSM state h [B, H, P, N] (``Mamba2Cache``); ``prefill`` runs the chunked form
over a prompt and returns the cache, ``step`` advances it by one token with the recurrence.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ssd
from .._validate import compute_dtype, interval, positive_int
from ._validate import feature_width
from .base import HeadNorm, Mixer, SequenceLayer

#: The positional inputs of ``lecture_kit.ssd``'s forms, as the block computes them (from ``ssd.SPEC``).
SSDInputs = ssd.SPEC.Inputs


class Mamba2Cache(NamedTuple):
    """What a Mamba-2 block remembers between tokens at inference: O(1) in the sequence length."""
    conv_state: torch.Tensor   # [B, E + 2GN, d_conv − 1]: the last d_conv − 1 inputs of the conv, oldest first
    ssm_state: torch.Tensor    # [B, H, P, N]: h_t, fp32 (fp64)


class SSD(Mixer):
    """The SSD as a module without parameters: (y, final state) = SSD(x, Δ, A, B, C, D=D) = M x + D x."""

    def __init__(self, chunk_size: int = 64):
        super().__init__(ssd, chunk_size)


class GatedRMSNorm(HeadNorm):
    """out = RMSNorm(y ∘ SiLU(z)) · weight, the RMS taken over groups of ``group_size`` channels.

    Shapes: y, z [..., dim] → [..., dim].  Gate first, then normalise (mamba_ssm's RMSNormGated with
    norm_before_gate=False); with G groups of B/C the block normalises each group's E/G channels
    separately.  Computed in fp32 (fp64) and returned in y's dtype.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        positive_int("GatedRMSNorm", "dim", dim)
        positive_int("GatedRMSNorm", "group_size", group_size)
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size = {group_size} must divide dim = {dim}")
        super().__init__(dim // group_size, group_size, kind="rms", eps=eps)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        feature_width("GatedRMSNorm", "y", y, self.n_heads * self.head_dim)
        if not isinstance(z, torch.Tensor) or z.shape != y.shape:
            raise ValueError(f"GatedRMSNorm: z must be a tensor of y's shape {tuple(y.shape)}, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        f = compute_dtype(y.dtype)
        return super().forward(y.to(f) * F.silu(z.to(f))).to(y.dtype)


class Mamba2Block(SequenceLayer):
    """The Mamba-2 block (module docstring): u [B, T, d_model] → [B, T, d_model].

    Arguments (mamba_ssm's defaults): ``d_state`` N = 128, ``headdim`` P = 64, ``expand`` = 2 (so
    E = 2·d_model and H = E / P), ``ngroups`` G = 1 (must divide H), ``d_conv`` = 4,
    ``A_init_range`` = (1, 16) for −A, ``dt_init_range`` = (1e-3, 1e-1) for Δ, ``norm_eps`` = 1e-5;
    and ``chunk_size`` = 64 of the chunked form (lecture_kit's default; mamba_ssm uses 256).

    ``step`` reads the convolution's window of the last d_conv inputs and advances the SSD by its
    definition, ``ssd.recurrent`` on one token: h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t B_tᵀ,
    y_t = h_t C_t + D x_t.  Its cache is a ``Mamba2Cache`` (or any (conv_state, ssm_state) pair).
    """

    def __init__(self, d_model: int, *, d_state: int = 128, headdim: int = 64, expand: int = 2,
                 ngroups: int = 1, d_conv: int = 4, chunk_size: int = 64,
                 A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_init_range: tuple[float, float] = (1e-3, 1e-1), norm_eps: float = 1e-5):
        super().__init__()
        owner = "Mamba2Block"
        for name, value in (("d_model", d_model), ("d_state", d_state), ("headdim", headdim),
                            ("expand", expand), ("ngroups", ngroups), ("d_conv", d_conv)):
            positive_int(owner, name, value)
        self.d_model, self.d_state, self.headdim, self.ngroups, self.d_conv = d_model, d_state, headdim, ngroups, d_conv
        self.d_inner = expand * d_model                                     # E
        if self.d_inner % headdim:
            raise ValueError(f"{owner}: headdim = {headdim} must divide expand·d_model = {self.d_inner}")
        self.nheads = self.d_inner // headdim                               # H
        if self.nheads % ngroups:
            raise ValueError(f"{owner}: ngroups = {ngroups} must divide the number of heads H = {self.nheads}")
        self.conv_dim = self.d_inner + 2 * ngroups * d_state                # channels of xBC
        A_low, A_high = interval(owner, "A_init_range", A_init_range)
        dt_low, dt_high = interval(owner, "dt_init_range", dt_init_range)

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(A_low, A_high).log())
        dt = torch.empty(self.nheads).uniform_(math.log(dt_low), math.log(dt_high)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))     # softplus⁻¹(Δ)
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.mixer = SSD(chunk_size)
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // ngroups, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    # ---- the pieces of the forward pass, shared by forward, prefill, step and hidden_attention ----

    def _project(self, u):
        """in_proj, split: z [B, T, E], xBC [B, T, E + 2GN], dt_raw [B, T, H]."""
        return self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _ssd_inputs(self, xBC, dt_raw) -> SSDInputs:
        """Convolved xBC [B, T, E + 2GN] and dt_raw [B, T, H] → the SSD's x, Δ, A, B, C."""
        G, N = self.ngroups, self.d_state
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        f = compute_dtype(self.A_log.dtype)
        dt = F.softplus(dt_raw.to(f) + self.dt_bias.to(f))
        A = -torch.exp(self.A_log.to(f))
        return SSDInputs(x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
                         B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)))

    def _mixer_inputs(self, u):
        """u [B, T, d_model] → (z, xBC before the conv, SSDInputs)."""
        z, xBC, dt_raw = self._project(u)
        T = u.shape[1]
        convolved = self.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2)   # causal: drop the look-ahead
        return z, xBC, self._ssd_inputs(F.silu(convolved), dt_raw)

    def _readout(self, y, z):
        """y [B, T, H, P], z [B, T, E] → out_proj(RMSNorm(y ∘ SiLU(z))) [B, T, d_model]."""
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _sequence(self, u, output_cache):
        z, xBC, inputs = self._mixer_inputs(u)
        y, ssm_state = self.mixer(*inputs, D=self.D, output_final_state=output_cache)
        if not output_cache:
            return self._readout(y, z), None
        # the conv's next window needs the last d_conv − 1 raw inputs (zeros before the sequence)
        conv_state = F.pad(xBC.transpose(1, 2), (self.d_conv - 1, 0))[..., u.shape[1]:]
        return self._readout(y, z), Mamba2Cache(conv_state, ssm_state)

    def _step(self, u_t, cache: Mamba2Cache):
        z, xBC, dt_raw = self._project(u_t[:, None])                                   # T = 1
        window = torch.cat([cache.conv_state, xBC.transpose(1, 2)], dim=-1)            # [B, E + 2GN, d_conv]
        convolved = (window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias  # the conv at time t
        inputs = self._ssd_inputs(F.silu(convolved)[:, None], dt_raw)
        y, h = ssd.recurrent(*inputs, D=self.D, initial_state=cache.ssm_state, output_final_state=True)
        return self._readout(y, z)[:, 0], Mamba2Cache(window[..., 1:], h)

    def _empty_cache(self, batch: int) -> Mamba2Cache:
        w = self.in_proj.weight
        return Mamba2Cache(w.new_zeros(batch, self.conv_dim, self.d_conv - 1),
                           w.new_zeros(batch, self.nheads, self.headdim, self.d_state, dtype=compute_dtype(w.dtype)))

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The mixer's matrices for input u [B, T, d_model]: M [B, H, T, T], one per head,

            M_ij = L_ij (C_iᵀ B_j) Δ_j  (i ≥ j),   L_ij = exp(Δ_{j+1} A + ⋯ + Δ_i A),

        so that the SSD's output is y[:, :, h] = M[:, h] @ x[:, :, h] + D_h x[:, :, h]
        (``ssd.matrix``).  It excludes the conv, the gate z and the D skip (notebook 05d).
        """
        self._check_sequence("hidden_attention", u)
        _, _, inputs = self._mixer_inputs(u)
        return ssd.matrix(*ssd.SPEC.matrix_args(inputs))


