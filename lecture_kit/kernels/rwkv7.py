r"""RWKV-7's generalised delta rule (a DPLR transition), chunkwise, in Triton.

The recurrence (fla layout, per batch b and head h; state S_t ∈ R^{K×V}, fp32)::

    S_t = (diag(exp w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ          w_t ≤ 0 is the *log* decay
    o_t = scale · S_tᵀ r_t

The chunkwise algorithm is the one notebook 03c derives (the WY / UT transform), with its symbols.  Cut the
sequence into chunks of C rows (the last one may be short).  Inside a chunk, with row indices i, j:

    Γ_i  = Σ_{s≤i} w_s     chunk-local cumulative log decay (fp32, ≤ 0, non-increasing in i)
    Γ⁻_i = Σ_{s<i} w_s     its exclusive version (= Γ_{i-1}; 0 on the first row)
    Γ_C  = Γ of the chunk's last row

    A^{qk}_ij = Σ_d r_id k_jd e^{Γ_id − Γ_jd}    A^{qb}_ij = Σ_d r_id b_jd e^{Γ_id − Γ_jd}     (j ≤ i)
    A^{ak}_ij = Σ_d a_id k_jd e^{Γ⁻_id − Γ_jd}   A^{ab}_ij = Σ_d a_id b_jd e^{Γ⁻_id − Γ_jd}    (j < i)

    𝒯 = (I − A^{ab})⁻¹          (unit lower-triangular; forward substitution in fp32)
    U = 𝒯 A^{ak} V               W = 𝒯 (a ⊙ e^{Γ⁻})

and then, sequentially over chunks, with S₀ the state entering the chunk:

    𝒱 = U + W S₀                                      the pseudo-values ν_i = a_iᵀ S_{i-1}
    O = A^{qk} V + A^{qb} 𝒱 + (r ⊙ e^{Γ}) S₀          (times scale)
    S ← e^{Γ_C} ⊙ S₀ + (k ⊙ e^{Γ_C−Γ})ᵀ V + (b ⊙ e^{Γ_C−Γ})ᵀ 𝒱

Numerics (notebooks 03c and 05b).  No bound on |w| is assumed: the kernel is correct for any w ≤ 0,
strong gates included (w = −5 and beyond).  The four intra-chunk matrices take one of two routes,
chosen per chunk and K slice (in slices of BK = 16 channels at C = 16):

* mild gates, every chunk-long log decay Γ of the slice within [−16, 0] (``FACTORED_SPAN``; the RWKV-7
  layer's decays, w ≥ −e^{−1/2}, keep |Γ_C| ≤ 9.7 at C = 16): e^{Γ_i − Γ_j} = e^{Γ_i}·e^{−Γ_j}, both
  factors normal fp32 numbers within e^{±16}, so each matrix is one tensor-core product of decayed
  operands (r ⊙ e^{Γ}, k ⊙ e^{−Γ}, …), masked to j ≤ i (j < i) after the product;
* otherwise (and always at C = 32, 64, where the slices are narrower than a tensor-core tile),
  pairwise on CUDA cores in fp32: every exponent ≤ 0 and masked to −∞ *before* ``exp``, 2·C·K
  exponentials per row.

Cumulative sums, the solve, U, W, the state and all accumulation are fp32; intermediates are stored
in fp32.

Window sums.  Each exponent is the sum of its own window of w, never a difference of two chunk-long
cumsums: Γ_i − Γ_j = w_{j+1} + … + w_i and Γ⁻_i − Γ_j = w_{j+1} + … + w_{i−1} by a cumsum down a
masked [C, C, BK] tensor of w (of w_{i−1} for the second, the rows shifted by one load), Γ_C − Γ_i =
w_{i+1} + … + w_C by a reverse cumsum of w_{i+1}, Γ⁻ by a cumsum of w_{i−1} (``segsum`` in
``semiseparable`` is the same idea).  A difference Γ_i − Γ_j carries the rounding of Γ, about
ulp(|Γ|) ≈ 4e-6 at |Γ| ≈ 70 (one chunk of strong gates), into every decay, and the rank-one removals
chain such decays through 𝒯, W and the state's path.  Measured on fp32 gradients at strong gates
(T ≤ 70, C = 16 to 64): relative RMS errors up to 3e-6 with differences, ≤ 3e-7 (dw ≈ 1e-6) with
window sums; d initial_state through the final state alone (a product of chunk transitions, ~1e-24)
went from 1.3e-5 to 2.7e-6, like ``rwkv7.chunked`` in fp32 (median 9e-7 against its 8e-7 over 12
draws).  The sums are of non-positive numbers, so every exponent is ≤ 0 exactly, not merely up to
rounding.

Two kernels (a "two-phase" design):

* ``_rwkv7_chunk_intra_kernel`` — grid ``(number of chunks, B·H)``, all chunks in parallel.  One
  program owns one chunk of one (batch, head) and computes everything that depends only on that
  chunk: Γ, the four matrices, 𝒯, U, W and the decayed operands r ⊙ e^{Γ}, k ⊙ e^{Γ_C−Γ},
  b ⊙ e^{Γ_C−Γ}, e^{Γ_C}.  It loops over K in slices of ``BK`` (for the pairwise [C, C, BK] products)
  and over V in slices of ``BV``.
* ``_rwkv7_chunk_scan_kernel`` — grid ``(V / BV, B·H)``.  One program owns one V-slice of the state
  of one (batch, head), keeps S [K, BV] in registers (fp32) and walks the chunks in order, applying
  the three sequential lines above; it writes O and, if asked, the final state.

Supported: r, k, a, b, v in bf16, fp16 or fp32 (one dtype); w in that dtype or fp32; fp64 is
refused (use the PyTorch forms in ``lecture_kit.rwkv7``).  Any B, H and T ≥ 1 (a short last chunk
is handled by masks, nothing is padded).  K and V powers of two in 16…256; K is held whole in one
tile of the scan kernel, V is tiled in slices of 16 to 64 (autotuned).  ``chunk_size`` ∈ {16, 32, 64} with
chunk_size·K ≤ 4096 (16 for any K, 32 for K ≤ 128, 64 for K ≤ 64; the scan's per-chunk tiles must fit
in shared memory); 16, fla's choice for DPLR, is the default and the fast one.  Matrix products
(``tl.dot``) use ``input_precision="ieee"`` for fp32 inputs (exact, but CUDA cores: the slow path) and
TF32 for bf16/fp16 inputs (whose own rounding, 2⁻⁸, dominates TF32's 2⁻¹¹).  The output is rounded
to its dtype to nearest even.  Scratch memory between the phases, per token and head, in fp32:
4 rows of K (W and the three decayed operands), one of V (U) and two of C (A^{qk}, A^{qb}).

Autograd: forward and backward are both Triton; no PyTorch form is called.  The forward saves only
its inputs.  The backward recomputes phase 1 and the forward walk, walks the chunks in reverse for
the state gradient and dv, then forms the gradients of r, w, k, a, b for all chunks in parallel.
Every case the forward supports is supported; there is no fallback.  The derivation and the
launches follow.

The backward pass reverses the algorithm above, chunk by chunk.  In one chunk, given dO = ∂L/∂O and
dS' = ∂L/∂S for the state leaving the chunk (the final state's gradient for the last chunk, zero when
it is not used), write Ō = scale · dO.  The three sequential lines give, in reverse order,

    d𝒱  = A^{qb}ᵀ Ō + (b ⊙ e^{Γ_C−Γ}) dS'
    dS₀ = e^{Γ_C} ⊙ dS' + (r ⊙ e^{Γ})ᵀ Ō + Wᵀ d𝒱         the gradient of the state entering the chunk

so the state gradient runs the chunks backwards, like the state ran them forwards.  The UT transform
has a one-line adjoint: 𝒱 solves (I − A^{ab}) 𝒱 = A^{ak} V + (a ⊙ e^{Γ⁻}) S₀, so with one
transposed solve

    Y = 𝒯ᵀ d𝒱          ∂L/∂A^{ab} = Y 𝒱ᵀ,   ∂L/∂A^{ak} = Y Vᵀ,   ∂L/∂(a ⊙ e^{Γ⁻}) = Y S₀ᵀ

(the paths through U and through W merge: 𝒯ᵀ (d𝒱 (A^{ak}V)ᵀ + d𝒱 S₀ᵀ (a ⊙ e^{Γ⁻})ᵀ) 𝒯ᵀ = Y Uᵀ +
Y S₀ᵀ Wᵀ = Y 𝒱ᵀ), and the values collect their three uses,

    dV = A^{qk}ᵀ Ō + (k ⊙ e^{Γ_C−Γ}) dS' + A^{ak}ᵀ Y.

The four matrices get their gradients, kept on their causal parts,

    dA^{qk} = Ō Vᵀ,  dA^{qb} = Ō 𝒱ᵀ  (j ≤ i)          dA^{ak} = Y Vᵀ,  dA^{ab} = Y 𝒱ᵀ  (j < i)

and the decayed operands theirs, the "state parts" (superscript S) of dr, da, dk, db:

    dr^S = e^{Γ} ⊙ (Ō S₀ᵀ)    da^S = e^{Γ⁻} ⊙ (Y S₀ᵀ)    dk^S = e^{Γ_C−Γ} ⊙ (V dS'ᵀ)    db^S = e^{Γ_C−Γ} ⊙ (𝒱 dS'ᵀ).

Each matrix is A^{xy}_ij = Σ_d x_id y_jd e^{E_id − Γ_jd} with (x, y, E) = (r, k, Γ), (r, b, Γ),
(a, k, Γ⁻), (a, b, Γ⁻), so its "pair parts" (superscript P) are

    dx_id += Σ_j dA^{xy}_ij y_jd e^{E_id − Γ_jd}        dy_jd += Σ_i dA^{xy}_ij x_id e^{E_id − Γ_jd},

taken by phase 1's two routes, chosen per chunk and K slice by phase 1's test (at every chunk size,
since the gradient kernel's slices are at least 16 channels wide): for mild gates (every Γ of the
slice within [−FACTORED_SPAN, 0]) e^{E_i − Γ_j} = e^{E_i}·e^{−Γ_j}, so

    dx = e^{E} ⊙ (dA^{xy} (y ⊙ e^{−Γ}))                 dy = e^{−Γ} ⊙ (dA^{xy}ᵀ (x ⊙ e^{E})),

eight [C, C]×[C, BK] products of the causal parts of the dA's, taken in fp32 (``"ieee"``, whatever the
input dtype: dw cancels these terms against each other, and must be left with fp32 rounding only);
otherwise pairwise in fp32, masked before the exponential exactly as in the forward.

The log decay.  Γ enters only through exponents: +Γ_i with r_i (in A^{qk}, A^{qb} and r ⊙ e^{Γ}),
−Γ_j with k_j and b_j (in all four matrices and in the decays e^{Γ_C−Γ}), +Γ⁻_i with a_i, and +Γ_C
in e^{Γ_C−Γ} and e^{Γ_C} ⊙ S₀.  A factor x e^{±Γ} contributes ±x ⊙ dx to ∂L/∂Γ, so

    ∂L/∂Γ_i = r_i ⊙ dr_i − k_i ⊙ dk_i − b_i ⊙ db_i      ∂L/∂Γ⁻_i = a_i ⊙ da_i
    ∂L/∂Γ_C = Σ_j (k_j ⊙ dk^S_j + b_j ⊙ db^S_j) + e^{Γ_C} ⊙ diag(S₀ dS'ᵀ)

and, as Γ_i = Σ_{s≤i} w_s, Γ⁻_i = Σ_{s<i} w_s and Γ_C = Σ_s w_s, dw_s = Σ_{i≥s} ∂L/∂Γ_i +
Σ_{i>s} ∂L/∂Γ⁻_i + ∂L/∂Γ_C.  The state parts of dk, db appear in ∂L/∂Γ_j with − and in ∂L/∂Γ_C
with +; for j ≥ s they cancel exactly, so the kernel sums only what is left:

    dw_s = Σ_{i≥s} (r ⊙ dr − k ⊙ dk^P − b ⊙ db^P)_i + Σ_{i>s} (a ⊙ da)_i
           + Σ_{j<s} (k ⊙ dk^S + b ⊙ db^S)_j + e^{Γ_C} ⊙ diag(S₀ dS'ᵀ)

(a reverse, a strict reverse and a strict forward cumsum inside the chunk, in fp32).  The pair terms
with both ends at or after s cancel inside the first two sums; both routes form them in fp32, so
what is left of them is fp32 rounding.  Every exponent is a window sum of w as in
the forward (≤ 0, masked before exp), and no sum runs over more than one chunk.

The backward launches four kernels:

* phase 1 again, with FOR_BACKWARD, which also stores 𝒯 and A^{ak};
* ``_rwkv7_chunk_scan_kernel`` with RECOMPUTE: the forward walk again, storing S₀ of every chunk
  (``h [B, H, NT, K, V]``) and 𝒱 instead of O;
* ``_rwkv7_chunk_scan_bwd_kernel`` — grid ``(V / BV, B·H)``, the reverse walk: one program owns a
  V-slice of dS (fp32, [K, BV]) and goes from the last chunk to the first; per chunk it stores dS'
  (``dh [B, H, NT, K, V]``), forms d𝒱, Y and dV, then steps dS' → dS₀; the last is ∂L/∂S_initial;
* ``_rwkv7_chunk_grad_kernel`` — grid ``(K / BK, number of chunks, B·H)``, all chunks in parallel:
  one program owns BK channels of one chunk; it sums the four dA's, the four state parts and
  diag(S₀ dS'ᵀ) over V tiles, then adds the pair parts (factored: eight fp32 products; pairwise: for
  PAIRS partner rows m at a time, in [C, PAIRS, BK] tensors of 1024 elements (2048 at chunks 32
  and 64, where PAIRS = 2 is the floor), never the whole [C, C, BK]), and finishes dw with the
  cumsums; it writes dr, dw, dk, da, db.

Memory.  Saved by the forward: the inputs (contiguous copies where the caller's are not, the initial
state as fp32), nothing else.  Scratch of the backward per token and head, fp32: 4K + V + 4C (+ K/C)
for phase 1 (W, the three decayed operands, U, A^{qk}, A^{qb}, A^{ak}, 𝒯, e^{Γ_C}), 2V for 𝒱 and Y,
and 2·K·V / C for S₀ and dS' of every chunk: about 4 KiB at K = V = 64, C = 16, half of it the chunk
states; phase 1's buffers are freed before the last kernel.  The gradients come out in their inputs'
dtypes (rounded to nearest even), d initial_state in its own.
"""
import os

