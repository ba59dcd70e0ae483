"""The layers around the mixers, and tiny language models built from them.  Zone 4 of the lecture.

The Mamba-2 block (Dao & Gu 2024, §7; math.md §1.1).  For an input u [B, T, d_model], with
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
"hidden attention" (Ali et al. 2024; math.md §6): one T×T matrix per head, shared by its P channels;
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

from . import ssd
from ._validate import Signature, compute_dtype


def seeded(build, *args, seed: int = 0, **kwargs):
    """``build(*args, **kwargs)`` with torch's global generator seeded by ``seed``, and the caller's
    generator left as it was: ``seeded(TinyMamba2LM, 16, 32, 2, seed=0)`` is the same model every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args, **kwargs)


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _interval(owner: str, name: str, value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0 < low <= high:
        raise ValueError(f"{owner}: {name} must be an interval (low, high) with 0 < low <= high, got {value!r}")
    return low, high


def _expect_sizes(sig: Signature, name: str, t: torch.Tensor, **expected: int) -> None:
    """After ``sig.tensor(name, t, ...)``: each named dimension must have the block's size."""
    for dim, size in expected.items():
        if sig.sizes[dim] != size:
            raise sig.error(f"{name} must have {dim} = {size}, got shape {tuple(t.shape)}")


class SSDInputs(NamedTuple):
    """The positional inputs of ``lecture_kit.ssd``'s forms, as the block computes them."""
    x: torch.Tensor     # [B, T, H, P]
    dt: torch.Tensor    # [B, T, H], Δ > 0, fp32 (fp64)
    A: torch.Tensor     # [H], < 0, fp32 (fp64)
    B: torch.Tensor     # [B, T, G, N]
    C: torch.Tensor     # [B, T, G, N]


class Mamba2Cache(NamedTuple):
    """What a Mamba-2 block remembers between tokens at inference: O(1) in the sequence length."""
    conv_state: torch.Tensor   # [B, E + 2GN, d_conv − 1]: the last d_conv − 1 inputs of the conv, oldest first
    ssm_state: torch.Tensor    # [B, H, P, N]: h_t, fp32 (fp64)


class SSD(nn.Module):
    """The token mixer as a module without parameters: (y, final state) = SSD(x, Δ, A, B, C) + D x.

    It runs ``ssd.kernel`` (Triton) when the inputs are on a GPU, not fp64, and the kernel exists
    (the kernel's own limits on N, P and chunk_size then apply), else ``ssd.chunked``.  Being a
    module, it can be hooked (``register_forward_hook``) to read the mixer's exact inputs and output
    inside a model.
    """

    def __init__(self, chunk_size: int = 64):
        super().__init__()
        self.chunk_size = _positive_int("SSD", "chunk_size", chunk_size)

    def forward(self, x, dt, A, B, C, D=None, *, initial_state=None, output_final_state=False):
        use_kernel = x.is_cuda and x.dtype != torch.float64 and hasattr(ssd, "kernel")
        form = ssd.kernel if use_kernel else ssd.chunked
        return form(x, dt, A, B, C, D=D, initial_state=initial_state,
                    output_final_state=output_final_state, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"


class GatedRMSNorm(nn.Module):
    """out = RMSNorm(y ∘ SiLU(z)) · weight, the RMS taken over groups of ``group_size`` channels.

    Shapes: y, z [..., dim] → [..., dim].  Gate first, then normalise (mamba_ssm's RMSNormGated with
    norm_before_gate=False); with G groups of B/C the block normalises each group's E/G channels
    separately.  Computed in fp32 (fp64) and returned in y's dtype.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size = {group_size} must divide dim = {dim}")
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        f = compute_dtype(y.dtype)
        gated = (y.to(f) * F.silu(z.to(f))).unflatten(-1, (-1, self.group_size))
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.to(f)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


class Mamba2Block(nn.Module):
    """The Mamba-2 block (module docstring): u [B, T, d_model] → [B, T, d_model].

    Arguments (mamba_ssm's defaults): ``d_state`` N = 128, ``headdim`` P = 64, ``expand`` = 2 (so
    E = 2·d_model and H = E / P), ``ngroups`` G = 1 (must divide H), ``d_conv`` = 4,
    ``A_init_range`` = (1, 16) for −A, ``dt_init_range`` = (1e-3, 1e-1) for Δ, ``norm_eps`` = 1e-5;
    and ``chunk_size`` = 64 of the chunked form (lecture_kit's default; mamba_ssm uses 256).
    """

    def __init__(self, d_model: int, *, d_state: int = 128, headdim: int = 64, expand: int = 2,
                 ngroups: int = 1, d_conv: int = 4, chunk_size: int = 64,
                 A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_init_range: tuple[float, float] = (1e-3, 1e-1), norm_eps: float = 1e-5):
        super().__init__()
        owner = "Mamba2Block"
        for name, value in (("d_model", d_model), ("d_state", d_state), ("headdim", headdim),
                            ("expand", expand), ("ngroups", ngroups), ("d_conv", d_conv)):
            _positive_int(owner, name, value)
        self.d_model, self.d_state, self.headdim, self.ngroups, self.d_conv = d_model, d_state, headdim, ngroups, d_conv
        self.d_inner = expand * d_model                                     # E
        if self.d_inner % headdim:
            raise ValueError(f"{owner}: headdim = {headdim} must divide expand·d_model = {self.d_inner}")
        self.nheads = self.d_inner // headdim                               # H
        if self.nheads % ngroups:
            raise ValueError(f"{owner}: ngroups = {ngroups} must divide the number of heads H = {self.nheads}")
        self.conv_dim = self.d_inner + 2 * ngroups * d_state                # channels of xBC
        A_low, A_high = _interval(owner, "A_init_range", A_init_range)
        dt_low, dt_high = _interval(owner, "dt_init_range", dt_init_range)

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

    def _check_sequence(self, fn: str, u) -> Signature:
        sig = Signature(f"Mamba2Block.{fn}")
        sig.tensor("u", u, "B T d_model")
        if sig.sizes["T"] < 1:
            raise sig.error(f"u must hold at least one token (T >= 1), got shape {tuple(u.shape)}")
        _expect_sizes(sig, "u", u, d_model=self.d_model)
        self._check_like_parameters(sig, "u", u)
        return sig

    def _check_like_parameters(self, sig: Signature, name: str, t: torch.Tensor) -> None:
        weight = self.in_proj.weight
        if t.dtype != weight.dtype or t.device != weight.device:
            raise sig.error(f"{name} is {t.dtype} on {t.device} but the block's parameters are {weight.dtype} "
                            f"on {weight.device}; move one to the other (block.to(...))")

    # ---- public API ----

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, T, d_model] → out [B, T, d_model], the SSD computed by ``self.mixer`` (chunked)."""
        self._check_sequence("forward", u)
        z, _, inputs = self._mixer_inputs(u)
        y, _ = self.mixer(*inputs, D=self.D)
        return self._readout(y, z)

    def prefill(self, u: torch.Tensor) -> tuple[torch.Tensor, Mamba2Cache]:
        """``forward`` over a prompt u [B, T, d_model], plus the cache that ``step`` continues from."""
        self._check_sequence("prefill", u)
        z, xBC, inputs = self._mixer_inputs(u)
        y, ssm_state = self.mixer(*inputs, D=self.D, output_final_state=True)
        # the conv's next window needs the last d_conv − 1 raw inputs (zeros before the sequence)
        conv_state = F.pad(xBC.transpose(1, 2), (self.d_conv - 1, 0))[..., u.shape[1]:]
        return self._readout(y, z), Mamba2Cache(conv_state, ssm_state)

    def step(self, u_t: torch.Tensor, cache: Mamba2Cache | None = None) -> tuple[torch.Tensor, Mamba2Cache]:
        """One token: u_t [B, d_model] → (out_t [B, d_model], the cache advanced by one token).

        ``cache=None`` starts from an empty sequence.  The convolution reads its window of the last
        d_conv inputs; the SSD advances by its definition, ``ssd.recurrent`` on one token:
        h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t B_tᵀ,  y_t = h_t C_t + D x_t.  Cost O(1) in t.
        """
        sig = Signature("Mamba2Block.step")
        sig.tensor("u_t", u_t, "B d_model")
        _expect_sizes(sig, "u_t", u_t, d_model=self.d_model)
        self._check_like_parameters(sig, "u_t", u_t)
        if cache is None:
            conv_state, ssm_state = self._empty_cache(u_t.shape[0])
        elif not isinstance(cache, tuple) or len(cache) != 2:
            raise sig.error(f"cache must be a Mamba2Cache(conv_state, ssm_state) or None, got {type(cache).__name__}")
        else:
            conv_state, ssm_state = cache
            sig.tensor("cache.conv_state", conv_state, "B conv_dim window")
            _expect_sizes(sig, "cache.conv_state", conv_state, conv_dim=self.conv_dim, window=self.d_conv - 1)
            sig.tensor("cache.ssm_state", ssm_state, "B H P N", same_dtype=False)
            _expect_sizes(sig, "cache.ssm_state", ssm_state, H=self.nheads, P=self.headdim, N=self.d_state)

        z, xBC, dt_raw = self._project(u_t[:, None])                                   # T = 1
        window = torch.cat([conv_state, xBC.transpose(1, 2)], dim=-1)                  # [B, E + 2GN, d_conv]
        convolved = (window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias  # the conv at time t
        inputs = self._ssd_inputs(F.silu(convolved)[:, None], dt_raw)
        y, h = ssd.recurrent(*inputs, D=self.D, initial_state=ssm_state, output_final_state=True)
        return self._readout(y, z)[:, 0], Mamba2Cache(window[..., 1:], h)

    def _empty_cache(self, batch: int) -> Mamba2Cache:
        w = self.in_proj.weight
        return Mamba2Cache(w.new_zeros(batch, self.conv_dim, self.d_conv - 1),
                           w.new_zeros(batch, self.nheads, self.headdim, self.d_state, dtype=compute_dtype(w.dtype)))

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The mixer's matrices for input u [B, T, d_model]: M [B, H, T, T], one per head,

            M_ij = L_ij (C_iᵀ B_j) Δ_j  (i ≥ j),   L_ij = exp(Δ_{j+1} A + ⋯ + Δ_i A),

        so that the SSD's output is y[:, :, h] = M[:, h] @ x[:, :, h] + D_h x[:, :, h]
        (``ssd.matrix``).  It excludes the conv, the gate z and the D skip (math.md §6).
        """
        self._check_sequence("hidden_attention", u)
        _, _, inputs = self._mixer_inputs(u)
        return ssd.matrix(inputs.dt, inputs.A, inputs.B, inputs.C)


class TinyLM(nn.Module):
    """A small residual language model around one kind of block (``block_type``, set by a subclass):

        h_0 = embedding(tokens)                           tokens [B, T] (int) → h [B, T, d_model]
        h_l = h_{l−1} + block_l(RMSNorm_l(h_{l−1}))       l = 1 … n_layers   (pre-norm residual)
        logits = head(RMSNorm(h_L))                       [B, T, vocab_size]

    ``tie_embeddings`` shares the head's weight with the embedding; the embedding is initialised
    N(0, 0.02²) as in mamba_ssm's language model.  ``block_options`` go to every block.
    """
    block_type: type[nn.Module]

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, *, tie_embeddings: bool = True,
                 norm_eps: float = 1e-5, **block_options):
        super().__init__()
        owner = type(self).__name__
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers)):
            _positive_int(owner, name, value)
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=norm_eps) for _ in range(n_layers))
        self.blocks = nn.ModuleList(self.block_type(d_model, **block_options) for _ in range(n_layers))
        self.final_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embedding.weight

    def _check_tokens(self, fn: str, tokens) -> None:
        where = f"{type(self).__name__}.{fn}"
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: tokens must be an int64 (or int32) tensor [B, T], got "
                             f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"{where}: tokens must have shape [B, T] with T >= 1, got {tuple(tokens.shape)}")
        if tokens.device != self.embedding.weight.device:
            raise ValueError(f"{where}: tokens are on {tokens.device} but the model is on {self.embedding.weight.device}")
        if bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f"{where}: tokens must lie in [0, vocab_size = {self.vocab_size}), "
                             f"got values in [{tokens.min().item()}, {tokens.max().item()}]")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → logits [B, T, vocab_size]."""
        self._check_tokens("forward", tokens)
        h = self.embedding(tokens)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(self.final_norm(h))

    def hidden_attention(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens [B, T] → one [B, H, T, T] per layer: each block's ``hidden_attention`` on the
        (normalised) residual stream that this block reads."""
        self._check_tokens("hidden_attention", tokens)
        h = self.embedding(tokens)
        matrices = []
        for norm, block in zip(self.norms, self.blocks):
            matrices.append(block.hidden_attention(norm(h)))
            h = h + block(norm(h))
        return matrices


class TinyMamba2LM(TinyLM):
    """``TinyLM`` of Mamba-2 blocks: TinyMamba2LM(vocab_size, d_model, n_layers, d_state=16, headdim=16, …)."""
    block_type = Mamba2Block
