"""Gated linear attention, GLA (Yang et al., 2023).  Derived in notebook 03d.

Per batch and head, with a data-dependent forget gate α_t = exp(g_t) ∈ (0, 1]^K (one per key
channel) and state S_t ∈ R^{K×V}:

    S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

No feature map and no normaliser (that is Katharopoulos et al.'s linear attention, not GLA): the
layer's output norm plays the normaliser's role.  With b_t = g_1 + ⋯ + g_t (per channel),

    P_ij = scale · Σ_d q_id k_jd exp(b_id − b_jd)    (j ≤ i),     O = P V,

a K-semiseparable matrix (an SSS representation with diagonal transitions).

Shapes: q, k, g [B, T, H, K] (g = log α ≤ 0, e.g. logsigmoid(·)/16 as in the GLA layer);
v [B, T, H, V]; initial_state and final state [B, H, K, V].  ``scale`` defaults to K^{-1/2}.
Every form returns ``(o, final_state or None)``; o has q's dtype, the state is fp32 (fp64 for fp64).
``help(gla.chunked)`` and the others list each form's parameters, returns and a checked example.
"""
from __future__ import annotations

import torch

from ._docs import document_form
from ._spec import KEYS, VALUES, Arg, MixerSpec, chunk_description, queries, scale_description
from ._validate import compute_dtype, pad_time
from .semiseparable import segsum

#: Sub-chunk length of the chunked form's secondary tiling (notebooks 03d and 04b; fla's BC).
SUB_CHUNK = 16


def _sample(draw, n, gate):
    """q, k, v standard normal; the gate logsigmoid(N(0, 1)) / 16, as in the GLA layer
    (``gate="strong"``: / 0.1)."""
    B, T, H, K, V = (n[d] for d in ("B", "T", "H", "K", "V"))
    gk = torch.nn.functional.logsigmoid(draw.randn(B, T, H, K)) / (16.0 if gate == "weak" else 0.1)
    q, k = draw.randn(B, T, H, K), draw.randn(B, T, H, K)
    return (q, k, draw.randn(B, T, H, V), gk), {}


#: GLA's arguments for its five forms, its docs, ``testing`` and the GLA layer (``lecture_kit/_spec.py``).
SPEC = MixerSpec(
    name="gla", title="GLA",
    inputs=(
        queries(), KEYS, VALUES,
        Arg("g", "B T H K", """
            Log forget gate g = log α ``[B, T, H, K]``, ≤ 0 everywhere (the GLA layer uses
            ``logsigmoid(·) / 16``); −inf resets a channel of the state.  Any float dtype:
            keep it in fp32 beside half-precision activations.""", activation=False, sign="<= 0"),
    ),
    scale="K^-1/2", scale_description=scale_description("o_t = scale · S_tᵀ q_t", "None means K^(-1/2)."),
    chunk_description=chunk_description("the last chunk is padded with zero keys and gates, which is exact")
    + "  Sub-chunks are 16 tokens when 16 divides it.",
    log_decay=("g",),
    sample=_sample,
)


def _suffix_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_{t > s} x_t along ``dim`` (0 at the last position): a reversed cumulative sum, shifted.

    Never formed as total − prefix: with log-decays of one sign the sum is as accurate as its
    terms, where the difference of two large prefix sums is not (and −inf − (−inf) is NaN)."""
    inclusive = x.flip(dim).cumsum(dim).flip(dim)
    return torch.cat([inclusive.narrow(dim, 1, x.shape[dim] - 1),
                      torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)


def recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition, one token at a time:
    S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ,  o_t = scale · S_tᵀ q_t."""
    scale = SPEC.check("recurrent", q, k, v, g, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state).scale
    f = compute_dtype(q.dtype)
    Bsz, T, H, K = q.shape
    q_, k_, v_, alpha = q.to(f), k.to(f), v.to(f), torch.exp(g.to(f))
    S = q.new_zeros(Bsz, H, K, v.shape[-1], dtype=f) if initial_state is None else initial_state.to(f)
    outs = []
    for t in range(T):
        S = alpha[:, t, :, :, None] * S + torch.einsum("bhk,bhv->bhkv", k_[:, t], v_[:, t])
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_[:, t]))
    return torch.stack(outs, dim=1).to(q.dtype), (S if output_final_state else None)


