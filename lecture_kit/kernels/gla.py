"""Gated linear attention (GLA): the Triton chunkwise kernel.  The algorithm of reference/math.md §3.2.

Per batch element and head, with log forget gate g_t ∈ R^K (g ≤ 0) and state S_t ∈ R^{K×V} (fp32):

    S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ            o_t = scale · S_tᵀ q_t

Chunkwise form.  Cut time into chunks of C tokens (default 64) and each chunk into sub-chunks of c = 16.
Inside chunk [i] let b be the *chunk-local* cumulative sum of g (fp32, reset at every chunk start, so
b ≤ 0 and b decreases down the chunk); b_C is its value at the chunk's last token and S_[i] the state
entering the chunk.  Stacking the chunk's rows into Q, K (C×K) and V (C×V):

    step 0  chunk-local cumsum       b_r = g_1 + … + g_r                      (r = 1..C inside the chunk)
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

Two kernels (the "materialising" schedule of the GLA paper, FLA's ``chunk`` mode):

* ``_chunk_states_kernel`` — grid (K/BK, V/BV, B·H).  One program owns a BK×BV tile of one head's
  state and walks the chunks in order: it stores S_[i] (the state *entering* chunk i, fp32, to
  ``h [B, H, NT, K, V]``), then applies step 1.  On the way it computes step 0 and, in the programs of
  the first V tile, stores b (fp32, ``[B, T, H, K]``) for the second kernel.  The last S is the final state.
* ``_chunk_output_kernel`` — grid (V/BV, NT, B·H), every chunk in parallel.  One program computes the
  C×BV tile of the output of one chunk: for each K tile it adds step 2 to O and steps 3–4 to the C×C
  score matrix A (kept in registers, never written to memory), then step 5.

Ragged T is handled by masks (no padded copies): rows past T load as zero and are excluded from every
exponent.  fp32 inputs use ``input_precision="ieee"`` matmuls (exact enough for 1e-5 tests); bf16 and
fp16 use tensor cores with fp32 accumulation.  fp16 caveat: S_[i] is rounded to the input dtype for the
tensor-core product of step 2, so states beyond fp16's range (~6.5e4) would overflow; use bf16 there.

Backward: a ``torch.autograd.Function`` whose backward *recomputes* the forward with the PyTorch
chunked form ``lecture_kit.gla.chunked`` (the same steps 0–5, in fp32) and differentiates it with
autograd — there are no Triton backward kernels yet.  Gradients are fp32-accurate, but the backward
runs at PyTorch speed and holds O(T·c·K) fp32 intermediates per head (the pairwise diagonal sub-blocks).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["gla_chunked"]

SUB_CHUNK = 16  # c: the sub-chunk of steps 3-4 (FLA's BC); also the smallest tensor-core tile.

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------------
# Tiles.  BK = min(64, K) is fixed on the host; BV, num_warps and num_stages are chosen by timing a few
# configurations on the first call for each (K, V, C, dtypes) on a GPU (its cost is part of the first
# call's compile time).  Under the CPU interpreter exactly one configuration runs, with BK = BV = 16,
# which fits every K and V and makes the small test sizes exercise the tiling over K and V.
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
    """x rounded to the input dtype (that of the pointer ``like``): matmul operands and the output.

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


