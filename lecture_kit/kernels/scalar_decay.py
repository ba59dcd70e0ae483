"""Triton kernels for the scalar-decay mixers: SSD (Mamba-2) and RetNet.  Derived in notebooks 03b and 04a.

Both mixers are, per batch b and head h, one linear recurrence whose decay is a single number per
head and token, kept as its logarithm l_t ≤ 0:

    S_t = exp(l_t) S_{t-1} + w_t k_t v_tᵀ          S_t ∈ R^{K×V}, fp32 (fla's key-major layout)
    o_t = scale · S_tᵀ q_t + D ∘ v_t

    SSD    (``dt`` given):  q = C, k = B, v = x, l_t = Δ_t A_h,  w_t = Δ_t,  scale = 1, D = skip
    RetNet (``dt=None``):   l_t = log γ_h,  w_t = 1,  D = None

q and k have G ≤ H groups ([B, T, G, K]); head h reads group h // (H / G).  They are never expanded
to H heads in memory: each program computes the group index and reads the shared rows.

The chunkwise algorithm.  Cut time into chunks of Q = ``chunk_size`` tokens (the last one may be
short: rows past T are masked, never padded in memory).  In chunk n, with rows i, j = 0 … Q−1,

    Λ_i  = l_{t0} + … + l_{t0+i}          chunk-local cumulative log-decay, fp32, ≤ 0
    L_ij = exp(Λ_i − Λ_j)  (i ≥ j),  0  (i < j)      the 1-semiseparable mask of the chunk

and the output is the sum of four steps (notebooks 03b and 04a, same names):

    1. diagonal blocks   O_diag = scale · (Q Kᵀ ∘ L ∘ w_j) V
    2. chunk states      S_n    = Σ_j exp(Λ_last − Λ_j) w_j k_j v_jᵀ
    3. state passing     H_n    = exp(Λ_last) H_{n−1} + S_n       (H_{−1} = initial_state)
    4. state → output    O_off  = scale · (Q ∘ exp(Λ)) H_{n−1}

    o = O_diag + O_off + D ∘ V,   final_state = H_{last}.

Every exponent is formed as the sum of its own window of log-decays, never as a difference such as
Λ_i − Λ_j: Λ_i − Λ_j = l_{j+1} + … + l_i and Λ_last − Λ_j = l_{j+1} + … + l_last (``_chunk_log_decay``,
``_decay_mask``).  A sum of non-positive numbers is ≤ 0 exactly, so no exponent can become
exp(+large) = inf; a single very negative step (l = −10⁴) costs no digits of the others' decays, as a
difference of two sums near −10⁴ would (ulp 10⁻³); and a reset, l = −∞, gives decay 0 across it and
leaves every window that does not contain it untouched, where a difference would give −∞ + ∞ = NaN.
Masks are applied with ``tl.where`` after the exp.

Forward pass, two kernels:

    _chunk_states_kernel   steps 2 + 3.  Grid (K/BK, V/BV, B·H).  One program owns a BK×BV tile of
                           the state of one (b, h) in fp32 registers and walks the chunks in order:
                           it writes H_{n−1} (the state *entering* chunk n) to ``states[b, h, n]``,
                           then folds chunk n in.  It is the only sequential part.
    _chunk_output_kernel   steps 1 + 4.  Grid (V/BV, n_chunks, B·H).  One program computes the BT×BV
                           tile of o for one chunk: it loops over K to form Q Kᵀ (BT×BT) and
                           Q H_{n−1} (BT×BV), then applies the decays, multiplies by V and adds D V.

Precision: cumulative sums, masks, accumulators and the recurrent state in fp32; matmul operands in
the input dtype (bf16/fp16 on tensor cores with fp32 accumulation).  The per-chunk states that pass
from the first kernel to the second are stored in the input dtype, because that is the precision at
which the second kernel multiplies them anyway.  For fp32 inputs every ``tl.dot`` uses
``input_precision="ieee"`` (no TF32), so fp32 results match an fp64 reference to ~1e-7.
fp64 is not supported by the kernels (the PyTorch forms in ssd.py / retnet.py handle it).

Backward pass (Triton as well).  Let dH_n be the gradient of the loss with respect to the state
*leaving* chunk n.  It obeys the forward recurrence run backwards in time, with (q, do) in place of
(k, v):

    dH_{n−1} = exp(Λ_last) dH_n + scale · Σ_i exp(Λ_i) q_i do_iᵀ       (dH_last = d final_state)

so ``_chunk_states_kernel`` computes it too (``REVERSE=True``), and dH_{−1} is d initial_state.
Then ``_chunk_grad_kernel`` (grid (n_chunks, B·H)) forms, inside each chunk,

    dq_i = scale · [ exp(Λ_i) H_{n−1} do_i + Σ_{j≤i} L_ij w_j (do_i·v_j) k_j ]
    dk_j = w_j · dk̃_j,   dk̃_j = Σ_{i≥j} scale L_ij (do_i·v_j) q_i + exp(Λ_last − Λ_j) dH_n v_j
    dv_j = w_j · [ Σ_{i≥j} scale L_ij (q_i·k_j) do_i + exp(Λ_last − Λ_j) dH_nᵀ k_j ] + D ∘ do_j
    dw_j = k_j · dk̃_j

and the decay gradient.  Adding c to one l_t multiplies every path that crosses t by e^c; the same
happens if q_s is multiplied by e^c and k_s by e^{−c} for all s ≥ t and the final state by e^c.  So

    dL/dl_t = Σ_{s ≥ t} (q_s·dq_s − k_s·dk_s) + ⟨dS_T, S_T⟩,

and the same argument at the end of chunk n gives the chunk-local form the kernel uses,

    dL/dl_t = Σ_{s ≥ t in chunk n} (q_s·dq_s − k_s·dk_s) + ⟨dH_n, H_n⟩,

a reverse cumulative sum inside the chunk; no sum runs over the whole sequence, where bf16
rounding errors would pile up.  PyTorch finishes with small reductions: the group sums of dq and
dk, the sums over b and t for d log_decay and dD, and SSD's dΔ_t = A_h dL/dl_t + dw_t (Δ_t enters
both the decay and the weight).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # lecture_kit/__init__.py does this first; repeated here so the module also works on its own.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .._validate import Signature  # noqa: E402
from ._compile import absent, present  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRETED = tl.constexpr(INTERPRETED)       # the same flag, readable inside the kernels

# Tile sizes over the key and value dims (BT is the chunk size).  With them the bf16/fp16 kernels
# compile for sm_90 without register spills (checked with cuobjdump's resource usage under Triton
# 3.9, tools/register_report.py; the autotuned 8-warp configurations), except the backward at
# chunk 128, which spills a little; fp32 (the exact-test path) spills at chunk 128.  The states
# kernel uses narrow value tiles because it is the sequential part: more, smaller programs hide its
# latency better.  The output kernel takes up to 128 values of 16-bit inputs at once, so that each
# (chunk, head) forms its BT×BT scores Q Kᵀ once rather than once per 64 values.
def _tiles(kernel: str, K: int, V: int, BT: int, dtype: torch.dtype) -> tuple[int, int]:
    if kernel == "states":
        return min(K, 64), min(V, 32)
    if kernel == "grad" and BT == 128:
        return min(K, 32), min(V, 32)
    if kernel == "output" and BT <= 64 and dtype != torch.float32:
        return min(K, 64), min(V, 128)
    return min(K, 64), min(V, 64)


def _heads_per_program(heads_per_group: int) -> int:
    """How many heads of one group an output program serves, sharing their scores Q Kᵀ: the
    largest of 8, 4, 2, 1 that divides the group.  Eight heads still leave B·H/8 · T/BT programs,
    over a thousand at the benchmark's shapes."""
    return next(n for n in (8, 4, 2, 1) if heads_per_group % n == 0)