def _channel_masks(g, f):
    """Per-channel 1-semiseparable masks exp(b_id − b_jd) (j ≤ i), [B, H, K, T, T]."""
    return torch.exp(segsum(g.to(f).permute(0, 2, 3, 1)))


def matrix(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, *,
           scale: float | None = None) -> torch.Tensor:
    """P [B, H, T, T] with P_ij = scale · Σ_d q_id k_jd exp(b_id − b_jd) for j ≤ i, so o = P v.

    Each channel's decay exp(b_id − b_jd) is a 1-semiseparable mask built by ``segsum`` (stable,
    masked before exp), so P is a sum of K masked rank-1 matrices: the "generalised matmul" that a
    tensor core cannot do directly, which is why the fast path is chunked.
    """
    scale = SPEC.check("matrix", q, k, g, scale=scale).scale
    f = compute_dtype(q.dtype)
    P = scale * torch.einsum("bhdij,bihd,bjhd->bhij", _channel_masks(g, f), q.to(f), k.to(f))
    return P.to(q.dtype)


def parallel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """O = P V plus the initial state's read-out scale · (q_i ∘ exp b_i)ᵀ S_0; the final state is
    Σ_j diag(exp(b_T − b_j)) k_j v_jᵀ + diag(exp b_T) S_0 (from the masks' last rows)."""
    scale = SPEC.check("parallel", q, k, v, g, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state).scale
    f = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(f), k.to(f), v.to(f)
    masks = _channel_masks(g, f)                                               # [B, H, K, T, T]
    o = scale * torch.einsum("bhdij,bihd,bjhd,bjhv->bihv", masks, q_, k_, v_)
    decay_from_start = torch.exp(g.to(f).cumsum(dim=1))                        # exp(b_i) [B, T, H, K]
    if initial_state is not None:
        o = o + scale * torch.einsum("bihd,bhdv->bihv", q_ * decay_from_start, initial_state.to(f))
    final = None
    if output_final_state:
        final = torch.einsum("bhdj,bjhd,bjhv->bhdv", masks[..., -1, :], k_, v_)
        if initial_state is not None:
            final = final + decay_from_start[:, -1, :, :, None] * initial_state.to(f)
    return o.to(q.dtype), final


def chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA's chunkwise algorithm with secondary (sub-chunk) tiling, notebooks 03d and 04b.

    Chunks of C = chunk_size tokens, sub-chunks of c = 16 (or C if 16 does not divide it).  Every
    exponent below is a sum of gates over a segment of tokens, b_C − b_s = g_{s+1} + ⋯ + g_C, say,
    summed as such (a suffix sum) and never formed as the difference of two cumulative sums: that
    difference loses the small terms beside a large one (a gate of −10⁴ costs fp32 all its digits)
    and turns a reset, g = −∞, into −∞ − (−∞) = NaN.  With b the chunk-local cumsum of g:
      1. chunk states:    S_c = diag(exp b_C) S_{c-1} + (K ∘ exp(b_C − b))ᵀ V     (sequential)
      2. inter output:    O_inter = scale · (Q ∘ exp b) S_{c-1}
      3. off-diagonal sub-blocks (query sub-chunk I, key sub-chunk J < I), with the reference
         point b_ref = b at I's first row:  A_IJ = (Q_I ∘ exp(b_I − b_ref)) (K_J ∘ exp(b_ref − b_J))ᵀ,
         b_I − b_ref summed over I's rows after the first, b_ref − b_J over the rest of J, the
         sub-chunks between and I's first row: an ordinary matmul with both factors bounded by 1
         (safe in half precision on tensor cores)
      4. diagonal sub-blocks pairwise: A_rs = Σ_d q_rd k_sd exp(b_rd − b_sd), s ≤ r, as a segsum
      5. O = O_inter + scale · tril(A) V
    """
    _, scale, C = SPEC.check("chunked", q, k, v, g, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, chunk_size=chunk_size)
    c = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    n_sub = C // c
    f = compute_dtype(q.dtype)
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    n_chunks = -(-T // C)

    def chunks(t):   # [B, T, H, D] -> [B, H, n_c, C, D]
        return pad_time(t.to(f), C).reshape(Bsz, n_chunks, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4)

    Qc, Kc, Vc, Gc = chunks(q), chunks(k), chunks(v), chunks(g)
    b = Gc.cumsum(dim=-2)                                                       # chunk-local, ≤ 0
    to_end = _suffix_sums(Gc, dim=-2)                                           # b_C − b  [B, H, n, C, K]

    # 1. chunk states, then pass them along (the only sequential step)
    local_states = (Kc * torch.exp(to_end)).transpose(-1, -2) @ Vc              # [B, H, n, K, V]
    S = q.new_zeros(Bsz, H, K, V, dtype=f) if initial_state is None else initial_state.to(f)
    entering = []
    for i in range(n_chunks):
        entering.append(S)
        S = torch.exp(b[:, :, i, -1, :, None]) * S + local_states[:, :, i]
    entering = torch.stack(entering, dim=2)                                     # [B, H, n, K, V]
    # 2. inter-chunk output
    O_inter = (Qc * torch.exp(b)) @ entering

    # sub-chunk views [B, H, n, I, c, K]
    sub = lambda t: t.reshape(*t.shape[:3], n_sub, c, t.shape[-1])             # noqa: E731
    Qs, Ks, Gs = sub(Qc), sub(Kc), sub(Gc)
    first = Gs[..., :1, :]                                                      # g at each I's first row
    # 3. off-diagonal sub-blocks.  Query side b_I − b_ref: the cumsum of I's gates after its first row
    query_exp = torch.cat([torch.zeros_like(first), Gs[..., 1:, :]], dim=-2).cumsum(dim=-2)
    #    key side b_ref − b_J: J's suffix sum, the sums of the sub-chunks J < L < I (the segsum of the
    #    sub-chunk sums at (I − 1, J), shifted down a row, −∞ for J ≥ I: those blocks vanish, masked
    #    before exp) and I's first gate
    between = segsum(Gs.sum(dim=-2).transpose(-1, -2))                          # [B, H, n, K, I, J]
    between = torch.cat([torch.full_like(between[..., :1, :], float("-inf")), between[..., :-1, :]], dim=-2)
    key_exp = (_suffix_sums(Gs, dim=-2)[:, :, :, None] + first[:, :, :, :, None]
               + between.permute(0, 1, 2, 4, 5, 3)[..., None, :])             # [B, H, n, I, J, c, K]
    A_off = torch.einsum("bhnirk,bhnijsk->bhnijrs", Qs * torch.exp(query_exp),
                         Ks[:, :, :, None] * torch.exp(key_exp))
    # 4. diagonal sub-blocks, pairwise: exp(b_r − b_s) = exp(g_{s+1} + ⋯ + g_r), 0 for s > r
    pair = torch.exp(segsum(Gs.transpose(-1, -2)))                              # [B, H, n, I, K, c, c]
    A_diag = torch.einsum("bhnirk,bhnisk,bhnikrs->bhnirs", Qs, Ks, pair)
    A_blocks = A_off.clone()                                                    # [B, H, n, I, J, c, c]
    idx = torch.arange(n_sub, device=q.device)
    A_blocks[:, :, :, idx, idx] = A_diag                                        # I = J blocks were 0
    A = A_blocks.permute(0, 1, 2, 3, 5, 4, 6).reshape(Bsz, H, n_chunks, C, C)   # [B, H, n, C, C]
    # 5. combine
    O = scale * (O_inter + A @ Vc)                                              # [B, H, n, C, V]
    o = O.permute(0, 2, 3, 1, 4).reshape(Bsz, n_chunks * C, H, V)[:, :T]
    return o.to(q.dtype), (S if output_final_state else None)


def kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton chunkwise kernel (``lecture_kit/kernels/gla.py``): the algorithm of ``chunked``,
    with the chunk states kept in fp32 and the C×C score matrix never leaving the chip.

    bf16, fp16 or fp32 inputs (fp64: use ``chunked``); K and V powers of two in 16..256;
    chunk_size a power of two in 16..128.  Differentiable in every input.
    """
    from .kernels.gla import gla_chunked                  # which checks the call against SPEC first
    return gla_chunked(q, k, v, g, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, chunk_size=chunk_size)


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
>>> B, T, H, K, V = 2, 50, 2, 16, 16
>>> q, k, v = (torch.randn(B, T, H, d) for d in (K, K, V))
>>> g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K)) / 16   # log α ≤ 0
"""

document_form(recurrent, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> o, S = lk.gla.recurrent(q, k, v, g, output_final_state=True)
>>> o.shape, S.shape, S.dtype
(torch.Size([2, 50, 2, 16]), torch.Size([2, 2, 16, 16]), torch.float32)

A sequence in two pieces, the state passed along, gives the same output and state:

>>> head = [t[:, :20] for t in (q, k, v, g)]
>>> tail = [t[:, 20:] for t in (q, k, v, g)]
>>> o1, S1 = lk.gla.recurrent(*head, output_final_state=True)
>>> o2, S2 = lk.gla.recurrent(*tail, initial_state=S1, output_final_state=True)
>>> torch.allclose(torch.cat([o1, o2], dim=1), o, atol=1e-5)
True
>>> torch.allclose(S2, S, atol=1e-5)
True
""")

