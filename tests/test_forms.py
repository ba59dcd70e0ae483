"""recurrent = parallel = chunked = matrix @ values, for every mixer, in fp64 and fp32, and gradients.

The reference is the fp64 recurrence (the definition); each test draws seeded random inputs with
``lecture_kit.testing.random_inputs`` and compares with the relative-RMS / max-abs bounds of
math.md §5.3.  The grid covers ragged lengths (T not a multiple of the chunk, T = 1), chunk sizes 16
and 64, zero and non-zero initial states, weak and strong gates, and SSD with G = 1 and G = H.
Then, for all five forms (the Triton kernel through its interpreter on a CPU): log-decays of −inf and
single steps of −1e4 and −1e6; what a NaN or inf in one token's activations does to the other
outputs (the forms' Notes); and ``torch.compile(fullgraph=True)`` of every ``chunked``.
"""
import math
import sys

import pytest
import torch

from lecture_kit import retnet
from lecture_kit._spec import FORMS
from lecture_kit.hardware import HAS_TRITON
from lecture_kit.testing import (MIXERS, TOLERANCE, assert_close, check_gradients, errors, matrix_args, mixer,
                                 random_inputs, sequential_fp32_bounds, spec, to_reference, values_of,
                                 with_log_decay)

# (mixer name, extra random_inputs keywords): SSD once with one group of B/C, once with G = H
CASES = [("ssd", {"groups": 1}), ("ssd", {"groups": 2}), ("retnet", {}), ("gla", {}), ("rwkv7", {})]
CASE_IDS = ["ssd-G1", "ssd-GH", "retnet", "gla", "rwkv7"]
SIZES = dict(batch=2, heads=2, key_dim=8, value_dim=4)


def with_skip(name, out, args, kwargs):
    """matrix @ values misses SSD's D x term; add it back."""
    if name == "ssd" and kwargs.get("D") is not None:
        return out + args[0] * kwargs["D"][:, None]
    return out


