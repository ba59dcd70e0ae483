"""Gated linear attention (GLA): the Triton chunkwise kernels, forward and backward.  Algorithm of
reference/math.md §3.2.

Per batch element and head, with log forget gate g_t ∈ R^K (g ≤ 0) and state S_t ∈ R^{K×V} (fp32):

    S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ            o_t = scale · S_tᵀ q_t

Chunkwise form.  Cut time into chunks of C tokens (default 64) and each chunk into sub-chunks of c = 16.
Inside chunk [i] let b be the *chunk-local* cumulative sum of g (fp32, reset at every chunk start, so
b ≤ 0 and b decreases down the chunk); b_C is its value at the chunk's last token and S_[i] the state
entering the chunk.  Stacking the chunk's rows into Q, K (C×K) and V (C×V):

    step 0  chunk-local cumsum       b_r = g_1 + … + g_r                      (r = 1..C inside the chunk)
            and sub-chunk-local      β_r = the same sum from the first row of r's sub-chunk
    step 1  inter-chunk state        S_[i+1] = diag(e^{b_C}) S_[i] + (K ⊙ e^{b_C − b})ᵀ V
    step 2  inter-chunk output       O^inter = (Q ⊙ e^{b}) S_[i]
    step 3  off-diagonal sub-blocks  A_IJ = (Q_I ⊙ e^{b_I − b_ref}) (K_J ⊙ e^{b_ref − b_J})ᵀ     (J < I)
                                     with b_ref = b at the first row of query sub-chunk I
    step 4  diagonal sub-blocks      A_rs = Σ_d q_rd k_sd e^{b_rd − b_sd}     (r, s in one sub-chunk, s ≤ r)
    step 5  output                   O = scale · (O^inter + A V)              (A is lower triangular)

Every exponent is ≤ 0 (§3.3, §7.4): b ≤ 0 and b_C − b ≤ 0 in steps 1–2; in step 3 rows r of sub-chunk
I lie after b_ref's row and columns s of earlier sub-chunks before it, so b_r − b_ref ≤ 0 ≤ b_s − b_ref;
in step 4 the pair (r, s) is masked to s ≤ r *before* the exponential.  Hence the matrix products of
steps 1–3 and 5 can take half-precision operands (tensor cores, fp32 accumulation), while step 4, whose
factors e^{b_r}, e^{−b_s} would not fit in half precision, is computed pairwise in fp32.
Exponents between rows of one sub-chunk are taken as differences of β, not of b: b_r − b_s = β_r − β_s
there, and b_r − b_ref = β_r − β_ref in step 3.  Both are sums of at most c gates, whereas b may reach
C·max|g| (≈ 450 for strong gates, logsigmoid/0.1, at C = 64), where one fp32 ulp is 3e-5: the
difference of two such b's would carry that absolute error into every nearby pair's exponent.

Backward.  Given dO = ∂L/∂o and dS_T = ∂L/∂(final state), write dS_[i] = ∂L/∂S_[i] for the gradient of
the state entering chunk [i] (so dS_[i+1] is that of the state leaving it; dS_[NT] = dS_T, zero when the
final state is not used, and dS_[0] = ∂L/∂(initial state)).  Step 1 and step 2 are the only places
S_[i] enters, so the state gradients run the state recurrence backwards, with (scale·Q ⊙ e^{b}, dO) in
place of (K ⊙ e^{b_C − b}, V):

    step 6  state gradients    dS_[i] = diag(e^{b_C}) dS_[i+1] + scale · (Q ⊙ e^{b})ᵀ dO     (i = NT−1 … 0)

Then, inside chunk [i], with dS' = dS_[i+1] and the score gradient dA_rs = scale · do_r·v_s (s ≤ r, C×C):

    step 7  dv = scale · Aᵀ dO + (K ⊙ e^{b_C − b}) dS'
    step 8  dq = scale · e^{b} ⊙ (dO S_[i]ᵀ) + dQ^intra,   dQ^intra_rd = Σ_{s ≤ r} dA_rs k_sd e^{b_rd − b_sd}
            dk = e^{b_C − b} ⊙ (V dS'ᵀ)     + dK^intra,   dK^intra_sd = Σ_{r ≥ s} dA_rs q_rd e^{b_rd − b_sd}

The intra sums have the shape of A and are tiled like it, with the same reference points: for query
sub-chunk I, with Q̃_I = Q_I ⊙ e^{b_I − b_ref} and K̃_{<I} = K_{<I} ⊙ e^{b_ref − b_{<I}} (the two
operands of step 3, exponents ≤ 0) and dA_I = the rows of I, columns before I,

    off-diagonal  dQ^intra_I += e^{b_I − b_ref} ⊙ (dA_I K̃_{<I}),
                  dK^intra_{<I} += e^{b_ref − b_{<I}} ⊙ (dA_Iᵀ Q̃_I)
    diagonal      the sums over s ≤ r (for dq) and r ≥ s (for dk) inside one sub-chunk, pairwise in fp32,
                  masked to the pair before the exponential (as step 4).

The gate gradient.  Adding ε to g_td (channel d of token t) multiplies by e^ε every term that carries
channel d across t: the scores A_rs with s < t ≤ r, the read-outs of the initial state at r ≥ t, and
everything written into the final state before t.  Multiplying q_rd by e^ε for r ≥ t, k_sd by e^{−ε} for
s ≥ t and row d of the final state by e^ε does exactly the same (a pair r ≥ s gains e^ε iff s < t ≤ r).
Differentiating both at ε = 0 (with dq, dk the full gradients of the chain rule above):

    ∂L/∂g_td = Σ_{s ≥ t} (q_sd dq_sd − k_sd dk_sd) + Σ_v (dS_T)_dv (S_T)_dv.

The same argument for chunk [i] alone — its input S_[i] fixed, its output S_[i+1] carrying everything
after it — makes the sum chunk-local, with the chunk's own output state in the last term:

    ∂L/∂g_td = Σ_{s ≥ t in [i]} (q_sd dq_sd − k_sd dk_sd) + Σ_v dS'_dv S_[i+1],dv.

By step 1, Σ_v dS'_dv S_[i+1],dv = e^{b_C,d} Σ_v dS'_dv S_[i],dv + Σ_{j in [i]} k_jd dk^inter_jd, where
dk^inter = e^{b_C − b} ⊙ (V dS'ᵀ) is the state part of dk.  Its sum over all j cancels the part j ≥ t of
−Σ_{s ≥ t} k_s dk^inter_s, which leaves only terms that do depend on g_t:

    step 9  dg_t = Σ_{s ≥ t} (q_s ⊙ dq^inter_s + R_s) + Σ_{j < t} k_j ⊙ dk^inter_j
                   + e^{b_C} ⊙ diag(dS' S_[i]ᵀ)
            R_s  = q_s ⊙ dQ^intra_s − k_s ⊙ dK^intra_s             (dq^inter = the state part of dq)

a reverse cumsum and an exclusive cumsum inside the chunk plus one per-chunk term, all in fp32.
Rounding.  In R the pair terms with both r, s ≥ t cancel, so they must cancel exactly: each pair term
dA_rs q_rd k_sd e^{b_rd − b_sd} enters q ⊙ dQ^intra (at row r) and k ⊙ dK^intra (at row s), and R
forms both from the *same* numbers — off the diagonal from the rounded matmul operands, as
Q̃_I ⊙ (dA_I K̃_{<I}) and K̃_{<I} ⊙ (dA_Iᵀ Q̃_I), on the diagonal from the fp32 pair terms.  Rebuilding R
as q ⊙ dq − k ⊙ dk from the finished dq, dk would leave the half-precision rounding of every cancelled
term in dg (the scalar-decay kernel measured relRMS 0.1–0.3 on its decay gradient that way).

Kernels (the "materialising" schedule of the GLA paper, FLA's ``chunk`` mode):

* ``_chunk_intra_kernel`` — grid (NT·C/c, B·H), every sub-chunk in parallel.  One program owns the c
  rows of one query sub-chunk I and does everything that needs only its chunk, summed or tiled over
  K: step 0 (β on its rows, b and b_C from the chunk's gates), the decayed operands Q ⊙ e^{b} and
  K ⊙ e^{b_C − b} of its rows, e^{b_C} (the program of the first sub-chunk), and the rows of A
  (steps 3–4): one tensor-core product for all the columns before I, then the diagonal c×c block
  pairwise on one [c, c, BK] tile per key tile.  A ``[B, H, T, C]`` holds row r of a
  chunk as A[r, 0..C−1]; for the backward it also stores β (fp32, ``[B, T, H, K]``).
* ``_chunk_states_kernel`` — grid (K/BK, V/BV, B·H).  One program owns a BK×BV tile of one head's
  state (fp32) and walks the chunks, S ← diag(e^{b_C}) S + scale · Xᵀ Y, storing the state that
  enters each chunk to ``h [B, H, NT, K, V]``.  Forward (step 1): X = K ⊙ e^{b_C − b}, Y = V, in
  order, and the last S is the final state.  REVERSE (step 6): X = Q ⊙ e^{b}, Y = dO, from the last
  chunk to the first, storing dS_[i+1]; the last one is dS_[0].  Nothing but loads, one product and
  one store stands on this sequential path; every exponential was taken by kernel 1.
* ``_chunk_output_kernel`` — grid (V/BV, NT, B·H), every chunk in parallel: O = scale · (X S + A Y)
  with X = Q ⊙ e^{b}, S = S_[i], Y = V (steps 2 and 5); transposed, for the backward's step 7,
  dv = X dS' + scale · Aᵀ dO with X = K ⊙ e^{b_C − b}.
* ``_chunk_grad_kernel`` — grid (K/BK, NT, B·H), every chunk and key tile in parallel.  One program
  computes the C×BK tiles of dq, dk and dg of one chunk (steps 8–9): the C×C score gradient dA and the
  state parts of dq and dk as sums over the V tiles, then the intra-chunk parts sub-chunk by
  sub-chunk (the diagonal blocks on [c, c, BK] tiles, their dA formed again from the block's rows),
  then the cumsums of step 9.  dA stays in registers.

Forward: kernels 1, 2, 3.  A, the decayed operands and the chunk states are stored in the dtype in
which the tensor-core products read them (bf16/fp16 for half inputs, fp32 otherwise), so storing
them narrow loses nothing.  The backward runs kernel 1 again (with β), kernel 2 for the states (fp32)
and, REVERSE, for their gradients, kernel 4 for dq, dk, dg, and kernel 3 transposed for dv.

Ragged T is handled by masks (no padded copies): rows past T load as zero and are excluded from every
exponent.  fp32 inputs use ``input_precision="ieee"`` matmuls (exact enough for 1e-5 tests); bf16 and
fp16 use tensor cores with fp32 accumulation.  fp16 caveat: S_[i] and dS_[i] are rounded to the input
dtype for the tensor-core products of steps 2, 7 and 8, so states beyond fp16's range (~6.5e4) would
overflow; use bf16 there.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..hardware import check_kernel_dtype

__all__ = ["gla_chunked"]

SUB_CHUNK = 16  # c: the sub-chunk of steps 3-4 (FLA's BC); also the smallest tensor-core tile.

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------------
# Tiles.  BK = min(64, K) is fixed on the host for kernels 2 and 3 (32 in the gradient kernel, which
# holds dA and more tiles at once; kernel 1 autotunes it); BV, num_warps and num_stages are chosen by
# timing a few configurations on the first
# call for each (K, V, C, dtypes) on a GPU (its cost is part of the first call's compile time).  Under
# the CPU interpreter exactly one configuration runs, with BK = BV = 16, which fits every K and V and
# makes the small test sizes exercise the tiling over K and V.  Compiled offline for sm_90 (Triton 3.9),
# the gradient kernel at the benchmark's shape (bf16, K = V = 128, C = 64, 8 warps, 1 stage) needs 226
# registers and no stack; other K, V ∈ 64..256 and C ∈ {32, 64} spill at most 24 bytes (fp32 with 2
# stages up to 200); at C = 128 its C×C dA spills.
# ------------------------------------------------------------------------------------------------------
def _configs(gpu_options):
    options = [(16, 4, 1)] if _INTERPRETED else gpu_options
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv, w, s in options]


def _keep_tiles_that_fit(configs, named_args, **kwargs):
    """Drop configurations whose value tile BV is wider than V (pruning runs when there are several)."""
    V = {**named_args, **kwargs}["V"]
    kept = [cfg for cfg in configs if cfg.kwargs["BV"] <= V]
    return kept or [triton.Config({"BV": V}, num_warps=4, num_stages=2)]


@triton.jit
def _as_input_dtype(x, like, EMULATE_BF16: tl.constexpr):
    """x rounded to the input dtype (that of the pointer ``like``): matmul operands and the outputs.

    EMULATE_BF16 is set only under the CPU interpreter, whose bf16 support is broken (arithmetic and
    tl.dot act on the raw bits; fp32 -> bf16 truncates).  There we round to nearest even at bf16's
    precision on the fp32 bit pattern and keep the result in fp32: the same numbers a GPU's bf16
    tensor cores see.
    """
    if EMULATE_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    return x.to(like.dtype.element_ty)


@triton.jit
def _mm(a, b, like, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """a @ b on the tensor cores: operands rounded to the input dtype, accumulation in fp32."""
    return tl.dot(_as_input_dtype(a, like, EMULATE_BF16), _as_input_dtype(b, like, EMULATE_BF16),
                  input_precision=DOT_PRECISION)


@triton.jit
def _store_rounded(ptr, offsets, x, mask, EMULATE_BF16: tl.constexpr):
    """Store x in the pointer's dtype, rounding to nearest (even) as the GPU does."""
    tl.store(ptr + offsets, _as_input_dtype(x, ptr, EMULATE_BF16).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _head(ptr, i_b, i_h, T, H: tl.constexpr, D: tl.constexpr):
    """ptr advanced to token 0, channel 0 of batch i_b, head i_h of a [B, T, H, D] tensor (int64 arithmetic)."""
    return ptr + (i_b.to(tl.int64) * T * H + i_h) * D


# ------------------------------------------------------------------------------------------------------
# Kernel 1: everything inside one chunk (steps 0, 3, 4 and the decayed operands), one sub-chunk per program.
# ------------------------------------------------------------------------------------------------------
def _key_tiles_that_fit(configs, named_args, **kwargs):
    """Drop configurations whose key tile BK is wider than K (BK = 16 always fits: K ≥ 16)."""
    K = {**named_args, **kwargs}["K"]
    return [cfg for cfg in configs if cfg.kwargs["BK"] <= K]


# Kernel 1 holds [C, BK] tiles of the whole chunk for step 3 and a [c, c, BK] tile for step 4.
# Compiled offline for sm_90 (Triton 3.9, bf16, K = 128, C = 64), these (BK, num_warps) need (registers
# a thread): (16, 2) 235, (16, 4) 128, (16, 8) 95, (32, 4) 223, (32, 8) 128 and 16 bytes of stack,
# (64, 8) 177; 1 warp, and BK = 64 at 4 warps, spill more.  They are autotuned.
@triton.autotune(
    configs=[triton.Config({"BK": bk}, num_warps=w, num_stages=1)
             for bk, w in ([(16, 4)] if _INTERPRETED else [(16, 2), (16, 4), (16, 8), (32, 4), (32, 8), (64, 8)])],
    key=["K", "C", "STORE_BETA"],
    prune_configs_by={"early_config_prune": _key_tiles_that_fit},
)
@triton.jit
def _chunk_intra_kernel(
    q, k, g,              # inputs [B, T, H, K]
    A,                    # out: [B, H, T, C], row r of a chunk = A[r, 0..C−1] (operand dtype)
    q_dec, k_dec,         # out: Q ⊙ e^{b} and K ⊙ e^{b_C − b}, [B, T, H, K] (operand dtype)
    decay_C, beta,        # out: e^{b_C} [B, H, NT, K] fp32; if STORE_BETA, β [B, T, H, K] fp32
    T, NT,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, c: tl.constexpr, BK: tl.constexpr,
    STORE_BETA: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """Rows of query sub-chunk I of chunk i_c: A (step 3 for the columns before I, step 4 for the
    diagonal c×c block, summed over the K tiles) and the decayed operands of steps 1, 2 and 7."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_c, I = i_s // (C // c), i_s % (C // c)          # chunk, and query sub-chunk inside it
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)                        # position inside the chunk (the key rows of step 3) ...
    rows_I = tl.arange(0, c)                      # ... and inside sub-chunk I
    t = i_c * C + rows
    t_I = i_c * C + I * c + rows_I
    valid, valid_I = (t < T)[:, None], (t_I < T)[:, None]
    before_I = (rows < I * c)[:, None] & valid    # the key rows of step 3
    after_I = (rows >= (I + 1) * c)[:, None]

    q, k, g = _head(q, i_b, i_h, T, H, K), _head(k, i_b, i_h, T, H, K), _head(g, i_b, i_h, T, H, K)
    q_dec, k_dec = _head(q_dec, i_b, i_h, T, H, K), _head(k_dec, i_b, i_h, T, H, K)
    s_le_r = (rows_I[None, :] <= rows_I[:, None]) & valid_I       # the diagonal block's pairs (r, s)
    A_I = tl.zeros([c, C], dtype=tl.float32)      # step 3: A[I, :I·c]
    A_diag = tl.zeros([c, c], dtype=tl.float32)   # step 4: A[I, I·c : I·c + c]
    for i_k in range(K // BK):                    # the sums over key channels d, one BK tile at a time
        d_k = i_k * BK + tl.arange(0, BK)
        tile_I = t_I[:, None] * (H * K) + d_k[None, :]
        q_I = tl.load(q + tile_I, mask=valid_I, other=0.0).to(tl.float32)
        k_I = tl.load(k + tile_I, mask=valid_I, other=0.0).to(tl.float32)
        g_I = tl.load(g + tile_I, mask=valid_I, other=0.0).to(tl.float32)
        g_i = tl.load(g + t[:, None] * (H * K) + d_k[None, :], mask=valid, other=0.0).to(tl.float32)

        # step 0: β on the rows of I (sub-chunk-local cumsum); b = (sum of g before I) + β there; b_C
        beta_I = tl.cumsum(g_I, axis=0)
        b_I = tl.sum(tl.where(before_I, g_i, 0.0), axis=0)[None, :] + beta_I                  # ≤ 0
        # b_C − b_r = g_{r+1} + … + g_C: the rest of I, then the rows after it, summed from the end
        b_C_minus_b_I = (tl.cumsum(g_I, axis=0, reverse=True) - g_I
                         + tl.sum(tl.where(after_I, g_i, 0.0), axis=0)[None, :])                # ≤ 0
        if STORE_BETA:
            tl.store(_head(beta, i_b, i_h, T, H, K) + tile_I, beta_I, mask=valid_I)
        if I == 0:                                # one program per chunk writes e^{b_C}
            tl.store(decay_C + (i_bh.to(tl.int64) * NT + i_c) * K + d_k, tl.exp(tl.sum(g_i, axis=0)))
        # the decayed operands: Q ⊙ e^{b} (steps 2 and 6), K ⊙ e^{b_C − b} (steps 1 and 7)
        _store_rounded(q_dec, tile_I, q_I * tl.exp(b_I), valid_I, EMULATE_BF16)
        _store_rounded(k_dec, tile_I, k_I * tl.exp(b_C_minus_b_I), valid_I, EMULATE_BF16)

        # step 3: A[I, :I·c] = (Q_I ⊙ e^{b_I − b_ref}) (K_{<I} ⊙ e^{b_ref − b_{<I}})ᵀ with b_ref = b at
        # I's first row.  Both exponents are short sums taken as such, never differences of b:
        # b_r − b_ref = β_r − g_ref inside I, and b_ref − b_s = g_{s+1} + … + g_{I·c} (reverse cumsum).
        if I > 0:
            k_i = tl.load(k + t[:, None] * (H * K) + d_k[None, :], mask=before_I, other=0.0).to(tl.float32)
            g_before = tl.where(before_I, g_i, 0.0)
            g_ref = tl.sum(tl.where(rows_I[:, None] == 0, g_I, 0.0), axis=0)[None, :]     # [1, BK]
            k_fac = tl.exp(tl.cumsum(g_before, axis=0, reverse=True) - g_before + g_ref)  # ≤ 1
            q_fac = tl.exp(beta_I - g_ref)                                               # ≤ 1
            A_I += _mm(q_I * q_fac, tl.trans(tl.where(before_I, k_i * k_fac, 0.0)), q,
                       DOT_PRECISION, EMULATE_BF16)

        # step 4: the diagonal block, pairwise in fp32 on a [c, c, BK] tile: A_rs += Σ_d q_rd k_sd e^{β_rd − β_sd}
        # for s ≤ r, masked before exp (a key past T pairs only with rows past T, which are not stored).
        # β_r and β_s are one cumsum here, but the pair's difference of two rounded sums can still come
        # out one ulp above the ≤ 0 it is, so it is clamped.
        exponent = tl.minimum(beta_I[:, None, :] - beta_I[None, :, :], 0.0)
        decay = tl.exp(tl.where(s_le_r[:, :, None], exponent, float("-inf")))
        A_diag += tl.sum(q_I[:, None, :] * k_I[None, :, :] * decay, axis=2)

    # A's rows of I: columns before I from step 3 and zeros after I, then the diagonal block (disjoint stores)
    A += (i_bh.to(tl.int64) * T + i_c * C + I * c) * C
    off_diagonal = (rows < I * c) | (rows >= (I + 1) * c)
    _store_rounded(A, rows_I[:, None] * C + rows[None, :], A_I, valid_I & off_diagonal[None, :], EMULATE_BF16)
    _store_rounded(A, rows_I[:, None] * C + I * c + rows_I[None, :], A_diag, valid_I, EMULATE_BF16)


# ------------------------------------------------------------------------------------------------------
# Kernel 2: step 1 (and, REVERSE, step 6), sequential over chunks.
# ------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs([(64, 4, 2), (32, 4, 2), (64, 4, 3), (32, 4, 3), (32, 2, 2)]),  # (BV, warps, stages)
    key=["K", "V", "C", "REVERSE"],
    prune_configs_by={"early_config_prune": _keep_tiles_that_fit},
)
@triton.jit
def _chunk_states_kernel(
    x, y, decay_C,        # x [B, T, H, K], y [B, T, H, V]: K ⊙ e^{b_C − b}, V  (REVERSE: Q ⊙ e^{b}, dO);
                          # decay_C = e^{b_C} [B, H, NT, K] fp32
    h, h0, ht,            # h [B, H, NT, K, V] (out); h0, ht [B, H, K, V] fp32
    scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """S ← diag(e^{b_C}) S + scale · Xᵀ Y over the chunks, one BK×BV tile of one head's state (fp32).
    Forward (step 1, scale 1): S_[0] = h0; for i = 0 … NT−1: h[i] = S_[i], then S_[i+1]; ht = S_[NT].
    REVERSE (step 6): dS_[NT] = h0; for i = NT−1 … 0: h[i] = dS_[i+1], then dS_[i]; ht = dS_[0].
    (h0, ht absent: start from zero, store nothing.)"""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)                        # position inside the chunk
    d_k = i_k * BK + tl.arange(0, BK)             # this program's key channels ...
    d_v = i_v * BV + tl.arange(0, BV)             # ... and value channels

    # Point every tensor at this (batch, head): token t, channel d then sits at x[t·H·K + d] (and alike
    # for y), offsets that fit in int32 (checked on the host), so tiles of offsets stay small.
    x, y = _head(x, i_b, i_h, T, H, K), _head(y, i_b, i_h, T, H, V)
    decay_C += i_bh.to(tl.int64) * NT * K + d_k
    state_tile = d_k[:, None] * V + d_v[None, :]  # [BK, BV] offsets inside one K×V state
    h += i_bh.to(tl.int64) * NT * K * V

    S = tl.zeros([BK, BV], dtype=tl.float32)      # S_[0]  (REVERSE: dS_[NT])
    if HAS_INITIAL_STATE:
        S += tl.load(h0 + i_bh.to(tl.int64) * K * V + state_tile)

    for step in range(NT):
        if REVERSE:
            i = NT - 1 - step
        else:
            i = step
        t = i * C + rows
        valid = (t < T)[:, None]
        _store_rounded(h + i * K * V, state_tile, S, None, EMULATE_BF16)  # S_[i] (REVERSE: dS_[i+1])
        x_i = tl.load(x + t[:, None] * (H * K) + d_k[None, :], mask=valid, other=0.0)
        y_i = tl.load(y + t[:, None] * (H * V) + d_v[None, :], mask=valid, other=0.0)
        # step 1: S_[i+1] = diag(e^{b_C}) S_[i] + (K ⊙ e^{b_C − b})ᵀ V                 exponents ≤ 0
        # step 6: dS_[i] = diag(e^{b_C}) dS_[i+1] + scale · (Q ⊙ e^{b})ᵀ dO
        S = tl.load(decay_C + i * K)[:, None] * S + scale * _mm(tl.trans(x_i), y_i, x, DOT_PRECISION,
                                                                 EMULATE_BF16)

    if STORE_FINAL_STATE:
        tl.store(ht + i_bh.to(tl.int64) * K * V + state_tile, S)


# ------------------------------------------------------------------------------------------------------
# Kernel 3: steps 2 and 5 (and, transposed, step 7 of the backward), parallel over chunks.
# ------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs([(64, 4, 2), (128, 8, 2), (64, 8, 2), (32, 4, 2), (128, 4, 3)]),
    key=["K", "V", "C", "TRANSPOSE_A"],
    prune_configs_by={"early_config_prune": _keep_tiles_that_fit},
)
@triton.jit
def _chunk_output_kernel(
    x, A, h, y,           # x [B, T, H, K]; A [B, H, T, C]; h [B, H, NT, K, V]; y [B, T, H, V]
    o,                    # out: [B, T, H, V]
    state_scale, score_scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    TRANSPOSE_A: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """o = state_scale · X S + score_scale · A Y (Aᵀ Y if TRANSPOSE_A) for one chunk and V tile.
    Steps 2 and 5: X = Q ⊙ e^{b}, S = S_[i], Y = V, both scales = scale.
    Step 7:        X = K ⊙ e^{b_C − b}, S = dS_[i+1], Y = dO, Aᵀ, state_scale 1, score_scale scale."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)                        # position inside chunk i_c
    t = i_c * C + rows
    valid = (t < T)[:, None]
    d_v = i_v * BV + tl.arange(0, BV)

    x, y, o = _head(x, i_b, i_h, T, H, K), _head(y, i_b, i_h, T, H, V), _head(o, i_b, i_h, T, H, V)
    h += (i_bh.to(tl.int64) * NT + i_c) * K * V
    O = tl.zeros([C, BV], dtype=tl.float32)
    for i_k in range(K // BK):                    # the sum over key channels d, one BK tile at a time
        d_k = i_k * BK + tl.arange(0, BK)
        x_i = tl.load(x + t[:, None] * (H * K) + d_k[None, :], mask=valid, other=0.0)
        S = tl.load(h + d_k[:, None] * V + d_v[None, :])
        O += _mm(x_i, S, x, DOT_PRECISION, EMULATE_BF16)

    A_i = tl.load(A + (i_bh.to(tl.int64) * T + t[:, None]) * C + rows[None, :], mask=valid, other=0.0)
    tile_v = t[:, None] * (H * V) + d_v[None, :]
    y_i = tl.load(y + tile_v, mask=valid, other=0.0)
    if TRANSPOSE_A:
        A_i = tl.trans(A_i)
    O = state_scale * O + score_scale * _mm(A_i, y_i, x, DOT_PRECISION, EMULATE_BF16)
    _store_rounded(o, tile_v, O, valid, EMULATE_BF16)


@triton.jit
def _sub_chunk_factors(b_i, beta_i, beta, I, i_c, d_k, rows, valid, T,
                       H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, c: tl.constexpr):
    """The row factors of step 3 for query sub-chunk I, both ≤ 1 and zero outside their rows:
    e^{b_r − b_ref} on the rows r of I (as β_r − β_ref, a short sum) and e^{b_ref − b_s} on the rows s
    before I, with b_ref = b at I's first row.  (If I lies past T, its rows are all masked.)"""
    in_I = ((rows // c == I) & valid)[:, None]                               # query rows of I
    before_I = ((rows < I * c) & valid)[:, None]                             # key rows of all J < I
    ref_t = tl.minimum(i_c * C + I * c, T - 1)                               # (in bounds when I is padding)
    beta_ref = tl.load(beta + ref_t * (H * K) + d_k)[None, :]                # = g at I's first row
    b_ref = tl.sum(tl.where((rows == I * c)[:, None], b_i, 0.0), axis=0)[None, :]
    q_fac = tl.where(in_I, tl.exp(tl.where(in_I, beta_i - beta_ref, 0.0)), 0.0)
    k_fac = tl.where(before_I, tl.exp(tl.where(before_I, b_ref - b_i, 0.0)), 0.0)
    return q_fac, k_fac


# ------------------------------------------------------------------------------------------------------
# Kernel 4: steps 8-9, the gradients of q, k and g, parallel over chunks and key tiles.
# ------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s)
             for w, s in ([(4, 1)] if _INTERPRETED else [(8, 1), (8, 2)])],   # 4 warps spill at C = 64
    key=["K", "V", "C", "BK"],
)
@triton.jit
def _chunk_grad_kernel(
    q, k, v, g, beta,     # q, k, g [B, T, H, K]; v [B, T, H, V]; β [B, T, H, K] fp32
    h, dh, do,            # h [B, H, NT, K, V] fp32: S_[i];  dh: dS_[i+1];  dO [B, T, H, V]
    dq, dk, dg,           # out: dq, dk [B, T, H, K] in the input dtype; dg [B, T, H, K] fp32
    scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, c: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """The BK columns of dq, dk and dg of one chunk (steps 8-9).  dA is a sum over all V, formed
    here by every K tile's program (a C×C×V product, cheap beside the rest)."""
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)                        # query position r inside chunk i_c ...
    cols = tl.arange(0, C)                        # ... and key position s
    sub = rows // c                               # the sub-chunk of each row
    t = i_c * C + rows
    valid = t < T
    d_k = i_k * BK + tl.arange(0, BK)

    q, k, g, beta = (_head(q, i_b, i_h, T, H, K), _head(k, i_b, i_h, T, H, K),
                     _head(g, i_b, i_h, T, H, K), _head(beta, i_b, i_h, T, H, K))
    dq, dk, dg = _head(dq, i_b, i_h, T, H, K), _head(dk, i_b, i_h, T, H, K), _head(dg, i_b, i_h, T, H, K)
    v, do = _head(v, i_b, i_h, T, H, V), _head(do, i_b, i_h, T, H, V)
    h += (i_bh.to(tl.int64) * NT + i_c) * K * V   # S_[i_c]
    dh += (i_bh.to(tl.int64) * NT + i_c) * K * V  # dS' = dS_[i_c + 1]

    # the score gradient dA_rs = scale · do_r·v_s (s ≤ r); and the state parts of step 8,
    # dO S_[i]ᵀ and V dS'ᵀ, with diag(dS' S_[i]ᵀ) for step 9 — all sums over the V tiles
    dA = tl.zeros([C, C], dtype=tl.float32)
    dq_i = tl.zeros([C, BK], dtype=tl.float32)
    dk_i = tl.zeros([C, BK], dtype=tl.float32)
    dS_S = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(V // BV):
        d_v = i_v * BV + tl.arange(0, BV)
        tile_v = t[:, None] * (H * V) + d_v[None, :]
        do_i = tl.load(do + tile_v, mask=valid[:, None], other=0.0)
        v_i = tl.load(v + tile_v, mask=valid[:, None], other=0.0)
        S = tl.load(h + d_k[:, None] * V + d_v[None, :])
        dS = tl.load(dh + d_k[:, None] * V + d_v[None, :])
        dA += _mm(do_i, tl.trans(v_i), q, DOT_PRECISION, EMULATE_BF16)
        dq_i += _mm(do_i, tl.trans(S), q, DOT_PRECISION, EMULATE_BF16)
        dk_i += _mm(v_i, tl.trans(dS), q, DOT_PRECISION, EMULATE_BF16)
        dS_S += tl.sum(dS * S, axis=1)
    dA = tl.where((cols[None, :] <= rows[:, None]) & valid[:, None], scale * dA, 0.0)

    tile_k = t[:, None] * (H * K) + d_k[None, :]
    q_i = tl.load(q + tile_k, mask=valid[:, None], other=0.0).to(tl.float32)
    k_i = tl.load(k + tile_k, mask=valid[:, None], other=0.0).to(tl.float32)
    g_i = tl.load(g + tile_k, mask=valid[:, None], other=0.0).to(tl.float32)
    b_i = tl.cumsum(g_i, axis=0)
    b_C = tl.sum(g_i, axis=0)                                                 # [BK]
    beta_i = tl.load(beta + tile_k, mask=valid[:, None], other=0.0)

    # step 8, state parts: dq^inter = scale·e^{b} ⊙ (dO S_[i]ᵀ),  dk^inter = e^{b_C − b} ⊙ (V dS'ᵀ)
    dq_i = scale * tl.exp(b_i) * dq_i                                         # exponent b ≤ 0
    dk_i = tl.exp(tl.cumsum(g_i, axis=0, reverse=True) - g_i) * dk_i          # b_C − b, from the end
    # step 9's fp32 sums: R = q ⊙ dq^inter + (q ⊙ dQ^intra − k ⊙ dK^intra), and k ⊙ dk^inter
    R = q_i * dq_i
    k_dk_inter = k_i * dk_i

    # off-diagonal sub-blocks: for query sub-chunk I, the operands of step 3 give
    # dQ^intra_I += e^{b_I − b_ref} ⊙ (dA_I K̃),  dK^intra_{<I} += e^{b_ref − b_{<I}} ⊙ (dA_Iᵀ Q̃_I)
    for I in range(1, C // c):
        q_fac, k_fac = _sub_chunk_factors(b_i, beta_i, beta, I, i_c, d_k, rows, valid, T, H, K, C, c)
        q_I = _as_input_dtype(q_i * q_fac, q, EMULATE_BF16)                      # Q̃_I, rounded once
        k_I = _as_input_dtype(k_i * k_fac, q, EMULATE_BF16)                      # K̃_{<I}
        dA_I = tl.where((sub[:, None] == I) & (cols[None, :] < I * c), dA, 0.0)
        dq_I = _mm(dA_I, k_I, q, DOT_PRECISION, EMULATE_BF16)                    # [C, BK], rows of I
        dk_I = _mm(tl.trans(dA_I), q_I, q, DOT_PRECISION, EMULATE_BF16)          # [C, BK], rows < I·c
        dq_i += q_fac * dq_I
        dk_i += k_fac * dk_I
        R += q_I.to(tl.float32) * dq_I - k_I.to(tl.float32) * dk_I               # the same pair terms

    # diagonal sub-blocks, pairwise in fp32, one sub-chunk I at a time on a [c, c, BK] tile indexed
    # (r, s, d): P_rsd = dA_rs e^{β_rd − β_sd} for s ≤ r (masked before exp, the exponent clamped to
    # ≤ 0 as in step 4), and dQ^intra_r += Σ_s P_rs ⊙ k_s, dK^intra_s += Σ_r P_rs ⊙ q_r share it.  The
    # block's dA_II = scale · dO_I V_Iᵀ is formed again from the c rows (cache hits; the C×C dA above
    # cannot be indexed by sub-chunk in registers), and the results are added to the sub-chunk's rows
    # of dq, dk and R, viewed as [C/c, c, BK] (sub-chunk, row in it, channel) for the loop.
    rows_c = tl.arange(0, c)
    s_le_r = rows_c[None, :] <= rows_c[:, None]
    sub_chunk = tl.arange(0, C // c)[:, None, None]
    dq_i = tl.reshape(dq_i, [C // c, c, BK])
    dk_i = tl.reshape(dk_i, [C // c, c, BK])
    R = tl.reshape(R, [C // c, c, BK])
    for I in range(C // c):
        t_I = i_c * C + I * c + rows_c
        valid_I = (t_I < T)[:, None]
        tile_I = t_I[:, None] * (H * K) + d_k[None, :]
        q_I = tl.load(q + tile_I, mask=valid_I, other=0.0).to(tl.float32)
        k_I = tl.load(k + tile_I, mask=valid_I, other=0.0).to(tl.float32)
        beta_I = tl.load(beta + tile_I, mask=valid_I, other=0.0)
        dA_II = tl.zeros([c, c], dtype=tl.float32)
        for i_v in range(V // BV):
            tile_v = t_I[:, None] * (H * V) + (i_v * BV + tl.arange(0, BV))[None, :]
            do_I = tl.load(do + tile_v, mask=valid_I, other=0.0)
            v_I = tl.load(v + tile_v, mask=valid_I, other=0.0)
            dA_II += _mm(do_I, tl.trans(v_I), q, DOT_PRECISION, EMULATE_BF16)
        pair = (s_le_r & valid_I)[:, :, None]                                    # (then s is valid too)
        exponent = tl.minimum(beta_I[:, None, :] - beta_I[None, :, :], 0.0)
        P = scale * dA_II[:, :, None] * tl.exp(tl.where(pair, exponent, float("-inf")))   # [c, c, BK]
        dq_I = tl.sum(P * k_I[None, :, :], axis=1)                               # Σ_s, [c, BK]
        dk_I = tl.sum(P * q_I[:, None, :], axis=0)                               # Σ_r, [c, BK]
        in_I = sub_chunk == I
        dq_i += tl.where(in_I, dq_I[None, :, :], 0.0)
        dk_i += tl.where(in_I, dk_I[None, :, :], 0.0)
        R += tl.where(in_I, (q_I * dq_I - k_I * dk_I)[None, :, :], 0.0)       # the same pair terms
    dq_i = tl.reshape(dq_i, [C, BK])
    dk_i = tl.reshape(dk_i, [C, BK])
    R = tl.reshape(R, [C, BK])

    # step 9: dg_t = Σ_{s ≥ t} R_s + Σ_{j < t} k_j ⊙ dk^inter_j + e^{b_C} ⊙ diag(dS' S_[i]ᵀ)
    dg_i = (tl.cumsum(R, axis=0, reverse=True) + tl.cumsum(k_dk_inter, axis=0) - k_dk_inter
            + (tl.exp(b_C) * dS_S)[None, :])
    tl.store(dg + tile_k, dg_i, mask=valid[:, None])
    _store_rounded(dq, tile_k, dq_i, valid[:, None], EMULATE_BF16)
    _store_rounded(dk, tile_k, dk_i, valid[:, None], EMULATE_BF16)


# ------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------
def _check(q, k, v, g, scale, initial_state, chunk_size):
    """Raise ValueError (naming the argument) for anything the kernels do not handle."""
    from .._validate import Signature

    sig = Signature("gla.kernel")
    sig.tensor("q", q, "B T H K")
    sig.tensor("k", k, "B T H K")
    sig.tensor("v", v, "B T H V")
    sig.tensor("g", g, "B T H K", same_dtype=False)
    sig.optional("initial_state", initial_state, "B H K V", same_dtype=False)
    sig.at_least_one("T")
    if q.dtype == torch.float64 or g.dtype == torch.float64:
        raise sig.error("the Triton kernel takes float16, bfloat16 or float32 inputs; "
                        "use gla.recurrent / gla.chunked for float64")
    for name in ("K", "V"):
        n = sig.sizes[name]
        if n < 16 or n > 256 or n & (n - 1):
            raise sig.error(f"{name} = {n}: the kernel needs a power of two between 16 and 256")
    C = sig.chunk_size(chunk_size)
    if C < SUB_CHUNK or C > 128 or C & (C - 1):
        raise sig.error(f"chunk_size = {C}: the kernel needs a power of two between {SUB_CHUNK} and 128")
    if scale is not None:
        sig.scalar("scale", scale)
    T, H = sig.sizes["T"], sig.sizes["H"]
    if T * H * max(sig.sizes["K"], sig.sizes["V"]) >= 2**31:
        raise sig.error(f"T = {T} is too long for one call: offsets inside one batch element must fit in "
                        "int32 (T·H·max(K, V) < 2^31); split the sequence and pass the state along with "
                        "initial_state")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise sig.error(f"inputs are on {q.device}; the kernel needs CUDA tensors, or TRITON_INTERPRET=1 "
                        "set before triton is imported (lecture_kit does this on machines without CUDA)")
    sig.nonpositive("g", g, "the log forget gate")
    return sig


def _launch_options(q):
    """Matmul precision and bf16 emulation for inputs like q."""
    emulate_bf16 = _INTERPRETED and q.dtype == torch.bfloat16
    # "ieee": exact fp32 products for fp32 inputs; for bf16/fp16 operands the option has no effect.
    precision = "ieee" if q.dtype == torch.float32 or emulate_bf16 else "tf32"
    return dict(DOT_PRECISION=precision, EMULATE_BF16=emulate_bf16)


def _key_tile(K, kernel="states"):
    """BK: 16 on the CPU (small tests still tile K); on a GPU 64, or 32 for the gradient kernel."""
    return 16 if _INTERPRETED else min(32 if kernel == "grad" else 64, K)


def _operand_dtype(q):
    """The dtype of matmul operands: the input dtype for bf16/fp16 inputs (tensor cores), else fp32.
    A, the decayed operands and the forward's chunk states are stored in it: the tensor-core products
    round them to it anyway."""
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _intra(q, k, g, chunk_size, *, store_beta):
    """Kernel 1: A [B, H, T, C], Q ⊙ e^{b}, K ⊙ e^{b_C − b} (operand dtype), e^{b_C} [B, H, NT, K] and,
    for the backward, β (fp32)."""
    B, T, H, K = q.shape
    NT = triton.cdiv(T, chunk_size)
    dtype = _operand_dtype(q)
    A = torch.empty(B, H, T, chunk_size, device=q.device, dtype=dtype)
    q_dec, k_dec = torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=dtype)
    decay_C = torch.empty(B, H, NT, K, device=q.device, dtype=torch.float32)
    beta = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32) if store_beta else None
    _chunk_intra_kernel[(NT * (chunk_size // SUB_CHUNK), B * H)](
        q, k, g, A, q_dec, k_dec, decay_C, beta, T, NT,
        H=H, K=K, C=chunk_size, c=SUB_CHUNK, STORE_BETA=store_beta, **_launch_options(q),
    )
    return A, q_dec, k_dec, decay_C, beta


def _states(x, y, decay_C, h, first, last, *, scale, chunk_size, reverse):
    """Kernel 2 over all chunks: forward (x, y = K ⊙ e^{b_C − b}, V) writes h[i] = S_[i] and
    last = S_[NT]; reverse (x, y = Q ⊙ e^{b}, dO) writes h[i] = dS_[i+1] and last = dS_[0]."""
    B, T, H, K = x.shape
    V, NT = y.shape[-1], h.shape[2]
    BK = _key_tile(K)
    _chunk_states_kernel[lambda meta: (K // BK, V // meta["BV"], B * H)](
        x, y, decay_C, h, first, last, scale, T, NT,
        H=H, K=K, V=V, C=chunk_size, BK=BK,
        HAS_INITIAL_STATE=first is not None, STORE_FINAL_STATE=last is not None, REVERSE=reverse,
        **_launch_options(x),
    )


def _output(x, A, h, y, o, *, state_scale, score_scale, transpose_A):
    """Kernel 3: o = state_scale · X S + score_scale · A Y (or Aᵀ Y), chunk by chunk."""
    B, T, H, K = x.shape
    V, C = y.shape[-1], A.shape[-1]
    _chunk_output_kernel[lambda meta: (V // meta["BV"], h.shape[2], B * H)](
        x, A, h, y, o, state_scale, score_scale, T, h.shape[2],
        H=H, K=K, V=V, C=C, BK=_key_tile(K), TRANSPOSE_A=transpose_A, **_launch_options(x),
    )


def _forward(q, k, v, g, scale, h0, output_final_state, chunk_size):
    """Kernel 1 (steps 0, 3, 4), kernel 2 (step 1), kernel 3 (steps 2, 5); returns (o, final state or None).

    HBM traffic: kernel 1 reads q, k, g and writes A (C per token and head), the two decayed operands
    and e^{b_C}; kernel 2 reads K ⊙ e^{b_C − b}, v, e^{b_C} and writes the chunk states h (K·V per
    chunk and head); kernel 3 reads Q ⊙ e^{b}, h, A, v and writes o.  All but e^{b_C} are stored in
    the operand dtype (bf16/fp16 for half inputs), the precision the tensor-core products read them in.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    A, q_dec, k_dec, decay_C, _ = _intra(q, k, g, chunk_size, store_beta=False)
    h = torch.empty(B, H, NT, K, V, device=q.device, dtype=_operand_dtype(q))
    ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    _states(k_dec, v, decay_C, h, h0, ht, scale=1.0, chunk_size=chunk_size, reverse=False)
    o = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
    _output(q_dec, A, h, v, o, state_scale=scale, score_scale=scale, transpose_A=False)
    return o, ht


def _backward(q, k, v, g, scale, h0, chunk_size, do, dht):
    """Kernel 1 (again, with β), kernel 2 (the states S_[i], fp32), kernel 2 REVERSE (step 6: dS_[i+1]
    and dS_[0]), kernel 4 (steps 8-9: dq, dk, dg), kernel 3 transposed (step 7: dv).  Returns dq, dk,
    dv (input dtype), dg (fp32), d initial_state (fp32, or None).

    HBM traffic beyond the inputs: kernel 1's outputs, β, the states and their gradients (fp32, each
    written once); dA never leaves the chip.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    A, q_dec, k_dec, decay_C, beta = _intra(q, k, g, chunk_size, store_beta=True)
    h = torch.empty(B, H, NT, K, V, device=q.device, dtype=torch.float32)
    dh = torch.empty_like(h)
    dh0 = torch.empty_like(h0) if h0 is not None else None
    _states(k_dec, v, decay_C, h, h0, None, scale=1.0, chunk_size=chunk_size, reverse=False)
    _states(q_dec, do, decay_C, dh, dht, dh0, scale=scale, chunk_size=chunk_size, reverse=True)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    BK = _key_tile(K, "grad")
    _chunk_grad_kernel[(K // BK, NT, B * H)](
        q, k, v, g, beta, h, dh, do, dq, dk, dg, scale, T, NT,
        H=H, K=K, V=V, C=chunk_size, c=SUB_CHUNK, BK=BK, BV=16 if _INTERPRETED else min(64, V),
        **_launch_options(q),
    )
    _output(k_dec, A, dh, do, dv, state_scale=1.0, score_scale=scale, transpose_A=True)
    return dq, dk, dv, dg, dh0


class _GLAChunked(torch.autograd.Function):
    """Forward: kernels 1, 2 and 3.  Backward: kernel 1 (with β), kernel 2 twice (the states, then
    their gradients), kernel 4 (dq, dk, dg) and kernel 3 transposed (dv)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, output_final_state, chunk_size):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
        o, ht = _forward(q, k, v, g, scale, h0, output_final_state, chunk_size)
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)          # an unused output's gradient arrives as None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.to(torch.float32).contiguous()
        dq, dk, dv, dg, dh0 = _backward(q, k, v, g, ctx.scale, h0, ctx.chunk_size, do, dht)
        dh0 = None if dh0 is None else dh0.to(ctx.initial_state_dtype)
        return dq, dk, dv, dg.to(g.dtype), dh0, None, None, None


def gla_chunked(q, k, v, g, *, scale, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunkwise gated linear attention with the Triton kernels of this module (math.md §3.2).

    q, k, g [B, T, H, K] (g = log forget gate ≤ 0, may be fp32 beside bf16 q, k, v); v [B, T, H, V];
    initial_state None or [B, H, K, V] (fp32).  K and V powers of two in 16..256; chunk_size a power
    of two in 16..128; any T ≥ 1.  ``scale=None`` means K^-1/2.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32, or None).
    Differentiable in q, k, v, g and initial_state, with Triton backward kernels (module docstring).
    """
    _check(q, k, v, g, scale, initial_state, chunk_size)
    check_kernel_dtype("gla_chunked", "q", q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, ht = _GLAChunked.apply(q, k, v, g, initial_state, scale, bool(output_final_state), chunk_size)
    return o, (ht if output_final_state else None)
