"""The Triton chunkwise RWKV-7 kernel (``lecture_kit.kernels.rwkv7.rwkv7_chunked``) against the fp64
recurrence ``lecture_kit.rwkv7.recurrent``, computed from the same rounded inputs (math.md §5.3).

Covered: bf16 / fp16 / fp32 inputs (w in fp32 or in the inputs' dtype); ragged lengths T = 1, 7, 50
with chunk 16, and chunks 32 and 64; zero and non-zero initial states; the layer's weak gates
w = −e^{−1/2}·σ(x) and strong unbounded gates w = −exp(x + 1) (down to about −20), plus extreme
ones (−80 and 0), the weak ones taking the factored route of phase 1 and the gradient kernel and the
strong ones the pairwise route (checked); RWKV-7's a = −κ̂, b = κ̂ ∘ a_icl with ‖κ̂‖ = 1; the ValueErrors for unsupported
input.  Gradients of every input (r, w, k, v, a, b, initial_state) against fp64 autograd of the
recurrence, through the Triton backward (which must not call ``rwkv7.chunked``): every dtype and
both gates at chunk 16, ragged T at chunks 32 and 64, through the final state alone, through the
output alone, and without an initial state (strided r, w in bf16, a zero-stride dO from ``sum()``).
On a CPU the kernels run through Triton's interpreter, so the sizes are small (B = H = 2 at most,
K, V ∈ {16, 32}).

Bounds: fp32 inputs use IEEE ``tl.dot`` → "fp32" (1e-5).  bf16/fp16 inputs → "half" for outputs,
"half_grad" for gradients; their fp32 final state is held to "tf32", the accuracy of the TF32
``tl.dot`` the kernel uses for half inputs on a GPU (the interpreter computes those products in fp32).
"""
import pytest
import torch

import lecture_kit  # noqa: F401  (sets TRITON_INTERPRET=1 before triton loads when there is no GPU)
from lecture_kit import rwkv7
from lecture_kit.bench import calls_to
from lecture_kit.kernels import rwkv7 as kernels_rwkv7
from lecture_kit.kernels.rwkv7 import rwkv7_chunked
from lecture_kit.testing import assert_close, check_gradients as check_against_fp64, random_inputs, to_reference

