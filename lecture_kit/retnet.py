"""Retention, the token mixer of RetNet (Sun et al., 2023).  Derived in notebook 03d.

Per batch and head, with a fixed decay γ = exp(log_gamma[h]) ∈ (0, 1) and state S_t ∈ R^{K×V}:

    S_t = γ S_{t-1} + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

Parallel form: O = (scale · Q Kᵀ ∘ D) V with D_nm = γ^{n−m} (n ≥ m), 0 otherwise.  Because
γ^{n−m} = γ^n γ^{−m}, the matrix is K-semiseparable.  The paper's third form, the chunkwise
recurrence, is ``chunked``.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; log_gamma [H] (≤ 0; RetNet uses log(1 − 2^{−5−h});
0 gives plain causal linear attention); initial_state and final state [B, H, K, V].  ``scale``
defaults to K^{-1/2}.  The decay is kept as its logarithm because the γ of heads h ≥ 4 round to
exactly 1.0 in bf16 (notebook 05b, section 3).

Every form returns ``(o, final_state or None)``; o has q's dtype, the state is fp32 (fp64 for fp64).
This is retention itself, before RetNet's group norm; the norm and the paper's score
normalisations are per-row scalings that the group norm removes (notebook 03d), and live in
``lecture_kit.blocks``.  ``help(retnet.chunked)`` and the others list each form's parameters,
returns and a checked example.
"""
from __future__ import annotations

import torch

from ._docs import document_form
from ._spec import KEYS, VALUES, Arg, MixerSpec, chunk_description, queries, scale_description
from ._validate import compute_dtype
from .semiseparable import segsum


def _sample(draw, n, gate):
    """q, k, v standard normal; RetNet's decays log γ_h = log(1 − 2^{−5−h}) (``gate="strong"``:
    log(1 − 2^{−1−h}))."""
    B, T, H, K, V = (n[d] for d in ("B", "T", "H", "K", "V"))
    h = torch.arange(H, dtype=torch.float64)
    log_gamma = torch.log1p(-2.0 ** (-5 - h)) if gate == "weak" else torch.log1p(-2.0 ** (-1 - h))
    return (draw.randn(B, T, H, K), draw.randn(B, T, H, K), draw.randn(B, T, H, V), log_gamma), {}


#: Retention as the forms, the docs, ``testing`` and the retention layer see it (``lecture_kit/_spec.py``).
SPEC = MixerSpec(
    name="retnet", title="RetNet",
    inputs=(
        queries(), KEYS, VALUES,
        Arg("log_gamma", "H", """
            Per-head log decay log γ ``[H]``, ≤ 0 (RetNet: ``log(1 - 2**(-5 - h))`` for head h;
            0 is causal linear attention without decay, −inf a head that forgets everything at
            every token).  Any float dtype.""", activation=False, sign="<= 0"),
    ),
    scale="K^-1/2", scale_description=scale_description("o_t = scale · S_tᵀ q_t", "None means K^(-1/2)."),
    chunk_description=chunk_description("the last chunk is shorter"),
    log_decay=("log_gamma",),
    sample=_sample,
    kernel_names={"log_decay": "log_gamma", "G": "H"},
)


def recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, *,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition, one token at a time:
    S_t = γ S_{t-1} + k_t v_tᵀ,  o_t = scale · S_tᵀ q_t."""
    scale = SPEC.check("recurrent", q, k, v, log_gamma, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state).scale
    f = compute_dtype(q.dtype)
    Bsz, T, H, K = q.shape
    q_, k_, v_ = q.to(f), k.to(f), v.to(f)
    gamma = torch.exp(log_gamma.to(f))[None, :, None, None]
    S = q.new_zeros(Bsz, H, K, v.shape[-1], dtype=f) if initial_state is None else initial_state.to(f)
    outs = []
    for t in range(T):
        S = gamma * S + torch.einsum("bhk,bhv->bhkv", k_[:, t], v_[:, t])
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_[:, t]))
    return torch.stack(outs, dim=1).to(q.dtype), (S if output_final_state else None)


def _decay_mask(log_gamma, T, f):
    """D [H, T, T]: γ^{n−m} for n ≥ m, 0 above the diagonal (masked before exp)."""
    return torch.exp(segsum(log_gamma.to(f)[:, None].expand(-1, T)))


def matrix(q: torch.Tensor, k: torch.Tensor, log_gamma: torch.Tensor, *,
           scale: float | None = None) -> torch.Tensor:
    """The retention matrix scale · (Q Kᵀ ∘ D)  [B, H, T, T], so that o = matrix @ v."""
    scale = SPEC.check("matrix", q, k, log_gamma, scale=scale).scale
    f = compute_dtype(q.dtype)
    P = scale * torch.einsum("bihk,bjhk->bhij", q.to(f), k.to(f)) * _decay_mask(log_gamma, q.shape[1], f)
    return P.to(q.dtype)


def parallel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, *,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parallel form O = scale · (Q Kᵀ ∘ D) V, plus the initial state's decayed read-out
    scale · γ^{n+1} S_0ᵀ q_n; the final state is Σ_m γ^{T−1−m} k_m v_mᵀ + γ^T S_0."""
    scale = SPEC.check("parallel", q, k, v, log_gamma, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state).scale
    f = compute_dtype(q.dtype)
    T = q.shape[1]
    q_, k_, v_ = q.to(f), k.to(f), v.to(f)
    D = _decay_mask(log_gamma, T, f)                                           # [H, T, T]
    o = scale * torch.einsum("bnhk,bmhk,hnm,bmhv->bnhv", q_, k_, D, v_)
    n = torch.arange(1, T + 1, dtype=f, device=q.device)
    gamma_pow = torch.exp(log_gamma.to(f)[:, None] * n)                        # γ^{n+1} [H, T]
    if initial_state is not None:
        o = o + scale * gamma_pow.T[None, :, :, None] * torch.einsum("bhkv,bnhk->bnhv", initial_state.to(f), q_)
    final = None
    if output_final_state:
        final = torch.einsum("hm,bmhk,bmhv->bhkv", D[:, -1, :], k_, v_)       # D[T−1, m] = γ^{T−1−m}
        if initial_state is not None:
            final = final + gamma_pow[:, -1, None, None] * initial_state.to(f)
    return o.to(q.dtype), final


def chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, *,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RetNet's chunkwise recurrent form (Sun et al. 2023, §2.1), chunk by chunk.

    For a chunk of n tokens (the last may be shorter) with local positions i, j = 0..n−1:
        O_[c] = scale · (Q Kᵀ ∘ D) V  +  scale · (Q R_{c−1}) ∘ ξ,     ξ_i = γ^{i+1}
        R_c   = Kᵀ (V ∘ ζ) + γ^n R_{c−1},                            ζ_j = γ^{n−1−j}
    The first term is the parallel form inside the chunk; the second reads the state that entered
    it; R carries the state from chunk to chunk.  Cost: linear in T.
    """
    _, scale, Q = SPEC.check("chunked", q, k, v, log_gamma, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, chunk_size=chunk_size)
    f = compute_dtype(q.dtype)
    Bsz, T, H, K = q.shape
    lg = log_gamma.to(f)[:, None]                                              # [H, 1]
    R = q.new_zeros(Bsz, H, K, v.shape[-1], dtype=f) if initial_state is None else initial_state.to(f)
    outs = []
    for start in range(0, T, Q):
        qc, kc, vc = (t[:, start:start + Q].to(f) for t in (q, k, v))
        n = qc.shape[1]
        pos = torch.arange(n, dtype=f, device=q.device)
        D = _decay_mask(log_gamma, n, f)                                       # [H, n, n]
        xi = torch.exp(lg * (pos + 1))                                         # [H, n]
        zeta = D[:, -1, :]                                                     # γ^{n−1−j} [H, n]
        inner = torch.einsum("bihk,bjhk,hij,bjhv->bihv", qc, kc, D, vc)
        cross = torch.einsum("bihk,bhkv->bihv", qc, R) * xi.T[None, :, :, None]
        outs.append(scale * (inner + cross))
        R = torch.einsum("bjhk,bjhv,hj->bhkv", kc, vc, zeta) + torch.exp(lg * n)[None, :, :, None] * R
    return torch.cat(outs, dim=1).to(q.dtype), (R if output_final_state else None)


def kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, *,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton chunkwise kernel (``lecture_kit/kernels/scalar_decay.py``, shared with SSD): the
    chunkwise recurrence of ``chunked`` with a constant log-decay per head.

    bf16, fp16 or fp32 inputs (fp64: use ``chunked``); K and V powers of two in 16..256;
    chunk_size 16, 32, 64 or 128.  Forward and backward are Triton kernels.
    """
    call = SPEC.check("kernel", q, k, v, log_gamma, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size)
    from .kernels.scalar_decay import scalar_decay_chunked
    return scalar_decay_chunked(q, k, v, log_gamma, scale=call.scale, initial_state=initial_state,
                                output_final_state=output_final_state, chunk_size=call.chunk_size,
                                checked=call.sig)