import torch
import triton
import triton.language as tl

from ._compile import absent, present

__all__ = ["rwkv7_chunked"]

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Phase 1 factorises e^{Γ_i − Γ_j} = e^{Γ_i}·e^{−Γ_j} (tensor cores) in a K slice whose chunk-long log
# decays all lie in [−FACTORED_SPAN, 0]; beyond that it computes the decays pairwise.  16 covers RWKV-7's
# layer at C = 16 (|Γ_C| ≤ 16·e^{−1/2} ≈ 9.7) and keeps every factor within e^{±16}, far inside fp32.
FACTORED_SPAN = 16.0


# --------------------------------------------------------------------------------------------------
# Phase 1: everything that depends on one chunk only (all chunks in parallel)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_w_shifted(w, x_off, i, t, T, shift: tl.constexpr, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr):
    """Row i of the result is w_{i+shift} (shift = ±1) of the same chunk, in fp32; 0 where that row
    lies outside the chunk or past T.  The building block of the window sums (module docstring)."""
    inside = ((i + shift >= 0) & (i + shift < C) & (t + shift < T))[:, None]
    return tl.load(w + x_off + shift * (H * K), mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _factored_scores(r_c, k_c, a_c, b_c, G, w_prev, ii, jj, DOT_PRECISION: tl.constexpr):
    """One K slice's share of A^{qk}, A^{qb}, A^{ak}, A^{ab} [C, C] for mild gates: products of
    r ⊙ e^{Γ}, a ⊙ e^{Γ⁻} with k ⊙ e^{−Γ}, b ⊙ e^{−Γ} (Γ⁻ the exclusive window sum), then masked."""
    r_in, a_in = r_c * tl.exp(G), a_c * tl.exp(tl.cumsum(w_prev, axis=0))
    k_out, b_out = k_c * tl.exp(-G), b_c * tl.exp(-G)
    return (tl.where(ii >= jj, tl.dot(r_in, tl.trans(k_out), input_precision=DOT_PRECISION), 0.0),
            tl.where(ii >= jj, tl.dot(r_in, tl.trans(b_out), input_precision=DOT_PRECISION), 0.0),
            tl.where(ii > jj, tl.dot(a_in, tl.trans(k_out), input_precision=DOT_PRECISION), 0.0),
            tl.where(ii > jj, tl.dot(a_in, tl.trans(b_out), input_precision=DOT_PRECISION), 0.0))


@triton.jit
def _pairwise_scores(r_c, k_c, a_c, b_c, w_c, w_prev, ii, jj):
    """The same four shares for any gates, in fp32 on [C, C, BK] tensors: e^{Γ_i − Γ_j} (j ≤ i) and
    e^{Γ⁻_i − Γ_j} (j < i), each exponent the window sum w_{j+1} + … + w_i (or + … + w_{i−1}), a
    cumsum down axis 0 of the w's after j, masked to −∞ outside the window before exp."""
    incl, strict = (jj <= ii)[:, :, None], (jj < ii)[:, :, None]
    seg_incl = tl.cumsum(tl.where(strict, w_c[:, None, :], 0.0), axis=0)                     # w_{j+1} + … + w_i
    seg_strict = tl.cumsum(tl.where((jj + 1 < ii)[:, :, None], w_prev[:, None, :], 0.0), axis=0)   # … + w_{i−1}
    E_incl = tl.exp(tl.where(incl, seg_incl, float("-inf")))                                # [C, C, BK]
    E_strict = tl.exp(tl.where(strict, seg_strict, float("-inf")))
    return (tl.sum(r_c[:, None, :] * k_c[None, :, :] * E_incl, axis=2),
            tl.sum(r_c[:, None, :] * b_c[None, :, :] * E_incl, axis=2),
            tl.sum(a_c[:, None, :] * k_c[None, :, :] * E_strict, axis=2),
            tl.sum(a_c[:, None, :] * b_c[None, :, :] * E_strict, axis=2))


# Phase 1's tiles are small ([C, BK], [C, C] at C = 16), so the warps are autotuned: compiled offline for
# sm_90 (Triton 3.9, bf16, K = V = 64, C = 16) 4 warps need 181 registers a thread, 2 warps 255 with no
# spills (half the registers per program, so more programs per SM); 1 warp spills.
@triton.autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=1) for w in ([4] if _INTERPRETED else [2, 4])],
    key=["K", "V", "C", "FOR_BACKWARD"],
)
@triton.jit
def _rwkv7_chunk_intra_kernel(
    r, w, k, v, a, b,                      # inputs, [B, T, H, K] (v: [B, T, H, V]), contiguous
    A_qk, A_qb, U, W,                      # outputs: [B, H, T, C], [B, H, T, C], [B, H, T, V], [B, H, T, K]
    r_dec, k_dec, b_dec, g_last,           # outputs: [B, H, T, K] ×3 and e^{Γ_C}: [B, H, NT, K]
    A_ak, T_solve,                         # outputs if FOR_BACKWARD: A^{ak} and 𝒯, [B, H, T, C]
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BKW: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FOR_BACKWARD: tl.constexpr, FACTORED_SPAN: tl.constexpr,
):
    i_n = tl.program_id(0)                 # which chunk
    i_bh = tl.program_id(1).to(tl.int64)   # which (batch, head)
    i_b = i_bh // H
    i_h = i_bh % H

    i = tl.arange(0, C)                    # row index inside the chunk
    t = (i_n * C + i).to(tl.int64)         # absolute time of each row (64-bit offsets throughout)
    row_ok = (t < T)[:, None]              # rows past T (short last chunk) are masked
    ii = i[:, None]                        # [C, 1]   (row i)
    jj = i[None, :]                        # [1, C]   (column j)

    # element (t, d) of head (b, h) in a [B, T, H, D] input sits at (b·T·H + h)·D + t·H·D + d
    x_base = (i_b * T * H + i_h) * K
    v_base = (i_b * T * H + i_h) * V
    # element (t, ·) of head (b, h) in a [B, H, T, ·] intermediate sits at (bh·T + t)·width + ·
    out_rows = i_bh * T + t

    A_qk_acc = tl.zeros([C, C], dtype=tl.float32)
    A_qb_acc = tl.zeros([C, C], dtype=tl.float32)
    A_ak_acc = tl.zeros([C, C], dtype=tl.float32)
    A_ab_acc = tl.zeros([C, C], dtype=tl.float32)

    # ---- the four intra-chunk matrices, accumulated over slices of the key dimension --------------
    for d0 in tl.range(0, K, BK):
        d = d0 + tl.arange(0, BK)
        x_off = x_base + t[:, None] * (H * K) + d[None, :]
        w_c = tl.load(w + x_off, mask=row_ok, other=0.0).to(tl.float32)   # padded rows: w = 0
        w_prev = _load_w_shifted(w, x_off, i, t, T, -1, H, K, C)           # w_{i−1}, 0 on the first row
        w_next = _load_w_shifted(w, x_off, i, t, T, 1, H, K, C)            # w_{i+1}, 0 on the last row
        r_c = tl.load(r + x_off, mask=row_ok, other=0.0).to(tl.float32)
        k_c = tl.load(k + x_off, mask=row_ok, other=0.0).to(tl.float32)
        a_c = tl.load(a + x_off, mask=row_ok, other=0.0).to(tl.float32)
        b_c = tl.load(b + x_off, mask=row_ok, other=0.0).to(tl.float32)

        G = tl.cumsum(w_c, axis=0)                                         # Γ_i = w_1 + … + w_i   [C, BK]
        G_C = tl.sum(tl.where(ii == C - 1, G, 0.0), axis=0)                # Γ_C      [BK]
        to_end = tl.cumsum(w_next, axis=0, reverse=True)                   # Γ_C − Γ_i = w_{i+1} + … + w_C

        # The four matrices of this K slice.  Mild gates (every Γ of the slice in [−FACTORED_SPAN, 0];
        # RWKV-7's layer stays within 16·e^{−1/2} ≈ 9.7): e^{Γ_i − Γ_j} = e^{Γ_i}·e^{−Γ_j} with both
        # factors normal fp32 numbers in [e^{−span}, e^{span}], so they are tensor-core products of
        # decayed operands, masked after the product.  Strong gates: pairwise decays, each exponent
        # the sum of its own window of w, masked before exp.  (tl.dot needs BK ≥ 16, i.e. C = 16.)
        if BK >= 16:
            if tl.min(G_C) >= -FACTORED_SPAN:
                d_qk, d_qb, d_ak, d_ab = _factored_scores(r_c, k_c, a_c, b_c, G, w_prev, ii, jj, DOT_PRECISION)
            else:
                d_qk, d_qb, d_ak, d_ab = _pairwise_scores(r_c, k_c, a_c, b_c, w_c, w_prev, ii, jj)
        else:
            d_qk, d_qb, d_ak, d_ab = _pairwise_scores(r_c, k_c, a_c, b_c, w_c, w_prev, ii, jj)
        A_qk_acc += d_qk
        A_qb_acc += d_qb
        A_ak_acc += d_ak
        A_ab_acc += d_ab

        # decayed operands of the sequential phase (exponents ≤ 0)
        out_off = out_rows[:, None] * K + d[None, :]
        tl.store(r_dec + out_off, r_c * tl.exp(G), mask=row_ok)                       # r ⊙ e^{Γ}
        tl.store(k_dec + out_off, k_c * tl.exp(to_end), mask=row_ok)                  # k ⊙ e^{Γ_C−Γ}
        tl.store(b_dec + out_off, b_c * tl.exp(to_end), mask=row_ok)                  # b ⊙ e^{Γ_C−Γ}
        tl.store(g_last + (i_bh * NT + i_n) * K + d, tl.exp(G_C))                     # e^{Γ_C}

    A_off = out_rows[:, None] * C + jj
    tl.store(A_qk + A_off, A_qk_acc, mask=row_ok)
    tl.store(A_qb + A_off, A_qb_acc, mask=row_ok)
    if FOR_BACKWARD:
        tl.store(A_ak + A_off, A_ak_acc, mask=row_ok)

    # ---- UT transform: 𝒯 = (I − A^{ab})⁻¹ by forward substitution, row by row ----------------------
    # row i of 𝒯 is e_i + Σ_{j<i} A^{ab}_ij 𝒯_j; A^{ab} is strictly lower, so summing over all j is
    # the same, and rows j < i are final when row i is formed.
    T_ut = (ii == jj).to(tl.float32)
    for row in range(1, C):
        A_ab_row = tl.sum(tl.where(ii == row, A_ab_acc, 0.0), axis=0)       # A^{ab}[row, :]   [C]
        T_row = tl.sum(A_ab_row[:, None] * T_ut, axis=0)                     # Σ_j A^{ab}_{row,j} 𝒯_j
        T_ut += tl.where(ii == row, T_row[None, :], 0.0)
    if FOR_BACKWARD:
        tl.store(T_solve + A_off, T_ut, mask=row_ok)

    # ---- U = 𝒯 A^{ak} V, one V-slice at a time ------------------------------------------------------
    TA_ak = tl.dot(T_ut, A_ak_acc, input_precision=DOT_PRECISION)
    for e0 in tl.range(0, V, BV):
        e = e0 + tl.arange(0, BV)
        v_c = tl.load(v + v_base + t[:, None] * (H * V) + e[None, :], mask=row_ok, other=0.0).to(tl.float32)
        U_c = tl.dot(TA_ak, v_c, input_precision=DOT_PRECISION)
        tl.store(U + out_rows[:, None] * V + e[None, :], U_c, mask=row_ok)

    # ---- W = 𝒯 (a ⊙ e^{Γ⁻}), one K-slice at a time (Γ recomputed for the slice) --------------------
    for d0 in tl.range(0, K, BKW):
        d = d0 + tl.arange(0, BKW)
        x_off = x_base + t[:, None] * (H * K) + d[None, :]
        a_c = tl.load(a + x_off, mask=row_ok, other=0.0).to(tl.float32)
        G_excl = tl.cumsum(_load_w_shifted(w, x_off, i, t, T, -1, H, K, C), axis=0)   # Γ⁻_i = w_1 + … + w_{i−1}
        W_c = tl.dot(T_ut, a_c * tl.exp(G_excl), input_precision=DOT_PRECISION)
        tl.store(W + out_rows[:, None] * K + d[None, :], W_c, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Phase 2: the sequential walk over chunks, state on-chip
# --------------------------------------------------------------------------------------------------
@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 → dtype, rounding to nearest even.  The GPU does this in hardware; the CPU interpreter
    truncates fp32 → bf16, which would double the output error on CPU, so for bf16 the rounding is
    done on the bits first (after it the conversion is exact, on either machine)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _walk_tiles(i_v, i_bh, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                BV: tl.constexpr):
    """The index tiles of a walk program (V-slice i_v of head i_bh, forward or reverse): rows i of a
    chunk, the whole key dimension d, this program's value channels e, the offsets of its [K, BV]
    state tile, and where its head starts in a [B, T, H, V] tensor."""
    i = tl.arange(0, C)
    d = tl.arange(0, K)
    e = i_v * BV + tl.arange(0, BV)
    state_off = i_bh * K * V + d[:, None] * V + e[None, :]
    return i, d, e, state_off, ((i_bh // H) * T * H + i_bh % H) * V


@triton.jit
def _state_or_zero(ptr, state_off, GIVEN: tl.constexpr, K: tl.constexpr, BV: tl.constexpr):
    """A walk's starting [K, BV] tile (fp32): loaded if GIVEN, else zero."""
    if GIVEN:
        return tl.load(ptr + state_off)
    else:
        return tl.zeros([K, BV], dtype=tl.float32)


@triton.jit
def _chunk_operands(W, r_dec, k_dec, b_dec, g_last, A_qk, A_qb, rows, row_ok, i, d, chunk,
                    K: tl.constexpr, C: tl.constexpr):
    """What phase 1 stored for one chunk and both walks read: W, r ⊙ e^{Γ}, k ⊙ e^{Γ_C−Γ},
    b ⊙ e^{Γ_C−Γ} [C, K], e^{Γ_C} [K] (chunk = its index among all chunks), A^{qk}, A^{qb} [C, C]."""
    K_off = rows[:, None] * K + d[None, :]
    A_off = rows[:, None] * C + i[None, :]
    return (tl.load(W + K_off, mask=row_ok, other=0.0), tl.load(r_dec + K_off, mask=row_ok, other=0.0),
            tl.load(k_dec + K_off, mask=row_ok, other=0.0), tl.load(b_dec + K_off, mask=row_ok, other=0.0),
            tl.load(g_last + chunk * K + d),
            tl.load(A_qk + A_off, mask=row_ok, other=0.0), tl.load(A_qb + A_off, mask=row_ok, other=0.0))


def _walk_tiles_that_fit(configs, named_args, **kwargs):
    """The walks' (BV, num_warps) choices that fit: BV ≤ V, the [K, BV] fp32 state at ≤ 64
    registers a thread, and two pipeline stages (prefetching the next chunk's operands) only while
    C·K ≤ 2048, beyond which they cost too much shared memory.  BV = 16 at 2 or 4 warps always fits
    (V ≥ 16, K ≤ 256), so some choice is always kept."""
    K, V, C = (({**named_args, **kwargs})[name] for name in ("K", "V", "C"))
    stages = 2 if C * K <= 2048 else 1
    return [triton.Config(cfg.kwargs, num_warps=cfg.num_warps, num_stages=stages) for cfg in configs
            if cfg.kwargs["BV"] <= V and K * cfg.kwargs["BV"] <= 64 * 32 * cfg.num_warps]


# One program per (V-slice, batch·head) walks all chunks in order: B·H·V/BV programs in all, so the
# slice width trades programs (parallelism across the GPU) against the work each does per chunk, and
# is autotuned with the warps, for both walks.  Under the interpreter BV = 16 fits every V and tiles V
# in the tests.
_WALK_CONFIGS = [triton.Config({"BV": bv}, num_warps=w)
                 for bv, w in ([(16, 4)] if _INTERPRETED else [(16, 2), (16, 4), (32, 4), (32, 8), (64, 4), (64, 8)])]


@triton.autotune(configs=_WALK_CONFIGS, key=["K", "V", "C", "RECOMPUTE"],
                 prune_configs_by={"early_config_prune": _walk_tiles_that_fit})
@triton.jit
def _rwkv7_chunk_scan_kernel(
    v, A_qk, A_qb, U, W, r_dec, k_dec, b_dec, g_last,      # phase-1 outputs and the values
    o, S_init, S_final,                                    # o: [B, T, H, V]; states: [B, H, K, V] fp32
    h, pseudo,                                             # if RECOMPUTE: S₀ [B, H, NT, K, V], 𝒱 [B, H, T, V]
    T, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, RECOMPUTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v = tl.program_id(0)                 # which V-slice of the state
    i_bh = tl.program_id(1).to(tl.int64)   # which (batch, head)
    i, d, e, state_off, v_base = _walk_tiles(i_v, i_bh, T, H, K, V, C, BV)       # v and o are [B, T, H, V]
    S = _state_or_zero(S_init, state_off, HAS_INITIAL_STATE, K, BV)              # S₀ [K, BV] fp32

    for i_n in range(NT):
        t = (i_n * C + i).to(tl.int64)
        row_ok = (t < T)[:, None]
        rows = i_bh * T + t                                               # rows of [B, H, T, ·] buffers
        W_c, r_c, k_c, b_c, g_C, Aqk_c, Aqb_c = _chunk_operands(
            W, r_dec, k_dec, b_dec, g_last, A_qk, A_qb, rows, row_ok, i, d, i_bh * NT + i_n, K, C)
        U_c = tl.load(U + rows[:, None] * V + e[None, :], mask=row_ok, other=0.0)        # [C, BV]
        io_off = v_base + t[:, None] * (H * V) + e[None, :]
        v_c = tl.load(v + io_off, mask=row_ok, other=0.0).to(tl.float32)                # [C, BV]

        Vp = U_c + tl.dot(W_c, S, input_precision=DOT_PRECISION)                        # 𝒱 = U + W S₀
        if RECOMPUTE:                                       # for the backward: S₀ and 𝒱, no output
            tl.store(h + (i_bh * NT + i_n) * K * V + d[:, None] * V + e[None, :], S)
            tl.store(pseudo + rows[:, None] * V + e[None, :], Vp, mask=row_ok)
        else:
            O_c = (tl.dot(Aqk_c, v_c, input_precision=DOT_PRECISION)                    # A^{qk} V
                   + tl.dot(Aqb_c, Vp, input_precision=DOT_PRECISION)                   # + A^{qb} 𝒱
                   + tl.dot(r_c, S, input_precision=DOT_PRECISION))                     # + (r ⊙ e^Γ) S₀
            tl.store(o + io_off, _round_to(scale * O_c, o.dtype.element_ty), mask=row_ok)
        S = (g_C[:, None] * S                                                           # e^{Γ_C} ⊙ S₀
             + tl.dot(tl.trans(k_c), v_c, input_precision=DOT_PRECISION)                # + (k ⊙ e^{Γ_C−Γ})ᵀ V
             + tl.dot(tl.trans(b_c), Vp, input_precision=DOT_PRECISION))                # + (b ⊙ e^{Γ_C−Γ})ᵀ 𝒱

    if STORE_FINAL_STATE:
        tl.store(S_final + state_off, S)


# --------------------------------------------------------------------------------------------------
# Backward 1: the reverse walk over chunks, state gradient on-chip
# --------------------------------------------------------------------------------------------------
@triton.autotune(configs=_WALK_CONFIGS, key=["K", "V", "C"],
                 prune_configs_by={"early_config_prune": _walk_tiles_that_fit})
@triton.jit
def _rwkv7_chunk_scan_bwd_kernel(
    do, A_qk, A_qb, A_ak, T_solve, W, r_dec, k_dec, b_dec, g_last,   # dO [B, T, H, V]; phase-1 outputs
    dS_last, dh, Y, dv, dS_first,          # dS_last, dS_first [B, H, K, V] fp32; dh [B, H, NT, K, V] fp32;
                                           # Y [B, H, T, V] fp32; dv [B, T, H, V]
    T, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    HAS_FINAL_GRAD: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One V-slice of dS of one (batch, head), from the last chunk to the first (module docstring):
    store dS', then d𝒱, Y = 𝒯ᵀ d𝒱 and dV, then dS₀ = e^{Γ_C} ⊙ dS' + (r ⊙ e^{Γ})ᵀ Ō + Wᵀ d𝒱."""
    i_v = tl.program_id(0)                 # which V-slice of the state gradient
    i_bh = tl.program_id(1).to(tl.int64)   # which (batch, head)
    i, d, e, state_off, v_base = _walk_tiles(i_v, i_bh, T, H, K, V, C, BV)       # do and dv are [B, T, H, V]
    dS = _state_or_zero(dS_last, state_off, HAS_FINAL_GRAD, K, BV)               # ∂L/∂S_T  [K, BV] fp32

    for step in range(NT):
        i_n = NT - 1 - step
        t = (i_n * C + i).to(tl.int64)
        row_ok = (t < T)[:, None]
        rows = i_bh * T + t                                                # rows of [B, H, T, ·] buffers
        tl.store(dh + (i_bh * NT + i_n) * K * V + d[:, None] * V + e[None, :], dS)   # dS' of chunk i_n
        W_c, r_c, k_c, b_c, g_C, Aqk_c, Aqb_c = _chunk_operands(
            W, r_dec, k_dec, b_dec, g_last, A_qk, A_qb, rows, row_ok, i, d, i_bh * NT + i_n, K, C)
        A_off = rows[:, None] * C + i[None, :]
        Aak_c = tl.load(A_ak + A_off, mask=row_ok, other=0.0)
        T_c = tl.load(T_solve + A_off, mask=row_ok, other=0.0)             # 𝒯 (zero rows past T)
        io_off = v_base + t[:, None] * (H * V) + e[None, :]
        dO_c = scale * tl.load(do + io_off, mask=row_ok, other=0.0).to(tl.float32)     # Ō  [C, BV]

        dVp = (tl.dot(tl.trans(Aqb_c), dO_c, input_precision=DOT_PRECISION)            # d𝒱 = A^{qb}ᵀ Ō
               + tl.dot(b_c, dS, input_precision=DOT_PRECISION))                       # + (b ⊙ e^{Γ_C−Γ}) dS'
        Y_c = tl.dot(tl.trans(T_c), dVp, input_precision=DOT_PRECISION)                # Y = 𝒯ᵀ d𝒱
        dv_c = (tl.dot(tl.trans(Aqk_c), dO_c, input_precision=DOT_PRECISION)           # dV = A^{qk}ᵀ Ō
                + tl.dot(k_c, dS, input_precision=DOT_PRECISION)                       # + (k ⊙ e^{Γ_C−Γ}) dS'
                + tl.dot(tl.trans(Aak_c), Y_c, input_precision=DOT_PRECISION))         # + A^{ak}ᵀ Y
        dS = (g_C[:, None] * dS                                                        # e^{Γ_C} ⊙ dS'
              + tl.dot(tl.trans(r_c), dO_c, input_precision=DOT_PRECISION)             # + (r ⊙ e^{Γ})ᵀ Ō
              + tl.dot(tl.trans(W_c), dVp, input_precision=DOT_PRECISION))             # + Wᵀ d𝒱
        tl.store(Y + rows[:, None] * V + e[None, :], Y_c, mask=row_ok)
        tl.store(dv + io_off, _round_to(dv_c, dv.dtype.element_ty), mask=row_ok)

    if HAS_INITIAL_STATE:
        tl.store(dS_first + state_off, dS)


# --------------------------------------------------------------------------------------------------
# Backward 2: dr, dw, dk, da, db of every chunk (all chunks in parallel)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rows(x, m, C: tl.constexpr):
    """Rows m (a vector of c row indices) of a [C, N] tile, as [c, N]: exact masked sums."""
    return tl.sum(tl.where(tl.arange(0, C)[:, None, None] == m[None, :, None], x[:, None, :], 0.0), axis=0)


@triton.jit
def _columns(x, m, C: tl.constexpr):
    """Columns m of a [C, C] tile, as [C, c]."""
    return tl.sum(tl.where(tl.arange(0, C)[None, None, :] == m[None, :, None], x[:, None, :], 0.0), axis=2)


@triton.jit
def _factored_pair_grads(dA_qk, dA_qb, dA_ak, dA_ab, r_c, k_c, a_c, b_c, G, w_prev, ii, jj):
    """The pair parts of dr, da, dk, db [C, BK] for mild gates: e^{E_i − Γ_j} = e^{E_i}·e^{−Γ_j} turns
    each into fp32 products of the causal part of a dA with decayed operands (module docstring)."""
    incl, strict = ii >= jj, ii > jj
    dA_qk, dA_qb = tl.where(incl, dA_qk, 0.0), tl.where(incl, dA_qb, 0.0)
    dA_ak, dA_ab = tl.where(strict, dA_ak, 0.0), tl.where(strict, dA_ab, 0.0)
    e_G, e_G_excl, e_minus_G = tl.exp(G), tl.exp(tl.cumsum(w_prev, axis=0)), tl.exp(-G)     # e^{Γ}, e^{Γ⁻}, e^{−Γ}
    k_out, b_out = k_c * e_minus_G, b_c * e_minus_G
    r_in, a_in = r_c * e_G, a_c * e_G_excl
    dr_P = e_G * (tl.dot(dA_qk, k_out, input_precision="ieee") + tl.dot(dA_qb, b_out, input_precision="ieee"))
    da_P = e_G_excl * (tl.dot(dA_ak, k_out, input_precision="ieee") + tl.dot(dA_ab, b_out, input_precision="ieee"))
    dk_P = e_minus_G * (tl.dot(tl.trans(dA_qk), r_in, input_precision="ieee")
                        + tl.dot(tl.trans(dA_ak), a_in, input_precision="ieee"))
    db_P = e_minus_G * (tl.dot(tl.trans(dA_qb), r_in, input_precision="ieee")
                        + tl.dot(tl.trans(dA_ab), a_in, input_precision="ieee"))
    return dr_P, da_P, dk_P, db_P


@triton.jit
def _pairwise_pair_grads(dA_qk, dA_qb, dA_ak, dA_ab, r_c, k_c, a_c, b_c, w_c, w_prev, w_next, ii,
                         C: tl.constexpr, BK: tl.constexpr, PAIRS: tl.constexpr):
    """The same pair parts for any gates, PAIRS partner rows m at a time: pairs (i, j = m) give dr, da
    and pairs (i = m, j) give dk, db.  The [C, PAIRS, BK] tensors are indexed [row of the tile, m, d];
    their exponents are window sums of w down axis 0, as in phase 1, masked before exp."""
    dr_P = tl.zeros([C, BK], dtype=tl.float32)
    da_P = tl.zeros([C, BK], dtype=tl.float32)
    dk_P = tl.zeros([C, BK], dtype=tl.float32)
    db_P = tl.zeros([C, BK], dtype=tl.float32)
    i3 = ii[:, :, None]                                                        # [C, 1, 1]
    for m0 in range(0, C, PAIRS):
        m = m0 + tl.arange(0, PAIRS)
        m3 = m[None, :, None]                                                  # [1, PAIRS, 1]
        # columns m of the scores: dx_i += Σ_m dA_im y_m e^{E_i − Γ_m}
        E_incl = tl.exp(tl.where(m3 <= i3, tl.cumsum(tl.where(m3 < i3, w_c[:, None, :], 0.0), axis=0),
                                 float("-inf")))                               # w_{m+1} + … + w_i
        E_strict = tl.exp(tl.where(m3 < i3, tl.cumsum(tl.where(m3 + 1 < i3, w_prev[:, None, :], 0.0), axis=0),
                                   float("-inf")))                             # w_{m+1} + … + w_{i−1}
        k_m = _rows(k_c, m, C)[None, :, :]
        b_m = _rows(b_c, m, C)[None, :, :]
        dr_P += tl.sum((_columns(dA_qk, m, C)[:, :, None] * k_m
                        + _columns(dA_qb, m, C)[:, :, None] * b_m) * E_incl, axis=1)
        da_P += tl.sum((_columns(dA_ak, m, C)[:, :, None] * k_m
                        + _columns(dA_ab, m, C)[:, :, None] * b_m) * E_strict, axis=1)
        # rows m of the scores: dy_j += Σ_m dA_mj x_m e^{E_m − Γ_j}   (reverse window sums, from m down to j)
        F_incl = tl.exp(tl.where(i3 <= m3, tl.cumsum(tl.where(i3 < m3, w_next[:, None, :], 0.0), axis=0,
                                                     reverse=True), float("-inf")))          # w_{j+1} + … + w_m
        F_strict = tl.exp(tl.where(i3 < m3, tl.cumsum(tl.where(i3 + 1 < m3, w_next[:, None, :], 0.0), axis=0,
                                                      reverse=True), float("-inf")))         # … + w_{m−1}
        r_m = _rows(r_c, m, C)[None, :, :]
        a_m = _rows(a_c, m, C)[None, :, :]
        dk_P += tl.sum(tl.trans(_rows(dA_qk, m, C))[:, :, None] * r_m * F_incl
                       + tl.trans(_rows(dA_ak, m, C))[:, :, None] * a_m * F_strict, axis=1)
        db_P += tl.sum(tl.trans(_rows(dA_qb, m, C))[:, :, None] * r_m * F_incl
                       + tl.trans(_rows(dA_ab, m, C))[:, :, None] * a_m * F_strict, axis=1)
    return dr_P, da_P, dk_P, db_P


@triton.jit
def _rwkv7_chunk_grad_kernel(
    r, w, k, v, a, b, do,                  # inputs and dO, [B, T, H, ·] as in the forward
    h, dh, pseudo, Y,                      # S₀ and dS' of every chunk [B, H, NT, K, V]; 𝒱, Y [B, H, T, V]; fp32
    dr, dw, dk, da, db,                    # outputs, [B, T, H, K], each in its input's dtype
    T, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PAIRS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FACTORED_SPAN: tl.constexpr,
):
    """The BK channels d of dr, dw, dk, da, db in one chunk (module docstring): state parts, pair
    parts (factored or pairwise), then the cumsums of dw."""
    i_k = tl.program_id(0)                 # which BK channels
    i_n = tl.program_id(1)                 # which chunk
    i_bh = tl.program_id(2).to(tl.int64)   # which (batch, head)
    i_b = i_bh // H
    i_h = i_bh % H

    i = tl.arange(0, C)
    t = (i_n * C + i).to(tl.int64)
    row_ok = (t < T)[:, None]
    ii = i[:, None]                        # [C, 1]  the row of every element of a [C, ·] tile
    rows = i_bh * T + t                    # rows of [B, H, T, ·] buffers
    d = i_k * BK + tl.arange(0, BK)
    chunk_state = (i_bh * NT + i_n) * K * V + d[:, None] * V       # [BK, 1] into h and dh
    v_base = (i_b * T * H + i_h) * V

    # ---- sums over V: the four score gradients, the four state parts, diag(S₀ dS'ᵀ) -----------------
    dA_qk = tl.zeros([C, C], dtype=tl.float32)
    dA_qb = tl.zeros([C, C], dtype=tl.float32)
    dA_ak = tl.zeros([C, C], dtype=tl.float32)
    dA_ab = tl.zeros([C, C], dtype=tl.float32)
    dr_acc = tl.zeros([C, BK], dtype=tl.float32)                   # Ō S₀ᵀ
    da_acc = tl.zeros([C, BK], dtype=tl.float32)                   # Y S₀ᵀ
    dk_S = tl.zeros([C, BK], dtype=tl.float32)                     # V dS'ᵀ
    db_S = tl.zeros([C, BK], dtype=tl.float32)                     # 𝒱 dS'ᵀ
    S_dS = tl.zeros([BK], dtype=tl.float32)                        # diag(S₀ dS'ᵀ)
    for e0 in tl.range(0, V, BV):
        e = e0 + tl.arange(0, BV)
        io_off = v_base + t[:, None] * (H * V) + e[None, :]
        dO_c = scale * tl.load(do + io_off, mask=row_ok, other=0.0).to(tl.float32)     # Ō  [C, BV]
        v_c = tl.load(v + io_off, mask=row_ok, other=0.0).to(tl.float32)
        Vp_c = tl.load(pseudo + rows[:, None] * V + e[None, :], mask=row_ok, other=0.0)  # 𝒱
        Y_c = tl.load(Y + rows[:, None] * V + e[None, :], mask=row_ok, other=0.0)
        S0_c = tl.load(h + chunk_state + e[None, :])                                  # S₀  [BK, BV]
        dS_c = tl.load(dh + chunk_state + e[None, :])                                 # dS'
        dA_qk += tl.dot(dO_c, tl.trans(v_c), input_precision=DOT_PRECISION)
        dA_qb += tl.dot(dO_c, tl.trans(Vp_c), input_precision=DOT_PRECISION)
        dA_ak += tl.dot(Y_c, tl.trans(v_c), input_precision=DOT_PRECISION)
        dA_ab += tl.dot(Y_c, tl.trans(Vp_c), input_precision=DOT_PRECISION)
        dr_acc += tl.dot(dO_c, tl.trans(S0_c), input_precision=DOT_PRECISION)
        da_acc += tl.dot(Y_c, tl.trans(S0_c), input_precision=DOT_PRECISION)
        dk_S += tl.dot(v_c, tl.trans(dS_c), input_precision=DOT_PRECISION)
        db_S += tl.dot(Vp_c, tl.trans(dS_c), input_precision=DOT_PRECISION)
        S_dS += tl.sum(S0_c * dS_c, axis=1)

    x_off = (i_b * T * H + i_h) * K + t[:, None] * (H * K) + d[None, :]
    w_c = tl.load(w + x_off, mask=row_ok, other=0.0).to(tl.float32)          # padded rows: w = 0
    w_prev = _load_w_shifted(w, x_off, i, t, T, -1, H, K, C)                  # w_{i−1}
    w_next = _load_w_shifted(w, x_off, i, t, T, 1, H, K, C)                   # w_{i+1}
    r_c = tl.load(r + x_off, mask=row_ok, other=0.0).to(tl.float32)
    k_c = tl.load(k + x_off, mask=row_ok, other=0.0).to(tl.float32)
    a_c = tl.load(a + x_off, mask=row_ok, other=0.0).to(tl.float32)
    b_c = tl.load(b + x_off, mask=row_ok, other=0.0).to(tl.float32)
    G = tl.cumsum(w_c, axis=0)                                                 # Γ      [C, BK]
    G_C = tl.sum(tl.where(ii == C - 1, G, 0.0), axis=0)                      # Γ_C    [BK]

    # state parts, with the exponents of phase 1 (window sums, ≤ 0); dr and da take their pair parts on top
    dr_acc = tl.exp(G) * dr_acc                                                # dr^S
    da_acc = tl.exp(tl.cumsum(w_prev, axis=0)) * da_acc                        # da^S, e^{Γ⁻}
    to_end = tl.exp(tl.cumsum(w_next, axis=0, reverse=True))                   # e^{Γ_C − Γ}
    dk_S = to_end * dk_S
    db_S = to_end * db_S

    # ---- pair parts: factored when this chunk's K slice has mild gates (phase 1's test), else pairwise ----
    if tl.min(G_C) >= -FACTORED_SPAN:
        dr_P, da_P, dk_P, db_P = _factored_pair_grads(dA_qk, dA_qb, dA_ak, dA_ab, r_c, k_c, a_c, b_c,
                                                      G, w_prev, ii, i[None, :])
    else:
        dr_P, da_P, dk_P, db_P = _pairwise_pair_grads(dA_qk, dA_qb, dA_ak, dA_ab, r_c, k_c, a_c, b_c,
                                                      w_c, w_prev, w_next, ii, C, BK, PAIRS)
    dr_acc += dr_P
    da_acc += da_P

    # ---- dw: Σ_{i≥s} (r dr − k dk^P − b db^P) + Σ_{i>s} a da + Σ_{j<s} (k dk^S + b db^S) + e^{Γ_C} diag(S₀ dS'ᵀ)
    R = r_c * dr_acc - k_c * dk_P - b_c * db_P
    P = a_c * da_acc
    Q = k_c * dk_S + b_c * db_S
    dw_c = (tl.cumsum(R, axis=0, reverse=True) + tl.cumsum(P, axis=0, reverse=True) - P
            + tl.cumsum(Q, axis=0) - Q + (tl.exp(G_C) * S_dS)[None, :])

    tl.store(dr + x_off, _round_to(dr_acc, dr.dtype.element_ty), mask=row_ok)
    tl.store(dw + x_off, _round_to(dw_c, dw.dtype.element_ty), mask=row_ok)
    tl.store(dk + x_off, _round_to(dk_S + dk_P, dk.dtype.element_ty), mask=row_ok)
    tl.store(da + x_off, _round_to(da_acc, da.dtype.element_ty), mask=row_ok)
    tl.store(db + x_off, _round_to(db_S + db_P, db.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Host side: checks, launch, autograd
# --------------------------------------------------------------------------------------------------
_CHUNK_SIZES = (16, 32, 64)


def _check_kernel(sig, chunk_size):
    """What this kernel adds to the checks of ``rwkv7.SPEC`` (done first, by ``rwkv7_chunked``):
    dtypes, head and chunk sizes, the device.  Returns the chunk size as an int."""
    sig.kernel_dtype()
    K = sig.kernel_head_size("K")
    sig.kernel_head_size("V", zero_ok=True)
    C = sig.kernel_chunk_size(chunk_size, _CHUNK_SIZES)
    if C * K > 4096:
        raise sig.error(f"chunk_size = {C} is too large for K = {K} in the Triton kernel: chunk_size·K "
                        f"must be ≤ 4096 (16 for any K, 32 for K ≤ 128, 64 for K ≤ 64)")
    sig.kernel_device(_INTERPRETED)
    return C


def _dot_precision(x):
    """``tl.dot``'s input precision for inputs like x: exact fp32 products for fp32, TF32 for bf16/fp16."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _phase1(r, w, k, v, a, b, C, for_backward=False):
    """Launch phase 1 (all chunks in parallel) on contiguous inputs; return its fp32 outputs by name,
    with A^{ak} and 𝒯 as well when ``for_backward``."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, C)
    f32 = dict(device=r.device, dtype=torch.float32)
    out = dict(A_qk=torch.empty(B, H, T, C, **f32), A_qb=torch.empty(B, H, T, C, **f32),
               U=torch.empty(B, H, T, V, **f32), W=torch.empty(B, H, T, K, **f32),
               r_dec=torch.empty(B, H, T, K, **f32), k_dec=torch.empty(B, H, T, K, **f32),
               b_dec=torch.empty(B, H, T, K, **f32), g_last=torch.empty(B, H, NT, K, **f32))
    if for_backward:
        out.update(A_ak=torch.empty(B, H, T, C, **f32), T_solve=torch.empty(B, H, T, C, **f32))
    # the pairwise [C, C, BK] products are kept at ≤ 4096 elements (32 registers a thread)
    BK = min(K, max(1, 4096 // (C * C)))
    _rwkv7_chunk_intra_kernel[(NT, B * H)](
        r, w, k, v, a, b, out["A_qk"], out["A_qb"], out["U"], out["W"],
        out["r_dec"], out["k_dec"], out["b_dec"], out["g_last"],
        out.get("A_ak", out["A_qk"]), out.get("T_solve", out["A_qk"]), T, NT,   # (unused unless for_backward)
        H=H, K=K, V=V, C=C, BK=BK, BKW=min(K, 64), BV=min(V, 64), DOT_PRECISION=_dot_precision(r),
        FOR_BACKWARD=for_backward, FACTORED_SPAN=FACTORED_SPAN,
    )
    return out


def _phase2(v, chunk, scale, S_init, C, *, o=None, S_final=None, h=None, pseudo=None):
    """Launch phase 2, the walk over chunks: write o (and S_final if given), or, given h and pseudo
    (the backward's recomputation), S₀ of every chunk and 𝒱 instead."""
    B, T, H, V = v.shape
    K = chunk["W"].shape[-1]
    NT = triton.cdiv(T, C)
    recompute = h is not None
    _rwkv7_chunk_scan_kernel[lambda meta: (V // meta["BV"], B * H)](
        v, chunk["A_qk"], chunk["A_qb"], chunk["U"], chunk["W"],
        chunk["r_dec"], chunk["k_dec"], chunk["b_dec"], chunk["g_last"],
        v if o is None else o, v if S_init is None else S_init, v if S_final is None else S_final,
        h if recompute else v, pseudo if recompute else v,        # (v: a placeholder, never written)
        T, NT, float(scale),
        H=H, K=K, V=V, C=C,
        HAS_INITIAL_STATE=S_init is not None, STORE_FINAL_STATE=S_final is not None, RECOMPUTE=recompute,
        DOT_PRECISION=_dot_precision(v),
    )


def _forward_triton(r, w, k, v, a, b, scale, S_init, output_final_state, C):
    """Launch the two phases on contiguous inputs (S_init: None or fp32); return (o in v.dtype,
    final state fp32 or None)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    chunk = _phase1(r, w, k, v, a, b, C)                 # Γ, the four matrices, 𝒯, U, W: all chunks at once
    o = torch.empty_like(v)
    S_final = torch.empty(B, H, K, V, device=r.device, dtype=torch.float32) if output_final_state else None
    _phase2(v, chunk, scale, S_init, C, o=o, S_final=S_final)     # the chunks in order, state in registers
    return o, S_final


def _backward_triton(r, w, k, v, a, b, scale, S_init, do, dS_final, C):
    """The backward's four launches (module docstring) on contiguous tensors; dS_final is None or
    fp32.  Returns dr, dw, dk, dv, da, db (each in its input's dtype) and d initial_state (fp32, None
    without an initial state)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, C)
    f32 = dict(device=r.device, dtype=torch.float32)

    # recompute: phase 1 (with A^{ak} and 𝒯), then the forward walk storing S₀ per chunk and 𝒱
    chunk = _phase1(r, w, k, v, a, b, C, for_backward=True)
    h = torch.empty(B, H, NT, K, V, **f32)
    pseudo = torch.empty(B, H, T, V, **f32)
    _phase2(v, chunk, scale, S_init, C, h=h, pseudo=pseudo)

    # the reverse walk: dS' per chunk, Y, dv, and d initial_state
    dh = torch.empty_like(h)
    Y = torch.empty_like(pseudo)
    dv = torch.empty_like(v)
    dS_init = None if S_init is None else torch.empty(B, H, K, V, **f32)
    _rwkv7_chunk_scan_bwd_kernel[lambda meta: (V // meta["BV"], B * H)](
        do, chunk["A_qk"], chunk["A_qb"], chunk["A_ak"], chunk["T_solve"], chunk["W"],
        chunk["r_dec"], chunk["k_dec"], chunk["b_dec"], chunk["g_last"],
        dh if dS_final is None else dS_final, dh, Y, dv, dh if dS_init is None else dS_init,   # (dh: placeholder)
        T, NT, float(scale),
        H=H, K=K, V=V, C=C, HAS_FINAL_GRAD=dS_final is not None, HAS_INITIAL_STATE=S_init is not None,
        DOT_PRECISION=_dot_precision(v),
    )
    del chunk                                            # phase 1's scratch is not needed any more

    # dr, dw, dk, da, db, all chunks in parallel.  A program holds four [C, C] score gradients, about
    # twelve [C, BK] tiles and either route's pair products ([C, PAIRS, BK] tensors for the pairwise
    # one).  Compiled offline for sm_90 (Triton 3.9, bf16, K = V = 64, 8 warps): at C = 16, BK = 32
    # the kernel fits in 212 registers with PAIRS = 2 and spills with PAIRS = 4 (255 and 56 bytes of
    # stack; 4 warps spill either way); C = 32 and 64 still spill.  Interpreter: BK = BV = 16, so that
    # the small test sizes exercise the tiling over K and V.
    dr, dw, dk, da, db = (torch.empty_like(x) for x in (r, w, k, a, b))
    BK, BV = (16, 16) if _INTERPRETED else (min(K, 32 if C <= 32 else 16), min(V, 32))
    pairs = max(2, 1024 // (C * BK))          # [C, PAIRS, BK] pair products: 1024 elements, 2048 at C ≥ 32
    _rwkv7_chunk_grad_kernel[(K // BK, NT, B * H)](
        r, w, k, v, a, b, do, h, dh, pseudo, Y, dr, dw, dk, da, db, T, NT, float(scale),
        H=H, K=K, V=V, C=C, BK=BK, BV=BV, PAIRS=pairs, DOT_PRECISION=_dot_precision(v),
        FACTORED_SPAN=FACTORED_SPAN, num_warps=8, num_stages=1,
    )
    return dr, dw, dk, dv, da, db, dS_init


class _RWKV7Chunked(torch.autograd.Function):
    """Forward: phases 1 and 2.  Backward: both again (recomputing 𝒯, A^{ak}, S₀ and 𝒱), the reverse
    walk and the gradient kernel; it saves only the inputs."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, scale, output_final_state, chunk_size):
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        S_init = None if initial_state is None else initial_state.float().contiguous()
        o, S = _forward_triton(r, w, k, v, a, b, scale, S_init, output_final_state, chunk_size)
        ctx.save_for_backward(r, w, k, v, a, b, S_init)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)             # an unused output's gradient arrives as None
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        r, w, k, v, a, b, S_init = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dS = None if dS is None else dS.float().contiguous()
        dr, dw, dk, dv, da, db, dS_init = _backward_triton(r, w, k, v, a, b, ctx.scale, S_init, do, dS,
                                                           ctx.chunk_size)
        dS_init = None if dS_init is None else dS_init.to(ctx.initial_state_dtype)
        return dr, dw, dk, dv, da, db, dS_init, None, None, None


# The same forward and backward as PyTorch operators, for torch.compile (kernels/_compile.py).

@torch.library.custom_op("lecture_kit::rwkv7_forward", mutates_args=())
def _forward_op(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, initial_state: torch.Tensor | None, scale: float,
                output_final_state: bool, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    S_init = None if initial_state is None else initial_state.float().contiguous()
    o, S = _forward_triton(r, w, k, v, a, b, scale, S_init, output_final_state, chunk_size)
    return o, absent(S, v)


@_forward_op.register_fake
def _(r, w, k, v, a, b, initial_state, scale, output_final_state, chunk_size):
    B, _, H, K = r.shape
    final = (v.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if output_final_state
             else v.new_empty(0))
    return torch.empty_like(v), final


@torch.library.custom_op("lecture_kit::rwkv7_backward", mutates_args=())
def _backward_op(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, initial_state: torch.Tensor | None, do: torch.Tensor,
                 dS: torch.Tensor | None, scale: float, chunk_size: int) -> list[torch.Tensor]:
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    S_init = None if initial_state is None else initial_state.float().contiguous()
    grads = _backward_triton(r, w, k, v, a, b, scale, S_init, do, dS, chunk_size)
    return [absent(g, v) for g in grads]


@_backward_op.register_fake
def _(r, w, k, v, a, b, initial_state, do, dS, scale, chunk_size):
    return [torch.empty_like(x) for x in (r, w, k, v, a, b)] + [
        v.new_empty(0) if initial_state is None else torch.empty_like(initial_state, dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    r, w, k, v, a, b, initial_state, scale, output_final_state, chunk_size = inputs
    ctx.save_for_backward(r, w, k, v, a, b, initial_state)
    ctx.scale, ctx.chunk_size, ctx.output_final_state = scale, chunk_size, output_final_state


def _backward_of_op(ctx, do, dS):
    r, w, k, v, a, b, initial_state = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dS = dS.float().contiguous() if ctx.output_final_state and dS is not None else None
    *grads, dS_init = _backward_op(r, w, k, v, a, b, initial_state, do, dS, ctx.scale, ctx.chunk_size)
    return (*grads, present(dS_init, initial_state), None, None, None)


_forward_op.register_autograd(_backward_of_op, setup_context=_setup_context)


def rwkv7_chunked(r, w, k, v, a, b, *, scale=1.0, initial_state=None, output_final_state=False,
                  chunk_size=16):
    """RWKV-7 generalised delta rule, chunkwise Triton kernel (see the module docstring for the math).

    Args:
        r, w, k, a, b: [B, T, H, K] — receptance (query), log decay w ≤ 0 (any float dtype: used in
            r's dtype or fp32), key, and the two vectors of the rank-1 transition term b aᵀ (RWKV-7:
            a = −κ̂, b = κ̂ ⊙ a_icl).
        v: [B, T, H, V].
        scale: multiplies the output (RWKV-7 uses 1.0).
        initial_state: None or [B, H, K, V], any float dtype, used in fp32 (fla layout: S ∈ R^{K×V}).
        output_final_state: also return S_T.
        chunk_size: 16 (default), 32 or 64.

    Returns:
        (o [B, T, H, V] in v.dtype, final state [B, H, K, V] fp32 or None); B, H or V = 0 give
        empty results.

    Differentiable in r, w, k, v, a, b and initial_state, with Triton backward kernels (module
    docstring).  This is ``rwkv7.kernel``: the arguments are checked against ``rwkv7.SPEC`` as every
    form's are, then against what this kernel adds (``_check_kernel``).
    """
    from ..rwkv7 import SPEC
    call = SPEC.check("kernel", r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size)
    scale, chunk_size = call.scale, _check_kernel(call.sig, chunk_size)
    empty = call.sig.empty_result(v, output_final_state)
    if empty is not None:           # B, H or V is 0: nothing to compute
        return empty
    if w.dtype not in (r.dtype, torch.float32):
        w = w.float()               # the kernel reads w in r's dtype or fp32; autograd casts dw back
    if initial_state is not None:
        initial_state = initial_state.float()
    if torch.compiler.is_compiling():
        o, S = _forward_op(r, w, k, v, a, b, initial_state, float(scale), bool(output_final_state),
                           chunk_size)
    else:
        o, S = _RWKV7Chunked.apply(r, w, k, v, a, b, initial_state, float(scale),
                                   bool(output_final_state), chunk_size)
    return o, (S if output_final_state else None)