DEVICE = lecture_kit.DEVICE
SIZES = dict(batch=2, heads=2, key_dim=32, value_dim=16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALE = 0.7   # not the default 1.0, so that a forgotten scale shows


def reference(args, kw, **extra):
    """fp64 recurrence on the same (rounded) inputs."""
    return rwkv7.recurrent(*to_reference(args), **to_reference(kw), scale=SCALE, output_final_state=True, **extra)


def bounds_for(dtype):
    return ("fp32", "fp32") if dtype == torch.float32 else ("half", "tf32")   # (output, final state)


@pytest.mark.parametrize("T", [1, 7, 50])
@pytest.mark.parametrize("gate", ["weak", "strong"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_forward_matches_fp64_recurrence(dtype, gate, T):
    dtype = DTYPES[dtype]
    args, kw = random_inputs("rwkv7", **SIZES, length=T, gate=gate, dtype=dtype, initial_state=True,
                             seed=T, device=DEVICE)
    o, S = rwkv7_chunked(*args, **kw, scale=SCALE, output_final_state=True)
    ref_o, ref_S = reference(args, kw)
    assert o.dtype == dtype and o.shape == ref_o.shape
    assert S.dtype == torch.float32 and S.shape == ref_S.shape
    out_bounds, state_bounds = bounds_for(dtype)
    assert_close("o", o, ref_o, out_bounds)
    assert_close("final state", S, ref_S, state_bounds)


@pytest.mark.parametrize("chunk_size,T,K,V", [(32, 70, 16, 32), (64, 100, 32, 16)])
def test_other_chunk_sizes(chunk_size, T, K, V):
    args, kw = random_inputs("rwkv7", batch=1, heads=2, key_dim=K, value_dim=V, length=T, gate="strong",
                             dtype=torch.float32, initial_state=True, seed=3, device=DEVICE)
    o, S = rwkv7_chunked(*args, **kw, scale=SCALE, output_final_state=True, chunk_size=chunk_size)
    ref_o, ref_S = reference(args, kw)
    assert_close("o", o, ref_o, "fp32")
    assert_close("final state", S, ref_S, "fp32")


def test_no_initial_state_no_final_state_and_strided_inputs():
    args, _ = random_inputs("rwkv7", **SIZES, length=40, dtype=torch.bfloat16, seed=4, device=DEVICE)
    args = list(args)
    args[0] = args[0].transpose(1, 2).contiguous().transpose(1, 2)    # r: same values, [B, H, T, K] memory
    assert not args[0].is_contiguous()
    o, S = rwkv7_chunked(*args, scale=SCALE)
    assert S is None
    ref_o, _ = reference(args, {})
    assert_close("o", o, ref_o, "half")


def test_w_in_the_inputs_dtype():
    args, kw = random_inputs("rwkv7", **SIZES, length=33, dtype=torch.bfloat16, initial_state=True, seed=5,
                             device=DEVICE)
    args = list(args)
    args[1] = args[1].to(torch.bfloat16)                               # w rounded to bf16 as well
    o, S = rwkv7_chunked(*args, **kw, scale=SCALE, output_final_state=True)
    ref_o, ref_S = reference(args, kw)
    assert_close("o", o, ref_o, "half")
    assert_close("final state", S, ref_S, "tf32")


@pytest.mark.parametrize("fill", ["extreme", "zero"])
def test_extreme_gates(fill):
    """w = −80 (decay e^{−80}, far past any bound a factorised scheme could use) mixed with w = 0, and
    w = 0 everywhere (no decay: the pure generalised delta rule)."""
    args, kw = random_inputs("rwkv7", **SIZES, length=41, dtype=torch.float32, initial_state=True, seed=6,
                             device=DEVICE)
    args = list(args)
    w = torch.zeros_like(args[1])
    if fill == "extreme":
        w[:, 1::3] = -80.0
        w[:, 2::5] = -3.0
    args[1] = w
    o, S = rwkv7_chunked(*args, **kw, scale=SCALE, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    ref_o, ref_S = reference(args, kw)
    assert_close("o", o, ref_o, "fp32")
    assert_close("final state", S, ref_S, "fp32")


def check_gradients(args, initial_state, *, dtype, use_output=True, use_final_state=True, chunk_size=16,
                    seed=8):
    """Gradients of L = ⟨dO, o⟩ + ⟨dS, S_T⟩ (either term may be left out) with respect to every input
    (initial_state too, when given), by the kernel and by fp64 autograd of the recurrence
    (``testing.check_gradients``), without the backward going through ``rwkv7.chunked``."""
    kw = {} if initial_state is None else {"initial_state": initial_state}
    with calls_to(rwkv7, "chunked") as chunked_calls:
        check_against_fp64(lambda *a, **k: rwkv7_chunked(*a, **k, scale=SCALE, chunk_size=chunk_size),
                           lambda *a, **k: rwkv7.recurrent(*a, **k, scale=SCALE), args, kw,
                           bounds="fp32" if dtype == torch.float32 else "half_grad",
                           names=["r", "w", "k", "v", "a", "b", *kw], use_output=use_output,
                           use_final_state=use_final_state, seed=seed)
    assert not chunked_calls, "the backward pass went through rwkv7.chunked"


@pytest.mark.parametrize("gate", ["weak", "strong"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_gradients_match_fp64_autograd(dtype, gate):
    dtype = DTYPES[dtype]
    args, kw = random_inputs("rwkv7", **SIZES, length=23, gate=gate, dtype=dtype, initial_state=True, seed=7,
                             device=DEVICE)
    check_gradients(args, kw["initial_state"], dtype=dtype)


@pytest.mark.parametrize("gate,factored", [("weak", True), ("strong", False)])
def test_the_gate_regimes_cover_both_routes(gate, factored):
    """Phase 1 and the gradient kernel take the factored route in a chunk's 16-channel slice when its
    chunk-long log decays all lie in [−FACTORED_SPAN, 0], else the pairwise one.  The weak gates of the
    tests above keep every slice of every chunk factored at chunk 16 and the strong gates none of them,
    so both routes are tested, forward and backward; a change to the gates of ``random_inputs`` that
    sent every test down one route would fail here rather than leave the other route untested."""
    (_, w, *_), _ = random_inputs("rwkv7", **SIZES, length=23, gate=gate, dtype=torch.float32, seed=7)
    B, T, H, K = w.shape
    C = 16
    padded = torch.cat([w, w.new_zeros(B, -T % C, H, K)], dim=1)                 # rows past T: w = 0
    gamma_C = padded.reshape(B, -1, C, H, K).sum(dim=2)                           # [B, chunks, H, K]
    slice_min = gamma_C.reshape(B, -1, H, K // 16, 16).amin(dim=-1)
    takes_factored = slice_min >= -kernels_rwkv7.FACTORED_SPAN
    assert bool(takes_factored.all() if factored else not takes_factored.any()), slice_min


@pytest.mark.parametrize("chunk_size,T,K,V,gate", [(32, 45, 16, 32, "strong"), (64, 70, 16, 16, "weak")])
def test_gradients_other_chunk_sizes(chunk_size, T, K, V, gate):
    """Ragged last chunks at chunk sizes 32 and 64 (T = 45 = 32 + 13, T = 70 = 64 + 6)."""
    args, kw = random_inputs("rwkv7", batch=1, heads=2, key_dim=K, value_dim=V, length=T, gate=gate,
                             dtype=torch.float32, initial_state=True, seed=9, device=DEVICE)
    check_gradients(args, kw["initial_state"], dtype=torch.float32, chunk_size=chunk_size)


@pytest.mark.parametrize("gate", ["weak", "strong"])
def test_gradients_through_the_final_state_only(gate):
    """o unused (its gradient arrives as None): every gradient, d initial_state included, flows from
    dS_T back through all three chunks of T = 37.  With strong gates d initial_state is ~1e-24, a
    product of three chunk transitions, and sensitive to how the decays' exponents are formed: with
    Γ_C − Γ taken as a difference of two cumsums instead of a window sum (kernel module docstring),
    it misses the fp32 bound."""
    args, kw = random_inputs("rwkv7", batch=1, heads=2, key_dim=16, value_dim=16, length=37, gate=gate,
                             dtype=torch.float32, initial_state=True, seed=0, device=DEVICE)
    check_gradients(args, kw["initial_state"], dtype=torch.float32, use_output=False, seed=100)


def test_gradients_through_the_output_only():
    """output_final_state=False: the state gradient starts from zero after the last chunk."""
    args, kw = random_inputs("rwkv7", batch=1, heads=2, key_dim=32, value_dim=16, length=37, gate="strong",
                             dtype=torch.bfloat16, initial_state=True, seed=10, device=DEVICE)
    check_gradients(args, kw["initial_state"], dtype=torch.bfloat16, use_final_state=False)


def test_gradients_without_initial_state_strided_inputs_and_sum():
    """No initial state, r strided in memory, w rounded to bf16 (so dw is bf16), and the loss o.sum(),
    whose gradient reaches the kernel as a zero-stride (expanded) tensor."""
    args, _ = random_inputs("rwkv7", batch=1, heads=2, key_dim=16, value_dim=16, length=20, gate="strong",
                            dtype=torch.bfloat16, seed=11, device=DEVICE)
    args = list(args)
    args[0] = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    args[1] = args[1].to(torch.bfloat16)
    inputs = [x.clone().requires_grad_() for x in args]
    o, _ = rwkv7_chunked(*inputs, scale=SCALE)
    grads = torch.autograd.grad(o.sum(), inputs)                      # dO = ones, expanded (strides 0)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref_grads = torch.autograd.grad(rwkv7.recurrent(*ref_inputs, scale=SCALE)[0].sum(), ref_inputs)
    for name, x, gx, ref_gx in zip(["r", "w", "k", "v", "a", "b"], inputs, grads, ref_grads):
        assert gx.dtype == x.dtype, name
        assert_close(f"d{name}", gx, ref_gx, "half_grad")


def test_unsupported_input_raises_value_error():
    args, kw = random_inputs("rwkv7", batch=1, heads=1, key_dim=16, value_dim=16, length=8, dtype=torch.float32,
                             initial_state=True, device=DEVICE)
    r, w, k, v, a, b = args

    def raises(match, *xs, **kws):
        with pytest.raises(ValueError, match=match):
            rwkv7_chunked(*xs, **kws)

    raises("float64", *(x.double() for x in args))                                 # fp64: use the PyTorch forms
    raises("power of two", r[..., :12], w[..., :12], k[..., :12], v, a[..., :12], b[..., :12])   # K = 12
    raises("V = 8", r, w, k, v[..., :8], a, b)
    raises("chunk_size", *args, chunk_size=8)
    raises("w must have shape", r, w[:, :4], k, v, a, b)
    raises("k has dtype", r, w, k.half(), v, a, b)
    raises("w is a log-decay", r, -w, k, v, a, b)                                 # positive log decays
    raises("initial_state must have shape", *args, initial_state=kw["initial_state"][..., :8])
    raises("4 dims", r[0], w, k, v, a, b)
