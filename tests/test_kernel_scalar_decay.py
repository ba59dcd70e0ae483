"""The scalar-decay Triton kernel (SSD and RetNet) against the fp64 recurrent definitions.

On a machine without CUDA the kernels run through Triton's interpreter (importing lecture_kit sets
TRITON_INTERPRET=1), so the sizes here are small.  Every reference is computed in fp64 from the same
rounded inputs the kernel sees; errors are measured as relative RMS and as max-abs / max|ref|, with
the tolerances of reference/math.md §5.
"""
import pytest
import torch

import lecture_kit  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from lecture_kit import retnet, ssd
from lecture_kit.kernels.scalar_decay import scalar_decay_chunked
from lecture_kit.testing import TOLERANCE, assert_close, check_gradients

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# math.md §5.3: IEEE fp32 products in tl.dot for fp32; half-precision operands, fp32 accumulation
TOL = {torch.float32: TOLERANCE["fp32"], torch.bfloat16: TOLERANCE["half"], torch.float16: TOLERANCE["half"]}
GRAD_TOL = {torch.float32: TOLERANCE["fp32"], torch.bfloat16: TOLERANCE["half_grad"],
            torch.float16: TOLERANCE["half_grad"]}


def make_inputs(mixer, *, B=2, T=100, H=4, G=None, K=16, V=32, dtype=torch.bfloat16, gate="weak",
                D=None, initial_state=True, seed=0):
    """Random inputs for one call, already rounded to ``dtype`` where the kernel reads that dtype.

    SSD: q = C, k = B, v = x, log_decay = A < 0, dt = Δ ≥ 0.  Weak gates: A ∈ [−1, −0.1],
    Δ ≈ softplus(N(−2, 1)) (long memory); strong gates: A ∈ [−8, −4], Δ ≈ softplus(N(1, 1)), so a
    chunk of 64 tokens decays by e^{−1000} or so (underflow, never overflow).
    RetNet: log γ_h = log(1 − 2^{−5−h}) (weak) or log(1 − 2^{−1−h}) (strong), q and k per head.
    """
    g = torch.Generator().manual_seed(seed)
    G = H if G is None else G
    randn = lambda *shape: torch.randn(*shape, generator=g)          # noqa: E731
    q, k = randn(B, T, G, K).to(dtype), randn(B, T, G, K).to(dtype)
    v = randn(B, T, H, V).to(dtype)
    args = dict(q=q, k=k, v=v)
    if mixer == "ssd":
        lo, hi, shift = (0.1, 1.0, -2.0) if gate == "weak" else (4.0, 8.0, 1.0)
        args["log_decay"] = -(lo + (hi - lo) * torch.rand(H, generator=g))
        args["dt"] = torch.nn.functional.softplus(randn(B, T, H) + shift)
        args["scale"] = 1.0
    else:
        first = 5 if gate == "weak" else 1
        args["log_decay"] = torch.log1p(-2.0 ** (-first - torch.arange(H, dtype=torch.float32)))
        args["dt"] = None
        args["scale"] = K ** -0.5
    if D == "H":
        args["D"] = randn(H)
    elif D == "HV":
        args["D"] = randn(H, V)
    else:
        args["D"] = None
    args["initial_state"] = randn(B, H, K, V) if initial_state else None
    return {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}


def kernel(args, chunk_size):
    return scalar_decay_chunked(args["q"], args["k"], args["v"], args["log_decay"], dt=args["dt"],
                                scale=args["scale"], D=args["D"], initial_state=args["initial_state"],
                                output_final_state=True, chunk_size=chunk_size)


def reference(mixer, args):
    """fp64 recurrent form of lecture_kit.ssd / lecture_kit.retnet on the same (rounded) inputs."""
    f64 = {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    h0 = f64["initial_state"]
    if mixer == "ssd":
        # SSD in the kernel's terms: q = C, k = B, v = x; mamba's state layout is [B, H, P, N]
        y, hT = ssd.recurrent(f64["v"], f64["dt"], f64["log_decay"], f64["k"], f64["q"], D=f64["D"],
                              initial_state=None if h0 is None else h0.transpose(-1, -2),
                              output_final_state=True)
        return y, hT.transpose(-1, -2)
    # retnet's forms take one q, k per head: expand the groups (the reference only, never the kernel)
    H = f64["v"].shape[2]
    q, k = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (f64["q"], f64["k"]))
    return retnet.recurrent(q, k, f64["v"], f64["log_decay"], scale=f64["scale"],
                            initial_state=h0, output_final_state=True)


# ------------------------------------------------------------------------------------------------
# Forward: output and final state
# ------------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # mixer,  dtype,          T,   chunk, G,    gate,     D
    ("ssd",    torch.bfloat16, 100, 16,    1,    "weak",   "H"),
    ("ssd",    torch.bfloat16, 100, 64,    None, "strong", "HV"),
    ("ssd",    torch.float16,  7,   64,    2,    "weak",   None),
    ("ssd",    torch.float32,  100, 16,    None, "strong", "H"),
    ("ssd",    torch.float32,  1,   16,    1,    "weak",   "HV"),
    ("retnet", torch.bfloat16, 100, 64,    None, "weak",   None),
    ("retnet", torch.float16,  100, 16,    None, "strong", None),
    ("retnet", torch.float32,  7,   16,    None, "weak",   None),
    ("retnet", torch.float32,  100, 64,    1,    "strong", None),
]


