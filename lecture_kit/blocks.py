"""The layers around the mixers, and tiny language models built from them.  Zone 4 of the lecture.

Every layer maps u [B, T, d_model] → [B, T, d_model] and shares one interface (``SequenceLayer``):
``forward`` runs a mixer's parallel (chunked) form, ``prefill`` does the same and returns the cache
that ``step`` continues from one token at a time.  The layers:

    Mamba2Block            SSD                 (Dao & Gu 2024; math.md §1.1)        cache O(1) in t
    MultiScaleRetention    retention           (Sun et al. 2023; math.md §2.1–2.2)  cache O(1) in t
    GLALayer               gated lin. attn.    (Yang et al. 2023; math.md §3.1)     cache O(1) in t
    RWKV7TimeMix           generalised delta   (Peng et al. 2025; math.md §4.1)     cache O(1) in t
    RWKV7ChannelMix        RWKV's feed-forward (math.md §4.1)                      cache O(1) in t
    SoftmaxAttentionLayer  softmax attention   (the baseline)                       cache O(t): the KV cache

``cache_nbytes`` measures a cache; ``TinyLM`` stacks layers of one kind into a language model.

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

from . import gla, retnet, rwkv7, ssd
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


def _positive_float(owner: str, name: str, value, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 if zero_ok else value > 0):
        raise ValueError(f"{owner}: {name} must be a {'non-negative' if zero_ok else 'positive'} number, got {value!r}")
    return float(value)


def _head_dim(owner: str, name: str, expand, d_model: int, n_heads: int, *, even: bool = False) -> int:
    """Channels per head of a projection to expand·d_model channels split into n_heads heads."""
    width = expand * d_model if isinstance(expand, (int, float)) and not isinstance(expand, bool) else float("nan")
    head = width / n_heads
    if not (head >= 1 and head == int(head) and (not even or int(head) % 2 == 0)):
        raise ValueError(f"{owner}: {name} must make {name}·d_model / n_heads a positive {'even ' if even else ''}"
                         f"integer (d_model = {d_model}, n_heads = {n_heads}), got {name} = {expand!r}")
    return int(head)


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


# ---- the pieces the layers share ----

class SSDInputs(NamedTuple):
    """The positional inputs of ``lecture_kit.ssd``'s forms, as the block computes them."""
    x: torch.Tensor     # [B, T, H, P]
    dt: torch.Tensor    # [B, T, H], Δ > 0, fp32 (fp64)
    A: torch.Tensor     # [H], < 0, fp32 (fp64)
    B: torch.Tensor     # [B, T, G, N]
    C: torch.Tensor     # [B, T, G, N]


class RWKV7Inputs(NamedTuple):
    """The positional inputs of ``lecture_kit.rwkv7``'s forms, as ``RWKV7TimeMix`` computes them."""
    r: torch.Tensor     # [B, T, H, N]  receptance (the query)
    w: torch.Tensor     # [B, T, H, N]  log decay = −e^{−1/2} σ(·) ∈ (−0.61, 0), fp32 (fp64)
    k: torch.Tensor     # [B, T, H, N]  replacement key k̃
    v: torch.Tensor     # [B, T, H, N]
    a: torch.Tensor     # [B, T, H, N]  −κ̂
    b: torch.Tensor     # [B, T, H, N]  κ̂ ∘ a_icl


class Mamba2Cache(NamedTuple):
    """What a Mamba-2 block remembers between tokens at inference: O(1) in the sequence length."""
    conv_state: torch.Tensor   # [B, E + 2GN, d_conv − 1]: the last d_conv − 1 inputs of the conv, oldest first
    ssm_state: torch.Tensor    # [B, H, P, N]: h_t, fp32 (fp64)


