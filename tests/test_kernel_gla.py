"""The Triton chunkwise GLA kernel (``lecture_kit.kernels.gla.gla_chunked``) against the fp64
recurrence ``lecture_kit.gla.recurrent``, computed from the same rounded inputs (math.md §5.3).

Covered: bf16 / fp16 / fp32 inputs (g in fp32, or in the inputs' dtype); ragged lengths T = 1, 7, 100
with chunk 16 and 64 (and 32); zero and non-zero initial states; the layer's weak gates
logsigmoid(x)/16, plain logsigmoid(x), the strong logsigmoid(x)/0.1 of ``random_inputs``, and extreme
ones (−60 beside 0); gradients of q, k, v, g and initial_state against fp64 autograd of the
recurrence; kernel 1's parts on their own (step 0's sums and the decayed operands against fp64 torch
cumsums, A against the diagonal blocks of ``gla.matrix``) and kernel 4a's score gradient against
torch; the ValueErrors for unsupported input.  On a CPU the kernels run through Triton's interpreter
with 16×16 key/value tiles, so the small sizes (B, H ≤ 2, K, V ∈ {16, 32}) still tile K and V.

Bounds (math.md §5.3): fp32 inputs use IEEE ``tl.dot`` → "fp32" (1e-5) for outputs and for every
gradient, dg included.  dg is the delicate one (§5.2: a reverse cumsum of differences whose intra-chunk
parts cancel); the kernel forms those differences from identical fp32 pair terms, so what remains is the
fp32 rounding of the exponents, ≈ ε·(sum of up to C gates): measured ≤ 5e-6 relRMS with the strong gates
at chunk 64.  bf16/fp16 inputs → "half" for outputs and for the fp32 final state (its chunk updates take
half-precision matmul operands), and → "half_grad" (§5.3's bf16 gradient row, 1e-2 / 5e-2) for all
gradients, dg included with no extra atol: its cancelling terms carry no half-precision rounding.
"""
import pytest
import torch

import lecture_kit  # noqa: F401  (sets TRITON_INTERPRET=1 before triton loads when there is no GPU)
from lecture_kit import gla
from lecture_kit.kernels import gla as gla_kernels
from lecture_kit.kernels.gla import gla_chunked
from lecture_kit.testing import assert_close, check_gradients as check_against_fp64, random_inputs, to_reference

DEVICE = lecture_kit.DEVICE
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALE = 0.3   # not the default K^-1/2, so that a forgotten scale shows


def inputs(*, T, dtype, gate="weak", batch=2, heads=1, K=32, V=16, initial_state=True, seed=0):
    """q, k, v in ``dtype``; g in fp32: "weak" logsigmoid/16 (the GLA layer), "unit" logsigmoid,
    "strong" logsigmoid/0.1 (``random_inputs``'s strong gate)."""
    args, kw = random_inputs("gla", batch=batch, heads=heads, key_dim=K, value_dim=V, length=T,
                             gate="strong" if gate == "strong" else "weak", dtype=dtype,
                             initial_state=initial_state, seed=seed, device=DEVICE)
    if gate == "unit":
        q, k, v, g = args
        args = (q, k, v, g * 16.0)                     # logsigmoid(x)/16 -> logsigmoid(x)
    return list(args), kw


def reference(args, kw):
    """fp64 recurrence on the same (rounded) inputs."""
    return gla.recurrent(*to_reference(args), **to_reference(kw), scale=SCALE, output_final_state=True)


# (dtype, T, chunk_size, gate): every length with both chunk sizes in fp32, a spread in half precision
CASES = [
    ("fp32", 1, 16, "weak"), ("fp32", 7, 16, "strong"), ("fp32", 100, 16, "unit"), ("fp32", 1, 64, "strong"),
    ("fp32", 7, 64, "unit"), ("fp32", 100, 64, "strong"), ("fp32", 100, 64, "weak"),
    ("bf16", 7, 16, "unit"), ("bf16", 100, 64, "weak"), ("bf16", 100, 64, "strong"),
    ("fp16", 1, 16, "strong"), ("fp16", 100, 64, "unit"),
]


