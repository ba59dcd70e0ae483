"""Argument checking shared by every public function of lecture_kit.

Each public form passes its arguments through its mixer's spec (``lecture_kit/_spec.py``), which
builds a :class:`Signature`: every tensor argument is bound with the dimension names of design.md
(``"B T H P"``), and the bound sizes come back.  Anything unexpected raises ``ValueError`` naming the
function, the argument and the expected shape, so a wrong call never turns into a silent wrong
answer (or, for the kernels, a Triton crash).  The layers and the other modules use the plain
number checks at the end (``positive_int`` and friends).
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .hardware import check_kernel_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: The dtypes the Triton kernels take for their activations (float64 runs through ``chunked``).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_value_checks = True


class set_value_checks:
    """Turn the checks of input *values* on or off: ``lecture_kit.set_value_checks(False)``, or
    for a block of code ``with lecture_kit.set_value_checks(False): ...``.

    Shapes, dtypes and devices are always checked; they cost nothing.  Values (a log-decay ≤ 0,
    Δ ≥ 0) are checked by default, which takes one reduction per checked tensor and one
    device→host copy per call: on a GPU that synchronises with the device before every kernel
    launch, so the CPU can no longer queue work ahead of the GPU, which costs a microsecond-scale
    kernel a large fraction of its time.  Code whose inputs are valid by construction (a gate made
    by ``logsigmoid``) can switch the checks off, as ``torch.distributions`` lets one switch off
    ``validate_args``.  They are also skipped while ``torch.compile`` traces a function (a sync
    would break the graph).
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


def _log_decay_rule(t):
    return t <= 0                      # −inf (a reset) passes; NaN and +inf fail


def _negative_rule(t):
    return t < 0


def _step_rule(t):
    return (t >= 0) & (t < math.inf)   # finite and ≥ 0; NaN fails both


def _finite_rule(t):
    return torch.isfinite(t)


#: What a sign rule of a spec's argument requires (``Arg.sign``), how it is tested, and what the
#: error says (formatted with the argument's name and the tensor's extremes).
VALUE_RULES = {
    "<= 0": (_log_decay_rule,
             "{name} is a log-decay and must be <= 0 everywhere (max {max:.3g}); pass log(decay), e.g. "
             "-softplus(.) or logsigmoid(.); -inf (decay 0: a reset of the state) is allowed, NaN is not"),
    "< 0": (_negative_rule,
            "{name} must be < 0 everywhere (max {max:.3g}); Mamba-2 parametrises it as A = -exp(A_log); "
            "-inf is allowed, NaN is not"),
    ">= 0": (_step_rule,
             "{name} must be finite and >= 0 everywhere (min {min:.3g}, max {max:.3g})"),
    "finite": (_finite_rule, "{name} must be finite everywhere (min {min:.3g}, max {max:.3g})"),
}