class RecurrentCache(NamedTuple):
    """What a retention, GLA or RWKV-7 layer remembers between tokens: O(1) in the sequence length."""
    state: torch.Tensor | None   # [B, H, K, V]: the mixer's S_t, fp32 (fp64); None for RWKV7ChannelMix
    last: torch.Tensor | None    # [B, d_model]: the input u_t, which the next token shifts in (RWKV-7); else None
    position: int                # t, the tokens seen so far: the next token's rotary phase (retention)


class KVCache(NamedTuple):
    """What softmax attention remembers: every key and value so far, O(t) in the sequence length."""
    keys: torch.Tensor     # [B, t, H, D], rotated
    values: torch.Tensor   # [B, t, H, D]


def cache_nbytes(cache: tuple) -> int:
    """Bytes that one layer's cache holds (its tensors; the position counter is not counted).

    Constant in t for the recurrent layers (e.g. 4·B·H·K·V for a retention state in fp32);
    2·B·t·H·D·itemsize for ``SoftmaxAttentionLayer``'s ``KVCache``.
    """
    return sum(t.nbytes for t in cache if isinstance(t, torch.Tensor))


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding, rotate-every-two (torchscale's ``theta_shift``): x [B, T, H, D],
    positions [T] (int) → [B, T, H, D].

    The token at position n turns each pair of channels (x_{2i}, x_{2i+1}) by the angle n·θ_i:

        (x_{2i}, x_{2i+1}) ↦ (x_{2i} cos nθ_i − x_{2i+1} sin nθ_i,  x_{2i+1} cos nθ_i + x_{2i} sin nθ_i),
        θ_i = base^{−i/(D/2 − 1)},  i = 0 … D/2 − 1                (torchscale: linspace(0, 1, D/2))

    so that ⟨rot_n q, rot_m k⟩ depends on n − m only.  These frequencies are torchscale's RetNet ones,
    not RoFormer's base^{−2i/D}.  No xPos length scale: in RetNet the decay γ^{n−m} plays its role.
    D must be even.  Computed in fp32 (fp64) and returned in x's dtype.
    """
    sig = Signature("rotary")
    sig.tensor("x", x, "B T H D")
    if sig.sizes["D"] % 2:
        raise sig.error(f"x must have an even D (pairs of channels turn together), got shape {tuple(x.shape)}")
    if (not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex()
            or tuple(positions.shape) != (sig.sizes["T"],)):
        raise sig.error(f"positions must be an int tensor [T={sig.sizes['T']}], got "
                        f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    f = compute_dtype(x.dtype)
    theta = base ** -torch.linspace(0, 1, x.shape[-1] // 2, dtype=f, device=x.device)     # [D/2]
    angle = positions.to(f)[:, None, None] * theta                                       # [T, 1, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    even, odd = x.to(f)[..., 0::2], x.to(f)[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2).to(x.dtype)


def token_shift(u: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """u [B, T, C] → u delayed by one token [B, T, C]: row t holds u_{t−1}, row 0 holds ``previous``
    [B, C] (the last token of what came before; zeros, RWKV's padding, for an empty past)."""
    sig = Signature("token_shift")
    sig.tensor("u", u, "B T C")
    sig.optional("previous", previous, "B C")
    first = torch.zeros_like(u[:, :1]) if previous is None else previous[:, None]
    return torch.cat([first, u[:, :-1]], dim=1)


class Mixer(nn.Module):
    """One of lecture_kit's token mixers as a module without parameters: ``mixer(*inputs, **options)``
    = ``forms.kernel`` (Triton) when the inputs are on a GPU and not fp64, else ``forms.chunked``
    (the kernel's own limits on head sizes and chunk_size then apply).  ``forms`` is the mixer's
    module (``ssd``, ``retnet``, ``gla``, ``rwkv7``); ``inputs`` its positional inputs, in its order.

    Being a module, it can be hooked (``register_forward_hook``) to read the mixer's exact inputs and
    output inside a model.  The layers' ``step`` calls ``forms.recurrent`` on one token instead.
    """

    def __init__(self, forms, chunk_size: int = 64):
        super().__init__()
        self.forms = forms
        self.chunk_size = _positive_int(type(self).__name__, "chunk_size", chunk_size)

    def forward(self, *inputs, **options):
        first = inputs[0]
        use_kernel = first.is_cuda and first.dtype != torch.float64 and hasattr(self.forms, "kernel")
        form = self.forms.kernel if use_kernel else self.forms.chunked
        return form(*inputs, chunk_size=self.chunk_size, **options)

    def extra_repr(self) -> str:
        return f"{self.forms.__name__.rsplit('.', 1)[-1]}, chunk_size={self.chunk_size}"


class SSD(Mixer):
    """The SSD as a module without parameters: (y, final state) = SSD(x, Δ, A, B, C, D=D) = M x + D x."""

    def __init__(self, chunk_size: int = 64):
        super().__init__(ssd, chunk_size)


class HeadNorm(nn.Module):
    """Normalise each head's channels on their own: y [..., H·D] → [..., H·D] (a "GroupNorm" with H groups).

        kind="rms":     ŷ = y / √(mean(y²) + eps)                      (RetNet, GLA, Mamba-2's groups)
        kind="layer":   ŷ = (y − mean(y)) / √(var(y) + eps)            (RWKV-7's GroupNorm(H, H·D))

    the mean and variance taken over the D channels of one head; then, with ``affine``, ŷ ∘ weight
    (+ bias, for "layer"), one weight per channel.  Computed in fp32 (fp64), returned in y's dtype.
    """

    def __init__(self, n_heads: int, head_dim: int, *, kind: str = "rms", affine: bool = True, eps: float = 1e-5):
        super().__init__()
        owner = type(self).__name__
        self.n_heads = _positive_int(owner, "n_heads", n_heads)
        self.head_dim = _positive_int(owner, "head_dim", head_dim)
        if kind not in ("rms", "layer"):
            raise ValueError(f"{owner}: kind must be 'rms' or 'layer', got {kind!r}")
        self.kind, self.eps = kind, _positive_float(owner, "eps", eps, zero_ok=True)
        dim = n_heads * head_dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and kind == "layer" else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        f = compute_dtype(y.dtype)
        normalise = F.rms_norm if self.kind == "rms" else F.layer_norm
        out = normalise(y.to(f).unflatten(-1, (self.n_heads, self.head_dim)), (self.head_dim,), eps=self.eps)
        out = out.flatten(-2)
        if self.weight is not None:
            out = out * self.weight.to(f)
        if self.bias is not None:
            out = out + self.bias.to(f)
        return out.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.n_heads}, {self.head_dim}, kind={self.kind!r}, affine={self.weight is not None}, eps={self.eps}"


class GatedRMSNorm(HeadNorm):
    """out = RMSNorm(y ∘ SiLU(z)) · weight, the RMS taken over groups of ``group_size`` channels.

    Shapes: y, z [..., dim] → [..., dim].  Gate first, then normalise (mamba_ssm's RMSNormGated with
    norm_before_gate=False); with G groups of B/C the block normalises each group's E/G channels
    separately.  Computed in fp32 (fp64) and returned in y's dtype.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size = {group_size} must divide dim = {dim}")
        super().__init__(dim // group_size, group_size, kind="rms", eps=eps)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        f = compute_dtype(y.dtype)
        return super().forward(y.to(f) * F.silu(z.to(f))).to(y.dtype)


def _zero_state(projection: nn.Linear, batch: int, heads: int, key_dim: int, value_dim: int) -> torch.Tensor:
    """An empty matrix state [B, H, K, V] on the layer's device, fp32 (fp64 for an fp64 layer)."""
    w = projection.weight
    return w.new_zeros(batch, heads, key_dim, value_dim, dtype=compute_dtype(w.dtype))


class SequenceLayer(nn.Module):
    """What the layers of this module share: u [B, T, d_model] → out [B, T, d_model], in two ways.

        forward(u)               the parallel pass (the mixer's chunked form; its kernel on a GPU)
        prefill(u)               the same, plus the cache that ``step`` continues from
        step(u_t, cache=None)    one token u_t [B, d_model] → (out_t [B, d_model], the cache one token on)

    ``cache=None`` starts from an empty sequence; prefill followed by steps gives ``forward``'s outputs.
    A subclass sets ``d_model`` and implements ``_sequence(u, output_cache)`` → (out, cache or None),
    ``_step(u_t, cache)`` → (out_t, cache) and ``_empty_cache(batch)``, the cache before any token;
    a given cache is checked against that one (same fields, shapes, dtypes, device).
    """
    d_model: int
    #: The dimension of the cache's tensors that grows with t (the KV cache's time), or None.
    _growing_dim: int | None = None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, T, d_model] → out [B, T, d_model]."""
        self._check_sequence("forward", u)
        return self._sequence(u, output_cache=False)[0]

    def prefill(self, u: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """``forward`` over a prompt u [B, T, d_model], plus the cache that ``step`` continues from."""
        self._check_sequence("prefill", u)
        return self._sequence(u, output_cache=True)

    def step(self, u_t: torch.Tensor, cache: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """One token: u_t [B, d_model] → (out_t [B, d_model], the cache advanced by one token)."""
        sig = Signature(f"{type(self).__name__}.step")
        sig.tensor("u_t", u_t, "B d_model")
        _expect_sizes(sig, "u_t", u_t, d_model=self.d_model)
        self._check_like_parameters(sig, "u_t", u_t)
        empty = self._empty_cache(u_t.shape[0])
        return self._step(u_t, empty if cache is None else self._check_cache(sig, cache, empty))

    def _check_sequence(self, fn: str, u) -> Signature:
        sig = Signature(f"{type(self).__name__}.{fn}")
        sig.tensor("u", u, "B T d_model")
        if sig.sizes["T"] < 1:
            raise sig.error(f"u must hold at least one token (T >= 1), got shape {tuple(u.shape)}")
        _expect_sizes(sig, "u", u, d_model=self.d_model)
        self._check_like_parameters(sig, "u", u)
        return sig

    def _check_like_parameters(self, sig: Signature, name: str, t: torch.Tensor) -> None:
        weight = next(self.parameters())
        if t.dtype != weight.dtype or t.device != weight.device:
            raise sig.error(f"{name} is {t.dtype} on {t.device} but the layer's parameters are {weight.dtype} "
                            f"on {weight.device}; move one to the other (layer.to(...))")

    def _check_cache(self, sig: Signature, cache, empty: tuple) -> tuple:
        kind = type(empty)
        if not isinstance(cache, tuple) or len(cache) != len(empty):
            raise sig.error(f"cache must be a {kind.__name__}({', '.join(kind._fields)}) or None, "
                            f"got {type(cache).__name__}")
        cache = kind(*cache)
        lengths = set()
        for field, want, got in zip(kind._fields, empty, cache):
            name = f"cache.{field}"
            if want is None:
                if got is not None:
                    raise sig.error(f"{name} must be None for a {type(self).__name__}, got {type(got).__name__}")
            elif isinstance(want, int):
                if isinstance(got, bool) or not isinstance(got, int) or got < 0:
                    raise sig.error(f"{name} must be a non-negative int, got {got!r}")
            else:
                shape = ["t" if d == self._growing_dim else str(n) for d, n in enumerate(want.shape)]
                if (not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.device != want.device
                        or got.dim() != want.dim()
                        or any(s != "t" and n != m for s, n, m in zip(shape, got.shape, want.shape))):
                    got_text = (f"{got.dtype} of shape {tuple(got.shape)} on {got.device}"
                                if isinstance(got, torch.Tensor) else type(got).__name__)
                    raise sig.error(f"{name} must be {want.dtype} of shape [{', '.join(shape)}] on {want.device}, "
                                    f"got {got_text}")
                if self._growing_dim is not None:
                    lengths.add(got.shape[self._growing_dim])
        if len(lengths) > 1:
            raise sig.error(f"cache fields must hold the same number of tokens, got {sorted(lengths)}")
        return cache


# ---- the layers ----

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
        (``ssd.matrix``).  It excludes the conv, the gate z and the D skip (math.md §6).
        """
        self._check_sequence("hidden_attention", u)
        _, _, inputs = self._mixer_inputs(u)
        return ssd.matrix(inputs.dt, inputs.A, inputs.B, inputs.C)


