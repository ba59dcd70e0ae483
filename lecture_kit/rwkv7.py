"""RWKV-7 "Goose" time mixing: the generalised delta rule (Peng et al., 2025).  Derived in
notebook 03c.

Per batch and head, state S_t ∈ R^{K×V} (flash-linear-attention's layout; BlinkDL's code stores Sᵀ):

    S_t = (diag(exp w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ
    o_t = scale · S_tᵀ r_t

The transition G_t = diag(exp w_t) + b_t a_tᵀ is diagonal-plus-rank-one (DPLR).  The RWKV-7 layer
passes a = −κ̂ and b = κ̂ ∘ a_icl with κ̂ a unit "removal key" and a_icl ∈ (0, 1) an in-context
learning rate, so that the rank-one term subtracts (κ̂ ∘ a_icl) κ̂ᵀ S_{t-1}: with the new
key-value pair this is one step of gradient descent on ½‖Sᵀκ̂ − v‖² (an online regression), plus
decay.  It is *not* RWKV-4's ratio Σ w^{i−j} k_j v_j / Σ w^{i−j} k_j (notebook 03c).

Unrolled, o_t = Σ_{j≤t} A_tj v_j with A_tj = scale · r_tᵀ G_t ⋯ G_{j+1} k_j: an SSS representation
with K×K transitions, so A is K-semiseparable — but, because the G_t do not commute, it is not a
mask times a low-rank matrix.

Shapes: r, w, k, a, b [B, T, H, K] (w = log decay ≤ 0; the layer uses w = −e^{−1/2}·sigmoid(·));
v [B, T, H, V]; initial_state and final state [B, H, K, V].  ``scale`` defaults to 1.0 (fla's
RWKV-7).  Every form returns ``(o, final_state or None)``; o has r's dtype, the state is fp32
(fp64 for fp64).  ``help(rwkv7.chunked)`` and the others list each form's parameters, returns
and a checked example.
"""
from __future__ import annotations

import torch

from ._docs import document_form
from ._spec import KEYS, VALUES, Arg, MixerSpec, chunk_description, queries, scale_description
from ._validate import compute_dtype, pad_time
from .semiseparable import segsum, sss_matrix


def _sample(draw, n, gate):
    """The layer's bounded decay w = −e^{−1/2}·σ(N(0, 1)) (``gate="strong"``: unbounded,
    −exp(N(1, 1)), down to about −20); a = −κ̂ and b = κ̂ ∘ a_icl with κ̂ a unit removal key and
    a_icl = σ(N(0, 1)); r, v standard normal, k of variance 1/K."""
    B, T, H, K, V = (n[d] for d in ("B", "T", "H", "K", "V"))
    randn = draw.randn
    w = -0.6065306597126334 * torch.sigmoid(randn(B, T, H, K)) if gate == "weak" \
        else -torch.exp(randn(B, T, H, K) + 1.0)
    kappa = torch.nn.functional.normalize(randn(B, T, H, K), dim=-1)
    a_icl = torch.sigmoid(randn(B, T, H, K))
    return (randn(B, T, H, K), w, randn(B, T, H, K) / K ** 0.5, randn(B, T, H, V), -kappa,
            kappa * a_icl), {}


#: RWKV-7's inputs, checks and defaults (``lecture_kit/_spec.py``), for every form, the docs, ``testing``
#: and the time-mix layer.
SPEC = MixerSpec(
    name="rwkv7", title="RWKV-7",
    inputs=(
        queries("r", "Receptance, RWKV's query,", "``k``, ``v``, ``a`` and ``b``"),
        Arg("w", "B T H K", """
            Log decay ``[B, T, H, K]``, ≤ 0 everywhere (the layer uses
            ``-exp(-0.5) * sigmoid(·)``); −inf resets a channel of the state.  Any float dtype:
            keep it in fp32 beside half-precision activations.""", activation=False, sign="<= 0"),
        KEYS, VALUES,
        Arg("a", "B T H K", """
            The transition's left factor ``[B, T, H, K]``: the layer passes ``-kappa``, a
            removal key of unit norm per head."""),
        Arg("b", "B T H K", """
            The transition's right factor ``[B, T, H, K]``: the layer passes ``kappa * a_icl``,
            with an in-context learning rate ``a_icl`` in (0, 1)."""),
    ),
    scale=1.0, scale_description=scale_description("o_t = scale · S_tᵀ r_t", "fla's RWKV-7 uses 1.0, the default."),
    kernel_chunk_size=16,
    chunk_description=chunk_description("the last chunk is padded with zero keys and decays, which is exact"),
    kernel_chunk_description="""
        Tokens per chunk: 16 for any K, 32 for K ≤ 128, 64 for K ≤ 64.  T need not be a
        multiple.""",
    log_decay=("w",),
    sample=_sample,
)