# ------------------------------------------------------------------------------------------------------
# Kernel 1: steps 0 and 1, sequential over chunks.
# ------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs([(64, 4, 2), (32, 4, 2), (64, 4, 3)]),  # (BV, num_warps, num_stages)
    key=["K", "V", "C"],
    prune_configs_by={"early_config_prune": _keep_tiles_that_fit},
)
@triton.jit
def _chunk_states_kernel(
    k, v, g,              # inputs: k, g [B, T, H, K]; v [B, T, H, V]
    b, h, h0, ht,         # b [B, T, H, K] fp32 (out); h [B, H, NT, K, V] fp32 (out); h0, ht [B, H, K, V] fp32
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)                        # position inside the chunk
    d_k = i_k * BK + tl.arange(0, BK)             # this program's key channels ...
    d_v = i_v * BV + tl.arange(0, BV)             # ... and value channels

    # Token t, channel d of this (batch, head) sits at k[head_k + t·H·K + d] (and alike for g, b, v).
    head_k = (i_b.to(tl.int64) * T * H + i_h) * K
    head_v = (i_b.to(tl.int64) * T * H + i_h) * V
    state_tile = d_k[:, None] * V + d_v[None, :]  # [BK, BV] offsets inside one K×V state
    h += i_bh.to(tl.int64) * NT * K * V

    S = tl.zeros([BK, BV], dtype=tl.float32)      # S_[0]
    if HAS_INITIAL_STATE:
        S += tl.load(h0 + i_bh.to(tl.int64) * K * V + state_tile)

    for i in range(NT):
        t = i * C + rows
        valid = (t < T)[:, None]
        tile_k = head_k + t[:, None] * (H * K) + d_k[None, :]
        tile_v = head_v + t[:, None] * (H * V) + d_v[None, :]
        tl.store(h + i * K * V + state_tile, S)                      # S_[i], read by kernel 2

        # step 0: chunk-local cumsum in fp32 (rows past T load g = 0, so b_C = b at the last token)
        g_i = tl.load(g + tile_k, mask=valid, other=0.0).to(tl.float32)
        b_i = tl.cumsum(g_i, axis=0)                                   # [C, BK], ≤ 0, decreasing
        b_C = tl.sum(g_i, axis=0)                                      # [BK]
        if i_v == 0:                                                   # one program per K tile writes b
            tl.store(b + tile_k, b_i, mask=valid)

        # step 1: S_[i+1] = diag(e^{b_C}) S_[i] + (K ⊙ e^{b_C − b})ᵀ V              exponents ≤ 0
        # b_C − b_j = g_{j+1} + … + g_C, summed from the chunk's end: the exponents that matter
        # (rows near the end, where e^{b_C − b_j} is not negligible) are short sums, free of the
        # cancellation that b_C − b_j would suffer when both are large (strong gates).
        to_end = tl.cumsum(g_i, axis=0, reverse=True) - g_i
        k_i = tl.load(k + tile_k, mask=valid, other=0.0).to(tl.float32)
        v_i = tl.load(v + tile_v, mask=valid, other=0.0)
        k_decayed = k_i * tl.exp(to_end)
        S = tl.exp(b_C)[:, None] * S + _mm(tl.trans(k_decayed), v_i, k, DOT_PRECISION, EMULATE_BF16)

    if STORE_FINAL_STATE:
        tl.store(ht + i_bh.to(tl.int64) * K * V + state_tile, S)


