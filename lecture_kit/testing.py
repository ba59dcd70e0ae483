"""Random inputs, error metrics and tolerances shared by the tests and the notebooks' checking cells.

Metric: a scale-aware pair, never an elementwise relative error (outputs cross zero):

    rel_rms = ‖x − ref‖₂ / ‖ref‖₂,        max_abs = max|x − ref| / max|ref|.

The reference is always computed in fp64 from the *same rounded inputs* the tested code saw
(``to_reference``), so the measured error is the tested code's alone.
"""
from __future__ import annotations

import importlib
import math
import numbers
import operator
from typing import NamedTuple

import torch

from ._spec import Draw
from .claims import record, show

#: (rel_rms, max_abs) bounds, by what is being compared.
TOLERANCE = {
    "fp64": (1e-12, 1e-11),          # fp64 forms vs the fp64 recurrence
    "fp32": (1e-5, 1e-5),            # fp32 PyTorch forms (or IEEE-fp32 kernels) vs fp64
    "tf32": (2e-3, 5e-3),            # fp32 kernels whose tl.dot uses TF32
    "half": (5e-3, 2e-2),            # bf16 / fp16 kernels, fp32 accumulation
    "half_grad": (1e-2, 5e-2),       # their gradients
}



def sequential_fp32_bounds(steps: int) -> tuple[float, float]:
    """(rel_rms, max_abs) bounds for an fp32 form that applies ``steps`` updates one after another
    (the token-by-token recurrence).  A contribution n steps old has passed through n rounded
    multiplications by the decay (unit roundoff u = 2⁻²⁴ each), a relative error of up to about n·u,
    which decays close to 1 hardly shrink; so the bound is steps·u, never tighter than
    ``TOLERANCE["fp32"]``.  The chunked and parallel forms need no such allowance: they form every
    decay power directly, as exp of a sum of log-decays."""
    return tuple(max(b, steps * 2.0 ** -24) for b in TOLERANCE["fp32"])


MIXERS = ("ssd", "retnet", "gla", "rwkv7")


class Errors(NamedTuple):
    rel_rms: float
    max_abs: float

    def within(self, bounds) -> bool:
        return self.rel_rms <= bounds[0] and self.max_abs <= bounds[1]


def errors(actual: torch.Tensor, reference: torch.Tensor) -> Errors:
    """Relative RMS error and max-abs error scaled by max|reference|, computed in fp64."""
    a, r = actual.detach().double(), reference.detach().double()
    if a.shape != r.shape:
        raise ValueError(f"errors: shapes differ, {tuple(a.shape)} vs {tuple(r.shape)}")
    scale_rms, scale_max = r.norm(), r.abs().max() if r.numel() else r.new_tensor(0.0)
    diff = a - r
    rel = (diff.norm() / scale_rms).item() if scale_rms > 0 else diff.norm().item()
    mx = (diff.abs().max() / scale_max).item() if scale_max > 0 else (diff.abs().max().item() if diff.numel() else 0.0)
    return Errors(rel, mx)


def check(claim: str, actual: torch.Tensor, reference: torch.Tensor, bounds) -> Errors:
    """Assert that ``actual`` matches ``reference`` within ``bounds`` = (rel_rms, max_abs) or a
    ``TOLERANCE`` key, print a one-line verdict, and return the measured errors."""
    if isinstance(bounds, str):
        bounds = TOLERANCE[bounds]
    e = errors(actual, reference)
    ok = e.within(bounds)
    line = (f"{'✓' if ok else '✗'} {claim}   rel. RMS error {e.rel_rms:.1e} (≤ {bounds[0]:.0e}), "
            f"max error {e.max_abs:.1e} (≤ {bounds[1]:.0e})")
    print(line)
    record(claim, ok, e._asdict(), "≤", dict(zip(Errors._fields, bounds)), device=actual.device)
    assert ok, line
    return e


def check_equal(claim: str, actual, expected):
    """The checking cell of an exact claim (a rank, a count, a byte size): assert equality and print
    one line, ``✓ claim   actual (expected expected)``; integers get thousands separators."""
    show = lambda x: f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else f"{x}"
    ok = actual == expected
    line = f"{'✓' if ok else '✗'} {claim}   {show(actual)} (expected {show(expected)})"
    print(line)
    record(claim, ok, actual, "=", expected)
    assert ok, line


#: The relations ``check_bound`` takes: each one's comparison and the symbol its line prints.
BOUND_RELATIONS = {"<": (operator.lt, "<"), "<=": (operator.le, "≤"),
                   ">": (operator.gt, ">"), ">=": (operator.ge, "≥")}