class MultiScaleRetention(SequenceLayer):
    """RetNet's multi-scale retention (Sun et al. 2023, §2.2; math.md §2.1–2.2): u [B, T, d_model] → same.

        q, k = rotary(u W_q), rotary(u W_k)          [B, T, H, K]   token n turned by n·θ (``rotary``)
        v, g = u W_v, u W_g                           [B, T, H, V],  [B, T, H·V]
        o = Retention(q, k, v; γ)                     S_n = γ_h S_{n−1} + k_n v_nᵀ,  o_n = K^{−1/2} S_nᵀ q_n
        out = (swish(g) ∘ GroupNorm(o)) W_o           GroupNorm: RMSNorm over each head's V channels, no affine

    with a fixed decay per head, γ_h = 1 − 2^{−5−h} (h = 0 … H−1), passed to ``lecture_kit.retnet`` as
    ``log_gamma``; K = expand_k·d_model/H (even, for the rotation) and V = expand_v·d_model/H
    (torchscale's and fla's defaults: expand_k = 1, expand_v = 2).  No biases.

    Against torchscale's ``MultiScaleRetention``: the same rotation (``theta_shift``, whose frequencies
    ``rotary`` states) and RMSNorm(elementwise_affine=False) group norm; its k·K^{−1/2} is our score
    scale.  We omit the paper's score normalisations (math.md §2.2): they are per-row positive
    scalings that the group norm removes up to its eps, and leaving them out makes forward, prefill and
    step compute exactly the same function.  The cache is a ``RecurrentCache(S [B, H, K, V], None, t)``:
    t is the position, hence the rotation, of the next token.
    """

    def __init__(self, d_model: int, n_heads: int, *, expand_k: float = 1, expand_v: float = 2,
                 chunk_size: int = 64, norm_eps: float = 1e-6):
        super().__init__()
        owner = type(self).__name__
        self.d_model = _positive_int(owner, "d_model", d_model)
        self.n_heads = _positive_int(owner, "n_heads", n_heads)
        self.key_dim = _head_dim(owner, "expand_k", expand_k, d_model, n_heads, even=True)      # K
        self.value_dim = _head_dim(owner, "expand_v", expand_v, d_model, n_heads)               # V
        H, K, V = n_heads, self.key_dim, self.value_dim
        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, H * K, bias=False)
        self.v_proj = nn.Linear(d_model, H * V, bias=False)
        self.g_proj = nn.Linear(d_model, H * V, bias=False)
        self.mixer = Mixer(retnet, chunk_size)
        norm_eps = _positive_float(owner, "norm_eps", norm_eps, zero_ok=True)
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
        return RecurrentCache(_zero_state(self.q_proj, batch, self.n_heads, self.key_dim, self.value_dim), None, 0)

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The retention matrices [B, H, T, T] for input u [B, T, d_model]: M_nm = K^{−1/2} q_nᵀ k_m γ^{n−m}
        (n ≥ m), so that o[:, :, h] = M[:, h] @ v[:, :, h] before the group norm (``retnet.matrix``)."""
        self._check_sequence("hidden_attention", u)
        q, k, _ = self._mixer_inputs(u, 0)
        return retnet.matrix(q, k, self.log_gamma)


class GLALayer(SequenceLayer):
    """The gated linear attention layer (Yang et al. 2023; fla's ``GatedLinearAttention``; math.md §3.1):
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
        self.d_model = _positive_int(owner, "d_model", d_model)
        self.n_heads = _positive_int(owner, "n_heads", n_heads)
        self.key_dim = _head_dim(owner, "expand_k", expand_k, d_model, n_heads)       # K
        self.value_dim = _head_dim(owner, "expand_v", expand_v, d_model, n_heads)     # V
        _positive_int(owner, "gate_low_rank", gate_low_rank)
        self.gate_temperature = _positive_float(owner, "gate_temperature", gate_temperature)
        H, K, V = n_heads, self.key_dim, self.value_dim
        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, H * K, bias=False)
        self.v_proj = nn.Linear(d_model, H * V, bias=False)
        self.gate_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank, bias=False), nn.Linear(gate_low_rank, H * K))
        self.r_proj = nn.Linear(d_model, H * V, bias=False)
        self.mixer = Mixer(gla, chunk_size)
        self.norm = HeadNorm(H, V, kind="rms", eps=_positive_float(owner, "norm_eps", norm_eps, zero_ok=True))
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
        return RecurrentCache(_zero_state(self.q_proj, batch, self.n_heads, self.key_dim, self.value_dim), None, 0)

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The GLA matrices [B, H, T, T] for input u: P_ij = K^{−1/2} Σ_d q_id k_jd exp(b_id − b_jd) (j ≤ i),
        b = cumsum(log α), so that o[:, :, h] = P[:, h] @ v[:, :, h] before the norm (``gla.matrix``)."""
        self._check_sequence("hidden_attention", u)
        q, k, _, g = self._mixer_inputs(u)
        return gla.matrix(q, k, g)


def _rwkv_rank(d_model: int, factor: float) -> int:
    """RWKV-7's suggested LoRA rank: max(32, round(factor·√d_model / 32)·32)."""
    return max(32, int(round(factor * d_model ** 0.5 / 32)) * 32)