@pytest.mark.parametrize("mixer,dtype,T,chunk_size,G,gate,D", FORWARD_CASES)
def test_forward_matches_recurrent(mixer, dtype, T, chunk_size, G, gate, D):
    args = make_inputs(mixer, T=T, G=G, dtype=dtype, gate=gate, D=D)
    o, final = kernel(args, chunk_size)
    o_ref, final_ref = reference(mixer, args)
    assert o.dtype == dtype and o.shape == args["v"].shape
    assert final.dtype == torch.float32 and final.shape == args["initial_state"].shape
    assert_close("o", o, o_ref, TOL[dtype])
    assert_close("final_state", final, final_ref, TOL[dtype])


def test_no_initial_state_no_final_state():
    args = make_inputs("ssd", T=37, G=2, dtype=torch.float32, initial_state=False, D="H")
    o, final = scalar_decay_chunked(args["q"], args["k"], args["v"], args["log_decay"], dt=args["dt"],
                                    D=args["D"], chunk_size=32)
    assert final is None
    assert_close("o", o, reference("ssd", args)[0], TOL[torch.float32])


# ------------------------------------------------------------------------------------------------
# Backward: every input's gradient against fp64 autograd through the recurrent form
# ------------------------------------------------------------------------------------------------

GRAD_CASES = [
    # mixer,  dtype,          T,   chunk, G,    gate,     D
    ("ssd",    torch.float32,  100, 16,    1,    "weak",   "HV"),
    ("ssd",    torch.bfloat16, 100, 64,    2,    "weak",   "H"),
    ("ssd",    torch.float16,  7,   16,    None, "strong", "H"),
    ("retnet", torch.float32,  100, 64,    None, "weak",   None),
    ("retnet", torch.bfloat16, 100, 16,    None, "strong", None),
]


@pytest.mark.parametrize("mixer,dtype,T,chunk_size,G,gate,D", GRAD_CASES)
def test_gradients_match_recurrent(mixer, dtype, T, chunk_size, G, gate, D):
    args = make_inputs(mixer, B=1, T=T, G=G, dtype=dtype, gate=gate, D=D)
    names = [n for n in ("q", "k", "v", "log_decay", "dt", "D", "initial_state") if args[n] is not None]

    def through(fn):            # fn(args) as a function of the differentiated tensors, by name
        return lambda **leaves: fn({**args, **{n: leaves[n] for n in names}})[:2]

    check_gradients(through(lambda a: kernel(a, chunk_size)),
                    through(lambda a: reference(mixer, {**a, "scale": args["scale"]})),
                    (), {n: args[n] for n in names}, bounds=GRAD_TOL[dtype], names=names, seed=1)


def test_gradient_without_final_state():
    """Only o is used: the final state's gradient is absent and the adjoint starts from zero."""
    args = make_inputs("retnet", B=1, T=50, dtype=torch.float32, initial_state=False)
    check_gradients(lambda *xs, output_final_state: scalar_decay_chunked(*xs, scale=args["scale"], chunk_size=16),
                    lambda *xs, output_final_state: retnet.recurrent(*xs, scale=args["scale"],
                                                                      output_final_state=True),
                    [args[n] for n in ("q", "k", "v", "log_decay")], bounds=GRAD_TOL[torch.float32],
                    names=["q", "k", "v", "log_decay"], use_final_state=False)


@pytest.mark.parametrize("mixer,G", [("retnet", None), ("ssd", 2)])
def test_gradients_without_the_decays(mixer, G):
    """With a fixed decay (and Δ) the kernel skips the decay-gradient terms: the other gradients
    must be exactly those of the full backward, whose decay gradients are checked above."""
    args = make_inputs(mixer, B=1, T=70, G=G, dtype=torch.bfloat16, gate="strong")
    names = ("q", "k", "v", "initial_state")
    g = torch.Generator().manual_seed(2)
    do = torch.randn(args["v"].shape, generator=g).to(torch.bfloat16).to(DEVICE)

    def grads(decays_too):
        learn = names + (("log_decay", "dt") if decays_too and mixer == "ssd" else
                         ("log_decay",) if decays_too else ())
        leaves = {n: args[n].clone().requires_grad_() for n in learn}
        o, _ = kernel({**args, **leaves}, 16)
        return torch.autograd.grad((o.float() * do.float()).sum(), [leaves[n] for n in names])

    for n, full, skipped in zip(names, grads(True), grads(False)):
        assert torch.equal(full, skipped), n


# ------------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the problem, never a Triton crash
# ------------------------------------------------------------------------------------------------

def test_rejects_bad_input():
    args = make_inputs("ssd", T=8, dtype=torch.float32)
    call = lambda **kw: scalar_decay_chunked(**{**{n: args[n] for n in ("q", "k", "v", "log_decay")},  # noqa: E731
                                                "dt": args["dt"], **kw})
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        scalar_decay_chunked(args["q"].double(), args["k"].double(), args["v"].double(), args["log_decay"])
    with pytest.raises(ValueError, match="power of two"):
        scalar_decay_chunked(args["q"][..., :12], args["k"][..., :12], args["v"], args["log_decay"])
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=48)
    with pytest.raises(ValueError, match="log_decay"):
        scalar_decay_chunked(args["q"], args["k"], args["v"], -args["log_decay"])
    with pytest.raises(ValueError, match="dt"):
        call(dt=-args["dt"])
    with pytest.raises(ValueError, match="divide"):              # G = 3 groups for H = 4 heads
        scalar_decay_chunked(args["q"][:, :, :3], args["k"][:, :, :3], args["v"], args["log_decay"])
    with pytest.raises(ValueError, match="initial_state"):
        call(initial_state=torch.zeros(2, 4, 32, 16))
