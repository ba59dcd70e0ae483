"""Gated linear attention (GLA): the Triton chunkwise kernels, forward and backward.  Algorithm of
notebooks 03d and 04b.

Per batch element and head, with log forget gate g_t ∈ R^K (g ≤ 0) and state S_t ∈ R^{K×V} (fp32):

    S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ            o_t = scale · S_tᵀ q_t

Chunkwise form.  Cut time into chunks of C tokens (default 64) and each chunk into NC = C/c sub-chunks of
c = 16 rows.  Inside chunk [i] let b be the *chunk-local* cumulative sum of g (fp32, reset at every
chunk start, so b ≤ 0 and b decreases down the chunk); b_C is its value at the chunk's last token and
S_[i] the state entering the chunk.  For a row r let f(r) and e(r) be the first and the last row of its
sub-chunk.  Stacking the chunk's rows into Q, K (C×K) and V (C×V):

    step 0  chunk-local sums         b_r = g_1 + … + g_r,        b_C − b_r = g_{r+1} + … + g_C
            sub-chunk-local sums     β_r = g_f(r) + … + g_r,     γ_r = g_{r+1} + … + g_e(r)
            and sub-chunk totals     G_J = β at J's last row = g_f + … + g_e over sub-chunk J
    step 1  inter-chunk state        S_[i+1] = diag(e^{b_C}) S_[i] + (K ⊙ e^{b_C − b})ᵀ V
    step 2  inter-chunk output       O^inter = (Q ⊙ e^{b}) S_[i]
    step 3  off-diagonal sub-blocks  A_IJ = (Q_I ⊙ e^{β_I + G_{J+1} + … + G_{I−1}}) (K_J ⊙ e^{γ_J})ᵀ      (J < I)
    step 4  diagonal sub-blocks      A_rs = Σ_d q_rd k_sd e^{g_{s+1,d} + … + g_{r,d}}  (r, s in one sub-chunk, s ≤ r)
    step 5  output                   O = scale · (O^inter + A V)              (A is lower triangular)

Step 3 splits the decay of a pair (r in I, s in J < I) at J's last row: b_r − b_s = γ_s + (G_{J+1} + … +
G_{I−1}) + β_r, the gates after s in J, those of the sub-chunks between, and those of I up to r.  The
key factor e^{γ_s} is the same for every I (K ⊙ e^{γ} is stored once); the query factor carries the gap.

Every exponent is ≤ 0, so every factor lies in [0, 1] (§3.3, §7.4), and every exponent is the sum of
the gates of exactly the window it spans, never a difference of two cumulative sums.  The first makes
the matrix products of steps 1–3 and 5 safe in half precision (tensor cores, fp32 accumulation).  The
second keeps the exponents exact to fp32's relative rounding: a sum x of n gates of one sign errs by
≲ nε|x|, so e^{x} by ≲ nε|x|e^{x} ≤ nε/e, whereas b may reach C·max|g| (≈ 450 for strong gates,
logsigmoid/0.1, at C = 64), where one fp32 ulp is 3e-5, and the difference of two such b's would carry
that absolute error into the exponent of every nearby pair.  Step 4, whose factors e^{b_r}, e^{−b_s}
would not fit in half precision (nor, for strong gates, in fp32), is computed pairwise in fp32: key
row by key row, from the last row up, each query row's window grows by one gate (the pairs s > r are
masked to −∞ before the exponential).

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

The intra sums have the shape of A and are tiled like it, on step 3's operands: for a pair of
sub-chunks J < I, with Q̃_I = Q_I ⊙ e^{β_I + gap} (gap = G_{J+1} + … + G_{I−1}), K̂_J = K_J ⊙ e^{γ_J}
and dA_IJ = the rows of I, columns of J,

    off-diagonal  dQ^intra_I += e^{β_I + gap} ⊙ (dA_IJ K̂_J),
                  dK^intra_J += e^{γ_J} ⊙ (dA_IJᵀ Q̃_I)
    diagonal      the sums over s ≤ r (for dq) and r ≥ s (for dk) inside one sub-chunk, pairwise in fp32:
                  the walk of step 4 over the key rows, P_rs = dA_rs e^{g_{s+1} + … + g_r}, gives
                  dQ^intra_r += P_rs k_s and dK^intra_s += Σ_r P_rs q_r in the same step.

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
Q̃_I ⊙ (dA_IJ K̂_J) and K̂_J ⊙ (dA_IJᵀ Q̃_I) (the programs of I and of J form Q̃_I with the same code,
so they see the same rounded numbers), on the diagonal from the fp32 pair terms.  Rebuilding R
as q ⊙ dq − k ⊙ dk from the finished dq, dk would leave the half-precision rounding of every cancelled
term in dg (the scalar-decay kernel measured relRMS 0.1–0.3 on its decay gradient that way).

Kernels (the "materialising" schedule of the GLA paper, FLA's ``chunk`` mode):

Kernel 1 is three kernels, each of one kind of work:

* ``_chunk_gates_kernel`` (1a) — grid (NT, K/BK, B·H), every chunk and key tile in parallel: step 0,
  by the only scans of the forward pass, and the operands the later kernels need decayed by it:
  β (fp32), e^{b_C} (fp32, ``[B, H, NT, K]``) and, rounded to the operand dtype, Q ⊙ e^{b} (steps 2
  and 6), K ⊙ e^{b_C − b} (steps 1 and 7) and K ⊙ e^{γ} (step 3's keys).
* ``_chunk_scores_kernel`` (1b) — grid (NT·NC(NC−1)/2, B·H), one program per pair J < I of sub-chunks:
  step 3's c×c block, one tensor-core product per key tile, of the stored keys K_J ⊙ e^{γ_J} and the
  queries Q_I ⊙ e^{β_I + gap} formed here (the gap belongs to the pair).  No program when C = c.
* ``_chunk_diagonal_kernel`` (1c) — grid (NT·NC, B·H), one program per sub-chunk: step 4 on 2-D
  [c, BK] tiles in c steps, one key row s each (load k_s and the gate after it, grow the windows, one
  exponential per (r, d), a sum over d gives column s), then the block and zeros to its right.

So ``A [B, H, T, C]`` (operand dtype), holding row r of a chunk as A[r, 0..C−1], is the chunk's whole
lower-triangular C×C matrix, every entry stored by exactly one program.  Then:

* ``_chunk_states_kernel`` (2) — grid (K/BK, V/BV, B·H).  One program owns a BK×BV tile of one head's
  state (fp32) and walks the chunks, S ← diag(e^{b_C}) S + scale · Xᵀ Y, storing the state that
  enters each chunk to ``h [B, H, NT, K, V]``.  Forward (step 1): X = K ⊙ e^{b_C − b}, Y = V, in
  order, and the last S is the final state.  REVERSE (step 6): X = Q ⊙ e^{b}, Y = dO, from the last
  chunk to the first, storing dS_[i+1]; the last one is dS_[0].  Nothing but loads, one product and
  one store stands on this sequential path; every exponential was taken by kernel 1a.
* ``_chunk_output_kernel`` (3) — grid (V/BV, NT, B·H), every chunk in parallel: O = scale · (X S + A Y)
  with X = Q ⊙ e^{b}, S = S_[i], Y = V (steps 2 and 5); transposed, for the backward's step 7,
  dv = X dS' + scale · Aᵀ dO with X = K ⊙ e^{b_C − b}.

Kernel 4 is three kernels, so that none holds the C×C score gradient beside [C, BK] tiles:

* ``_chunk_score_grad_kernel`` (4a) — grid (NT, B·H): dA = scale · dO Vᵀ of one chunk, lower
  triangular, summed over the V tiles and stored once (fp32, ``[B, H, T, C]``) for all key tiles.
* ``_chunk_intra_grad_kernel`` (4b) — grid (NT·NC, K/BK, B·H), one program per sub-chunk I and key
  tile: the intra parts of dq and dk of I's rows and their R (fp32 ``[B, T, H, K]`` each): the pairs
  (I, J < I) for dq, the pairs (J > I, I) for dk, each one tensor-core product of a c×c block of dA
  with a stored K̂_J or a Q̃_J formed here, then the diagonal block by the walk of step 4.
* ``_chunk_grad_kernel`` (4c) — grid (NT, K/BK, B·H), every chunk and key tile: the state parts of dq
  and dk and diag(dS' S_[i]ᵀ) as sums over the V tiles, plus 4b's parts, then the cumsums of step 9
  (b and b_C − b from the chunk's own gates, as in kernel 1a); stores dq, dk and dg.

Forward: kernels 1a-1c, 2, 3.  A, the decayed operands and the chunk states are stored in the dtype in
which the tensor-core products read them (bf16/fp16 for half inputs, fp32 otherwise), so storing
them narrow loses nothing.  The backward runs kernel 1a, kernel 2 for the states (fp32) and, REVERSE,
for their gradients, kernels 4a-4c for dq, dk, dg, and kernel 3 transposed for dv.

What the backward keeps from the forward, memory against time: A, the costly part of kernel 1 (the
exponentials of step 4, the products of step 3), is saved, C values per token and head in the
operand dtype (128 B in bf16 at C = 64).  Kernel 1a is run again instead of saving its outputs: it is
one streaming pass (it reads q, k, g and writes β and three operands: 2.3 KB of traffic per token
and head at K = 128 in bf16, about that of one state walk), while keeping β and the three decayed
operands alive from the forward to the backward would hold 1.3 KB per token and head, as much as the
inputs q, k, v, g themselves, in every layer of a model until its backward runs.

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

from ._compile import absent, present

__all__ = ["gla_chunked"]

SUB_CHUNK = 16  # c: the sub-chunk of steps 3-4 (FLA's BC); also the smallest tensor-core tile.

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------------
# Tiles.  BK = min(64, K) is fixed on the host for kernels 2 and 3; the other kernels autotune it.  BV,
# num_warps and num_stages are chosen by timing a few configurations on the first call for each
# (K, V, C, dtypes) on a GPU (its cost is part of the first call's compile time).  Under the CPU
# interpreter exactly one configuration runs, with BK = BV = 16, which fits every K and V and makes
# the small test sizes exercise the tiling over K and V.  Register counts of the autotuned choices are
# given beside kernels 1 and 4 (``tools/register_report.py`` computes them).
# ------------------------------------------------------------------------------------------------------
def _configs(gpu_options):
    options = [(16, 4, 1)] if _INTERPRETED else gpu_options
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv, w, s in options]


def _tiles_that_fit(configs, named_args, **kwargs):
    """Drop configurations whose key tile BK or value tile BV is wider than K or V (pruning runs when
    there are several); if none is left, the first one with its tiles cut to K and V (both ≥ 16)."""
    sizes = {**named_args, **kwargs}
    dims = {"BK": sizes.get("K"), "BV": sizes.get("V")}
    kept = [cfg for cfg in configs if all(b <= dims[tile] for tile, b in cfg.kwargs.items())]
    first = configs[0]
    return kept or [triton.Config({tile: min(b, dims[tile]) for tile, b in first.kwargs.items()},
                                  num_warps=first.num_warps, num_stages=first.num_stages)]


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
def _in_sequence(t, T, d):
    """The mask t < T of one row's load, shaped like its channel offsets d (a scalar mask would do on
    a GPU; the interpreter rejects one)."""
    return t + 0 * d < T


@triton.jit
def _head(ptr, i_b, i_h, T, H: tl.constexpr, D: tl.constexpr):
    """ptr advanced to token 0, channel 0 of batch i_b, head i_h of a [B, T, H, D] tensor (int64 arithmetic)."""
    return ptr + (i_b.to(tl.int64) * T * H + i_h) * D


# ------------------------------------------------------------------------------------------------------
# Kernels 1a-1c: everything inside one chunk (steps 0, 3, 4 and the decayed operands).
# ------------------------------------------------------------------------------------------------------
def _key_tile_configs(gpu_options):
    """Autotuned (BK, num_warps, num_stages); one configuration with BK = 16 under the interpreter."""
    options = [(16, 4, 1)] if _INTERPRETED else gpu_options
    return [triton.Config({"BK": bk}, num_warps=w, num_stages=s) for bk, w, s in options]


@triton.jit
def _decayed_queries(q, beta, i_c, I, J, d_k, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                     c: tl.constexpr, BK: tl.constexpr):
    """Step 3's query operand of the pair J < I for one key tile: Q_I ⊙ e^{β_I + G_{J+1} + … + G_{I−1}}
    (fp32, [c, BK]: the queries of sub-chunk I decayed from J's last row, exponents ≤ 0) and the factor.
    Each G is β at its sub-chunk's last row (a whole sub-chunk, in the sequence when I has a row in it),
    summed in order: every program that needs this operand forms the same numbers."""
    t_I = i_c * C + I * c + tl.arange(0, c)
    valid_I = (t_I < T)[:, None]
    tile_I = t_I[:, None] * (H * K) + d_k[None, :]
    q_I = tl.load(q + tile_I, mask=valid_I, other=0.0).to(tl.float32)
    beta_I = tl.load(beta + tile_I, mask=valid_I, other=0.0)
    gap = tl.zeros([BK], dtype=tl.float32)
    for n in range(J + 1, I):
        t_end = i_c * C + n * c + c - 1
        gap += tl.load(beta + t_end * (H * K) + d_k, mask=_in_sequence(t_end, T, d_k), other=0.0)
    factor = tl.exp(beta_I + gap[None, :])
    return q_I * factor, factor


@triton.jit
def _diagonal_step(window, g, t_s, s, rows_c, d_k, T, H: tl.constexpr, K: tl.constexpr):
    """One step of step 4's walk over the key rows of a sub-chunk, from its last row up: key row s
    (token t_s).  window_r = g_{s+1} + … + g_r for the rows r > s of the sub-chunk (0 for r ≤ s), grown
    by the gate after s; returns it and the pair factors e^{window_r} for r ≥ s, 0 for r < s (masked to
    −∞ before exp).  The gate after the sub-chunk's last row is loaded but added to no row."""
    g_after_s = tl.load(g + (t_s + 1) * (H * K) + d_k, mask=_in_sequence(t_s + 1, T, d_k), other=0.0)
    window += tl.where((rows_c > s)[:, None], g_after_s.to(tl.float32)[None, :], 0.0)
    return window, tl.exp(tl.where((rows_c >= s)[:, None], window, float("-inf")))


# Compiled offline for sm_90 (Triton 3.9, bf16, K = 128, C = 64), the (BK, num_warps, num_stages) below
# need (registers a thread, no stack in any): gates (16, 2, 1) 104, (16, 4, 1) 56, (32, 4, 1) 105,
# (32, 8, 1) 56, (64, 8, 1) 106; scores (32, 1, 2) 72, (32, 2, ·) 64, (64, 2, 2) 113, (64, 4, 3) 112;
# diagonal (32, 2, 1) 56, (64, 4, ·) 55, (128, 4, 2) 91, (128, 8, 2) 57.  None spills at K ∈ 64..256,
# C ∈ 32..128, bf16 or fp32 (at C = 128 the gates kernel's [C, BK] tiles take up to 255, no stack).
@triton.autotune(
    configs=_key_tile_configs([(16, 2, 1), (16, 4, 1), (32, 4, 1), (32, 8, 1), (64, 8, 1)]),
    key=["K", "C"],
    prune_configs_by={"early_config_prune": _tiles_that_fit},
)
@triton.jit
def _chunk_gates_kernel(
    q, k, g,              # inputs [B, T, H, K]
    beta,                 # out: β [B, T, H, K] fp32
    q_dec, k_dec, k_sub,  # out: Q ⊙ e^{b}, K ⊙ e^{b_C − b}, K ⊙ e^{γ}, [B, T, H, K] (operand dtype)
    decay_C,              # out: e^{b_C} [B, H, NT, K] fp32
    T, NT,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, c: tl.constexpr, BK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Step 0 for the BK channels of one chunk, and the three operands decayed by it.  The only scans
    of the forward pass: every later exponent is read from what this program stores."""
    i_c, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)                        # position r inside the chunk
    t = i_c * C + rows
    valid = (t < T)[:, None]
    d_k = i_k * BK + tl.arange(0, BK)
    tile = t[:, None] * (H * K) + d_k[None, :]

    q, k, g = _head(q, i_b, i_h, T, H, K), _head(k, i_b, i_h, T, H, K), _head(g, i_b, i_h, T, H, K)
    q_i = tl.load(q + tile, mask=valid, other=0.0).to(tl.float32)
    k_i = tl.load(k + tile, mask=valid, other=0.0).to(tl.float32)
    g_i = tl.load(g + tile, mask=valid, other=0.0).to(tl.float32)
    # g_{r+1}, the gate of the next row (zero after the chunk's last row and past T), so that the sums
    # that start after r are cumsums of their own gates, not a cumsum minus g_r
    g_next = tl.load(g + tile + H * K, mask=((rows + 1 < C) & (t + 1 < T))[:, None], other=0.0).to(tl.float32)

    # the chunk's sums: b_r = g_1 + … + g_r, b_C, and b_C − b_r = g_{r+1} + … + g_C
    _store_rounded(_head(q_dec, i_b, i_h, T, H, K), tile, q_i * tl.exp(tl.cumsum(g_i, axis=0)), valid,
                   EMULATE_BF16)
    tl.store(decay_C + (i_bh.to(tl.int64) * NT + i_c) * K + d_k, tl.exp(tl.sum(g_i, axis=0)))
    _store_rounded(_head(k_dec, i_b, i_h, T, H, K), tile, k_i * tl.exp(tl.cumsum(g_next, axis=0, reverse=True)),
                   valid, EMULATE_BF16)
    # the same two sums inside each sub-chunk, viewed as [C/c, c, BK] (sub-chunk, row in it, channel):
    # β_r from r's sub-chunk's first row to r, γ_r from r + 1 to the sub-chunk's last row
    beta_i = tl.reshape(tl.cumsum(tl.reshape(g_i, [C // c, c, BK]), axis=1), [C, BK])
    tl.store(_head(beta, i_b, i_h, T, H, K) + tile, beta_i, mask=valid)
    g_next = tl.where(((rows % c) != c - 1)[:, None], g_next, 0.0)     # stop at the sub-chunk's end
    gamma_i = tl.reshape(tl.cumsum(tl.reshape(g_next, [C // c, c, BK]), axis=1, reverse=True), [C, BK])
    _store_rounded(_head(k_sub, i_b, i_h, T, H, K), tile, k_i * tl.exp(gamma_i), valid, EMULATE_BF16)


@triton.autotune(
    configs=_key_tile_configs([(32, 1, 2), (32, 2, 2), (32, 2, 3), (64, 2, 2), (64, 4, 3)]),
    key=["K", "C"],
    prune_configs_by={"early_config_prune": _tiles_that_fit},
)
@triton.jit
def _chunk_scores_kernel(
    q, beta, k_sub,       # q [B, T, H, K]; β [B, T, H, K] fp32; K ⊙ e^{γ} (operand dtype)
    A,                    # out: [B, H, T, C], row r of a chunk = A[r, 0..C−1] (operand dtype)
    T,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, c: tl.constexpr, BK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """Step 3 for one pair of sub-chunks J < I of one chunk: the c×c block
    A_IJ = (Q_I ⊙ e^{β_I + G_{J+1} + … + G_{I−1}}) (K_J ⊙ e^{γ_J})ᵀ, one tensor-core product per key tile."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    PAIRS: tl.constexpr = (C // c) * (C // c - 1) // 2
    i_c, p = i_s // PAIRS, i_s % PAIRS
    # the pairs in the order (1, 0), (2, 0), (2, 1), (3, 0), …: pair p = I(I−1)/2 + J
    I = 1
    for m in tl.static_range(2, C // c):
        I += (p >= m * (m - 1) // 2).to(tl.int32)
    J = p - I * (I - 1) // 2
    i_b, i_h = i_bh // H, i_bh % H
    rows_c = tl.arange(0, c)
    t_I, t_J = i_c * C + I * c + rows_c, i_c * C + J * c + rows_c
    valid_I, valid_J = (t_I < T)[:, None], (t_J < T)[:, None]

    q, beta, k_sub = _head(q, i_b, i_h, T, H, K), _head(beta, i_b, i_h, T, H, K), _head(k_sub, i_b, i_h, T, H, K)
    A_IJ = tl.zeros([c, c], dtype=tl.float32)
    for i_k in range(K // BK):                    # the sum over key channels d, one BK tile at a time
        d_k = i_k * BK + tl.arange(0, BK)
        q_IJ, _ = _decayed_queries(q, beta, i_c, I, J, d_k, T, H, K, C, c, BK)
        k_J = tl.load(k_sub + t_J[:, None] * (H * K) + d_k[None, :], mask=valid_J, other=0.0)
        A_IJ += _mm(q_IJ, tl.trans(k_J), q, DOT_PRECISION, EMULATE_BF16)
    A += (i_bh.to(tl.int64) * T + t_I[:, None]) * C + J * c + rows_c[None, :]
    _store_rounded(A, 0, A_IJ, valid_I, EMULATE_BF16)


@triton.autotune(
    configs=_key_tile_configs([(32, 2, 1), (64, 4, 1), (64, 4, 2), (128, 4, 2), (128, 8, 2)]),
    key=["K", "C"],
    prune_configs_by={"early_config_prune": _tiles_that_fit},
)
@triton.jit
def _chunk_diagonal_kernel(
    q, k, g,              # inputs [B, T, H, K]
    A,                    # out: [B, H, T, C] (operand dtype): the diagonal blocks, and zeros right of them
    T,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, c: tl.constexpr, BK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Step 4 for one sub-chunk I: A_rs = Σ_d q_rd k_sd e^{g_{s+1,d} + … + g_{r,d}} for s ≤ r in I,
    key row by key row, in fp32 on the vector units; and A's columns right of the block set to zero."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_c, I = i_s // (C // c), i_s % (C // c)
    i_b, i_h = i_bh // H, i_bh % H
    rows_c = tl.arange(0, c)                      # rows r of I, and (as columns) its key rows s
    t_I = i_c * C + I * c + rows_c
    valid_I = (t_I < T)[:, None]

    q, k, g = _head(q, i_b, i_h, T, H, K), _head(k, i_b, i_h, T, H, K), _head(g, i_b, i_h, T, H, K)
    A_II = tl.zeros([c, c], dtype=tl.float32)
    for i_k in range(K // BK):                    # the sum over key channels d, one BK tile at a time
        d_k = i_k * BK + tl.arange(0, BK)
        q_I = tl.load(q + t_I[:, None] * (H * K) + d_k[None, :], mask=valid_I, other=0.0).to(tl.float32)
        # window_r = g_{s+1} + … + g_r, grown by one gate a step as the key row s walks up from the
        # last row: a sum of the pair's own gates, ≤ 0, and exactly 0 on the diagonal.  Rows r < s
        # are masked to −∞ before exp; keys past T load as zero.
        window = tl.zeros([c, BK], dtype=tl.float32)
        for j in range(c):
            s = c - 1 - j
            t_s = i_c * C + I * c + s
            k_s = tl.load(k + t_s * (H * K) + d_k, mask=_in_sequence(t_s, T, d_k), other=0.0).to(tl.float32)
            window, decay = _diagonal_step(window, g, t_s, s, rows_c, d_k, T, H, K)
            column = tl.sum(q_I * k_s[None, :] * decay, axis=1)                  # A[I, s] over this tile
            A_II += tl.where(rows_c[None, :] == s, column[:, None], 0.0)

    # the block's rows of A: the diagonal block, then zeros in the columns after I
    A += (i_bh.to(tl.int64) * T + t_I[:, None]) * C
    cols = tl.arange(0, C)[None, :]
    _store_rounded(A, I * c + rows_c[None, :], A_II, valid_I, EMULATE_BF16)
    _store_rounded(A, cols, tl.zeros([c, C], dtype=tl.float32), valid_I & (cols >= (I + 1) * c), EMULATE_BF16)


# ------------------------------------------------------------------------------------------------------
# Kernel 2: step 1 (and, REVERSE, step 6), sequential over chunks.
# ------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs([(64, 4, 2), (32, 4, 2), (64, 4, 3), (32, 4, 3), (32, 2, 2)]),  # (BV, warps, stages)
    key=["K", "V", "C", "REVERSE"],
    prune_configs_by={"early_config_prune": _tiles_that_fit},
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
    prune_configs_by={"early_config_prune": _tiles_that_fit},
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


# ------------------------------------------------------------------------------------------------------
# Kernels 4a-4c: steps 8-9, the gradients of q, k and g.
# ------------------------------------------------------------------------------------------------------
# Compiled offline for sm_90 (Triton 3.9, bf16, K = V = 128, C = 64), the autotuned choices need
# (registers a thread, no stack in any): score_grad 44-77; intra_grad (BK 16 or 32) 80, (64, 8 warps)
# 114; grad (BK, BV) = (16, ·) 80-94, (32, ·) at 8 warps 102-103.  In bf16 none spills at K, V ∈ 64..256
# and C ∈ {64, 128} (at C = 32 one wide choice of grad spills); fp32's IEEE products run without tensor
# cores and spill in the wider tiles at C = 128, but every shape keeps choices that do not.
@triton.autotune(
    configs=_configs([(64, 4, 2), (128, 8, 2), (64, 8, 3), (32, 4, 2)]),     # (BV, warps, stages)
    key=["V", "C"],
    prune_configs_by={"early_config_prune": _tiles_that_fit},
)
@triton.jit
def _chunk_score_grad_kernel(
    do, v,                # dO, V [B, T, H, V]
    dA,                   # out: [B, H, T, C] fp32, row r of a chunk = dA[r, 0..C−1]
    scale, T,
    H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """The score gradient of one chunk, dA_rs = scale · do_r·v_s for s ≤ r and 0 above the diagonal,
    summed over the V tiles: once per chunk, for all key tiles of kernel 4b."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    t = i_c * C + rows
    valid = (t < T)[:, None]
    do, v = _head(do, i_b, i_h, T, H, V), _head(v, i_b, i_h, T, H, V)
    acc = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(V // BV):
        tile_v = t[:, None] * (H * V) + (i_v * BV + tl.arange(0, BV))[None, :]
        do_i = tl.load(do + tile_v, mask=valid, other=0.0)
        v_i = tl.load(v + tile_v, mask=valid, other=0.0)
        acc += _mm(do_i, tl.trans(v_i), do, DOT_PRECISION, EMULATE_BF16)
    dA += (i_bh.to(tl.int64) * T + t[:, None]) * C + rows[None, :]
    tl.store(dA, tl.where(rows[None, :] <= rows[:, None], scale * acc, 0.0), mask=valid)


@triton.autotune(
    configs=_key_tile_configs([(16, 2, 2), (32, 4, 1), (32, 4, 2), (64, 8, 1), (64, 8, 2)]),
    key=["K", "C"],
    prune_configs_by={"early_config_prune": _tiles_that_fit},
)
@triton.jit
def _chunk_intra_grad_kernel(
    q, k, g,              # inputs [B, T, H, K]
    beta, k_sub, dA,      # β [B, T, H, K] fp32, K ⊙ e^{γ} (operand dtype), dA [B, H, T, C] fp32
    dq_intra, dk_intra, R_intra,  # out: dQ^intra, dK^intra and R [B, T, H, K] fp32
    T,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, c: tl.constexpr, BK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """The intra-chunk parts of dq and dk (step 8) of the rows of one sub-chunk I and key tile, and
    their R = q ⊙ dQ^intra − k ⊙ dK^intra (step 9) formed from the same numbers: the pairs (I, J < I)
    with I as the queries, the pairs (J > I, I) with I as the keys, then the diagonal block."""
    i_s, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, I = i_s // (C // c), i_s % (C // c)
    i_b, i_h = i_bh // H, i_bh % H
    rows_c = tl.arange(0, c)
    t_I = i_c * C + I * c + rows_c
    valid_I = (t_I < T)[:, None]
    d_k = i_k * BK + tl.arange(0, BK)
    tile_I = t_I[:, None] * (H * K) + d_k[None, :]
    q, k, g = _head(q, i_b, i_h, T, H, K), _head(k, i_b, i_h, T, H, K), _head(g, i_b, i_h, T, H, K)
    beta, k_sub = _head(beta, i_b, i_h, T, H, K), _head(k_sub, i_b, i_h, T, H, K)
    dA += (i_bh.to(tl.int64) * T + i_c * C) * C   # row 0 of the chunk
    block = rows_c[:, None] * C + rows_c[None, :]  # a c×c block of dA, at its first row and column

    # I as the queries: dQ^intra_I = Σ_{J<I} e^{β_I + gap} ⊙ (dA_IJ K̂_J), R_I += Q̃_I ⊙ (dA_IJ K̂_J)
    dq_I = tl.zeros([c, BK], dtype=tl.float32)
    R_I = tl.zeros([c, BK], dtype=tl.float32)
    for J in range(0, I):
        q_IJ, q_fac = _decayed_queries(q, beta, i_c, I, J, d_k, T, H, K, C, c, BK)
        q_IJ = _as_input_dtype(q_IJ, q, EMULATE_BF16).to(tl.float32)          # Q̃_I, rounded once
        t_J = i_c * C + J * c + rows_c
        k_J = tl.load(k_sub + t_J[:, None] * (H * K) + d_k[None, :], mask=(t_J < T)[:, None], other=0.0)
        dA_IJ = tl.load(dA + I * c * C + J * c + block, mask=valid_I, other=0.0)
        X = _mm(dA_IJ, k_J, q, DOT_PRECISION, EMULATE_BF16)                   # Σ_s dA_rs k̂_s
        dq_I += q_fac * X
        R_I += q_IJ * X
    # I as the keys: dK^intra_I = e^{γ_I} ⊙ Σ_{J>I} dA_JIᵀ Q̃_J, R_I −= K̂_I ⊙ (dA_JIᵀ Q̃_J)
    k_hat = tl.load(k_sub + tile_I, mask=valid_I, other=0.0).to(tl.float32)
    dk_I = tl.zeros([c, BK], dtype=tl.float32)
    for J in range(I + 1, C // c):
        q_JI, _ = _decayed_queries(q, beta, i_c, J, I, d_k, T, H, K, C, c, BK)
        valid_J = ((i_c * C + J * c + rows_c) < T)[:, None]
        dA_JI = tl.load(dA + J * c * C + I * c + block, mask=valid_J, other=0.0)
        dk_I += _mm(tl.trans(dA_JI), q_JI, q, DOT_PRECISION, EMULATE_BF16)    # Σ_r dA_rs q̃_r
    R_I -= k_hat * dk_I
    # e^{γ_I}, from I's own gates: γ_r = g_{r+1} + … + g_e(r)
    g_next = tl.load(g + tile_I + H * K, mask=((rows_c + 1 < c) & (t_I + 1 < T))[:, None], other=0.0)
    dk_I *= tl.exp(tl.cumsum(g_next.to(tl.float32), axis=0, reverse=True))

    # the diagonal block, key row s by key row from the last, as step 4: P_rs = dA_rs e^{window_r}
    # (s ≤ r) gives dQ^intra_r += P_rs k_s and dK^intra_s += Σ_r P_rs q_r, and R both, in fp32
    q_I = tl.load(q + tile_I, mask=valid_I, other=0.0).to(tl.float32)
    k_I = tl.load(k + tile_I, mask=valid_I, other=0.0).to(tl.float32)
    dq_diag = tl.zeros([c, BK], dtype=tl.float32)
    dk_diag = tl.zeros([c, BK], dtype=tl.float32)
    window = tl.zeros([c, BK], dtype=tl.float32)
    for j in range(c):
        s = c - 1 - j
        t_s = i_c * C + I * c + s
        k_s = tl.load(k + t_s * (H * K) + d_k, mask=_in_sequence(t_s, T, d_k), other=0.0).to(tl.float32)
        window, decay = _diagonal_step(window, g, t_s, s, rows_c, d_k, T, H, K)
        dA_s = tl.load(dA + (I * c + rows_c) * C + I * c + s, mask=t_I < T, other=0.0)   # dA[r, s]
        P = dA_s[:, None] * decay                                                      # [c, BK]
        dq_diag += P * k_s[None, :]
        dk_diag += tl.where((rows_c == s)[:, None], tl.sum(P * q_I, axis=0)[None, :], 0.0)
    R_I += q_I * dq_diag - k_I * dk_diag                                               # the same pair terms
    tl.store(_head(dq_intra, i_b, i_h, T, H, K) + tile_I, dq_I + dq_diag, mask=valid_I)
    tl.store(_head(dk_intra, i_b, i_h, T, H, K) + tile_I, dk_I + dk_diag, mask=valid_I)
    tl.store(_head(R_intra, i_b, i_h, T, H, K) + tile_I, R_I, mask=valid_I)


@triton.autotune(
    configs=[triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=st)
             for bk, bv, w, st in ([(16, 16, 4, 1)] if _INTERPRETED else
                                   [(16, 64, 4, 2), (16, 128, 4, 2), (32, 64, 8, 2), (32, 128, 8, 2),
                                    (32, 32, 8, 3)])],
    key=["K", "V", "C"],
    prune_configs_by={"early_config_prune": _tiles_that_fit},
)
@triton.jit
def _chunk_grad_kernel(
    q, k, v, g,           # q, k, g [B, T, H, K]; v [B, T, H, V]
    h, dh, do,            # h [B, H, NT, K, V] fp32: S_[i];  dh: dS_[i+1];  dO [B, T, H, V]
    dq_intra, dk_intra, R_intra,  # kernel 4b's sums [B, T, H, K] fp32
    dq, dk, dg,           # out: dq, dk [B, T, H, K] in the input dtype; dg [B, T, H, K] fp32
    scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """The BK columns of dq, dk and dg of one chunk (steps 8-9): the state parts, summed over the V
    tiles, plus kernel 4b's intra-chunk parts, then the cumsums of step 9."""
    i_c, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    t = i_c * C + rows
    valid = (t < T)[:, None]
    d_k = i_k * BK + tl.arange(0, BK)
    v, do = _head(v, i_b, i_h, T, H, V), _head(do, i_b, i_h, T, H, V)
    h += (i_bh.to(tl.int64) * NT + i_c) * K * V   # S_[i_c]
    dh += (i_bh.to(tl.int64) * NT + i_c) * K * V  # dS' = dS_[i_c + 1]

    # the state parts of step 8, dO S_[i]ᵀ and V dS'ᵀ, and diag(dS' S_[i]ᵀ) for step 9: sums over V
    dq_i = tl.zeros([C, BK], dtype=tl.float32)
    dk_i = tl.zeros([C, BK], dtype=tl.float32)
    dS_S = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(V // BV):
        d_v = i_v * BV + tl.arange(0, BV)
        tile_v = t[:, None] * (H * V) + d_v[None, :]
        do_i = tl.load(do + tile_v, mask=valid, other=0.0)
        v_i = tl.load(v + tile_v, mask=valid, other=0.0)
        S = tl.load(h + d_k[:, None] * V + d_v[None, :])
        dS = tl.load(dh + d_k[:, None] * V + d_v[None, :])
        dq_i += _mm(do_i, tl.trans(S), do, DOT_PRECISION, EMULATE_BF16)
        dk_i += _mm(v_i, tl.trans(dS), do, DOT_PRECISION, EMULATE_BF16)
        dS_S += tl.sum(dS * S, axis=1)

    # step 9: dg_t = Σ_{s ≥ t} (q ⊙ dq^inter + R)_s + Σ_{j < t} k_j ⊙ dk^inter_j + e^{b_C} ⊙ diag(dS' S_[i]ᵀ),
    # with dq^inter = scale·e^{b} ⊙ (dO S_[i]ᵀ) and dk^inter = e^{b_C − b} ⊙ (V dS'ᵀ); b and b_C − b as
    # in kernel 1a.  The dq half first, then the dk half, so that few [C, BK] tiles are live at once.
    tile_k = t[:, None] * (H * K) + d_k[None, :]
    g = _head(g, i_b, i_h, T, H, K)
    g_i = tl.load(g + tile_k, mask=valid, other=0.0).to(tl.float32)
    dq_i = scale * tl.exp(tl.cumsum(g_i, axis=0)) * dq_i
    q_i = tl.load(_head(q, i_b, i_h, T, H, K) + tile_k, mask=valid, other=0.0).to(tl.float32)
    R = q_i * dq_i + tl.load(_head(R_intra, i_b, i_h, T, H, K) + tile_k, mask=valid, other=0.0)
    dg_i = tl.cumsum(R, axis=0, reverse=True) + (tl.exp(tl.sum(g_i, axis=0)) * dS_S)[None, :]
    dq_i += tl.load(_head(dq_intra, i_b, i_h, T, H, K) + tile_k, mask=valid, other=0.0)
    _store_rounded(_head(dq, i_b, i_h, T, H, K), tile_k, dq_i, valid, EMULATE_BF16)

    g_next = tl.load(g + tile_k + H * K, mask=((rows + 1 < C) & (t + 1 < T))[:, None], other=0.0).to(tl.float32)
    dk_i = tl.exp(tl.cumsum(g_next, axis=0, reverse=True)) * dk_i
    k_dk_inter = tl.load(_head(k, i_b, i_h, T, H, K) + tile_k, mask=valid, other=0.0).to(tl.float32) * dk_i
    dg_i += tl.cumsum(k_dk_inter, axis=0) - k_dk_inter
    tl.store(_head(dg, i_b, i_h, T, H, K) + tile_k, dg_i, mask=valid)
    dk_i += tl.load(_head(dk_intra, i_b, i_h, T, H, K) + tile_k, mask=valid, other=0.0)
    _store_rounded(_head(dk, i_b, i_h, T, H, K), tile_k, dk_i, valid, EMULATE_BF16)


# ------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------
#: The chunk sizes the kernels take: powers of two from one sub-chunk to 128.
_CHUNK_SIZES = tuple(c for c in (16, 32, 64, 128) if c >= SUB_CHUNK)


def _check_kernel(sig, chunk_size):
    """What these kernels add to the checks of ``gla.SPEC`` (done first, by ``gla_chunked``):
    dtypes, head and chunk sizes, the device.  Returns the chunk size as an int."""
    sig.kernel_dtype()
    K, V = sig.kernel_head_size("K"), sig.kernel_head_size("V", zero_ok=True)
    C = sig.kernel_chunk_size(chunk_size, _CHUNK_SIZES)
    sig.kernel_offsets(sig.size("T") * sig.size("H") * max(K, V))
    sig.kernel_device(_INTERPRETED)
    return C


def _launch_options(q):
    """Matmul precision and bf16 emulation for inputs like q."""
    emulate_bf16 = _INTERPRETED and q.dtype == torch.bfloat16
    # "ieee": exact fp32 products for fp32 inputs; for bf16/fp16 operands the option has no effect.
    precision = "ieee" if q.dtype == torch.float32 or emulate_bf16 else "tf32"
    return dict(DOT_PRECISION=precision, EMULATE_BF16=emulate_bf16)


def _key_tile(K):
    """BK of kernels 2 and 3: 16 on the CPU (small tests still tile K), min(64, K) on a GPU."""
    return 16 if _INTERPRETED else min(64, K)


def _operand_dtype(q):
    """The dtype of matmul operands: the input dtype for bf16/fp16 inputs (tensor cores), else fp32.
    A, the decayed operands and the forward's chunk states are stored in it: the tensor-core products
    round them to it anyway."""
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _gates(q, k, g, chunk_size):
    """Kernel 1a: β [B, T, H, K] (fp32); Q ⊙ e^{b}, K ⊙ e^{b_C − b}, K ⊙ e^{γ} (operand dtype, like q);
    e^{b_C} [B, H, NT, K] (fp32)."""
    B, T, H, K = q.shape
    NT = triton.cdiv(T, chunk_size)
    beta = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    q_dec, k_dec, k_sub = (torch.empty_like(q, dtype=_operand_dtype(q)) for _ in range(3))
    decay_C = torch.empty(B, H, NT, K, device=q.device, dtype=torch.float32)
    _chunk_gates_kernel[lambda meta: (NT, K // meta["BK"], B * H)](
        q, k, g, beta, q_dec, k_dec, k_sub, decay_C, T, NT,
        H=H, K=K, C=chunk_size, c=SUB_CHUNK, EMULATE_BF16=_launch_options(q)["EMULATE_BF16"],
    )
    return beta, q_dec, k_dec, k_sub, decay_C


def _scores(q, k, g, beta, k_sub, chunk_size):
    """Kernels 1b and 1c: A [B, H, T, C] (operand dtype), every chunk's lower-triangular C×C matrix
    (steps 3 and 4), from the inputs and kernel 1a's β and K ⊙ e^{γ}."""
    B, T, H, K = q.shape
    NT, NC = triton.cdiv(T, chunk_size), chunk_size // SUB_CHUNK
    options = _launch_options(q)
    A = torch.empty(B, H, T, chunk_size, device=q.device, dtype=_operand_dtype(q))
    if NC > 1:                                    # the pairs J < I of sub-chunks (none when C = c)
        _chunk_scores_kernel[(NT * (NC * (NC - 1) // 2), B * H)](
            q, beta, k_sub, A, T, H=H, K=K, C=chunk_size, c=SUB_CHUNK, **options,
        )
    _chunk_diagonal_kernel[(NT * NC, B * H)](
        q, k, g, A, T, H=H, K=K, C=chunk_size, c=SUB_CHUNK, EMULATE_BF16=options["EMULATE_BF16"],
    )
    return A


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
    """Kernels 1a-1c (steps 0, 3, 4), kernel 2 (step 1), kernel 3 (steps 2, 5); returns (o, final state
    or None, A), A for the backward.

    HBM traffic: kernel 1a reads q, k, g and writes β (fp32), the three decayed operands and e^{b_C};
    1b reads q, β and K ⊙ e^{γ}, 1c q, k and g, and together they write A (C per token and head);
    kernel 2 reads K ⊙ e^{b_C − b}, v, e^{b_C} and writes the chunk states h (K·V per
    chunk and head); kernel 3 reads Q ⊙ e^{b}, h, A, v and writes o.  All but e^{b_C} are stored in
    the operand dtype (bf16/fp16 for half inputs), the precision the tensor-core products read them in.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    beta, q_dec, k_dec, k_sub, decay_C = _gates(q, k, g, chunk_size)
    A = _scores(q, k, g, beta, k_sub, chunk_size)
    h = torch.empty(B, H, NT, K, V, device=q.device, dtype=_operand_dtype(q))
    ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    _states(k_dec, v, decay_C, h, h0, ht, scale=1.0, chunk_size=chunk_size, reverse=False)
    o = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
    _output(q_dec, A, h, v, o, state_scale=scale, score_scale=scale, transpose_A=False)
    return o, ht, A


def _backward(q, k, v, g, A, scale, h0, chunk_size, do, dht):
    """Kernel 1a again (β and the decayed operands; A is the forward's), kernel 2 (the states S_[i],
    fp32), kernel 2 REVERSE (step 6: dS_[i+1] and dS_[0]), kernels 4a-4c (steps 8-9: dA, then the
    intra parts of dq and dk with their R, then dq, dk, dg), kernel 3 transposed (step 7: dv).  Returns
    dq, dk, dv (input dtype), dg (fp32), d initial_state (fp32, or None).

    HBM traffic beyond the inputs: kernel 1a's outputs, the states and their gradients (fp32, each
    written once), dA (C per token and head) and kernel 4b's three sums (fp32, K per token and head
    each), each written once and read by the next kernel.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    beta, q_dec, k_dec, k_sub, decay_C = _gates(q, k, g, chunk_size)
    h = torch.empty(B, H, NT, K, V, device=q.device, dtype=torch.float32)
    dh = torch.empty_like(h)
    dh0 = torch.empty_like(h0) if h0 is not None else None
    _states(k_dec, v, decay_C, h, h0, None, scale=1.0, chunk_size=chunk_size, reverse=False)
    _states(q_dec, do, decay_C, dh, dht, dh0, scale=scale, chunk_size=chunk_size, reverse=True)

    options = _launch_options(q)
    dA = torch.empty(B, H, T, chunk_size, device=q.device, dtype=torch.float32)
    _chunk_score_grad_kernel[(NT, B * H)](do, v, dA, scale, T, H=H, V=V, C=chunk_size, **options)
    dq_intra, dk_intra, R_intra = (torch.empty(B, T, H, K, device=q.device, dtype=torch.float32) for _ in range(3))
    _chunk_intra_grad_kernel[lambda meta: (NT * (chunk_size // SUB_CHUNK), K // meta["BK"], B * H)](
        q, k, g, beta, k_sub, dA, dq_intra, dk_intra, R_intra, T,
        H=H, K=K, C=chunk_size, c=SUB_CHUNK, **options,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    _chunk_grad_kernel[lambda meta: (NT, K // meta["BK"], B * H)](
        q, k, v, g, h, dh, do, dq_intra, dk_intra, R_intra, dq, dk, dg, scale, T, NT,
        H=H, K=K, V=V, C=chunk_size, **options,
    )
    _output(k_dec, A, dh, do, dv, state_scale=1.0, score_scale=scale, transpose_A=True)
    return dq, dk, dv, dg, dh0


class _GLAChunked(torch.autograd.Function):
    """Forward: kernels 1a-1c, 2 and 3, saving A.  Backward: kernel 1a, kernel 2 twice (the states,
    then their gradients), kernels 4a-4c (dq, dk, dg) and kernel 3 transposed (dv)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, output_final_state, chunk_size):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
        o, ht, A = _forward(q, k, v, g, scale, h0, output_final_state, chunk_size)
        ctx.save_for_backward(q, k, v, g, A, h0)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)          # an unused output's gradient arrives as None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, A, h0 = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.to(torch.float32).contiguous()
        dq, dk, dv, dg, dh0 = _backward(q, k, v, g, A, ctx.scale, h0, ctx.chunk_size, do, dht)
        dh0 = None if dh0 is None else dh0.to(ctx.initial_state_dtype)
        return dq, dk, dv, dg.to(g.dtype), dh0, None, None, None


# The same forward and backward as PyTorch operators, for torch.compile (kernels/_compile.py).  The
# forward also returns A, which its backward reads instead of forming it again.

@torch.library.custom_op("lecture_kit::gla_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                initial_state: torch.Tensor | None, scale: float, output_final_state: bool,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    o, ht, A = _forward(q, k, v, g, scale, h0, output_final_state, chunk_size)
    return o, absent(ht, v), A


@_forward_op.register_fake
def _(q, k, v, g, initial_state, scale, output_final_state, chunk_size):
    B, T, H, K = q.shape
    ht = v.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else v.new_empty(0)
    return torch.empty_like(v), ht, q.new_empty(B, H, T, chunk_size, dtype=_operand_dtype(q))


@torch.library.custom_op("lecture_kit::gla_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, A: torch.Tensor,
                 initial_state: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None,
                 scale: float, chunk_size: int) -> list[torch.Tensor]:
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    grads = _backward(q, k, v, g, A, scale, h0, chunk_size, do, dht)
    return [absent(grad, v) for grad in grads]


@_backward_op.register_fake
def _(q, k, v, g, A, initial_state, do, dht, scale, chunk_size):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(g, dtype=torch.float32),
            v.new_empty(0) if initial_state is None else torch.empty_like(initial_state, dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    q, k, v, g, initial_state, scale, output_final_state, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, output[2], initial_state)
    ctx.mark_non_differentiable(output[2])
    ctx.scale, ctx.chunk_size, ctx.output_final_state = scale, chunk_size, output_final_state


def _backward_of_op(ctx, do, dht, dA):
    q, k, v, g, A, initial_state = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
    dht = dht.to(torch.float32).contiguous() if ctx.output_final_state and dht is not None else None
    dq, dk, dv, dg, dh0 = _backward_op(q, k, v, g, A, initial_state, do, dht, ctx.scale, ctx.chunk_size)
    return dq, dk, dv, dg.to(g.dtype), present(dh0, initial_state), None, None, None


_forward_op.register_autograd(_backward_of_op, setup_context=_setup_context)


def gla_chunked(q, k, v, g, *, scale, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunkwise gated linear attention with the Triton kernels of this module (notebooks 03d and 04b).

    q, k, g [B, T, H, K] (g = log forget gate ≤ 0, any float dtype: used in q's dtype or fp32);
    v [B, T, H, V]; initial_state None or [B, H, K, V] (any float dtype, used in fp32).  K and V
    powers of two in 16..256; chunk_size a power of two in 16..128; any T ≥ 1; B, H or V = 0 give
    empty results.  ``scale=None`` means K^-1/2.  This is ``gla.kernel``: the arguments are checked
    against ``gla.SPEC`` as every form's are, then against what these kernels add (``_check_kernel``).
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32, or None).
    Differentiable in q, k, v, g and initial_state, with Triton backward kernels (module docstring).
    """
    from ..gla import SPEC
    call = SPEC.check("kernel", q, k, v, g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size)
    scale, chunk_size = call.scale, _check_kernel(call.sig, chunk_size)
    empty = call.sig.empty_result(v, output_final_state)
    if empty is not None:           # B, H or V is 0: nothing to compute
        return empty
    if g.dtype not in (q.dtype, torch.float32):
        g = g.float()               # the kernels read g in q's dtype or fp32; autograd casts dg back
    if torch.compiler.is_compiling():
        o, ht, _ = _forward_op(q, k, v, g, initial_state, scale, bool(output_final_state), chunk_size)
    else:
        o, ht = _GLAChunked.apply(q, k, v, g, initial_state, scale, bool(output_final_state), chunk_size)
    return o, (ht if output_final_state else None)