def _rwkv_layer_ratios(owner: str, layer_id, n_layers) -> tuple[float, float]:
    """RWKV's depth-dependent initialisation: (layer_id / (n_layers − 1), 1 − layer_id / n_layers)."""
    _positive_int(owner, "n_layers", n_layers)
    if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < n_layers:
        raise ValueError(f"{owner}: layer_id must be an int in [0, n_layers = {n_layers}), got {layer_id!r}")
    return layer_id / max(n_layers - 1, 1), 1 - layer_id / n_layers


def _rwkv_mix_init(d_model: int, powers: torch.Tensor) -> torch.Tensor:
    """Token-shift lerps μ = 1 − (c / d_model)^p for channels c = 0 … d_model − 1: [len(powers), d_model]."""
    return 1 - (torch.arange(d_model) / d_model)[None, :] ** powers[:, None]


class RWKV7TimeMix(SequenceLayer):
    """RWKV-7's time mixing (Peng et al. 2025; ``RWKV_Tmix_x070`` of BlinkDL's rwkv_v7_demo.py; math.md §4.1):
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
        self.d_model = _positive_int(owner, "d_model", d_model)
        self.n_heads = _positive_int(owner, "n_heads", n_heads)
        self.head_size = _positive_int(owner, "head_size", head_size)
        ratio_0_to_1, ratio_1_to_0 = _rwkv_layer_ratios(owner, layer_id, n_layers)
        ranks = {name: _rwkv_rank(d_model, f) if r is None else _positive_int(owner, name, r)
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
        self.norm = HeadNorm(H, N, kind="layer", eps=_positive_float(owner, "norm_eps", norm_eps, zero_ok=True))
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
        state = _zero_state(self.r_proj, batch, self.n_heads, self.head_size, self.head_size)
        return RecurrentCache(state, self.r_proj.weight.new_zeros(batch, self.d_model), 0)

    def hidden_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The WKV matrices [B, H, T, T] for input u: A_tj = r_tᵀ G_t ⋯ G_{j+1} k̃_j (j ≤ t),
        G_s = diag(e^{w_s}) + b_s a_sᵀ, so that o[:, :, h] = A[:, h] @ v[:, :, h] before the norm and
        the bonus (``rwkv7.matrix``)."""
        self._check_sequence("hidden_attention", u)
        r, w, k, _, a, b = self._mixer_inputs(u, None)[0]
        return rwkv7.matrix(r, w, k, a, b)