# ---- reference sections for help() ---------------------------------------------------
# Every form takes the same inputs, described once in SPEC; ``document``
# (lecture_kit/_docs.py) appends Parameters, Returns, Raises and Examples to each form's
# docstring above, whose math is what the notebooks' listings show.

_RETURNS = """
o : torch.Tensor
    The output ``[B, T, H, V]``, in q's dtype.
final_state : torch.Tensor | None
    The state after the last token ``[B, H, K, V]``, float32 (float64 for float64
    inputs); None unless ``output_final_state``.
"""

_SETUP = """
>>> import torch, lecture_kit as lk
>>> _ = torch.manual_seed(0)
>>> B, T, H, K, V = 2, 50, 4, 16, 16
>>> q, k, v = (torch.randn(B, T, H, d) for d in (K, K, V))
>>> log_gamma = torch.log1p(-2.0 ** (-5 - torch.arange(H)))     # RetNet's: log γ < 0
"""

document_form(recurrent, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> o, S = lk.retnet.recurrent(q, k, v, log_gamma, output_final_state=True)
>>> o.shape, S.shape, S.dtype
(torch.Size([2, 50, 4, 16]), torch.Size([2, 4, 16, 16]), torch.float32)

A sequence in two pieces, the state passed along, gives the same output and state:

>>> head = [t[:, :20] for t in (q, k, v)]
>>> tail = [t[:, 20:] for t in (q, k, v)]
>>> o1, S1 = lk.retnet.recurrent(*head, log_gamma, output_final_state=True)
>>> o2, S2 = lk.retnet.recurrent(*tail, log_gamma, initial_state=S1,
...                              output_final_state=True)
>>> torch.allclose(torch.cat([o1, o2], dim=1), o, atol=1e-5)
True
>>> torch.allclose(S2, S, atol=1e-5)
True
""")

document_form(parallel, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> kw = dict(initial_state=torch.randn(B, H, K, V), output_final_state=True)
>>> o, S = lk.retnet.parallel(q, k, v, log_gamma, **kw)
>>> o_ref, S_ref = lk.retnet.recurrent(q, k, v, log_gamma, **kw)
>>> torch.allclose(o, o_ref, atol=1e-5), torch.allclose(S, S_ref, atol=1e-5)
(True, True)

Half-precision activations with an fp32 decay: the output is bf16, the state stays fp32.

>>> half = [t.bfloat16() for t in (q, k, v)]
>>> o, S = lk.retnet.parallel(*half, log_gamma, output_final_state=True)
>>> o.dtype, S.dtype
(torch.bfloat16, torch.float32)
""")

document_form(chunked, SPEC, returns=_RETURNS,
              examples=_SETUP + """
T = 50 is not a multiple of the chunk size, so the last chunk is ragged:

>>> kw = dict(initial_state=torch.randn(B, H, K, V), output_final_state=True)
>>> o, S = lk.retnet.chunked(q, k, v, log_gamma, **kw, chunk_size=16)
>>> o_ref, S_ref = lk.retnet.recurrent(q, k, v, log_gamma, **kw)
>>> torch.allclose(o, o_ref, atol=1e-5), torch.allclose(S, S_ref, atol=1e-5)
(True, True)
""")

document_form(matrix, SPEC, returns="""
P : torch.Tensor
    The retention matrix ``[B, H, T, T]``, in q's dtype, lower triangular: with a zero
    initial state, ``o[b, :, h] = P[b, h] @ v[b, :, h]``.
""", examples=_SETUP + """
>>> P = lk.retnet.matrix(q, k, log_gamma)
>>> P.shape
torch.Size([2, 4, 50, 50])
>>> o = torch.einsum("bhij,bjhv->bihv", P, v)
>>> torch.allclose(o, lk.retnet.recurrent(q, k, v, log_gamma)[0], atol=1e-5)
True

Every block on or below the diagonal has rank at most K (measured in fp64):

>>> P64 = lk.retnet.matrix(q.double(), k.double(), log_gamma.double())[0, 0]
>>> lk.semiseparable.semiseparable_rank(P64)
16
""")

document_form(kernel, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> dev = lk.DEVICE     # CUDA if visible, else the CPU with Triton's interpreter
>>> args = [t.to(dev) for t in (q, k, v, log_gamma)]
>>> o, S = lk.retnet.kernel(*args, output_final_state=True, chunk_size=16)
>>> o_ref, S_ref = lk.retnet.chunked(q, k, v, log_gamma, output_final_state=True)
>>> torch.allclose(o.cpu(), o_ref, atol=1e-4), torch.allclose(S.cpu(), S_ref, atol=1e-4)
(True, True)
""")
