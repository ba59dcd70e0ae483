"""Argument checking shared by every public function of lecture_kit.

Each public form builds a :class:`Signature`, passes every tensor argument through it with the
dimension names of design.md (``"B T H P"``), and gets back the bound sizes.  Anything unexpected
raises ``ValueError`` naming the function, the argument and the expected shape, so a wrong call never
turns into a silent wrong answer (or, for the kernels, a Triton crash).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_value_checks = True


class set_value_checks:
    """Turn the checks of input *values* on or off: ``lecture_kit.set_value_checks(False)``, or
    for a block of code ``with lecture_kit.set_value_checks(False): ...``.

    Shapes, dtypes and devices are always checked; they cost nothing.  Values (a log-decay ≤ 0,
    Δ ≥ 0) are checked by default, which takes one reduction and one device→host copy per checked
    tensor: on a GPU that synchronises with the device before every kernel launch, so the CPU can
    no longer queue work ahead of the GPU, which costs a microsecond-scale kernel a large fraction
    of its time.  Code whose inputs are valid by construction (a gate made by ``logsigmoid``) can
    switch the checks off, as ``torch.distributions`` lets one switch off ``validate_args``.  They
    are also skipped while ``torch.compile`` traces a function (a sync would break the graph).
    """

    def __init__(self, enabled: bool):
        global _value_checks
        if not isinstance(enabled, bool):
            raise ValueError(f"set_value_checks: enabled must be True or False, got {enabled!r}")
        self.previous, _value_checks = _value_checks, enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _value_checks
        _value_checks = self.previous


def value_checks_enabled() -> bool:
    """Whether values are checked now (see :class:`set_value_checks`)."""
    return _value_checks and not torch.compiler.is_compiling()


class Signature:
    """Binds dimension names to sizes across the arguments of one call.

    >>> sig = Signature("ssd.recurrent")
    >>> sig.tensor("x", x, "B T H P")          # binds B, T, H, P
    >>> sig.tensor("dt", dt, "B T H")          # must agree with x on B, T, H
    """

    def __init__(self, function: str):
        self.function = function
        self.sizes: dict[str, int] = {}
        self._bound_by: dict[str, str] = {}
        self.device: torch.device | None = None
        self._device_from: str | None = None
        self.dtype: torch.dtype | None = None
        self._dtype_from: str | None = None

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.function}: {message}")

    def _shape_text(self, dims: list[str]) -> str:
        return "[" + ", ".join(f"{d}={self.sizes[d]}" if d in self.sizes else d for d in dims) + "]"

    def tensor(self, name: str, t, dims: str, *, same_dtype: bool = True) -> torch.Tensor:
        """Check ``t`` has the named dims, a floating dtype and this call's device.

        ``same_dtype=True`` for the activations (q, k, v, x, B, C, ...), which must share one dtype;
        parameters and gates (dt, A, g, D, initial_state) may be kept in another float dtype,
        e.g. fp32 decays beside bf16 activations, as the fast kernels expect.
        """
        dim_list = dims.split()
        if not isinstance(t, torch.Tensor):
            raise self.error(f"{name} must be a torch.Tensor of shape {self._shape_text(dim_list)}, "
                             f"got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise self.error(f"{name} must be floating point (float16, bfloat16, float32 or float64), "
                             f"got {t.dtype}")
        if t.dim() != len(dim_list):
            raise self.error(f"{name} must have shape {self._shape_text(dim_list)} "
                             f"({len(dim_list)} dims), got {tuple(t.shape)}")
        for d, size in zip(dim_list, t.shape):
            if d in self.sizes and self.sizes[d] != size:
                raise self.error(f"{name} must have shape {self._shape_text(dim_list)} "
                                 f"({d} = {self.sizes[d]} from {self._bound_by[d]}), got {tuple(t.shape)}")
            self.sizes.setdefault(d, size)
            self._bound_by.setdefault(d, name)
        if self.device is None:
            self.device, self._device_from = t.device, name
        elif t.device != self.device:
            raise self.error(f"{name} is on {t.device} but {self._device_from} is on {self.device}; "
                             f"put all inputs on one device")
        if same_dtype:
            if self.dtype is None:
                self.dtype, self._dtype_from = t.dtype, name
            elif t.dtype != self.dtype:
                raise self.error(f"{name} has dtype {t.dtype} but {self._dtype_from} has {self.dtype}; "
                                 f"pass them in one dtype")
        return t

    def optional(self, name: str, t, dims: str, **kw) -> torch.Tensor | None:
        return None if t is None else self.tensor(name, t, dims, **kw)

    def one_of(self, name: str, t, *alternatives: str) -> torch.Tensor | None:
        """``t`` is None or matches one of several shapes (e.g. ``D`` as ``[H]`` or ``[H, P]``)."""
        if t is None:
            return None
        for dims in alternatives:
            if isinstance(t, torch.Tensor) and t.dim() == len(dims.split()):
                return self.tensor(name, t, dims, same_dtype=False)
        shapes = " or ".join(self._shape_text(d.split()) for d in alternatives)
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise self.error(f"{name} must have shape {shapes}, got {got}")

    def at_least_one(self, dim: str) -> None:
        if self.sizes[dim] < 1:
            raise self.error(f"{dim} must be at least 1, got {self.sizes[dim]}")

    def nonpositive(self, name: str, t: torch.Tensor, what: str = "a log-decay") -> None:
        """Log-decays must be <= 0 (decays in (0, 1]); NaN fails too (a NaN maximum compares false).
        One reduction and one device sync, unless value checks are off (:class:`set_value_checks`)."""
        if value_checks_enabled() and t.numel() and not bool(t.amax() <= 0):
            raise self.error(f"{name} is {what} and must be <= 0 everywhere "
                             f"(max {t.max().item():.3g}); pass log(decay), e.g. -softplus(.) or logsigmoid(.)")

    def nonnegative(self, name: str, t: torch.Tensor) -> None:
        if value_checks_enabled() and t.numel() and not bool(t.amin() >= 0):
            raise self.error(f"{name} must be >= 0 everywhere (min {t.min().item():.3g})")

    def negative(self, name: str, t: torch.Tensor) -> None:
        if value_checks_enabled() and t.numel() and not bool(t.amax() < 0):
            raise self.error(f"{name} must be < 0 everywhere (max {t.max().item():.3g}); "
                             f"Mamba-2 parametrises it as A = -exp(A_log)")

    def chunk_size(self, chunk_size) -> int:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise self.error(f"chunk_size must be a positive int, got {chunk_size!r}")
        return chunk_size

    def scalar(self, name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"{name} must be a Python float, got {type(value).__name__}")
        return float(value)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are computed in fp64 (exact references); everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pad_time(t: torch.Tensor, multiple: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad dimension ``dim`` (time) up to a multiple of ``multiple``.

    The chunked forms pad with zero keys/values and zero log-decays (decay 1): such tokens leave the
    state unchanged and their outputs are cut off, so padding is exact.
    """
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