class RWKV7ChannelMix(SequenceLayer):
    """RWKV-7's channel mixing, its feed-forward (``RWKV_CMix_x070``; math.md §4.1): u [B, T, d_model] → same.

        x^k = u_t + (u_{t−1} − u_t) ∘ μ_k               token shift, one static lerp
        out = relu(x^k W_k)² W_v                        W_k: d_model → expand·d_model (squared ReLU)

    Initialisation as the reference (μ_k = 1 − (c/d_model)^{(1 − layer_id/n_layers)⁴}, W_k uniform
    ±0.5/√d_model) except W_v, which it zeroes: PyTorch's default here.  The cache is a
    ``RecurrentCache(None, u_t [B, d_model], t)``: just the last input.
    """

    def __init__(self, d_model: int, expand: int = 4, *, layer_id: int = 0, n_layers: int = 1):
        super().__init__()
        owner = type(self).__name__
        self.d_model = _positive_int(owner, "d_model", d_model)
        _positive_int(owner, "expand", expand)
        _, ratio_1_to_0 = _rwkv_layer_ratios(owner, layer_id, n_layers)
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
        self.d_model = _positive_int(owner, "d_model", d_model)
        self.n_heads = _positive_int(owner, "n_heads", n_heads)
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


# ---- language models ----

