"""Random inputs, error metrics and tolerances shared by the tests and the notebooks' checking cells.

Metric (math.md §5.3): a scale-aware pair, never an elementwise relative error (outputs cross zero):

    rel_rms = ‖x − ref‖₂ / ‖ref‖₂,        max_abs = max|x − ref| / max|ref|.

The reference is always computed in fp64 from the *same rounded inputs* the tested code saw
(``to_reference``), so the measured error is the tested code's alone.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: (rel_rms, max_abs) bounds of math.md §5.3, by what is being compared.
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
    assert ok, line
    return e


def check_equal(claim: str, actual, expected):
    """The checking cell of an exact claim (a rank, a count, a byte size): assert equality and print
    one line, ``✓ claim   actual (expected expected)``; integers get thousands separators."""
    show = lambda x: f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else f"{x}"
    ok = actual == expected
    line = f"{'✓' if ok else '✗'} {claim}   {show(actual)} (expected {show(expected)})"
    print(line)
    assert ok, line


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
    Gates and decays are made in fp32 and stay fp32 for half-precision inputs, as in the layers.
    """
    if gate not in ("weak", "strong"):
        raise ValueError(f"gate must be 'weak' or 'strong', got {gate!r}")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay > 0):
        raise ValueError(f"decay must be a float > 0 (mean |log-decay| per token), got {decay!r}")
    g = torch.Generator().manual_seed(seed)
    B, T, H, K, V = batch, length, heads, key_dim, value_dim
    randn = lambda *s: torch.randn(*s, generator=g)
    rand = lambda *s: torch.rand(*s, generator=g)
    act = lambda t: t.to(device=device, dtype=dtype)                  # activations: the tested dtype
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    par = lambda t: t.to(device=device, dtype=gate_dtype)             # gates/decays: fp32 (fp64)
    kwargs = {}
    if name == "ssd":
        G = 1 if groups is None else groups
        # Mamba-2's init: Δ log-uniform in [1e-3, 1e-1], A = −U[1, 16]; "strong" takes Δ in [0.5, 2]
        dt = torch.exp(torch.empty(B, T, H).uniform_(*(torch.log(torch.tensor([1e-3, 1e-1])).tolist()), generator=g)) \
            if gate == "weak" else 0.5 + 1.5 * rand(B, T, H)
        A = -(1 + 15 * rand(H))
        args = (act(randn(B, T, H, V)), par(dt), par(A), act(randn(B, T, G, K)), act(randn(B, T, G, K)))
        kwargs["D"] = par(randn(H))
        state_shape = (B, H, V, K)
    elif name == "retnet":
        h = torch.arange(H, dtype=torch.float64)
        log_gamma = torch.log1p(-2.0 ** (-5 - h)) if gate == "weak" else torch.log1p(-2.0 ** (-1 - h))
        args = (act(randn(B, T, H, K)), act(randn(B, T, H, K)), act(randn(B, T, H, V)), par(log_gamma))
        state_shape = (B, H, K, V)
    elif name == "gla":
        normaliser = 16.0 if gate == "weak" else 0.1                 # the GLA layer uses 16
        gk = F.logsigmoid(randn(B, T, H, K)) / normaliser
        args = (act(randn(B, T, H, K)), act(randn(B, T, H, K)), act(randn(B, T, H, V)), par(gk))
        state_shape = (B, H, K, V)
    elif name == "rwkv7":
        # the layer's bounded decay −e^{−1/2}·σ(·), or unbounded strong decays down to about −20
        w = -0.6065306597126334 * torch.sigmoid(randn(B, T, H, K)) if gate == "weak" \
            else -torch.exp(randn(B, T, H, K) + 1.0)
        kappa = F.normalize(randn(B, T, H, K), dim=-1)              # removal key, unit norm per head
        a_icl = torch.sigmoid(randn(B, T, H, K))                    # in-context learning rate
        args = (act(randn(B, T, H, K)), par(w), act(randn(B, T, H, K) / K ** 0.5), act(randn(B, T, H, V)),
                act(-kappa), act(kappa * a_icl))
        state_shape = (B, H, K, V)
    else:
        raise ValueError(f"name must be one of {MIXERS}, got {name!r}")
    if decay is not None:
        args = _with_mean_log_decay(name, args, decay)
    if initial_state:
        kwargs["initial_state"] = randn(*state_shape).to(device=device, dtype=gate_dtype)
    return args, kwargs


#: Position of the log-decay parameter among each mixer's positional inputs (SSD: A, with ℓ = Δ·A).
DECAY_POSITION = {"ssd": 2, "retnet": 3, "gla": 3, "rwkv7": 1}


def _with_mean_log_decay(name: str, args: tuple, decay: float) -> tuple:
    """Rescale the decay argument so that the mean |log-decay| per token is ``decay``."""
    i = DECAY_POSITION[name]
    log_decay = args[1] * args[2] if name == "ssd" else args[i]
    rescaled = args[i] * (decay / log_decay.abs().mean())
    return args[:i] + (rescaled,) + args[i + 1:]


#: Position of the values (what ``matrix`` multiplies) among each mixer's positional inputs.
VALUES_POSITION = {"ssd": 0, "retnet": 2, "gla": 2, "rwkv7": 3}


def values_of(name: str, args):
    """The argument that ``matrix`` multiplies: x for SSD, v for the others."""
    return args[VALUES_POSITION[name]]


def matrix_args(name: str, args):
    """The positional arguments of ``matrix``: the mixer's inputs without the values."""
    return tuple(a for i, a in enumerate(args) if i != VALUES_POSITION[name])
