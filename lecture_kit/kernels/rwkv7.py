r"""RWKV-7's generalised delta rule (a DPLR transition), chunkwise, in Triton.

The recurrence (fla layout, per batch b and head h; state S_t ∈ R^{K×V}, fp32)::

    S_t = (diag(exp w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ          w_t ≤ 0 is the *log* decay
    o_t = scale · S_tᵀ r_t

The chunkwise algorithm is math.md §4.3 (the WY / UT transform), with the same symbols.  Cut the
sequence into chunks of C rows (the last one may be short).  Inside a chunk, with row indices i, j:

    Γ_i  = Σ_{s≤i} w_s     chunk-local cumulative log decay (fp32, ≤ 0, non-increasing in i)
    Γ⁻_i = Γ_i − w_i       its exclusive version (= Γ_{i-1}; 0 on the first row)
    Γ_C  = Γ of the chunk's last row

    A^{qk}_ij = Σ_d r_id k_jd e^{Γ_id − Γ_jd}    A^{qb}_ij = Σ_d r_id b_jd e^{Γ_id − Γ_jd}     (j ≤ i)
    A^{ak}_ij = Σ_d a_id k_jd e^{Γ⁻_id − Γ_jd}   A^{ab}_ij = Σ_d a_id b_jd e^{Γ⁻_id − Γ_jd}    (j < i)

    𝒯 = (I − A^{ab})⁻¹          (unit lower-triangular; forward substitution in fp32)
    U = 𝒯 A^{ak} V               W = 𝒯 (a ⊙ e^{Γ⁻})

and then, sequentially over chunks, with S₀ the state entering the chunk:

    𝒱 = U + W S₀                                      the pseudo-values ν_i = a_iᵀ S_{i-1}
    O = A^{qk} V + A^{qb} 𝒱 + (r ⊙ e^{Γ}) S₀          (times scale)
    S ← e^{Γ_C} ⊙ S₀ + (k ⊙ e^{Γ_C−Γ})ᵀ V + (b ⊙ e^{Γ_C−Γ})ᵀ 𝒱

Numerics (math.md §4.4, §7).  Every exponent is ≤ 0 and the causal mask is applied *before* ``exp``
(masked exponents are set to −∞), so the kernel is correct for any w ≤ 0, strong gates included
(w = −5 and beyond): no bound on |w| is assumed and no factorisation e^{x_i}·e^{−x_j} is used.  The
four intra-chunk matrices are therefore computed pairwise on CUDA cores in fp32 (for C = 16 that is
2·C·K exponentials per row, cheap next to the memory traffic).  Cumulative sums, the solve, U, W,
the state and all accumulation are fp32; intermediates are stored in fp32.

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
tile of the scan kernel, V is tiled in slices of 32.  ``chunk_size`` ∈ {16, 32, 64} with
chunk_size·K ≤ 4096 (16 for any K, 32 for K ≤ 128, 64 for K ≤ 64; the scan's per-chunk tiles must fit
in shared memory); 16, fla's choice for DPLR, is the default and the fast one.  Matrix products
(``tl.dot``) use ``input_precision="ieee"`` for fp32 inputs (exact, but CUDA cores: the slow path) and
TF32 for bf16/fp16 inputs (whose own rounding, 2⁻⁸, dominates TF32's 2⁻¹¹).  The output is rounded
to its dtype to nearest even.  Scratch memory between the phases, per token and head, in fp32:
4 rows of K (W and the three decayed operands), one of V (U) and two of C (A^{qk}, A^{qb}).

Autograd: the forward pass is the Triton code; the **backward pass is not Triton**: it recomputes
the forward with ``lecture_kit.rwkv7.chunked`` (the PyTorch form of the same algorithm, in fp32,
same chunk size) and differentiates that with autograd.  Exact up to fp32 rounding, but not fast
(a Python loop over chunks) and it keeps O(B·H·T·C·K) floats alive for the recomputation.
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["rwkv7_chunked"]


# --------------------------------------------------------------------------------------------------
# Phase 1: everything that depends on one chunk only (all chunks in parallel)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rwkv7_chunk_intra_kernel(
    r, w, k, v, a, b,                      # inputs, [B, T, H, K] (v: [B, T, H, V]), contiguous
    A_qk, A_qb, U, W,                      # outputs: [B, H, T, C], [B, H, T, C], [B, H, T, V], [B, H, T, K]
    r_dec, k_dec, b_dec, g_last,           # outputs: [B, H, T, K] ×3 and e^{Γ_C}: [B, H, NT, K]
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BKW: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    incl = (jj <= ii)[:, :, None]          # [C, C, 1]  j ≤ i
    strict = (jj < ii)[:, :, None]         # [C, C, 1]  j < i

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
        r_c = tl.load(r + x_off, mask=row_ok, other=0.0).to(tl.float32)
        k_c = tl.load(k + x_off, mask=row_ok, other=0.0).to(tl.float32)
        a_c = tl.load(a + x_off, mask=row_ok, other=0.0).to(tl.float32)
        b_c = tl.load(b + x_off, mask=row_ok, other=0.0).to(tl.float32)

        G = tl.cumsum(w_c, axis=0)                                         # Γ_i      [C, BK]
        G_excl = G - w_c                                                   # Γ⁻_i
        G_C = tl.sum(tl.where(ii == C - 1, G, 0.0), axis=0)                # Γ_C      [BK]

        # pairwise decays e^{Γ_i − Γ_j} (j ≤ i) and e^{Γ⁻_i − Γ_j} (j < i): mask, then exp
        E_incl = tl.exp(tl.where(incl, G[:, None, :] - G[None, :, :], float("-inf")))        # [C, C, BK]
        E_strict = tl.exp(tl.where(strict, G_excl[:, None, :] - G[None, :, :], float("-inf")))
        A_qk_acc += tl.sum(r_c[:, None, :] * k_c[None, :, :] * E_incl, axis=2)
        A_qb_acc += tl.sum(r_c[:, None, :] * b_c[None, :, :] * E_incl, axis=2)
        A_ak_acc += tl.sum(a_c[:, None, :] * k_c[None, :, :] * E_strict, axis=2)
        A_ab_acc += tl.sum(a_c[:, None, :] * b_c[None, :, :] * E_strict, axis=2)

        # decayed operands of the sequential phase (exponents ≤ 0)
        out_off = out_rows[:, None] * K + d[None, :]
        tl.store(r_dec + out_off, r_c * tl.exp(G), mask=row_ok)                       # r ⊙ e^{Γ}
        tl.store(k_dec + out_off, k_c * tl.exp(G_C[None, :] - G), mask=row_ok)        # k ⊙ e^{Γ_C−Γ}
        tl.store(b_dec + out_off, b_c * tl.exp(G_C[None, :] - G), mask=row_ok)        # b ⊙ e^{Γ_C−Γ}
        tl.store(g_last + (i_bh * NT + i_n) * K + d, tl.exp(G_C))                     # e^{Γ_C}

    A_off = out_rows[:, None] * C + jj
    tl.store(A_qk + A_off, A_qk_acc, mask=row_ok)
    tl.store(A_qb + A_off, A_qb_acc, mask=row_ok)

    # ---- UT transform: 𝒯 = (I − A^{ab})⁻¹ by forward substitution, row by row ----------------------
    # row i of 𝒯 is e_i + Σ_{j<i} A^{ab}_ij 𝒯_j; A^{ab} is strictly lower, so summing over all j is
    # the same, and rows j < i are final when row i is formed.
    T_ut = (ii == jj).to(tl.float32)
    for row in range(1, C):
        A_ab_row = tl.sum(tl.where(ii == row, A_ab_acc, 0.0), axis=0)       # A^{ab}[row, :]   [C]
        T_row = tl.sum(A_ab_row[:, None] * T_ut, axis=0)                     # Σ_j A^{ab}_{row,j} 𝒯_j
        T_ut += tl.where(ii == row, T_row[None, :], 0.0)

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
        w_c = tl.load(w + x_off, mask=row_ok, other=0.0).to(tl.float32)
        a_c = tl.load(a + x_off, mask=row_ok, other=0.0).to(tl.float32)
        G_excl = tl.cumsum(w_c, axis=0) - w_c
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
def _rwkv7_chunk_scan_kernel(
    v, A_qk, A_qb, U, W, r_dec, k_dec, b_dec, g_last,      # phase-1 outputs and the values
    o, S_init, S_final,                                    # o: [B, T, H, V]; states: [B, H, K, V] fp32
    T, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_v = tl.program_id(0)                 # which V-slice of the state
    i_bh = tl.program_id(1).to(tl.int64)   # which (batch, head)
    i_b = i_bh // H
    i_h = i_bh % H

    i = tl.arange(0, C)
    d = tl.arange(0, K)                    # the whole key dimension
    e = i_v * BV + tl.arange(0, BV)        # this program's slice of the value dimension
    state_off = i_bh * K * V + d[:, None] * V + e[None, :]
    v_base = (i_b * T * H + i_h) * V       # v and o are [B, T, H, V]

    if HAS_INITIAL_STATE:
        S = tl.load(S_init + state_off)                                   # S₀ [K, BV] fp32
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)

    for i_n in range(NT):
        t = (i_n * C + i).to(tl.int64)
        row_ok = (t < T)[:, None]
        rows = i_bh * T + t                                               # rows of [B, H, T, ·] buffers
        K_off = rows[:, None] * K + d[None, :]
        W_c = tl.load(W + K_off, mask=row_ok, other=0.0)                  # [C, K]
        r_c = tl.load(r_dec + K_off, mask=row_ok, other=0.0)              # r ⊙ e^{Γ}
        k_c = tl.load(k_dec + K_off, mask=row_ok, other=0.0)              # k ⊙ e^{Γ_C−Γ}
        b_c = tl.load(b_dec + K_off, mask=row_ok, other=0.0)              # b ⊙ e^{Γ_C−Γ}
        g_C = tl.load(g_last + (i_bh * NT + i_n) * K + d)                 # e^{Γ_C}  [K]
        A_off = rows[:, None] * C + i[None, :]
        Aqk_c = tl.load(A_qk + A_off, mask=row_ok, other=0.0)             # [C, C]
        Aqb_c = tl.load(A_qb + A_off, mask=row_ok, other=0.0)
        U_c = tl.load(U + rows[:, None] * V + e[None, :], mask=row_ok, other=0.0)        # [C, BV]
        io_off = v_base + t[:, None] * (H * V) + e[None, :]
        v_c = tl.load(v + io_off, mask=row_ok, other=0.0).to(tl.float32)                # [C, BV]

        Vp = U_c + tl.dot(W_c, S, input_precision=DOT_PRECISION)                        # 𝒱 = U + W S₀
        O_c = (tl.dot(Aqk_c, v_c, input_precision=DOT_PRECISION)                        # A^{qk} V
               + tl.dot(Aqb_c, Vp, input_precision=DOT_PRECISION)                       # + A^{qb} 𝒱
               + tl.dot(r_c, S, input_precision=DOT_PRECISION))                         # + (r ⊙ e^Γ) S₀
        S = (g_C[:, None] * S                                                           # e^{Γ_C} ⊙ S₀
             + tl.dot(tl.trans(k_c), v_c, input_precision=DOT_PRECISION)                # + (k ⊙ e^{Γ_C−Γ})ᵀ V
             + tl.dot(tl.trans(b_c), Vp, input_precision=DOT_PRECISION))                # + (b ⊙ e^{Γ_C−Γ})ᵀ 𝒱
        tl.store(o + io_off, _round_to(scale * O_c, o.dtype.element_ty), mask=row_ok)

    if STORE_FINAL_STATE:
        tl.store(S_final + state_off, S)


# --------------------------------------------------------------------------------------------------
# Host side: checks, launch, autograd
# --------------------------------------------------------------------------------------------------
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CHUNK_SIZES = (16, 32, 64)


def _check_inputs(r, w, k, v, a, b, initial_state, chunk_size):
    """Raise ValueError, naming the argument, for anything the kernels do not support."""
    for name, x in (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"rwkv7_chunked: {name} must be a 4-d tensor "
                             f"[B, T, H, {'V' if name == 'v' else 'K'}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, T, H, K = r.shape
    V = v.shape[-1]
    for name, x in (("w", w), ("k", k), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"rwkv7_chunked: {name} must have shape [B, T, H, K] = {tuple(r.shape)} "
                             f"like r, got {tuple(x.shape)}")
    if v.shape[:3] != r.shape[:3]:
        raise ValueError(f"rwkv7_chunked: v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], "
                         f"got {tuple(v.shape)}")
    if T < 1 or B < 1 or H < 1:
        raise ValueError(f"rwkv7_chunked: B, T, H must be ≥ 1, got r of shape {tuple(r.shape)}")
    for name, n in (("K (last dim of r, w, k, a, b)", K), ("V (last dim of v)", V)):
        if n < 16 or n > 256 or n & (n - 1):
            raise ValueError(f"rwkv7_chunked: {name} must be a power of two in 16..256, got {n}")
    dtype = r.dtype
    if dtype not in _KERNEL_DTYPES:
        raise ValueError(f"rwkv7_chunked: r must be bf16, fp16 or fp32, got {dtype} "
                         "(fp64: use the PyTorch forms in lecture_kit.rwkv7)")
    for name, x in (("k", k), ("v", v), ("a", a), ("b", b)):
        if x.dtype != dtype:
            raise ValueError(f"rwkv7_chunked: {name} must have r's dtype {dtype}, got {x.dtype}")
    if w.dtype not in (dtype, torch.float32):
        raise ValueError(f"rwkv7_chunked: w must have r's dtype {dtype} or fp32, got {w.dtype}")
    for name, x in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.device != r.device:
            raise ValueError(f"rwkv7_chunked: {name} is on {x.device}, r on {r.device}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(f"rwkv7_chunked: initial_state must be [B, H, K, V] = {(B, H, K, V)}, got "
                             f"{tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else initial_state}")
        if initial_state.device != r.device:
            raise ValueError(f"rwkv7_chunked: initial_state is on {initial_state.device}, r on {r.device}")
        if not initial_state.is_floating_point() or initial_state.dtype == torch.float64:
            raise ValueError(f"rwkv7_chunked: initial_state must be fp32 (or bf16/fp16, promoted), "
                             f"got {initial_state.dtype}")
    if chunk_size not in _CHUNK_SIZES or chunk_size * K > 4096:
        raise ValueError(f"rwkv7_chunked: chunk_size must be one of {_CHUNK_SIZES} with chunk_size·K ≤ 4096 "
                         f"(16 for any K, 32 for K ≤ 128, 64 for K ≤ 64), got chunk_size={chunk_size}, K={K}")
    if r.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("rwkv7_chunked: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before triton is imported (importing lecture_kit first does this without CUDA)")
    if not bool((w <= 0).all()):   # one reduction and one device sync per call; NaN fails too
        raise ValueError("rwkv7_chunked: w is the log decay and must be ≤ 0 everywhere, "
                         f"got max(w) = {w.max().item():.4g}")


def _forward_triton(r, w, k, v, a, b, scale, initial_state, output_final_state, C):
    """Launch the two phases; return (o in v.dtype, final state fp32 or None)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, C)
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    dev = r.device
    f32 = dict(device=dev, dtype=torch.float32)
    A_qk = torch.empty(B, H, T, C, **f32)
    A_qb = torch.empty(B, H, T, C, **f32)
    U = torch.empty(B, H, T, V, **f32)
    W, r_dec, k_dec, b_dec = (torch.empty(B, H, T, K, **f32) for _ in range(4))
    g_last = torch.empty(B, H, NT, K, **f32)
    dot_precision = "ieee" if r.dtype == torch.float32 else "tf32"

    # phase 1: the pairwise [C, C, BK] products are kept at ≤ 4096 elements (32 registers a thread)
    BK = min(K, max(1, 4096 // (C * C)))
    _rwkv7_chunk_intra_kernel[(NT, B * H)](
        r, w, k, v, a, b, A_qk, A_qb, U, W, r_dec, k_dec, b_dec, g_last, T, NT,
        H=H, K=K, V=V, C=C, BK=BK, BKW=min(K, 64), BV=min(V, 64), DOT_PRECISION=dot_precision,
        num_warps=4, num_stages=1,
    )

    # phase 2: one program per (V-slice, batch·head); 32-wide slices give enough programs at small B·H
    o = torch.empty_like(v)
    S_final = torch.empty(B, H, K, V, **f32) if output_final_state else None
    S_init = initial_state.float().contiguous() if initial_state is not None else None
    BV = min(V, 32)
    _rwkv7_chunk_scan_kernel[(V // BV, B * H)](
        v, A_qk, A_qb, U, W, r_dec, k_dec, b_dec, g_last,
        o, S_init if S_init is not None else o, S_final if S_final is not None else o,
        T, NT, float(scale),
        H=H, K=K, V=V, C=C, BV=BV,
        HAS_INITIAL_STATE=S_init is not None, STORE_FINAL_STATE=output_final_state,
        DOT_PRECISION=dot_precision,
        # two pipeline stages prefetch the next chunk's operands; past C·K = 2048 they cost too much shared memory
        num_warps=4 if K <= 128 else 8, num_stages=2 if C * K <= 2048 else 1,
    )
    return o, S_final


class _RWKV7Chunked(torch.autograd.Function):
    """Forward: the Triton kernels.  Backward: autograd through ``lecture_kit.rwkv7.chunked`` in fp32."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, scale, output_final_state, chunk_size):
        o, S = _forward_triton(r, w, k, v, a, b, scale, initial_state, output_final_state, chunk_size)
        ctx.save_for_backward(r, w, k, v, a, b, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        if S is not None:
            return o, S
        return o, None

    @staticmethod
    def backward(ctx, do, dS):
        from lecture_kit.rwkv7 import chunked      # the PyTorch form; imported here to avoid an import cycle

        saved = ctx.saved_tensors
        inputs = saved[:6]
        initial_state = saved[6]
        with torch.enable_grad():
            xs = [x.detach().float().requires_grad_(needs) for x, needs in zip(inputs, ctx.needs_input_grad[:6])]
            S0 = None
            if initial_state is not None:
                S0 = initial_state.detach().float().requires_grad_(ctx.needs_input_grad[6])
            o, S = chunked(*xs, scale=ctx.scale, initial_state=S0, output_final_state=True,
                           chunk_size=ctx.chunk_size)
            outs, grads_out = [o], [do.float()]
            if dS is not None:
                outs.append(S)
                grads_out.append(dS.float())
            wrt = [x for x in xs + [S0] if x is not None and x.requires_grad]
            grads = iter(torch.autograd.grad(outs, wrt, grads_out, allow_unused=True)) if wrt else iter(())
        result = []
        for x, orig in zip(xs + [S0], list(inputs) + [initial_state]):
            if x is not None and x.requires_grad:
                g = next(grads)
                result.append(None if g is None else g.to(orig.dtype))
            else:
                result.append(None)
        return (*result, None, None, None)


def rwkv7_chunked(r, w, k, v, a, b, *, scale=1.0, initial_state=None, output_final_state=False,
                  chunk_size=16):
    """RWKV-7 generalised delta rule, chunkwise Triton kernel (see the module docstring for the math).

    Args:
        r, w, k, a, b: [B, T, H, K] — receptance (query), log decay w ≤ 0 (may be fp32), key, and the
            two vectors of the rank-1 transition term b aᵀ (RWKV-7: a = −κ̂, b = κ̂ ⊙ a_icl).
        v: [B, T, H, V].
        scale: multiplies the output (RWKV-7 uses 1.0).
        initial_state: None or [B, H, K, V] fp32 (fla layout: S ∈ R^{K×V}).
        output_final_state: also return S_T.
        chunk_size: 16 (default), 32 or 64.

    Returns:
        (o [B, T, H, V] in v.dtype, final state [B, H, K, V] fp32 or None).

    Differentiable in r, w, k, v, a, b and initial_state; the backward pass recomputes through the
    PyTorch chunked form (see the module docstring).
    """
    _check_inputs(r, w, k, v, a, b, initial_state, chunk_size)
    o, S = _RWKV7Chunked.apply(r, w, k, v, a, b, initial_state, float(scale), bool(output_final_state),
                               int(chunk_size))
    return o, (S if output_final_state else None)