def _transitions(w, a, b, f):
    """G_t = diag(exp w_t) + b_t a_tᵀ  [B, H, T, K, K]."""
    w, a, b = (t.to(f).transpose(1, 2) for t in (w, a, b))
    return torch.diag_embed(torch.exp(w)) + b[..., :, None] * a[..., None, :]


def recurrent(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
    b: torch.Tensor, *, scale: float = 1.0, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition, one token at a time:
    S_t = diag(exp w_t) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ,  o_t = scale · S_tᵀ r_t."""
    scale = SPEC.check("recurrent", r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state).scale
    f = compute_dtype(r.dtype)
    Bsz, T, H, K = r.shape
    r_, k_, v_, a_, b_, decay = r.to(f), k.to(f), v.to(f), a.to(f), b.to(f), torch.exp(w.to(f))
    S = r.new_zeros(Bsz, H, K, v.shape[-1], dtype=f) if initial_state is None else initial_state.to(f)
    outs = []
    for t in range(T):
        removed = torch.einsum("bhk,bhkv->bhv", a_[:, t], S)                      # a_tᵀ S_{t-1}
        S = decay[:, t, :, :, None] * S + torch.einsum("bhk,bhv->bhkv", b_[:, t], removed) \
            + torch.einsum("bhk,bhv->bhkv", k_[:, t], v_[:, t])
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, r_[:, t]))
    return torch.stack(outs, dim=1).to(r.dtype), (S if output_final_state else None)


def matrix(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, a: torch.Tensor,
           b: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """A [B, H, T, T] with A_tj = scale · r_tᵀ G_t ⋯ G_{j+1} k_j (j ≤ t), so o = A v.

    Built directly from the SSS representation (``semiseparable.sss_matrix``), O(T² K²).
    """
    scale = SPEC.check("matrix", r, w, k, a, b, scale=scale).scale
    f = compute_dtype(r.dtype)
    G = _transitions(w, a, b, f)
    A = sss_matrix(scale * r.to(f).transpose(1, 2), G, k.to(f).transpose(1, 2))
    return A.to(r.dtype)


def parallel(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
    b: torch.Tensor, *, scale: float = 1.0, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o = A v, plus the initial state carried through every transition: scale · r_tᵀ G_t ⋯ G_0 S_0.

    The final state is Σ_j (G_{T-1} ⋯ G_{j+1} k_j) v_jᵀ + G_{T-1} ⋯ G_0 S_0, with the products of
    transitions accumulated in one backward sweep.
    """
    scale = SPEC.check("parallel", r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state).scale
    f = compute_dtype(r.dtype)
    T = r.shape[1]
    r_, k_, v_ = r.to(f), k.to(f), v.to(f)
    G = _transitions(w, a, b, f)                                                   # [B, H, T, K, K]
    A = sss_matrix(scale * r_.transpose(1, 2), G, k_.transpose(1, 2))
    o = torch.einsum("bhtj,bjhv->bthv", A, v_)
    if initial_state is not None:
        P = initial_state.to(f)
        reads = []
        for t in range(T):
            P = G[:, :, t] @ P                                                     # G_t ⋯ G_0 S_0
            reads.append(scale * torch.einsum("bhk,bhkv->bhv", r_[:, t], P))
        o = o + torch.stack(reads, dim=1)
    final = None
    if output_final_state:
        product = torch.eye(r.shape[-1], dtype=f, device=r.device).expand(*G.shape[:2], -1, -1)
        carried = []
        for j in range(T - 1, -1, -1):                   # product = G_{T-1} ⋯ G_{j+1}
            carried.append(product @ k_[:, j, :, :, None])
            product = product @ G[:, :, j]
        keys_at_end = torch.cat(carried[::-1], dim=-1)   # [B, H, K, T]: column j is G_{T-1}⋯G_{j+1} k_j
        final = torch.einsum("bhkj,bjhv->bhkv", keys_at_end, v_)
        if initial_state is not None:
            final = final + product @ initial_state.to(f)   # product = G_{T-1} ⋯ G_0
    return o.to(r.dtype), final


def chunked(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
    b: torch.Tensor, *, scale: float = 1.0, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-7's chunkwise algorithm with the WY/UT transform, notebook 03c.

    In a chunk, Γ_i = w_1 + ⋯ + w_i (chunk-local, per channel), Γ⁻ its exclusive version, S_0 the
    entering state.  The pseudo-values ν_i = a_iᵀ S_{i-1} (what the rank-one term removes) satisfy
    a unit-lower-triangular system, so with the four C×C matrices (exponents ≤ 0, masked before
    exp), nonzero for j ≤ i on the first line and for j < i on the second,

        A^{qk}_ij = Σ_d r_id k_jd e^{Γ_id − Γ_jd},    A^{qb}_ij = Σ_d r_id b_jd e^{Γ_id − Γ_jd}
        A^{ak}_ij = Σ_d a_id k_jd e^{Γ⁻_id − Γ_jd},   A^{ab}_ij = Σ_d a_id b_jd e^{Γ⁻_id − Γ_jd}

    the UT transform gives U = (I − A^{ab})^{-1} A^{ak} V and W = (I − A^{ab})^{-1} (a ∘ e^{Γ⁻}),
    both parallel over chunks.  Then, sequentially over chunks:
        𝒱 = U + W S_0
        O = scale · (A^{qk} V + A^{qb} 𝒱 + (r ∘ e^{Γ}) S_0)
        S = e^{Γ_C} ∘ S_0 + (k ∘ e^{Γ_C − Γ})ᵀ V + (b ∘ e^{Γ_C − Γ})ᵀ 𝒱
    """
    _, scale, C = SPEC.check("chunked", r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, chunk_size=chunk_size)
    f = compute_dtype(r.dtype)
    Bsz, T, H, K = r.shape
    V = v.shape[-1]
    n_chunks = -(-T // C)

    def chunks(t):   # [B, T, H, D] -> [B, H, n_c, C, D]
        return pad_time(t.to(f), C).reshape(Bsz, n_chunks, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4)

    Rc, Wc, Kc, Vc, Ac, Bc = (chunks(t) for t in (r, w, k, v, a, b))
    # pairwise exponents per channel: inclusive Γ_i − Γ_j (j ≤ i) and exclusive Γ⁻_i − Γ_j (j < i)
    incl = segsum(Wc.transpose(-1, -2))                                          # [B, H, n, K, C, C]
    excl = torch.cat([torch.full_like(incl[..., :1, :], float("-inf")), incl[..., :-1, :]], dim=-2)
    E_incl, E_excl = torch.exp(incl), torch.exp(excl)
    pairwise = lambda x, y, E: torch.einsum("bhnid,bhnjd,bhndij->bhnij", x, y, E)
    A_qk, A_qb = pairwise(Rc, Kc, E_incl), pairwise(Rc, Bc, E_incl)
    A_ak, A_ab = pairwise(Ac, Kc, E_excl), pairwise(Ac, Bc, E_excl)
    Gamma = Wc.cumsum(dim=-2)                                                    # Γ   [B, H, n, C, K]
    Gamma_excl = torch.cat([torch.zeros_like(Gamma[..., :1, :]), Gamma[..., :-1, :]], dim=-2)   # Γ⁻
    to_end = E_incl[..., -1, :].transpose(-1, -2)                                # e^{Γ_C − Γ_j} [B, H, n, C, K]

    # UT transform, parallel over chunks: (I − A^{ab}) is unit lower triangular
    I_minus = torch.eye(C, dtype=f, device=r.device) - A_ab
    solve = lambda rhs: torch.linalg.solve_triangular(I_minus, rhs, upper=False, unitriangular=True)
    U = solve(A_ak @ Vc)                                                          # [B, H, n, C, V]
    W = solve(Ac * torch.exp(Gamma_excl))                                         # [B, H, n, C, K]

    S = r.new_zeros(Bsz, H, K, v.shape[-1], dtype=f) if initial_state is None else initial_state.to(f)
    outs = []
    for i in range(Rc.shape[2]):
        pseudo = U[:, :, i] + W[:, :, i] @ S                                      # 𝒱
        outs.append(scale * (A_qk[:, :, i] @ Vc[:, :, i] + A_qb[:, :, i] @ pseudo
                             + (Rc[:, :, i] * torch.exp(Gamma[:, :, i])) @ S))
        S = torch.exp(Gamma[:, :, i, -1, :, None]) * S \
            + (Kc[:, :, i] * to_end[:, :, i]).transpose(-1, -2) @ Vc[:, :, i] \
            + (Bc[:, :, i] * to_end[:, :, i]).transpose(-1, -2) @ pseudo
    o = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(Bsz, n_chunks * C, H, V)[:, :T]
    return o.to(r.dtype), (S if output_final_state else None)


def kernel(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
    b: torch.Tensor, *, scale: float = 1.0, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton chunkwise kernel (``lecture_kit/kernels/rwkv7.py``): the algorithm of ``chunked``.

    Phase 1, parallel over chunks, builds the four intra-chunk matrices and the UT transform (U, W);
    phase 2 walks the chunks in order with the state in fp32 registers.  bf16, fp16 or fp32 inputs
    (fp64: use ``chunked``); K and V powers of two in 16..256; chunk_size 16 (any K), 32 (K ≤ 128)
    or 64 (K ≤ 64).  Differentiable in every input.
    """
    from .kernels.rwkv7 import rwkv7_chunked              # which checks the call against SPEC first
    return rwkv7_chunked(r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, chunk_size=chunk_size)


# ---- reference sections for help() ---------------------------------------------------
# Every form takes the same inputs, described once in SPEC; ``document``
# (lecture_kit/_docs.py) appends Parameters, Returns, Raises and Examples to each form's
# docstring above, whose math is what the notebooks' listings show.

_RETURNS = """
o : torch.Tensor
    The output ``[B, T, H, V]``, in r's dtype.
final_state : torch.Tensor | None
    The state after the last token ``[B, H, K, V]``, float32 (float64 for float64
    inputs); None unless ``output_final_state``.
"""

_SETUP = """
>>> import torch, lecture_kit as lk
>>> _ = torch.manual_seed(0)
>>> B, T, H, K, V = 2, 50, 2, 16, 16
>>> r, k, v = (torch.randn(B, T, H, d) for d in (K, K, V))
>>> w = -0.6 * torch.sigmoid(torch.randn(B, T, H, K))                 # log decay ≤ 0
>>> kappa = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
>>> a, b = -kappa, kappa * torch.sigmoid(torch.randn(B, T, H, K))    # the delta rule
"""

document_form(recurrent, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> o, S = lk.rwkv7.recurrent(r, w, k, v, a, b, output_final_state=True)
>>> o.shape, S.shape, S.dtype
(torch.Size([2, 50, 2, 16]), torch.Size([2, 2, 16, 16]), torch.float32)

A sequence in two pieces, the state passed along, gives the same output and state:

>>> head = [t[:, :20] for t in (r, w, k, v, a, b)]
>>> tail = [t[:, 20:] for t in (r, w, k, v, a, b)]
>>> o1, S1 = lk.rwkv7.recurrent(*head, output_final_state=True)
>>> o2, S2 = lk.rwkv7.recurrent(*tail, initial_state=S1, output_final_state=True)
>>> torch.allclose(torch.cat([o1, o2], dim=1), o, atol=1e-5)
True
>>> torch.allclose(S2, S, atol=1e-5)
True
""")

document_form(parallel, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> kw = dict(initial_state=torch.randn(B, H, K, V), output_final_state=True)
>>> o, S = lk.rwkv7.parallel(r, w, k, v, a, b, **kw)
>>> o_ref, S_ref = lk.rwkv7.recurrent(r, w, k, v, a, b, **kw)
>>> torch.allclose(o, o_ref, atol=1e-5), torch.allclose(S, S_ref, atol=1e-5)
(True, True)

Half-precision activations with an fp32 decay: the output is bf16, the state stays fp32.

>>> half = [t.bfloat16() for t in (r, k, v, a, b)]
>>> o, S = lk.rwkv7.parallel(half[0], w, *half[1:], output_final_state=True)
>>> o.dtype, S.dtype
(torch.bfloat16, torch.float32)
""")

document_form(chunked, SPEC, returns=_RETURNS,
              examples=_SETUP + """
T = 50 is not a multiple of the chunk size, so the last chunk is ragged:

>>> kw = dict(initial_state=torch.randn(B, H, K, V), output_final_state=True)
>>> o, S = lk.rwkv7.chunked(r, w, k, v, a, b, **kw, chunk_size=16)
>>> o_ref, S_ref = lk.rwkv7.recurrent(r, w, k, v, a, b, **kw)
>>> torch.allclose(o, o_ref, atol=1e-5), torch.allclose(S, S_ref, atol=1e-5)
(True, True)
""")

document_form(matrix, SPEC, returns="""
A : torch.Tensor
    The mixing matrix ``[B, H, T, T]``, in r's dtype, lower triangular: with a zero
    initial state, ``o[b, :, h] = A[b, h] @ v[b, :, h]``.
""", examples=_SETUP + """
>>> A = lk.rwkv7.matrix(r, w, k, a, b)
>>> A.shape
torch.Size([2, 2, 50, 50])
>>> o = torch.einsum("bhij,bjhv->bihv", A, v)
>>> torch.allclose(o, lk.rwkv7.recurrent(r, w, k, v, a, b)[0], atol=1e-5)
True

Every block on or below the diagonal has rank at most K (measured in fp64):

>>> A64 = lk.rwkv7.matrix(*(t.double() for t in (r, w, k, a, b)))[0, 0]
>>> lk.semiseparable.semiseparable_rank(A64)
16
""")

document_form(kernel, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> dev = lk.DEVICE     # CUDA if visible, else the CPU with Triton's interpreter
>>> args = [t.to(dev) for t in (r, w, k, v, a, b)]
>>> o, S = lk.rwkv7.kernel(*args, output_final_state=True)        # chunk_size 16
>>> o_ref, S_ref = lk.rwkv7.chunked(r, w, k, v, a, b, output_final_state=True)
>>> torch.allclose(o.cpu(), o_ref, atol=1e-4), torch.allclose(S.cpu(), S_ref, atol=1e-4)
(True, True)
""")