@pytest.mark.parametrize("gate", ["weak", "strong"])
@pytest.mark.parametrize("initial_state", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("T", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("name,extra", CASES, ids=CASE_IDS)
def test_forms_agree_in_fp64(name, extra, T, initial_state, gate):
    m = mixer(name)
    args, kw = random_inputs(name, length=T, gate=gate, initial_state=initial_state, seed=T, **SIZES, **extra)
    ref, ref_state = m.recurrent(*args, **kw, output_final_state=True)
    bounds = TOLERANCE["fp64"]
    out, state = m.parallel(*args, **kw, output_final_state=True)
    assert_close("parallel", out, ref, bounds)
    assert_close("parallel state", state, ref_state, bounds)
    for chunk_size in (16, 64):
        out, state = m.chunked(*args, **kw, output_final_state=True, chunk_size=chunk_size)
        assert_close(f"chunked({chunk_size})", out, ref, bounds)
        assert_close(f"chunked({chunk_size}) state", state, ref_state, bounds)
    if not initial_state:
        M = m.matrix(*matrix_args(name, args))
        assert M.shape == (2, 2, T, T)
        v = values_of(name, args)
        out = with_skip(name, torch.einsum("bhij,bjhv->bihv", M, v), args, kw)
        assert_close("matrix @ values", out, ref, bounds)
        assert torch.equal(M, M.tril()), "the mixing matrix must be causal (lower triangular)"


@pytest.mark.parametrize("gate", ["weak", "strong"])
@pytest.mark.parametrize("name,extra", CASES, ids=CASE_IDS)
def test_fp32_forms_match_fp64_reference(name, extra, gate):
    m = mixer(name)
    args, kw = random_inputs(name, length=100, gate=gate, initial_state=True, dtype=torch.float32, **SIZES, **extra)
    ref, ref_state = m.recurrent(*to_reference(args), **to_reference(kw), output_final_state=True)
    for form in (m.recurrent, m.parallel, lambda *a, **k: m.chunked(*a, **k, chunk_size=16)):
        out, state = form(*args, **kw, output_final_state=True)
        assert out.dtype == torch.float32 and state.dtype == torch.float32
        assert_close("fp32 output", out, ref, TOLERANCE["fp32"])
        assert_close("fp32 state", state, ref_state, TOLERANCE["fp32"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ssd", "retnet", "gla", "rwkv7"])
def test_half_inputs_give_half_outputs_and_fp32_states(name, dtype):
    m = mixer(name)
    args, kw = random_inputs(name, length=40, initial_state=True, dtype=dtype, **SIZES)
    ref, ref_state = m.recurrent(*to_reference(args), **to_reference(kw), output_final_state=True)
    out, state = m.chunked(*args, **kw, output_final_state=True, chunk_size=16)
    assert out.dtype == dtype and state.dtype == torch.float32
    # computed in fp32 from the rounded inputs: only the final rounding of o to half precision remains
    assert_close("half output", out, ref, TOLERANCE["half"])
    assert_close("half state", state, ref_state, TOLERANCE["fp32"])


@pytest.mark.parametrize("T", [7, 100])
@pytest.mark.parametrize("name,extra", CASES, ids=CASE_IDS)
def test_chunked_gradients_equal_recurrent_gradients(name, extra, T):
    m = mixer(name)
    args, kw = random_inputs(name, length=T, gate="strong" if T == 7 else "weak", initial_state=True,
                             **SIZES, **extra)
    check_gradients(lambda *a, **k: m.chunked(*a, **k, chunk_size=16), m.recurrent, args, kw,
                    bounds=(1e-10, 1e-10), seed=1)


def test_sequential_fp32_bounds_cover_a_long_recurrence_and_stay_tight_for_short_ones():
    """The recurrence's bound grows as T·2⁻²⁴.  At T = 2048 with RetNet's slowest decay (γ = 1 − 2⁻¹²),
    a decay one ulp below its correctly rounded value (what a GPU's exp may return; the H200 run of
    the tour failed this way) breaks the plain fp32 bound and stays inside the sequential one.  At
    short T the bound is the ordinary fp32 bound."""
    assert sequential_fp32_bounds(64) == TOLERANCE["fp32"]
    T = 2048
    args, _ = random_inputs("retnet", batch=1, length=T, heads=8, key_dim=16, value_dim=16,
                            dtype=torch.float32, seed=0)
    assert torch.exp(args[3]).max() > 1 - 2.0 ** -11           # the slowest head, γ = 1 − 2⁻¹²
    ref, _ = retnet.recurrent(*to_reference(args))
    gamma = torch.exp(args[3])
    one_ulp_low = torch.log(torch.nextafter(gamma, torch.zeros_like(gamma)).double()).float()
    assert (torch.exp(one_ulp_low) < gamma).all()
    for log_gamma in (args[3], one_ulp_low):
        o, _ = retnet.recurrent(*args[:3], log_gamma)
        assert errors(o, ref).within(sequential_fp32_bounds(T))
    assert not errors(o, ref).within(TOLERANCE["fp32"])      # the allowance is needed


# ------------------------------------------------------------------------------------------------
# Decays at their edges: a reset (−inf) and single steps far below the others, in every form
# ------------------------------------------------------------------------------------------------

EDGE_SIZES = dict(batch=1, length=40, heads=2, key_dim=16, value_dim=16, dtype=torch.float32, initial_state=True)
#: All five forms, or all but ``kernel`` where Triton cannot be imported (tests/test_without_triton.py).
EDGE_FORMS = [f for f in FORMS if HAS_TRITON or f != "kernel"]


def edge_cases():
    for name in MIXERS:
        for form in EDGE_FORMS:
            for chunk_size in ((16, 64) if form in ("chunked", "kernel") else (None,)):
                for value in (-math.inf, -1e4, -1e6):
                    for token in (16, 21):    # a chunk's (or a 16-token sub-chunk's) first token, one inside
                        chunk = f"-C{chunk_size}" if chunk_size else ""
                        yield pytest.param(name, form, chunk_size, value, token,
                                           id=f"{name}-{form}{chunk}-{value:g}-t{token}")


@pytest.mark.parametrize("name,form,chunk_size,value,token", list(edge_cases()))
def test_resets_and_steep_decays_match_the_fp64_recurrence(name, form, chunk_size, value, token):
    """A log-decay of −inf (the state forgets everything: a document boundary) or of −1e4, −1e6 among
    ordinary ones (``testing.with_log_decay``), in fp32, against the fp64 recurrence on the same
    inputs, within the ordinary fp32 bound.  A difference of two cumulative sums loses everything
    beside such a step (and gives −inf − (−inf) = NaN at a reset); a segment sum does not.  Chunks
    of 64 hold the 40 tokens in one chunk of three sub-chunks (GLA's off-diagonal blocks)."""
    m = mixer(name)
    args, kw = random_inputs(name, **EDGE_SIZES, seed=token)
    args = with_log_decay(name, args, value, token)
    if form == "matrix":
        M = m.matrix(*matrix_args(name, args))
        ref, _ = m.recurrent(*to_reference(args), **to_reference({k: v for k, v in kw.items() if k == "D"}))
        out = with_skip(name, torch.einsum("bhij,bjhv->bihv", M.double(), values_of(name, args).double()),
                        to_reference(args), to_reference(kw))
        assert torch.isfinite(M).all()
        assert_close("matrix @ values", out, ref, "fp32")
        return
    options = {"chunk_size": chunk_size} if chunk_size else {}
    out, state = getattr(m, form)(*args, **kw, output_final_state=True, **options)
    ref, ref_state = m.recurrent(*to_reference(args), **to_reference(kw), output_final_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    assert_close("output", out, ref, "fp32")
    assert_close("final state", state, ref_state, "fp32")


# ------------------------------------------------------------------------------------------------
# A NaN or inf in one token's activations: what it does to the other outputs (the forms' Notes)
# ------------------------------------------------------------------------------------------------

NAN_T, NAN_CHUNK = 21, 16          # token 21 lies in the second chunk, tokens 16 … 31


def nan_cases():
    for name in MIXERS:
        for form in EDGE_FORMS:
            for arg in spec(name).inputs:
                if arg.activation and (form != "matrix" or arg.name != spec(name).values):
                    for value in (math.nan, math.inf):
                        yield pytest.param(name, form, arg.name, value, id=f"{name}-{form}-{arg.name}-{value}")


@pytest.mark.parametrize("name,form,arg,value", list(nan_cases()))
def test_a_non_finite_activation_stays_where_the_notes_say(name, form, arg, value):
    """Every form: the other sequence of the batch is exact and token t's own output is not finite.
    Before t: recurrent exact; chunked and kernel exact in the chunks before t's; matrix exact
    between tokens before t; parallel promises nothing (0·NaN across the whole sequence)."""
    m = mixer(name)
    args, kw = random_inputs(name, **{**EDGE_SIZES, "batch": 2}, seed=3)
    i = [a.name for a in spec(name).inputs].index(arg)
    poisoned = args[i].clone()
    poisoned[0, NAN_T, 0, 0] = value
    bad_args = args[:i] + (poisoned,) + args[i + 1:]
    if form == "matrix":
        clean, bad = m.matrix(*matrix_args(name, args)), m.matrix(*matrix_args(name, bad_args))
        assert_close("other sequence", bad[1], clean[1], "fp32")
        assert_close("earlier tokens", bad[0, :, :NAN_T, :NAN_T], clean[0, :, :NAN_T, :NAN_T], "fp32")
        assert not torch.isfinite(bad[0, 0, NAN_T:, :NAN_T + 1]).all()
        return
    options = {"chunk_size": NAN_CHUNK} if form in ("chunked", "kernel") else {}
    clean, _ = getattr(m, form)(*args, **kw, **options)
    bad, _ = getattr(m, form)(*bad_args, **kw, **options)
    assert_close("other sequence", bad[1], clean[1], "fp32")
    assert not torch.isfinite(bad[0, NAN_T, 0]).all(), "token t's output must show the NaN"
    exact_before = {"recurrent": NAN_T, "chunked": NAN_T // NAN_CHUNK * NAN_CHUNK,
                    "kernel": NAN_T // NAN_CHUNK * NAN_CHUNK, "parallel": 0}[form]
    if exact_before:
        assert_close("earlier tokens", bad[0, :exact_before], clean[0, :exact_before], "fp32")


# ------------------------------------------------------------------------------------------------
# torch.compile: the chunked forms compile into one graph (value checks are skipped while tracing)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(torch, "compile") or sys.platform == "win32",
                    reason="torch.compile is not available on this platform")
@pytest.mark.parametrize("name", MIXERS)
def test_chunked_compiles_into_one_graph(name):
    """fullgraph=True fails on any graph break (a device sync in a value check would be one);
    the aot_eager backend traces forward and backward without generating code, which keeps it fast."""
    m = mixer(name)
    args, kw = random_inputs(name, batch=1, length=20, heads=2, key_dim=4, value_dim=4, dtype=torch.float32,
                             initial_state=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a, **k: m.chunked(*a, **k, chunk_size=8, output_final_state=True),
                             fullgraph=True, backend="aot_eager")
    leaves = [a.clone().requires_grad_() for a in args]
    out, state = compiled(*leaves, **kw)
    ref, ref_state = m.chunked(*args, **kw, chunk_size=8, output_final_state=True)
    assert_close("compiled output", out, ref, (1e-6, 1e-6))
    assert_close("compiled state", state, ref_state, (1e-6, 1e-6))
    (out.sum() + state.sum()).backward()
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)
