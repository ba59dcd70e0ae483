"""What the layers share: the ``SequenceLayer`` interface (forward, prefill, step), the ``Mixer``
module that runs a mixer's chunked form or its kernel, per-head norms, the recurrent cache, rotary
embeddings and ``seeded`` construction."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import Signature, compute_dtype, positive_float, positive_int, set_value_checks
from ._validate import feature_width


def seeded(build, *args, seed: int = 0, **kwargs):
    """``build(*args, **kwargs)`` with torch's global generator seeded by ``seed``, and the caller's
    generator left as it was: ``seeded(TinyMamba2LM, 16, 32, 2, seed=0)`` is the same model every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args, **kwargs)


class RecurrentCache(NamedTuple):
    """What a retention, GLA or RWKV-7 layer remembers between tokens: O(1) in the sequence length."""
    state: torch.Tensor | None   # [B, H, K, V]: the mixer's S_t, fp32 (fp64); None for RWKV7ChannelMix
    last: torch.Tensor | None    # [B, d_model]: the input u_t, which the next token shifts in (RWKV-7); else None
    position: int                # t, the tokens seen so far: the next token's rotary phase (retention)


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


class Mixer(nn.Module):
    """One of lecture_kit's token mixers as a module without parameters: ``mixer(*inputs, **options)``
    = ``forms.kernel`` (Triton) when the inputs are on a GPU and not fp64, else ``forms.chunked``
    (the kernel's own limits on head sizes and chunk_size then apply).  ``forms`` is the mixer's
    module (``ssd``, ``retnet``, ``gla``, ``rwkv7``); ``inputs`` its positional inputs, in its order.

    Being a module, it can be hooked (``register_forward_hook``) to read the mixer's exact inputs and
    output inside a model.  The layers' ``step`` calls ``forms.recurrent`` on one token instead.

    The layers make their decays valid by construction (Δ = softplus(·) ≥ 0, A = −exp(·) < 0,
    logsigmoid gates ≤ 0, RWKV-7's bounded w, RetNet's fixed γ), so the mixer runs without the value
    checks (``lecture_kit.set_value_checks``), which would synchronise with the GPU on every call.
    """

    def __init__(self, forms, chunk_size: int = 64):
        super().__init__()
        self.forms = forms
        self.chunk_size = positive_int(type(self).__name__, "chunk_size", chunk_size)

    def forward(self, *inputs, **options):
        first = inputs[0]
        use_kernel = first.is_cuda and first.dtype != torch.float64 and hasattr(self.forms, "kernel")
        form = self.forms.kernel if use_kernel else self.forms.chunked
        with set_value_checks(False):
            return form(*inputs, chunk_size=self.chunk_size, **options)

    def extra_repr(self) -> str:
        return f"{self.forms.__name__.rsplit('.', 1)[-1]}, chunk_size={self.chunk_size}"


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
        self.n_heads = positive_int(owner, "n_heads", n_heads)
        self.head_dim = positive_int(owner, "head_dim", head_dim)
        if kind not in ("rms", "layer"):
            raise ValueError(f"{owner}: kind must be 'rms' or 'layer', got {kind!r}")
        self.kind, self.eps = kind, positive_float(owner, "eps", eps, zero_ok=True)
        dim = n_heads * head_dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and kind == "layer" else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        feature_width(type(self).__name__, "y", y, self.n_heads * self.head_dim)
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
        sig.expect("u_t", u_t, d_model=self.d_model)
        self._check_like_parameters(sig, "u_t", u_t)
        empty = self._empty_cache(u_t.shape[0])
        return self._step(u_t, empty if cache is None else self._check_cache(sig, cache, empty))

    def _check_sequence(self, fn: str, u) -> Signature:
        sig = Signature(f"{type(self).__name__}.{fn}")
        sig.tensor("u", u, "B T d_model")
        if sig.sizes["T"] < 1:
            raise sig.error(f"u must hold at least one token (T >= 1), got shape {tuple(u.shape)}")
        sig.expect("u", u, d_model=self.d_model)
        self._check_like_parameters(sig, "u", u)
        return sig

    @staticmethod
    def _zero_state(projection: nn.Linear, batch: int, heads: int, key_dim: int, value_dim: int) -> torch.Tensor:
        """An empty matrix state [B, H, K, V] on the layer's device, fp32 (fp64 for an fp64 layer)."""
        w = projection.weight
        return w.new_zeros(batch, heads, key_dim, value_dim, dtype=compute_dtype(w.dtype))

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