@pytest.mark.parametrize("dtype,T,chunk_size,gate", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_forward_matches_fp64_recurrence(dtype, T, chunk_size, gate):
    dtype = DTYPES[dtype]
    args, kw = inputs(T=T, dtype=dtype, gate=gate, seed=T + chunk_size)
    o, S = gla_chunked(*args, **kw, scale=SCALE, output_final_state=True, chunk_size=chunk_size)
    ref_o, ref_S = reference(args, kw)
    assert o.dtype == dtype and o.shape == ref_o.shape
    assert S.dtype == torch.float32 and S.shape == ref_S.shape
    bounds = "fp32" if dtype == torch.float32 else "half"
    assert_close("o", o, ref_o, bounds)
    assert_close("final state", S, ref_S, bounds)


def test_chunk_32_two_heads_and_wider_values():
    args, kw = inputs(T=70, dtype=torch.float32, gate="unit", heads=2, K=16, V=32, seed=3)
    o, S = gla_chunked(*args, **kw, scale=SCALE, output_final_state=True, chunk_size=32)
    ref_o, ref_S = reference(args, kw)
    assert_close("o", o, ref_o, "fp32")
    assert_close("final state", S, ref_S, "fp32")


def test_no_initial_state_no_final_state_g_in_bf16_and_strided_inputs():
    args, _ = inputs(T=40, dtype=torch.bfloat16, gate="unit", heads=2, initial_state=False, seed=4)
    args[3] = args[3].to(torch.bfloat16)                                   # g rounded to bf16 as well
    args[0] = args[0].transpose(1, 2).contiguous().transpose(1, 2)         # q: same values, [B, H, T, K] memory
    assert not args[0].is_contiguous()
    o, S = gla_chunked(*args, scale=SCALE)
    assert S is None
    ref_o, _ = reference(args, {})
    assert_close("o", o, ref_o, "half")


def chunk_sums(g, C, c):
    """fp64 references of step 0 from torch cumsums: b, b_C − b, β, γ [B, T, H, K] and b_C [B, H, NT, K]."""
    B, T, H, K = g.shape
    NT = -(-T // C)
    padded = torch.zeros(B, NT * C, H, K, dtype=torch.float64, device=g.device)
    padded[:, :T] = g.double()
    in_chunks = padded.view(B, NT, C, H, K)
    b = in_chunks.cumsum(2)
    b_C = b[:, :, -1]
    rest = b_C[:, :, None] - b                                           # b_C − b_r, from the fp64 cumsum
    in_subs = padded.view(B, NT, C // c, c, H, K)
    beta = in_subs.cumsum(3)
    gamma = beta[:, :, :, -1:] - beta
    per_token = lambda x: x.reshape(B, NT * C, H, K)[:, :T]
    return per_token(b), per_token(rest), per_token(beta), per_token(gamma), b_C.permute(0, 2, 1, 3)


KERNEL_1_CASES = [("fp32", 100, 64, "strong"), ("fp32", 50, 32, "extreme"), ("bf16", 45, 32, "unit"),
                  ("fp16", 20, 16, "weak")]


@pytest.mark.parametrize("dtype,T,chunk_size,gate", KERNEL_1_CASES, ids=["-".join(map(str, c)) for c in KERNEL_1_CASES])
def test_kernel_1_against_torch_cumsums_and_the_matrix(dtype, T, chunk_size, gate):
    """Kernel 1a's sums and decayed operands against fp64 torch cumsums, and A from kernels 1b-1c
    against the diagonal C×C blocks of ``gla.matrix`` (scale 1), zeros above the diagonal included."""
    dtype = DTYPES[dtype]
    (q, k, _, g), _ = inputs(T=T, dtype=dtype, gate="unit" if gate == "extreme" else gate, seed=13)
    if gate == "extreme":                          # −60 beside 0: windows of exactly zero and far below
        g = torch.zeros_like(g)
        g[:, 1::3, :, ::2] = -60.0
    beta, q_dec, k_dec, k_sub, decay_C = gla_kernels._gates(q, k, g, chunk_size)
    b, rest, ref_beta, gamma, b_C = chunk_sums(g, chunk_size, gla_kernels.SUB_CHUNK)
    operand_bounds = "fp32" if dtype == torch.float32 else "half"
    assert beta.dtype == torch.float32 and q_dec.dtype == k_dec.dtype == k_sub.dtype == dtype
    assert_close("β", beta, ref_beta, "fp32")
    assert_close("e^{b_C}", decay_C, b_C.exp().float(), "fp32")    # (what fp32 holds: e^{−500} is 0)
    q64, k64 = q.double(), k.double()
    assert_close("Q ⊙ e^b", q_dec, q64 * b.exp(), operand_bounds)
    assert_close("K ⊙ e^{b_C − b}", k_dec, k64 * rest.exp(), operand_bounds)
    assert_close("K ⊙ e^γ", k_sub, k64 * gamma.exp(), operand_bounds)

    A = gla_kernels._scores(q, k, g, beta, k_sub, chunk_size)               # [B, H, T, C]
    P = gla.matrix(q64, k64, g.double(), scale=1.0)                         # [B, H, T, T]
    blocks = torch.zeros_like(P[..., :chunk_size])
    for t0 in range(0, T, chunk_size):                                      # the last chunk is ragged
        n = min(chunk_size, T - t0)
        blocks[..., t0:t0 + n, :n] = P[..., t0:t0 + n, t0:t0 + n]
    assert A.dtype == dtype
    assert_close("A", A, blocks, operand_bounds)
    position = torch.arange(T, device=A.device) % chunk_size                # row r inside its chunk
    above = torch.arange(chunk_size, device=A.device)[None, :] > position[:, None]
    assert (A[..., above] == 0).all(), "A must be exactly zero above the diagonal"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernel_4a_score_gradient_against_torch(dtype):
    """Kernel 4a's dA = scale · dO Vᵀ inside each chunk, lower triangular (zeros above the diagonal
    exactly), against the same product in fp64, with a ragged last chunk and two value tiles."""
    dtype, C, T = DTYPES[dtype], 32, 45
    (_, _, v, _), _ = inputs(T=T, dtype=dtype, V=32, seed=15)
    do = torch.randn(v.shape, generator=torch.Generator().manual_seed(16)).to(device=DEVICE, dtype=dtype)
    B, _, H, V = v.shape
    dA = torch.empty(B, H, T, C, device=DEVICE, dtype=torch.float32)
    gla_kernels._chunk_score_grad_kernel[(-(-T // C), B * H)](
        do, v, dA, SCALE, T, H=H, V=V, C=C, **gla_kernels._launch_options(v))
    reference = torch.zeros(B, H, T, C, dtype=torch.float64, device=DEVICE)
    for t0 in range(0, T, C):
        n = min(C, T - t0)
        block = SCALE * torch.einsum("bthv,bshv->bhts", do[:, t0:t0 + n].double(), v[:, t0:t0 + n].double())
        reference[..., t0:t0 + n, :n] = block.tril()
    assert_close("dA", dA, reference, "fp32" if dtype == torch.float32 else "half")
    position = torch.arange(T, device=DEVICE) % C
    assert (dA[..., torch.arange(C, device=DEVICE)[None, :] > position[:, None]] == 0).all()


def check_gradients(args, kw, chunk_size, bounds, **options):
    """Gradients of q, k, v, g (and initial_state) for random cotangents of o and of the final state
    (``testing.check_gradients``), against fp64 autograd of the recurrence on the same inputs."""
    check_against_fp64(lambda *a, **k: gla_chunked(*a, **k, scale=SCALE, chunk_size=chunk_size),
                       lambda *a, **k: gla.recurrent(*a, **k, scale=SCALE), args, kw, bounds=bounds,
                       names=["q", "k", "v", "g", *kw], **options)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_extreme_gates(dtype):
    """g = −60 (decay e^{−60}: e^{+60·16} in a naively factorised sub-block would overflow) beside g = 0
    (no decay at all): every exponent the kernels take, forward and backward, must stay ≤ 0."""
    dtype = DTYPES[dtype]
    args, kw = inputs(T=50, dtype=dtype, seed=6)
    g = torch.zeros_like(args[3])
    g[:, 1::3, :, ::2] = -60.0
    g[:, 2::5] = -3.0
    args[3] = g
    o, S = gla_chunked(*args, **kw, scale=SCALE, output_final_state=True, chunk_size=32)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    ref_o, ref_S = reference(args, kw)
    bounds = "fp32" if dtype == torch.float32 else "half"
    assert_close("o", o, ref_o, bounds)
    assert_close("final state", S, ref_S, bounds)
    check_gradients(args, kw, 32, "fp32" if dtype == torch.float32 else "half_grad")


# (dtype, T, chunk_size, gate): ragged T for both chunk sizes, every dtype, the three gate strengths
GRAD_CASES = [
    ("fp32", 37, 16, "unit"), ("fp32", 37, 16, "strong"), ("fp32", 100, 64, "strong"), ("fp32", 100, 64, "weak"),
    ("fp32", 7, 64, "unit"),
    ("bf16", 37, 16, "weak"), ("bf16", 100, 64, "strong"), ("bf16", 100, 64, "unit"),
    ("fp16", 37, 16, "strong"), ("fp16", 100, 64, "weak"),
]


@pytest.mark.parametrize("dtype,T,chunk_size,gate", GRAD_CASES, ids=["-".join(map(str, c)) for c in GRAD_CASES])
def test_gradients_match_fp64_autograd(dtype, T, chunk_size, gate):
    dtype = DTYPES[dtype]
    args, kw = inputs(T=T, dtype=dtype, gate=gate, heads=2, seed=7 + T + chunk_size)
    check_gradients(args, kw, chunk_size, "fp32" if dtype == torch.float32 else "half_grad")


def test_gradients_g_in_bf16_no_initial_state_two_value_tiles():
    """g rounded to bf16 (its gradient comes back in bf16), no initial state, V = 32 (two value tiles)."""
    args, _ = inputs(T=45, dtype=torch.bfloat16, gate="unit", V=32, initial_state=False, seed=11)
    args[3] = args[3].to(torch.bfloat16)
    check_gradients(args, {}, 32, "half_grad", use_final_state=False, seed=12)


def test_backward_reuses_the_forward_scores(monkeypatch):
    """A is computed once, in the forward (kernels 1b-1c), and saved: the backward reruns only kernel 1a."""
    calls = []
    scores = gla_kernels._scores
    monkeypatch.setattr(gla_kernels, "_scores", lambda *a, **kw: calls.append(1) or scores(*a, **kw))
    args, _ = inputs(T=20, dtype=torch.float32, initial_state=False, seed=14)
    xs = [x.clone().requires_grad_() for x in args]
    o, _ = gla_chunked(*xs, scale=SCALE, chunk_size=16)
    assert len(calls) == 1
    o.sum().backward()
    assert len(calls) == 1, "the backward formed A again"
    assert all(x.grad is not None for x in xs)


def test_gradient_without_final_state():
    args, _ = inputs(T=20, dtype=torch.float32, initial_state=False, seed=9)
    check_gradients(args, {}, 16, "fp32", use_final_state=False, seed=9)


def test_unsupported_input_raises_value_error():
    args, kw = inputs(T=8, dtype=torch.float32, batch=1, K=16, V=16, seed=10)
    q, k, v, g = args

    def raises(match, *xs, **kws):
        with pytest.raises(ValueError, match=match):
            gla_chunked(*xs, scale=SCALE, **kws)

    raises("float64", *(x.double() for x in args))                         # fp64: use the PyTorch forms
    raises("power of two", q[..., :12], k[..., :12], v, g[..., :12])        # K = 12
    raises("V = 8", q, k, v[..., :8], g)                                    # V = 8
    raises("V = 512", q, k, torch.cat([v] * 32, -1), g)                     # V = 512
    raises("chunk_size", *args, chunk_size=8)
    raises("chunk_size", *args, chunk_size=48)
    raises("g must have shape", q, k, v, g[:, :4])
    raises("dtype", q, k.half(), v, g)
    raises("<= 0", q, k, v, -g)                                             # positive log forget gates
    raises("initial_state must have shape", *args, initial_state=kw["initial_state"][..., :8])
    raises("4 dims", q[0], k, v, g)