# A few launch configurations for the GPU to choose from (warps and pipeline depth, measured once
# per shape by triton.autotune); the interpreter gets exactly one, so nothing is timed on the CPU.
def _configs(*warps_stages):
    if INTERPRETED:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in warps_stages]


# ------------------------------------------------------------------------------------------------
# The decays of one chunk
# ------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_log_decay(dt_ptr, log_decay_ptr, b, h, t0, T, H, BT: tl.constexpr, HAS_DT: tl.constexpr):
    """The decays of one chunk, every exponent a sum over its own window of log-decays l ≤ 0:

        Λ_i    = Σ_{s ≤ i} l_s     (chunk start → row i)        ``lam``      [BT]
        rest_j = Σ_{s > j} l_s     (row j → chunk end)          ``rest``     [BT]
        Λ_last = Σ_s l_s           (the whole chunk)            ``lam_last``

    and w [BT], l [BT] and log_decay[h] for ``_decay_mask``.  l_t = Δ_t · log_decay[h] and w_t = Δ_t
    when ``HAS_DT``; otherwise l_t = log_decay[h] and w_t = 1.  Rows past T get l = 0 and w = 0.

    Never a difference of two sums: after one step of l = −10⁴ both Λ_i and Λ_j are near −10⁴ and
    Λ_i − Λ_j would keep only 3 of its digits (ulp(10⁴) ≈ 10⁻³), and after a reset, l = −∞, it
    would be −∞ + ∞ = NaN.  Sums of non-positive numbers are ≤ 0 exactly, so no exponent needs a
    clamp, and −∞ stays −∞ (decay 0).  A zero step Δ_t = 0 decays by e⁰ = 1 whatever log_decay is.
    A constant decay (RetNet) needs no scan: each sum is a count times log γ (0 for an empty count).
    """
    i = tl.arange(0, BT)
    valid = t0 + i < T
    a = tl.load(log_decay_ptr + h).to(tl.float32)
    if HAS_DT:
        w = tl.load(dt_ptr + (b * T + t0 + i) * H + h, mask=valid, other=0.0).to(tl.float32)
        l = tl.where(w > 0, w * a, 0.0)
        next_valid = (i + 1 < BT) & (t0 + i + 1 < T)
        w_next = tl.load(dt_ptr + (b * T + t0 + i + 1) * H + h, mask=next_valid, other=0.0).to(tl.float32)
        lam = tl.cumsum(l, axis=0)
        rest = tl.cumsum(tl.where(w_next > 0, w_next * a, 0.0), axis=0, reverse=True)
        lam_last = tl.sum(l, axis=0)
    else:
        n_valid = tl.minimum(T - t0, BT)
        w = tl.where(valid, 1.0, 0.0)
        l = tl.where(valid, a, 0.0)
        lam = (tl.minimum(i, n_valid - 1) + 1).to(tl.float32) * a
        after = n_valid - 1 - i
        rest = tl.where(after > 0, after.to(tl.float32) * a, 0.0)
        lam_last = n_valid.to(tl.float32) * a
    return lam, rest, lam_last, w, l, a