def check_bound(claim: str, value, relation: str, bound):
    """The checking cell of a claim that one number lies on one side of a bound (a growth factor
    below 8, an accuracy of at least 95%, a largest exponent ≤ 0): assert ``value relation bound``
    for ``relation`` one of ``"<"``, ``"<="``, ``">"``, ``">="``, print one line,
    ``✓ claim   0.98 (< 1)``, and return ``value`` as a Python number.

    ``value`` and ``bound`` are real numbers or one-element tensors; a NaN fails every relation.
    Value and bound are written with as many digits as it takes to tell them apart.
    """
    if relation not in BOUND_RELATIONS:
        raise ValueError(f"relation must be one of {tuple(BOUND_RELATIONS)}, got {relation!r}")
    value, bound = _real("value", value), _real("bound", bound)
    holds, symbol = BOUND_RELATIONS[relation]
    ok = holds(value, bound)
    line = (f"{'✓' if ok else '✗'} {claim}   {show(value, near=bound)} "
            f"({symbol} {show(bound, near=value)})")
    print(line)
    record(claim, ok, value, symbol, bound)
    assert ok, line
    return value


def _real(name: str, x) -> int | float:
    """``x`` as a Python int or float: a real number, or a tensor of one real element."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a real number or a one-element tensor, "
                             f"got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number or a one-element tensor, got {x!r}")
    return int(x) if isinstance(x, numbers.Integral) else float(x)


def to_reference(tree):
    """Cast every floating tensor of a (nested) tuple/list/dict to fp64: the reference's inputs."""
    if isinstance(tree, torch.Tensor):
        return tree.double() if tree.is_floating_point() else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_reference(t) for t in tree)
    if isinstance(tree, dict):
        return {k: to_reference(v) for k, v in tree.items()}
    return tree


def mixer(name: str):
    """The lecture_kit module of a mixer by name: ``mixer("gla") is lecture_kit.gla``."""
    if name not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}, got {name!r}")
    return importlib.import_module(f"lecture_kit.{name}")


def spec(name: str):
    """The ``SPEC`` of a mixer by name (``lecture_kit/_spec.py``)."""
    return mixer(name).SPEC


def random_inputs(name: str, *, batch=2, length=64, heads=2, key_dim=16, value_dim=16, groups=None,
                  gate="weak", decay=None, dtype=torch.float64, initial_state=False, seed=0, device="cpu"):
    """Seeded random inputs for one mixer, in its positional order, plus its keyword arguments.

    Returns ``(args, kwargs)`` so that ``mixer(name).recurrent(*args, **kwargs)`` runs.  ``key_dim``
    is K (N for SSD), ``value_dim`` is V (P for SSD); ``groups`` is SSD's G (default 1).
    ``gate="weak"`` gives decays near 1 (long memory, as at initialisation); ``"strong"`` gives
    decays far below 1 (large negative log-decays), which stress every exp and cumsum.
    ``decay`` (a float > 0), when given, is a continuous strength instead: the drawn log-decays are
    rescaled so that their mean magnitude per token is ``decay``, i.e. mean |ℓ_t| = decay with
    ℓ = Δ·A for SSD (A is rescaled, Δ kept), log γ for RetNet, g for GLA and w for RWKV-7.  The
    shape of the draw (which heads or channels forget faster) is that of ``gate``.
    What is drawn is each mixer's ``SPEC.sample``; the activations are cast to ``dtype``, the
    decays, gates and parameters to fp32 (fp64 for fp64), as in the layers, following the spec.
    """
    if gate not in ("weak", "strong"):
        raise ValueError(f"gate must be 'weak' or 'strong', got {gate!r}")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay > 0):
        raise ValueError(f"decay must be a float > 0 (mean |log-decay| per token), got {decay!r}")
    s = spec(name)
    if groups is not None and "G" not in " ".join(a.dims for a in s.inputs).split():
        raise ValueError(f"groups is SSD's G; {name} has no groups, got groups={groups!r}")
    size = {"B": batch, "T": length, "H": heads, "G": 1 if groups is None else groups,
            s.key_dim: key_dim, s.value_dim: value_dim}
    draw = Draw(torch.Generator().manual_seed(seed))
    drawn, drawn_kw = s.sample(draw, size, gate)
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def cast(arg, t):       # activations: the tested dtype; decays, gates, parameters: fp32 (fp64)
        return t.to(device=device, dtype=dtype if arg.activation else gate_dtype)

    args = tuple(cast(arg, t) for arg, t in zip(s.inputs, drawn))
    kwargs = {n: cast(s.arg(n), t) for n, t in drawn_kw.items()}
    if decay is not None:
        args = _with_mean_log_decay(s, args, decay)
    if initial_state:
        state = draw.randn(*(size[d] for d in s.state.dims.split()))
        kwargs["initial_state"] = state.to(device=device, dtype=gate_dtype)
    return args, kwargs


def _position(s, name: str) -> int:
    return [a.name for a in s.inputs].index(name)


def _with_mean_log_decay(s, args: tuple, decay: float) -> tuple:
    """Rescale the decay argument so that the mean |log-decay| per token is ``decay``."""
    log_decay = math.prod(args[_position(s, n)] for n in s.log_decay)
    i = _position(s, s.decay)
    return args[:i] + (args[i] * (decay / log_decay.abs().mean()),) + args[i + 1:]


