"""recurrent = parallel = chunked = matrix @ values, for every mixer, in fp64 and fp32, and gradients.

The reference is the fp64 recurrence (the definition); each test draws seeded random inputs with
``lecture_kit.testing.random_inputs`` and compares with the relative-RMS / max-abs bounds of
math.md §5.3.  The grid covers ragged lengths (T not a multiple of the chunk, T = 1), chunk sizes 16
and 64, zero and non-zero initial states, weak and strong gates, and SSD with G = 1 and G = H.
"""
import pytest
import torch

from lecture_kit import retnet
from lecture_kit.testing import (TOLERANCE, errors, matrix_args, mixer, random_inputs, sequential_fp32_bounds,
                                 to_reference, values_of)

# (mixer name, extra random_inputs keywords): SSD once with one group of B/C, once with G = H
CASES = [("ssd", {"groups": 1}), ("ssd", {"groups": 2}), ("retnet", {}), ("gla", {}), ("rwkv7", {})]
CASE_IDS = ["ssd-G1", "ssd-GH", "retnet", "gla", "rwkv7"]
SIZES = dict(batch=2, heads=2, key_dim=8, value_dim=4)


def assert_close(what, actual, reference, bounds):
    e = errors(actual, reference)
    assert e.within(bounds), f"{what}: rel RMS {e.rel_rms:.2e}, max {e.max_abs:.2e} > {bounds}"
    return e


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
    leaves = [a.clone().requires_grad_() for a in args]
    kw_leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
    inputs = leaves + list(kw_leaves.values())
    g = torch.Generator().manual_seed(1)

    def grads(form):
        out, state = form(*leaves, **kw_leaves, output_final_state=True)
        loss = (out * torch.randn(out.shape, generator=g.manual_seed(1), dtype=out.dtype)).sum() \
            + (state * torch.randn(state.shape, generator=g.manual_seed(2), dtype=state.dtype)).sum()
        return torch.autograd.grad(loss, inputs)

    ref = grads(m.recurrent)
    got = grads(lambda *a, **k: m.chunked(*a, **k, chunk_size=16))
    names = [f"arg{i}" for i in range(len(leaves))] + list(kw_leaves)
    for n, r, c in zip(names, ref, got):
        assert_close(f"d{n}", c, r, (1e-10, 1e-10))


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