@triton.jit
def _decay_mask(l, a, BT: tl.constexpr, HAS_DT: tl.constexpr):
    """L_ij = exp(Σ_{j<s≤i} l_s) for i ≥ j, 0 above the diagonal: the window sums of a running
    cumsum down the masked [BT, BT] tile of l (rows s, columns j, kept where s > j), or for a
    constant decay (i − j) · log γ; the diagonal is e⁰ = 1 even for log γ = −∞."""
    i = tl.arange(0, BT)
    if HAS_DT:
        window = tl.cumsum(tl.where(i[:, None] > i[None, :], l[:, None], 0.0), axis=0)
    else:
        window = tl.where(i[:, None] > i[None, :], (i[:, None] - i[None, :]).to(tl.float32) * a, 0.0)
    return tl.where(i[:, None] >= i[None, :], tl.exp(window), 0.0)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation (tensor cores for bf16/fp16 operands).

    Under the CPU interpreter the operands are widened to fp32 first: Triton 3.9's interpreter
    multiplies bf16 bit patterns as integers.  Nothing changes numerically, because the product of
    two bf16 or fp16 numbers is exact in fp32 and the sum is accumulated in fp32 either way.
    """
    if _INTERPRETED:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest (even), as the GPU does.

    Triton 3.9's CPU interpreter truncates fp32 → bf16 instead, which biases every rounded product
    towards zero (≈3× the GPU's error); there we round the fp32 bit pattern to the nearest bf16 first.
    """
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile(ptr, r0, c0, n_rows, row_stride, BR: tl.constexpr, BC: tl.constexpr):
    """The BR×BC tile at (r0, c0) of a row-major matrix with ``n_rows`` rows; rows past the end read as 0."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=rows[:, None] < n_rows, other=0.0)


@triton.jit
def _tile_t(ptr, r0, c0, n_rows, row_stride, BR: tl.constexpr, BC: tl.constexpr):
    """The same tile, transposed (BC×BR), read straight from memory in that order."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    return tl.load(ptr + rows[None, :] * row_stride + cols[:, None], mask=rows[None, :] < n_rows, other=0.0)


@triton.jit
def _store_tile(ptr, x, r0, c0, n_rows, row_stride, BR: tl.constexpr, BC: tl.constexpr):
    """Write the BR×BC tile x at (r0, c0), dropping rows past the end, in the pointer's dtype."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], _cast(x, ptr.dtype.element_ty),
             mask=rows[:, None] < n_rows)


# ------------------------------------------------------------------------------------------------
# Steps 2 + 3: chunk states and state passing (and, reversed, the state gradients)
# ------------------------------------------------------------------------------------------------

@triton.autotune(configs=_configs((4, 2), (4, 3), (8, 2)), key=["BT", "BK", "BV", "HAS_DT", "REVERSE"])
@triton.jit
def _chunk_states_kernel(
    x_ptr, y_ptr,                   # forward: k [B,T,G,K], v [B,T,H,V];  REVERSE: q, do
    dt_ptr, log_decay_ptr,
    first_ptr,                      # [B,H,K,V] fp32 state before the first chunk walked (if HAS_FIRST)
    states_ptr,                     # [B,H,NT,K,V] out: the state before chunk n is folded in
    last_ptr,                       # [B,H,K,V] fp32 out: the state after the last chunk (if STORE_LAST)
    T, H, G, K, V, NT, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DT: tl.constexpr, HAS_FIRST: tl.constexpr, STORE_LAST: tl.constexpr,
    REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One BK×BV tile of one (b, h) state, carried in fp32 across all chunks.

    Forward (REVERSE=False), chunks n = 0, 1, …:   store H_{n−1};  H_n = exp(Λ_last) H_{n−1} + S_n,
        S_n = kᵀ (f ∘ v) with f_j = w_j exp(Λ_last − Λ_j)                     (steps 2 and 3)
    Reverse (REVERSE=True), chunks n = NT−1, …, 0: store dH_n;  dH_{n−1} = exp(Λ_last) dH_n + qᵀ (f ∘ do),
        f_i = scale · exp(Λ_i)                                                 (the adjoint recurrence)
    """
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    g = h // (H // G)
    x_base = x_ptr + (b * T * G + g) * K          # [T, K] view of group g: row stride G·K
    y_base = y_ptr + (b * T * H + h) * V          # [T, V] view of head h: row stride H·V
    state_base = (b * H + h) * K * V
    k0, v0 = i_k * BK, i_v * BV

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_FIRST:
        state = _tile(first_ptr + state_base, k0, v0, K, V, BK, BV).to(tl.float32)

    for step in range(NT):
        if REVERSE:
            n = NT - 1 - step
        else:
            n = step
        t0 = n * BT
        _store_tile(states_ptr + (state_base * NT + n * K * V), state, k0, v0, K, V, BK, BV)

        lam, rest, lam_last, w, _, _ = _chunk_log_decay(dt_ptr, log_decay_ptr, b, h, t0, T, H, BT, HAS_DT)
        if REVERSE:
            f = scale * tl.exp(lam)
        else:
            f = w * tl.exp(rest)
        xT = _tile_t(x_base, t0, k0, T, G * K, BT, BK)          # BK×BT; rows past T read as 0
        y = _tile(y_base, t0, v0, T, H * V, BT, BV)             # BT×BV
        # 2. chunk state S_n = xᵀ (f ∘ y);  3. state passing H_n = exp(Λ_last) H_{n−1} + S_n
        y_weighted = _cast(y.to(tl.float32) * f[:, None], y.dtype)
        state = tl.exp(lam_last) * state + _dot(xT, y_weighted, DOT_PRECISION)

    if STORE_LAST:
        _store_tile(last_ptr + state_base, state, k0, v0, K, V, BK, BV)