class TinyLM(nn.Module):
    """A small residual language model around one kind of block (``block_type``, set by a subclass):

        h_0 = embedding(tokens)                           tokens [B, T] (int) → h [B, T, d_model]
        h ← h + block(RMSNorm(h))                         for each block, in order   (pre-norm residual)
        logits = head(RMSNorm(h))                         [B, T, vocab_size]

    Each of the ``n_layers`` layers holds one block (two for RWKV-7: time mix, then channel mix;
    a subclass may override ``_layer``).  ``tie_embeddings`` shares the head's weight with the
    embedding; the embedding is initialised N(0, 0.02²) as in mamba_ssm's language model.
    ``block_options`` go to every block.

    Inference: ``prefill(tokens)`` returns the logits and one cache per block; ``step(token, caches)``
    advances every block by one token (``cache_nbytes`` of each cache: its memory).
    """
    block_type: type[SequenceLayer]

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, *, tie_embeddings: bool = True,
                 norm_eps: float = 1e-5, **block_options):
        super().__init__()
        owner = type(self).__name__
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers)):
            _positive_int(owner, name, value)
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(block for layer_id in range(n_layers)
                                    for block in self._layer(d_model, layer_id, n_layers, **block_options))
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=norm_eps) for _ in self.blocks)
        self.final_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embedding.weight

    def _layer(self, d_model: int, layer_id: int, n_layers: int, **block_options) -> list[SequenceLayer]:
        """The blocks of layer ``layer_id``, each to sit in its own pre-norm residual: one ``block_type``."""
        return [self.block_type(d_model, **block_options)]

    def _check_tokens(self, fn: str, tokens, name: str = "tokens", dims: str = "B T") -> None:
        where, shape = f"{type(self).__name__}.{fn}", f"[{', '.join(dims.split())}]"
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: {name} must be an int64 (or int32) tensor {shape}, got "
                             f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.dim() != len(dims.split()) or tokens.numel() == 0:
            raise ValueError(f"{where}: {name} must have shape {shape}, non-empty, got {tuple(tokens.shape)}")
        if tokens.device != self.embedding.weight.device:
            raise ValueError(f"{where}: {name} are on {tokens.device} but the model is on "
                             f"{self.embedding.weight.device}")
        if bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f"{where}: {name} must lie in [0, vocab_size = {self.vocab_size}), "
                             f"got values in [{tokens.min().item()}, {tokens.max().item()}]")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → logits [B, T, vocab_size]."""
        self._check_tokens("forward", tokens)
        h = self.embedding(tokens)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(self.final_norm(h))

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """``forward`` over a prompt tokens [B, T], plus one cache per block for ``step``."""
        self._check_tokens("prefill", tokens)
        h, caches = self.embedding(tokens), []
        for norm, block in zip(self.norms, self.blocks):
            out, cache = block.prefill(norm(h))
            h = h + out
            caches.append(cache)
        return self.head(self.final_norm(h)), caches

    def step(self, token: torch.Tensor, caches: list[tuple] | None = None) -> tuple[torch.Tensor, list[tuple]]:
        """One token per sequence: token [B] (int) → (logits [B, vocab_size], the caches one token on).
        ``caches=None`` starts from an empty sequence; else the list ``prefill`` or ``step`` returned."""
        self._check_tokens("step", token, name="token", dims="B")
        if caches is None:
            caches = [None] * len(self.blocks)
        elif not isinstance(caches, list) or len(caches) != len(self.blocks):
            raise ValueError(f"{type(self).__name__}.step: caches must be None or the list of {len(self.blocks)} "
                             f"caches, one per block, that prefill or step returned, got {type(caches).__name__}"
                             f"{f' of length {len(caches)}' if isinstance(caches, list) else ''}")
        h, advanced = self.embedding(token), []
        for norm, block, cache in zip(self.norms, self.blocks, caches):
            out, cache = block.step(norm(h), cache)
            h = h + out
            advanced.append(cache)
        return self.head(self.final_norm(h)), advanced

    def hidden_attention(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens [B, T] → one [B, H, T, T] per token-mixing block: each block's ``hidden_attention`` on
        the (normalised) residual stream that this block reads (blocks without one, RWKV-7's channel
        mixes, are skipped)."""
        self._check_tokens("hidden_attention", tokens)
        h = self.embedding(tokens)
        matrices = []
        for norm, block in zip(self.norms, self.blocks):
            if hasattr(block, "hidden_attention"):
                matrices.append(block.hidden_attention(norm(h)))
            h = h + block(norm(h))
        return matrices