def with_log_decay(name: str, args: tuple, value: float, token: int) -> tuple:
    """The inputs ``args`` with some log-decays set to ``value``: a reset of the state for −inf, a
    single steep step for a large negative number (the edge cases of ``exp`` and of cumulative
    sums).  Where the decay is per token (GLA's g, RWKV-7's w), token ``token`` of head 0 gets it
    in every other channel; where it is per head, head 0 gets it at every token (RetNet's
    log γ), or, for SSD (ℓ = Δ·A), token ``token`` of head 0 through its Δ when ``value`` is finite
    (its x divided by the new Δ, so that the input Δ x keeps its size), and every token of head 0
    through A = −inf otherwise, with Δ = 0 at ``token`` (a skipped token)."""
    s = spec(name)
    i = _position(s, s.decay)
    args = [a.clone() for a in args]
    dims = s.arg(s.decay).dims.split()
    if "T" in dims:
        args[i][:, token, 0, ::2] = value
    elif len(s.log_decay) == 1:
        args[i][0] = value
    else:
        step = _position(s, s.log_decay[0])
        if math.isinf(value):
            args[i][0] = value
            args[step][:, token, 0] = 0.0
        else:
            args[step][:, token, 0] = value / args[i][0]
            s.values_of(args)[:, token, 0] /= args[step][:, token, 0, None]
    return tuple(args)


def values_of(name: str, args):
    """The argument that ``matrix`` multiplies: x for SSD, v for the others."""
    return spec(name).values_of(args)


def matrix_args(name: str, args):
    """The positional arguments of ``matrix``: the mixer's inputs without the values."""
    return spec(name).matrix_args(args)


def assert_close(what: str, actual: torch.Tensor, reference: torch.Tensor, bounds) -> Errors:
    """Assert ``errors(actual, reference)`` within ``bounds`` = (rel_rms, max_abs) or a ``TOLERANCE``
    key, silently (``check`` is the printing version, for notebooks); return the errors."""
    bounds = TOLERANCE[bounds] if isinstance(bounds, str) else bounds
    e = errors(actual, reference)
    assert e.within(bounds), f"{what}: rel RMS {e.rel_rms:.2e}, max {e.max_abs:.2e} > {tuple(bounds)}"
    return e


def check_gradients(form, reference, args, kwargs=None, *, bounds, names=None, use_output=True,
                    use_final_state=True, seed=8) -> None:
    """The gradients of ``form`` against those of ``reference`` run in fp64 on the same inputs.

    Both are called as ``fn(*args, **kwargs, output_final_state=...)`` and return (output, final
    state); ``reference`` always returns the state.  The loss is L = ⟨dO, o⟩ + ⟨dS, S_T⟩ with seeded
    random cotangents, rounded to the dtypes of the outputs they meet (either term may be left out);
    its gradient is taken with respect to every tensor in ``args`` and in ``kwargs`` (``names``
    labels them in a failure, in that order).  Each gradient must have its input's shape and dtype,
    be finite and lie within ``bounds`` of the reference's; a gradient the reference finds unused
    must be zero.
    """
    kwargs = kwargs or {}
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    options = {k: v for k, v in kwargs.items() if k not in tensors}
    inputs = [x.detach().clone().requires_grad_() for x in [*args, *tensors.values()]]
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    names = names or [f"args[{i}]" for i in range(len(args))] + list(tensors)

    def run(fn, xs, output_final_state):
        return fn(*xs[:len(args)], **dict(zip(tensors, xs[len(args):])), **options,
                  output_final_state=output_final_state)

    o, S = run(form, inputs, use_final_state)
    ref_o, ref_S = run(reference, ref_inputs, True)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
    dS = torch.randn(ref_S.shape, generator=gen, dtype=torch.float64).to(ref_S.device)
    outs, seeds, ref_outs = [], [], []
    if use_output:
        outs, seeds, ref_outs = [o], [do], [ref_o]
    if use_final_state:
        dS = dS.to(S.dtype)
        outs, seeds, ref_outs = outs + [S], seeds + [dS], ref_outs + [ref_S]
    grads = torch.autograd.grad(outs, inputs, seeds, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_outs, ref_inputs, [x.double().to(y.device) for x, y in zip(seeds, ref_outs)],
                                    allow_unused=True)
    for name, x, gx, ref_gx in zip(names, inputs, grads, ref_grads):
        if ref_gx is None:
            assert gx is None or not gx.any(), f"d{name} should be zero"
            continue
        assert gx is not None, f"d{name} is missing"
        assert gx.shape == x.shape and gx.dtype == x.dtype, f"d{name}: {gx.dtype} {tuple(gx.shape)}"
        assert torch.isfinite(gx).all(), f"d{name} is not finite"
        assert_close(f"d{name}", gx, ref_gx, bounds)