# ------------------------------------------------------------------------------------------------
# Steps 1 + 4: diagonal blocks and state → output
# ------------------------------------------------------------------------------------------------

@triton.autotune(configs=_configs((4, 2), (8, 2), (8, 3)),
                 key=["BT", "BK", "BV", "HEADS", "HAS_DT", "HAS_D"])
@triton.jit
def _chunk_output_kernel(
    q_ptr, k_ptr, v_ptr, dt_ptr, log_decay_ptr,
    states_ptr,                     # [B,H,NT,K,V] the state entering each chunk
    D_ptr,                          # [H,V] fp32 (if HAS_D)
    o_ptr,                          # [B,T,H,V] out
    T, H, G, K, V, NT, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HEADS: tl.constexpr,
    HAS_DT: tl.constexpr, HAS_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o for rows t0 … t0+BT−1 of chunk n and columns i_v·BV …, of HEADS heads of one group:

        o = scale · [ (Q ∘ exp(Λ)) H_{n−1}  +  (Q Kᵀ ∘ L ∘ w_j) V ]  +  D ∘ V
              step 4: state → output          step 1: diagonal block

    The raw scores Q Kᵀ belong to the group, not the head: they are formed once and serve the
    HEADS consecutive heads of the program (all of one group), each with its own decays, state
    and values.  SSD's heads share B and C (G = 1 for the benchmark), so this saves most of its
    score products; RetNet (one head per group) runs with HEADS = 1.
    """
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (i_bh // (H // HEADS)).to(tl.int64)
    h_first = (i_bh % (H // HEADS)).to(tl.int64) * HEADS
    g = h_first // (H // G)
    t0, v0 = n * BT, i_v * BV
    q_base = q_ptr + (b * T * G + g) * K          # [T, K] views of group g: row stride G·K
    k_base = k_ptr + (b * T * G + g) * K

    scores = tl.zeros([BT, BT], dtype=tl.float32)      # Q Kᵀ, summed over the K tiles
    for i_k in range(0, tl.cdiv(K, BK)):
        q = _tile(q_base, t0, i_k * BK, T, G * K, BT, BK)
        kT = _tile_t(k_base, t0, i_k * BK, T, G * K, BT, BK)
        scores += _dot(q, kT, DOT_PRECISION)

    for i_h in range(HEADS):
        h = h_first + i_h
        v_base = (b * T * H + h) * V              # [T, V] views of head h: row stride H·V
        h_base = states_ptr + ((b * H + h) * NT + n) * K * V
        o_off = tl.zeros([BT, BV], dtype=tl.float32)   # Q H_{n−1}
        for i_k in range(0, tl.cdiv(K, BK)):
            q = _tile(q_base, t0, i_k * BK, T, G * K, BT, BK)
            h_prev = _tile(h_base, i_k * BK, v0, K, V, BK, BV)
            o_off += _dot(q, h_prev, DOT_PRECISION)

        lam, _, _, w, l, a = _chunk_log_decay(dt_ptr, log_decay_ptr, b, h, t0, T, H, BT, HAS_DT)
        # 4. state -> output: row i of Q H_{n-1} decays by exp(Λ_i) from the chunk's start
        o_off = o_off * tl.exp(lam)[:, None]
        # 1. diagonal block: the masked, weighted scores times the values
        head_scores = scores * _decay_mask(l, a, BT, HAS_DT) * w[None, :]
        v = _tile(v_ptr + v_base, t0, v0, T, H * V, BT, BV)
        o_diag = _dot(_cast(head_scores, v.dtype), v, DOT_PRECISION)

        o = scale * (o_off + o_diag)
        if HAS_D:
            d = tl.load(D_ptr + h * V + v0 + tl.arange(0, BV))
            o += d[None, :] * v.to(tl.float32)
        _store_tile(o_ptr + v_base, o, t0, v0, T, H * V, BT, BV)


# ------------------------------------------------------------------------------------------------
# Backward: the gradients inside each chunk
# ------------------------------------------------------------------------------------------------

@triton.autotune(configs=_configs((4, 2), (8, 1), (8, 2)),
                 key=["BT", "BK", "BV", "HAS_DT", "HAS_D", "DECAY_GRAD", "PER_HEAD"])
@triton.jit
def _chunk_grad_kernel(
    q_ptr, k_ptr, v_ptr, dt_ptr, log_decay_ptr, D_ptr,
    states_ptr,                     # [B,H,NT,K,V] H_{n−1}, the state entering chunk n
    dstates_ptr,                    # [B,H,NT,K,V] dH_n, the gradient of the state leaving chunk n
    do_ptr,                         # [B,T,H,V]
    dq_ptr, dk_ptr,                 # out: [B,T,G,K] in q's dtype, or [B,T,H,K] fp32 per head (PER_HEAD)
    dv_ptr,                         # [B,T,H,V] out
    dl_ptr, dw_ptr,                 # [B,T,H] fp32 out: dL/dl_t and dL/dw_t per token (if DECAY_GRAD)
    dD_ptr,                         # [B,NT,H,V] fp32 out: this chunk's Σ_t do_t ∘ v_t (if HAS_D)
    T, H, G, K, V, NT, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DT: tl.constexpr, HAS_D: tl.constexpr, DECAY_GRAD: tl.constexpr, PER_HEAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """All gradients of chunk n of one (b, h) (formulas in the module docstring).

    With the two BT×BT matrices of the chunk
        A_ij  = scale (q_i·k_j) L_ij        (the forward's scores)
        dA_ij = scale (do_i·v_j) L_ij       (their counterpart with do and v)
    the gradients are
        dv  = w ∘ [ Aᵀ do + exp(Λ_last − Λ) ∘ (K dH_n) ] + D ∘ do
        dq  = (dA ∘ w_j) K + scale · exp(Λ) ∘ (do H_{n−1}ᵀ)
        dk̃ = dAᵀ Q + exp(Λ_last − Λ) ∘ (V dH_nᵀ),     dk = w ∘ dk̃,
    and those of the per-token decay and weight
        dL/dl_t = Σ_{i ≥ t in the chunk} (q_i·dq_i − k_i·dk_i)  +  ⟨dH_n, H_n⟩,     dL/dw_j = k_j·dk̃_j
    (the chunk-local form of the module docstring's identity: paths that leave the chunk are all
    summarised by ⟨dH_n, H_n⟩, so no sum runs over the whole sequence).  Those two are formed only
    when the decay or Δ needs a gradient (``DECAY_GRAD``): RetNet's fixed γ needs neither.

    When the H/G heads of a group share q and k (SSD's B and C), their dq and dk add up: each
    program stores its head's share in fp32 (``PER_HEAD``, [B, T, H, K]) and the host sums the
    group's heads.  (Atomic adds into one [B, T, G, K] buffer measured 0.8 ms slower on the H200 at
    the benchmark's 32 heads per group.)  With one head per group, dq and dk are stored in q's
    dtype directly, with no sum and no cast.
    """
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    g = h // (H // G)
    t0 = n * BT
    q_base = q_ptr + (b * T * G + g) * K          # [T, K] views of group g: row stride G·K
    k_base = k_ptr + (b * T * G + g) * K
    v_base = (b * T * H + h) * V                  # [T, V] views of head h: row stride H·V
    if PER_HEAD:
        dqk_base, dqk_stride = (b * T * H + h) * K, H * K     # [T, K] view of head h in dq, dk
    else:
        dqk_base, dqk_stride = (b * T * G + g) * K, G * K     # [T, K] view of group g (= head h)
    h_base = states_ptr + ((b * H + h) * NT + n) * K * V
    dh_base = dstates_ptr + ((b * H + h) * NT + n) * K * V

    # the raw scores P = Q Kᵀ and dP = dO Vᵀ, summed over the K and V tiles
    P = tl.zeros([BT, BT], dtype=tl.float32)
    dP = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        q = _tile(q_base, t0, i_k * BK, T, G * K, BT, BK)
        kT = _tile_t(k_base, t0, i_k * BK, T, G * K, BT, BK)
        P += _dot(q, kT, DOT_PRECISION)
    for i_v in range(0, tl.cdiv(V, BV)):
        do = _tile(do_ptr + v_base, t0, i_v * BV, T, H * V, BT, BV)
        vT = _tile_t(v_ptr + v_base, t0, i_v * BV, T, H * V, BT, BV)
        dP += _dot(do, vT, DOT_PRECISION)

    lam, rest, lam_last, w, l, a = _chunk_log_decay(dt_ptr, log_decay_ptr, b, h, t0, T, H, BT, HAS_DT)
    L = _decay_mask(l, a, BT, HAS_DT)
    dA = scale * dP * L
    # the three BT×BT matmul operands, rounded once to the input dtype
    A_t = _cast(tl.trans(scale * P * L), q_ptr.dtype.element_ty)
    dA_w = _cast(dA * w[None, :], q_ptr.dtype.element_ty)
    dA_t = _cast(tl.trans(dA), q_ptr.dtype.element_ty)
    to_start = tl.exp(lam)                                 # exp(Λ_i): from the chunk's start to row i
    to_end = tl.exp(rest)                                  # exp(Λ_last − Λ_j): from row j to the chunk's end

    # dv, one V tile at a time
    for i_v in range(0, tl.cdiv(V, BV)):
        do = _tile(do_ptr + v_base, t0, i_v * BV, T, H * V, BT, BV)
        dv_intra = _dot(A_t, do, DOT_PRECISION)
        dv_state = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            k = _tile(k_base, t0, i_k * BK, T, G * K, BT, BK)
            dh = _tile(dh_base, i_k * BK, i_v * BV, K, V, BK, BV)
            dv_state += _dot(k, dh, DOT_PRECISION)
        dv = w[:, None] * (dv_intra + to_end[:, None] * dv_state)
        if HAS_D:
            cols = i_v * BV + tl.arange(0, BV)
            d = tl.load(D_ptr + h * V + cols)
            dv += d[None, :] * do.to(tl.float32)
            v = _tile(v_ptr + v_base, t0, i_v * BV, T, H * V, BT, BV)
            do_v = tl.sum(do.to(tl.float32) * v.to(tl.float32), axis=0)
            tl.store(dD_ptr + ((b * NT + n) * H + h) * V + cols, do_v)
        _store_tile(dv_ptr + v_base, dv, t0, i_v * BV, T, H * V, BT, BV)

    # dq and dk, one K tile at a time, and the two per-token scalars
    # q_i·dq_i − k_i·dk_i and k_j·dk̃_j: first their intra-chunk parts, then the state parts.
    # The intra parts need Σ_j dA_ij (q_i·k_j) w_j and its column sums.  They are formed here, in
    # fp32 from the unrounded scores, rather than from q·dq − k·dk with dq and dk from rounded
    # matmul operands: in bf16 that difference cancels badly (≈10× larger errors in dA).
    if DECAY_GRAD:
        dA_P = dA * P
        r = tl.sum(dA_P * w[None, :], axis=1) - w * tl.sum(dA_P, axis=0)
        dw = tl.sum(dA_P, axis=0)
        h_dh = tl.zeros([BK], dtype=tl.float32)              # ⟨dH_n, H_{n−1}⟩, summed over V
        k_dk_state_total = tl.zeros([BT], dtype=tl.float32)  # Σ_j k_j·(the dH_n part of dk_j)
    for i_k in range(0, tl.cdiv(K, BK)):
        q = _tile(q_base, t0, i_k * BK, T, G * K, BT, BK)
        k = _tile(k_base, t0, i_k * BK, T, G * K, BT, BK)
        dq_state = tl.zeros([BT, BK], dtype=tl.float32)      # do H_{n-1}ᵀ
        dk_state = tl.zeros([BT, BK], dtype=tl.float32)      # V dH_nᵀ
        for i_v in range(0, tl.cdiv(V, BV)):
            do = _tile(do_ptr + v_base, t0, i_v * BV, T, H * V, BT, BV)
            v = _tile(v_ptr + v_base, t0, i_v * BV, T, H * V, BT, BV)
            hT = _tile_t(h_base, i_k * BK, i_v * BV, K, V, BK, BV)
            dhT = _tile_t(dh_base, i_k * BK, i_v * BV, K, V, BK, BV)
            dq_state += _dot(do, hT, DOT_PRECISION)
            dk_state += _dot(v, dhT, DOT_PRECISION)
            if DECAY_GRAD:
                h_dh += tl.sum(hT.to(tl.float32) * dhT.to(tl.float32), axis=0)
        dq_state = scale * to_start[:, None] * dq_state
        dk_state = to_end[:, None] * dk_state
        dq = _dot(dA_w, k, DOT_PRECISION) + dq_state
        dk_tilde = _dot(dA_t, q, DOT_PRECISION) + dk_state
        dk = w[:, None] * dk_tilde
        if DECAY_GRAD:
            k_dk_state = tl.sum(k.to(tl.float32) * dk_state, axis=1)
            r += tl.sum(q.to(tl.float32) * dq_state, axis=1) - w * k_dk_state
            dw += k_dk_state
            k_dk_state_total += w * k_dk_state
        _store_tile(dq_ptr + dqk_base, dq, t0, i_k * BK, T, dqk_stride, BT, BK)
        _store_tile(dk_ptr + dqk_base, dk, t0, i_k * BK, T, dqk_stride, BT, BK)

    if DECAY_GRAD:
        # dL/dl_t = Σ_{i ≥ t in the chunk} dL/dΛ_i, with dL/dΛ_i = r_i and, for the chunk's last
        # row, also ⟨dH_n, H_n⟩ = exp(Λ_last) ⟨dH_n, H_{n−1}⟩ + Σ_j k_j·(the dH_n part of dk_j)
        h_n_dh_n = (tl.exp(lam_last) * tl.sum(h_dh, axis=0)
                    + tl.sum(k_dk_state_total, axis=0))
        dl = tl.cumsum(r, axis=0, reverse=True) + h_n_dh_n
        rows = t0 + tl.arange(0, BT)
        token = (b * T + rows) * H + h
        tl.store(dl_ptr + token, dl, mask=rows < T)
        tl.store(dw_ptr + token, dw, mask=rows < T)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 products for fp32 inputs (exact tests); bf16/fp16 operands ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _states(x, y, dt, log_decay, first, *, scale, chunk_size, reverse, store_last):
    """Launch ``_chunk_states_kernel``: returns (per-chunk states [B,H,NT,K,V] in x.dtype, last or None)."""
    B, T, G, K = x.shape
    H, V = y.shape[2], y.shape[3]
    NT = triton.cdiv(T, chunk_size)
    BK, BV = _tiles("states", K, V, chunk_size, x.dtype)
    states = x.new_empty(B, H, NT, K, V)
    last = x.new_empty(B, H, K, V, dtype=torch.float32) if store_last else None
    grid = (K // BK, V // BV, B * H)
    _chunk_states_kernel[grid](
        x, y, dt if dt is not None else log_decay, log_decay,
        first if first is not None else states, states, last if last is not None else states,
        T, H, G, K, V, NT, scale,
        BT=chunk_size, BK=BK, BV=BV, HAS_DT=dt is not None, HAS_FIRST=first is not None,
        STORE_LAST=store_last, REVERSE=reverse, DOT_PRECISION=_dot_precision(x.dtype),
    )
    return states, last


def _forward(q, k, v, log_decay, dt, D, initial_state, scale, chunk_size, output_final_state):
    B, T, G, K = q.shape
    H, V = v.shape[2], v.shape[3]
    NT = triton.cdiv(T, chunk_size)
    BK, BV = _tiles("output", K, V, chunk_size, q.dtype)
    # steps 2 + 3
    states, final = _states(k, v, dt, log_decay, initial_state, scale=scale, chunk_size=chunk_size,
                            reverse=False, store_last=output_final_state)
    # steps 1 + 4
    o = torch.empty_like(v)
    heads = _heads_per_program(H // G)
    _chunk_output_kernel[(V // BV, NT, B * H // heads)](
        q, k, v, dt if dt is not None else log_decay, log_decay, states,
        D if D is not None else log_decay, o,
        T, H, G, K, V, NT, scale,
        BT=chunk_size, BK=BK, BV=BV, HEADS=heads, HAS_DT=dt is not None, HAS_D=D is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    return o, final


def _backward(q, k, v, log_decay, dt, D, initial_state, scale, chunk_size, do, dfinal, decay_grad):
    """All input gradients; those of log_decay and dt (None) are skipped unless ``decay_grad``."""
    B, T, G, K = q.shape
    H, V = v.shape[2], v.shape[3]
    NT = triton.cdiv(T, chunk_size)
    BK, BV = _tiles("grad", K, V, chunk_size, q.dtype)
    # recompute the states entering each chunk
    states, _ = _states(k, v, dt, log_decay, initial_state, scale=scale, chunk_size=chunk_size,
                        reverse=False, store_last=False)
    # the adjoint recurrence: dH_n leaving each chunk, and dH_{-1} = d initial_state
    dstates, dinitial = _states(q, do, dt, log_decay, dfinal, scale=scale, chunk_size=chunk_size,
                                reverse=True, store_last=True)
    per_head = G < H                    # the heads of a group share q and k: their gradients add up
    dq = q.new_empty(B, T, H, K, dtype=torch.float32) if per_head else torch.empty_like(q)
    dk = torch.empty_like(dq) if per_head else torch.empty_like(k)
    dv = torch.empty_like(v)
    dl = q.new_empty(B, T, H, dtype=torch.float32) if decay_grad else None
    dw = torch.empty_like(dl) if decay_grad else None
    dD = q.new_empty(B, NT, H, V, dtype=torch.float32) if D is not None else None
    unused = dv                         # any tensor: a pointer the kernel never dereferences
    _chunk_grad_kernel[(NT, B * H)](
        q, k, v, dt if dt is not None else log_decay, log_decay, D if D is not None else log_decay,
        states, dstates, do, dq, dk, dv, dl if decay_grad else unused, dw if decay_grad else unused,
        dD if D is not None else unused,
        T, H, G, K, V, NT, scale,
        BT=chunk_size, BK=BK, BV=BV, HAS_DT=dt is not None, HAS_D=D is not None,
        DECAY_GRAD=decay_grad, PER_HEAD=per_head, DOT_PRECISION=_dot_precision(q.dtype),
    )
    if per_head:
        dq = dq.view(B, T, G, H // G, K).sum(3).to(q.dtype)
        dk = dk.view(B, T, G, H // G, K).sum(3).to(k.dtype)
    dlog_decay = ddt = None
    if decay_grad and dt is not None:
        dlog_decay = (dl * dt.float()).sum((0, 1))
        ddt = dl * log_decay.float() + dw
    elif decay_grad:
        dlog_decay = dl.sum((0, 1))
    if D is not None:
        dD = dD.sum((0, 1))                                                   # [H, V]
    return dq, dk, dv, dlog_decay, ddt, dD, dinitial


class _ScalarDecayChunked(torch.autograd.Function):
    """Autograd wiring: Triton forward, Triton backward (states are recomputed, not saved)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, dt, D, initial_state, scale, chunk_size, output_final_state):
        o, final = _forward(q, k, v, log_decay, dt, D, initial_state, scale, chunk_size, output_final_state)
        ctx.save_for_backward(q, k, v, log_decay, dt, D, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)       # an unused output's gradient arrives as None
        return (o, final) if output_final_state else o

    @staticmethod
    def backward(ctx, do, dfinal=None):
        q, k, v, log_decay, dt, D, initial_state = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        decay_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]      # log_decay, dt
        dq, dk, dv, dlog_decay, ddt, dD, dinitial = _backward(
            q, k, v, log_decay, dt, D, initial_state, ctx.scale, ctx.chunk_size, do, dfinal,
            decay_grad)
        return (dq, dk, dv, dlog_decay, None if ddt is None else ddt.to(dt.dtype), dD,
                None if initial_state is None else dinitial, None, None, None)


# ------------------------------------------------------------------------------------------------
# The same forward and backward as PyTorch operators, for torch.compile (kernels/_compile.py)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("lecture_kit::scalar_decay_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                dt: torch.Tensor | None, D: torch.Tensor | None, initial_state: torch.Tensor | None,
                scale: float, chunk_size: int, output_final_state: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    o, final = _forward(q, k, v, log_decay, dt, D, initial_state, scale, chunk_size, output_final_state)
    return o, absent(final, log_decay)


@_forward_op.register_fake
def _(q, k, v, log_decay, dt, D, initial_state, scale, chunk_size, output_final_state):
    B, K, (H, V) = q.shape[0], q.shape[3], v.shape[2:]
    final = (log_decay.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state
             else log_decay.new_empty(0))
    return torch.empty_like(v), final


@torch.library.custom_op("lecture_kit::scalar_decay_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                 dt: torch.Tensor | None, D: torch.Tensor | None, initial_state: torch.Tensor | None,
                 do: torch.Tensor, dfinal: torch.Tensor | None, scale: float, chunk_size: int,
                 decay_grad: bool) -> list[torch.Tensor]:
    grads = _backward(q, k, v, log_decay, dt, D, initial_state, scale, chunk_size, do, dfinal,
                      decay_grad)
    return [absent(g, log_decay) for g in grads]


@_backward_op.register_fake
def _(q, k, v, log_decay, dt, D, initial_state, do, dfinal, scale, chunk_size, decay_grad):
    empty = log_decay.new_empty(0)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(log_decay, dtype=torch.float32) if decay_grad else empty,
            torch.empty_like(dt, dtype=torch.float32) if decay_grad and dt is not None else empty,
            D.new_empty(D.shape, dtype=torch.float32) if D is not None else empty,
            torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else empty]


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, dt, D, initial_state, scale, chunk_size, output_final_state = inputs
    ctx.save_for_backward(q, k, v, log_decay, dt, D, initial_state)
    ctx.scale, ctx.chunk_size, ctx.output_final_state = scale, chunk_size, output_final_state