class TinyMamba2LM(TinyLM):
    """``TinyLM`` of Mamba-2 blocks: TinyMamba2LM(vocab_size, d_model, n_layers, d_state=16, headdim=16, …)."""
    block_type = Mamba2Block


class TinyRetNetLM(TinyLM):
    """``TinyLM`` of multi-scale retention layers: TinyRetNetLM(vocab_size, d_model, n_layers, n_heads=2, …)."""
    block_type = MultiScaleRetention


class TinyGLALM(TinyLM):
    """``TinyLM`` of GLA layers: TinyGLALM(vocab_size, d_model, n_layers, n_heads=2, …)."""
    block_type = GLALayer


class TinyAttentionLM(TinyLM):
    """``TinyLM`` of softmax attention layers, without MLPs like the others:
    TinyAttentionLM(vocab_size, d_model, n_layers, n_heads=2)."""
    block_type = SoftmaxAttentionLayer


class TinyRWKV7LM(TinyLM):
    """``TinyLM`` of RWKV-7 layers, each a time mix then a channel mix in their own pre-norm residuals
    (RWKV's LayerNorms are RMSNorms here, and there is no ln0 after the embedding):
    TinyRWKV7LM(vocab_size, d_model, n_layers, n_heads=2, head_size=8, ffn_expand=4, …).
    ``ffn_expand`` goes to the channel mixes, the other options to the time mixes; each layer gets
    its ``layer_id`` for RWKV's depth-dependent initialisation."""

    def _layer(self, d_model, layer_id, n_layers, *, ffn_expand: int = 4, **block_options):
        return [RWKV7TimeMix(d_model, layer_id=layer_id, n_layers=n_layers, **block_options),
                RWKV7ChannelMix(d_model, ffn_expand, layer_id=layer_id, n_layers=n_layers)]