class Signature:
    """Binds dimension names to sizes across the arguments of one call.

    >>> sig = Signature("ssd.recurrent")
    >>> sig.tensor("x", x, "B T H P")          # binds B, T, H, P
    >>> sig.tensor("dt", dt, "B T H")          # must agree with x on B, T, H

    ``names`` translates the words of a shared kernel into its caller's: ``ssd.kernel`` runs the
    scalar-decay kernel, whose arguments are q, k, v, log_decay and whose sizes are K and V, with
    ``names={"q": "C", "k": "B", "v": "x", "log_decay": "A", "K": "N", "V": "P"}``, so that the
    kernel's own checks (:meth:`term`, :meth:`size`) speak of C, B, x, A, N and P.
    """

    def __init__(self, function: str, names: Mapping[str, str] | None = None):
        self.function = function
        self.names = dict(names or {})
        self.sizes: dict[str, int] = {}
        self._bound_by: dict[str, str] = {}
        self.device: torch.device | None = None
        self._device_from: str | None = None
        self.dtype: torch.dtype | None = None
        self._dtype_from: str | None = None

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.function}: {message}")

    def term(self, name: str) -> str:
        """The caller's word for an argument or dimension ``name`` (see ``names``)."""
        return self.names.get(name, name)

    def size(self, dim: str) -> int:
        """The size bound to dimension ``dim``, in the kernel's words (see ``names``)."""
        return self.sizes[self.term(dim)]

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

    def expect(self, name: str, t: torch.Tensor, **expected: int) -> None:
        """After ``tensor(name, t, ...)``: each named dimension must have the given size (a layer's
        width, say)."""
        for dim, size in expected.items():
            if self.sizes[dim] != size:
                raise self.error(f"{name} must have {dim} = {size}, got shape {tuple(t.shape)}")

    def groups_divide(self, groups: str, heads: str) -> None:
        """Dimension ``groups`` (G ≥ 1) divides dimension ``heads`` (H): head h reads group
        h // (H/G), as grouped-query attention shares its keys."""
        G, H = self.size(groups), self.size(heads)
        if G < 1 or H % G:
            raise self.error(f"the number of groups {self.term(groups)} = {G} (from "
                             f"{self._bound_by[self.term(groups)]}) must divide the number of heads "
                             f"{self.term(heads)} = {H} (from {self._bound_by[self.term(heads)]})")

    def at_least_one(self, dim: str) -> None:
        if self.sizes[dim] < 1:
            raise self.error(f"{dim} must be at least 1, got {self.sizes[dim]} "
                             f"(from {self._bound_by[dim]})")

    def values(self, checks: Sequence[tuple[str, torch.Tensor, str]]) -> None:
        """Check the values of several tensors, each ``(name, tensor, rule)`` with a rule of
        ``VALUE_RULES``, at the cost of one device sync in all; nothing unless value checks are on
        (:class:`set_value_checks`).  The first tensor that breaks its rule is named."""
        checks = [c for c in checks if c[1].numel()]
        if not checks or not value_checks_enabled():
            return
        held = torch.stack([VALUE_RULES[rule][0](t).all() for _, t, rule in checks])
        if bool(held.all()):
            return
        name, t, rule = checks[int((~held).nonzero()[0, 0])]
        raise self.error(VALUE_RULES[rule][1].format(name=name, min=t.min().item(), max=t.max().item()))

    def chunk_size(self, chunk_size) -> int:
        """A positive integer of any integer type: int, a numpy integer or a 0-d integer tensor;
        not a bool, and not a float even when it is whole (16.0)."""
        if isinstance(chunk_size, torch.Tensor):
            integral = chunk_size.dim() == 0 and not chunk_size.is_floating_point() \
                and not chunk_size.is_complex() and chunk_size.dtype != torch.bool
        else:
            integral = isinstance(chunk_size, (numbers.Integral, np.integer)) \
                and not isinstance(chunk_size, (bool, np.bool_))
        if not integral or operator.index(chunk_size) < 1:
            raise self.error(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return operator.index(chunk_size)

    def scalar(self, name: str, value) -> float:
        """A finite real number: a Python or numpy int or float.  Tensors are refused, with or
        without a gradient: the Triton kernels take the value at launch and could not
        differentiate it, so no form takes one (multiply the output instead)."""
        if isinstance(value, torch.Tensor):
            raise self.error(f"{name} must be a Python float, got a tensor; pass float({name}) (every "
                             f"form, the Triton kernel included, takes a number; to learn a scale, "
                             f"multiply the output by it)")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise self.error(f"{name} must be a finite Python float, got {value!r}")
        return float(value)

    def flag(self, name: str, value) -> bool:
        """``True`` or ``False`` (a numpy bool too)."""
        if not isinstance(value, (bool, np.bool_)):
            raise self.error(f"{name} must be True or False, got {value!r}")
        return bool(value)

    # ---- what only the Triton kernels need, in their words (translated by ``names``) ----

    def empty_result(self, v: torch.Tensor, output_final_state: bool):
        """What a kernel returns when its values ``v`` are empty (B, H or V is 0; T and K ≥ 1 are
        checked): the output ``v * 0``, empty and still a function of v for autograd, and the
        empty fp32 state [B, H, K, V] or None.  None when there is something to compute."""
        if v.numel():
            return None
        state = v.new_zeros(*(self.size(d) for d in ("B", "H", "K", "V")), dtype=torch.float32)
        return v * 0, (state if output_final_state else None)

    def kernel_dtype(self) -> None:
        """The activations' dtype is one the Triton kernels take (and, for bf16 on a GPU, one its
        compute capability can multiply: ``hardware.check_kernel_dtype``)."""
        if self.dtype not in KERNEL_DTYPES:
            raise self.error(f"{self._dtype_from} has dtype {self.dtype}; the Triton kernel takes float16, "
                             f"bfloat16 or float32 (use the chunked form for float64)")
        check_kernel_dtype(self.function, self._dtype_from, torch.empty(0, dtype=self.dtype, device=self.device))

    def kernel_head_size(self, dim: str, *, low: int = 16, high: int = 256, zero_ok: bool = False) -> int:
        """A head size the kernel tiles: a power of two in low … high (0 too, with ``zero_ok``:
        the call then has nothing to compute)."""
        size = self.size(dim)
        if not (zero_ok and size == 0) and (size < low or size > high or size & (size - 1)):
            word = self.term(dim)
            raise self.error(f"{word} = {size} (from {self._bound_by[word]}) is not supported by the "
                             f"Triton kernel: it must be a power of two in {low} … {high} (use the "
                             f"chunked form for other sizes)")
        return size

    def kernel_chunk_size(self, chunk_size, allowed: Sequence[int]) -> int:
        C = self.chunk_size(chunk_size)
        if C not in allowed:
            raise self.error(f"chunk_size must be one of {tuple(allowed)} for the Triton kernel, "
                             f"got {chunk_size!r}")
        return C

    def kernel_device(self, interpreted: bool) -> None:
        if self.device.type != "cuda" and not interpreted:
            raise self.error(f"the inputs are on {self.device}: the Triton kernel needs a CUDA device, "
                             f"or TRITON_INTERPRET=1 set before triton is imported (importing "
                             f"lecture_kit does it on a machine without CUDA)")

    def kernel_offsets(self, elements: int) -> None:
        """Offsets inside one batch element must fit in int32."""
        if elements >= 2**31:
            raise self.error(f"T = {self.size('T')} is too long for one call: offsets inside one batch "
                             f"element must fit in int32 ({elements} ≥ 2^31); split the sequence and "
                             f"pass the state along with initial_state")


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


# ---- plain numbers: the arguments of layers, tasks and the vision model ----

def positive_int(owner: str, name: str, value) -> int:
    """``value`` as an int ≥ 1 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def positive_float(owner: str, name: str, value, *, zero_ok: bool = False) -> float:
    """``value`` as a float > 0 (≥ 0 with ``zero_ok``); NaN and bools fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (value >= 0 if zero_ok else value > 0):
        raise ValueError(f"{owner}: {name} must be a {'non-negative' if zero_ok else 'positive'} number, "
                         f"got {value!r}")
    return float(value)


def interval(owner: str, name: str, value) -> tuple[float, float]:
    """``value`` as a pair (low, high) with 0 < low ≤ high."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0 < low <= high:
        raise ValueError(f"{owner}: {name} must be an interval (low, high) with 0 < low <= high, got {value!r}")
    return low, high