document_form(parallel, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> kw = dict(initial_state=torch.randn(B, H, K, V), output_final_state=True)
>>> o, S = lk.gla.parallel(q, k, v, g, **kw)
>>> o_ref, S_ref = lk.gla.recurrent(q, k, v, g, **kw)
>>> torch.allclose(o, o_ref, atol=1e-5), torch.allclose(S, S_ref, atol=1e-5)
(True, True)

Half-precision activations with an fp32 gate: the output is bf16, the state stays fp32.

>>> half = [t.bfloat16() for t in (q, k, v)]
>>> o, S = lk.gla.parallel(*half, g, output_final_state=True)
>>> o.dtype, S.dtype
(torch.bfloat16, torch.float32)
""")

document_form(chunked, SPEC, returns=_RETURNS,
              examples=_SETUP + """
T = 50 is not a multiple of the chunk size, so the last chunk is ragged:

>>> kw = dict(initial_state=torch.randn(B, H, K, V), output_final_state=True)
>>> o, S = lk.gla.chunked(q, k, v, g, **kw, chunk_size=32)
>>> o_ref, S_ref = lk.gla.recurrent(q, k, v, g, **kw)
>>> torch.allclose(o, o_ref, atol=1e-5), torch.allclose(S, S_ref, atol=1e-5)
(True, True)
""")

document_form(matrix, SPEC, returns="""
P : torch.Tensor
    The mixing matrix ``[B, H, T, T]``, in q's dtype, lower triangular: with a zero
    initial state, ``o[b, :, h] = P[b, h] @ v[b, :, h]``.
""", examples=_SETUP + """
>>> P = lk.gla.matrix(q, k, g)
>>> P.shape
torch.Size([2, 2, 50, 50])
>>> o = torch.einsum("bhij,bjhv->bihv", P, v)
>>> torch.allclose(o, lk.gla.recurrent(q, k, v, g)[0], atol=1e-5)
True

Every block on or below the diagonal has rank at most K (measured in fp64):

>>> P64 = lk.gla.matrix(q.double(), k.double(), g.double())[0, 0]
>>> lk.semiseparable.semiseparable_rank(P64)
16
""")

document_form(kernel, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> dev = lk.DEVICE     # CUDA if visible, else the CPU with Triton's interpreter
>>> args = [t.to(dev) for t in (q, k, v, g)]
>>> o, S = lk.gla.kernel(*args, output_final_state=True, chunk_size=16)
>>> o_ref, S_ref = lk.gla.chunked(q, k, v, g, output_final_state=True)
>>> torch.allclose(o.cpu(), o_ref, atol=1e-4), torch.allclose(S.cpu(), S_ref, atol=1e-4)
(True, True)
""")