# ------------------------------------------------------------------------------------------------------
# Kernel 2: steps 2-5, parallel over chunks.
# ------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs([(64, 4, 2), (128, 8, 2), (64, 8, 2)]),  # (BV, num_warps, num_stages)
    key=["K", "V", "C"],
    prune_configs_by={"early_config_prune": _keep_tiles_that_fit},
)
@triton.jit
def _chunk_output_kernel(
    q, k, v, b, h,        # q, k [B, T, H, K]; v [B, T, H, V]; b [B, T, H, K] fp32; h [B, H, NT, K, V] fp32
    o,                    # output [B, T, H, V]
    scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, c: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)                        # query position r inside chunk i_c ...
    cols = tl.arange(0, C)                        # ... and key position s
    sub = rows // c                               # the sub-chunk of each row
    t = i_c * C + rows
    valid = t < T
    d_v = i_v * BV + tl.arange(0, BV)

    head_k = (i_b.to(tl.int64) * T * H + i_h) * K
    head_v = (i_b.to(tl.int64) * T * H + i_h) * V
    h += (i_bh.to(tl.int64) * NT + i_c) * K * V   # S_[i_c]

    O = tl.zeros([C, BV], dtype=tl.float32)       # O^inter, later + A V
    A = tl.zeros([C, C], dtype=tl.float32)        # intra-chunk scores, lower triangular

    for i_k in range(K // BK):                    # the sums over key channels d, one BK tile at a time
        d_k = i_k * BK + tl.arange(0, BK)
        tile_k = head_k + t[:, None] * (H * K) + d_k[None, :]
        q_i = tl.load(q + tile_k, mask=valid[:, None], other=0.0).to(tl.float32)
        k_i = tl.load(k + tile_k, mask=valid[:, None], other=0.0).to(tl.float32)
        b_i = tl.load(b + tile_k, mask=valid[:, None], other=0.0)

        # step 2: O^inter += (Q ⊙ e^{b}) S_[i]                                       exponent b ≤ 0
        S = tl.load(h + d_k[:, None] * V + d_v[None, :])
        O += _mm(q_i * tl.exp(b_i), S, q, DOT_PRECISION, EMULATE_BF16)

        # step 3: off-diagonal sub-blocks.  For query sub-chunk I, one product covers all J < I:
        #   A[I, :I·c] += (Q_I ⊙ e^{b_I − b_ref}) (K_{<I} ⊙ e^{b_ref − b_{<I}})ᵀ,  b_ref = b at I's first row
        for I in range(1, C // c):
            ref_t = tl.minimum(i_c * C + I * c, T - 1)   # (clamped to the last token if I is all padding)
            b_ref = tl.load(b + head_k + ref_t * (H * K) + d_k)[None, :]         # [1, BK]
            in_I = ((sub == I) & valid)[:, None]                                 # query rows of I
            before_I = ((rows < I * c) & valid)[:, None]                         # key rows of all J < I
            q_I = tl.where(in_I, q_i * tl.exp(tl.where(in_I, b_i - b_ref, 0.0)), 0.0)
            k_I = tl.where(before_I, k_i * tl.exp(tl.where(before_I, b_ref - b_i, 0.0)), 0.0)
            A += _mm(q_I, tl.trans(k_I), q, DOT_PRECISION, EMULATE_BF16)

        # step 4: diagonal sub-blocks, pairwise in fp32.  Iteration j fills column j of every diagonal
        # sub-block at once: row r meets key s = (first row of r's sub-chunk) + j, kept when s ≤ r.
        for j in range(c):
            s = sub * c + j                                                      # [C]
            tile_s = head_k + (i_c * C + s)[:, None] * (H * K) + d_k[None, :]
            pair = ((s <= rows) & valid)[:, None]                                # (then s is valid too)
            k_s = tl.load(k + tile_s, mask=pair, other=0.0).to(tl.float32)
            b_s = tl.load(b + tile_s, mask=pair, other=0.0)
            decay = tl.exp(tl.where(pair, b_i - b_s, 0.0))                       # masked before exp
            A_rs = tl.sum(q_i * k_s * decay, axis=1)                             # [C]: A[r, s(r)]
            A += tl.where(pair & (cols[None, :] == s[:, None]), A_rs[:, None], 0.0)

    # step 5: O = scale · (O^inter + A V)
    tile_v = head_v + t[:, None] * (H * V) + d_v[None, :]
    v_i = tl.load(v + tile_v, mask=valid[:, None], other=0.0)
    O = scale * (O + _mm(A, v_i, q, DOT_PRECISION, EMULATE_BF16))
    tl.store(o + tile_v, _as_input_dtype(O, o, EMULATE_BF16).to(o.dtype.element_ty), mask=valid[:, None])


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
    if q.device.type != "cuda" and not _INTERPRETED:
        raise sig.error(f"inputs are on {q.device}; the kernel needs CUDA tensors, or TRITON_INTERPRET=1 "
                        "set before triton is imported (lecture_kit does this on machines without CUDA)")
    sig.nonpositive("g", g, "the log forget gate")
    return sig


def _forward(q, k, v, g, scale, initial_state, output_final_state, chunk_size):
    """Launch kernel 1 (steps 0-1) then kernel 2 (steps 2-5); returns (o, final_state or None).

    HBM traffic: kernel 1 reads k, v, g and writes b (fp32) and the chunk states h (fp32, K·V per
    chunk and head); kernel 2 reads q, k, v, b, h and writes o.  A never leaves the chip.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = triton.cdiv(T, C)
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()

    b = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    h = torch.empty(B, H, NT, K, V, device=q.device, dtype=torch.float32)
    ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    o = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
    emulate_bf16 = _INTERPRETED and q.dtype == torch.bfloat16
    # "ieee": exact fp32 products for fp32 inputs; for bf16/fp16 operands the option has no effect.
    precision = "ieee" if q.dtype == torch.float32 or emulate_bf16 else "tf32"
    BK = 16 if _INTERPRETED else min(64, K)   # key tile (16 on the CPU: small tests still tile K)

    _chunk_states_kernel[lambda meta: (K // BK, V // meta["BV"], B * H)](
        k, v, g, b, h, h0, ht, T, NT,
        H=H, K=K, V=V, C=C, BK=BK, HAS_INITIAL_STATE=h0 is not None, STORE_FINAL_STATE=output_final_state,
        DOT_PRECISION=precision, EMULATE_BF16=emulate_bf16,
    )
    _chunk_output_kernel[lambda meta: (V // meta["BV"], NT, B * H)](
        q, k, v, b, h, o, scale, T, NT,
        H=H, K=K, V=V, C=C, c=SUB_CHUNK, BK=BK, DOT_PRECISION=precision, EMULATE_BF16=emulate_bf16,
    )
    return o, ht


class _GLAChunked(torch.autograd.Function):
    """Forward: the two Triton kernels.  Backward: recompute with ``gla.chunked`` (fp32) and autograd."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, output_final_state, chunk_size):
        o, ht = _forward(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        from .. import gla   # the PyTorch forms (imported here: lecture_kit.gla wires up this module)

        q, k, v, g, h0 = ctx.saved_tensors
        inputs = (q, k, v, g, h0)
        wanted = [i for i, x in enumerate(inputs) if x is not None and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().float().requires_grad_(i in wanted)
                      for i, x in enumerate(inputs)]
            o, ht = gla.chunked(*leaves[:4], scale=ctx.scale, initial_state=leaves[4],
                                output_final_state=dht is not None, chunk_size=ctx.chunk_size)
            outputs, cotangents = [o], [do.float()]
            if dht is not None:
                outputs.append(ht)
                cotangents.append(dht.float())
            found = torch.autograd.grad(outputs, [leaves[i] for i in wanted], cotangents, allow_unused=True)
        grads = [None] * 5
        for i, d in zip(wanted, found):
            grads[i] = torch.zeros_like(inputs[i]) if d is None else d.to(inputs[i].dtype)
        return (*grads, None, None, None)


def gla_chunked(q, k, v, g, *, scale, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunkwise gated linear attention with the Triton kernels of this module (math.md §3.2).

    q, k, g [B, T, H, K] (g = log forget gate ≤ 0, may be fp32 beside bf16 q, k, v); v [B, T, H, V];
    initial_state None or [B, H, K, V] (fp32).  K and V powers of two in 16..256; chunk_size a power
    of two in 16..128; any T ≥ 1.  ``scale=None`` means K^-1/2.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32, or None).
    Differentiable in q, k, v, g and initial_state (backward recomputes in PyTorch; see module docstring).
    """
    _check(q, k, v, g, scale, initial_state, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, ht = _GLAChunked.apply(q, k, v, g, initial_state, scale, bool(output_final_state), chunk_size)
    return o, (ht if output_final_state else None)