def _backward_of_op(ctx, do, dfinal):
    q, k, v, log_decay, dt, D, initial_state = ctx.saved_tensors
    decay_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dfinal = dfinal.float().contiguous() if ctx.output_final_state and dfinal is not None else None
    dq, dk, dv, dlog_decay, ddt, dD, dinitial = _backward_op(
        q, k, v, log_decay, dt, D, initial_state, do, dfinal, ctx.scale, ctx.chunk_size, decay_grad)
    return (dq, dk, dv, present(dlog_decay, log_decay) if decay_grad else None,
            present(ddt, dt) if decay_grad else None, present(dD, D), present(dinitial, initial_state),
            None, None, None)


_forward_op.register_autograd(_backward_of_op, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

_CHUNK_SIZES = (16, 32, 64, 128)


def _check(q, k, v, log_decay, dt, scale, D, initial_state, output_final_state):
    """The checks of a direct call, in this function's words (``ssd.kernel`` and ``retnet.kernel``
    check theirs against their specs and pass the result as ``checked``)."""
    sig = Signature("scalar_decay_chunked")
    sig.tensor("q", q, "B T G K")
    sig.tensor("k", k, "B T G K")
    sig.tensor("v", v, "B T H V")
    sig.tensor("log_decay", log_decay, "H", same_dtype=False)
    sig.optional("dt", dt, "B T H", same_dtype=False)
    sig.one_of("D", D, "H", "H V")
    sig.optional("initial_state", initial_state, "B H K V", same_dtype=False)
    sig.at_least_one("T")
    sig.at_least_one("K")
    sig.groups_divide("G", "H")
    sig.scalar("scale", scale)
    sig.flag("output_final_state", output_final_state)
    sig.values([("log_decay", log_decay, "<= 0")] + ([] if dt is None else [("dt", dt, ">= 0")]))
    return sig


def scalar_decay_chunked(q, k, v, log_decay, *, dt=None, scale=1.0, D=None,
                         initial_state=None, output_final_state=False, chunk_size=64, checked=None):
    """Chunkwise scalar-decay linear attention in Triton (module docstring: the math and the grid).

    Shapes: q, k [B, T, G, K] (G divides H; head h reads group h // (H/G)); v [B, T, H, V];
    log_decay [H] (≤ 0); dt None or [B, T, H] (≥ 0); D None, [H] or [H, V];
    initial_state None or [B, H, K, V].  Returns (o [B, T, H, V] in v.dtype, final state
    [B, H, K, V] fp32 or None).

        S_t = exp(l_t) S_{t−1} + w_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t + D ∘ v_t,
        l_t = dt_t · log_decay[h], w_t = dt_t   (dt given: SSD with q = C, k = B, v = x)
        l_t = log_decay[h],        w_t = 1      (dt None: RetNet)

    Inputs bf16, fp16 or fp32 (q, k, v in one dtype; dt, log_decay, D, initial_state any float
    dtype, used in fp32).  K and V must be powers of two in 16 … 256; chunk_size one of 16, 32, 64,
    128; T ≥ 1 (any length); B, H or V = 0 give empty results.  Differentiable in q, k, v,
    log_decay, dt, D and initial_state, with Triton backward kernels.

    ``checked``: the ``Signature`` with which ``ssd.kernel`` or ``retnet.kernel`` has checked these
    arguments against its spec; then only what this kernel adds is checked here (dtypes, head and
    chunk sizes, the device), in the caller's words (x, B, C, A, N, P for SSD).  None: a direct
    call, checked in full here.
    """
    sig = _check(q, k, v, log_decay, dt, scale, D, initial_state, output_final_state) \
        if checked is None else checked
    scale = float(scale)
    sig.kernel_dtype()
    K, V = sig.kernel_head_size("K"), sig.kernel_head_size("V", zero_ok=True)
    chunk_size = sig.kernel_chunk_size(chunk_size, _CHUNK_SIZES)
    T, H = sig.size("T"), sig.size("H")
    sig.kernel_offsets(max(T * H * max(K, V), triton.cdiv(T, chunk_size) * K * V))
    sig.kernel_device(INTERPRETED)
    empty = sig.empty_result(v, output_final_state)
    if empty is not None:           # B, H or V is 0: nothing to compute
        return empty

    if D is not None:
        D = D if D.dim() == 2 else D[:, None].expand(H, V)
    # the kernels read every tensor through row-major strides: make them contiguous (no-ops when
    # they already are); decays, D and the initial state in fp32
    args = [q.contiguous(), k.contiguous(), v.contiguous(), log_decay.float().contiguous(),
            None if dt is None else dt.contiguous(),
            None if D is None else D.float().contiguous(),
            None if initial_state is None else initial_state.float().contiguous()]
    if torch.compiler.is_compiling():
        o, final = _forward_op(*args, scale, chunk_size, output_final_state)
        return o, (final if output_final_state else None)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        out = _ScalarDecayChunked.apply(*args, scale, chunk_size, output_final_state)
        return out if output_final_state else (out, None)
    # nothing to differentiate: the kernels alone, without autograd's bookkeeping on the host
    return _forward(*args, scale, chunk_size, output_final_state)
