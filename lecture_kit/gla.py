"""Gated linear attention, GLA (Yang et al., 2023).  Derived in notebook 03d.

Per batch and head, with a data-dependent forget gate α_t = exp(g_t) ∈ (0, 1]^K (one per key channel)
and state S_t ∈ R^{K×V}:

    S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

No feature map and no normaliser (that is Katharopoulos et al.'s linear attention, not GLA): the
layer's output norm plays the normaliser's role.  With b_t = g_1 + ⋯ + g_t (per channel),

    P_ij = scale · Σ_d q_id k_jd exp(b_id − b_jd)    (j ≤ i),     O = P V,

a K-semiseparable matrix (an SSS representation with diagonal transitions).

Shapes: q, k, g [B, T, H, K] (g = log α ≤ 0, e.g. logsigmoid(·)/16 as in the GLA layer);
v [B, T, H, V]; initial_state and final state [B, H, K, V].  ``scale`` defaults to K^{-1/2}.
Every form returns ``(o, final_state or None)``; o has q's dtype, the state is fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch

from ._validate import Signature, compute_dtype, pad_time
from .semiseparable import segsum

#: Sub-chunk length of the chunked form's secondary tiling (math.md §3.2; fla's BC).
SUB_CHUNK = 16


def _check(fn, q, k, v, g, scale, initial_state=None, values=True):
    sig = Signature(f"gla.{fn}")
    sig.tensor("q", q, "B T H K")
    sig.tensor("k", k, "B T H K")
    if values:
        sig.tensor("v", v, "B T H V")
    sig.tensor("g", g, "B T H K", same_dtype=False)
    sig.at_least_one("T")
    sig.optional("initial_state", initial_state, "B H K V", same_dtype=False)
    sig.nonpositive("g", g)
    return sig, (sig.sizes["K"] ** -0.5 if scale is None else sig.scalar("scale", scale))


def recurrent(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False):
    """The definition, one token at a time: S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t."""
    _, scale = _check("recurrent", q, k, v, g, scale, initial_state)
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


def matrix(q, k, g, *, scale=None):
    """P [B, H, T, T] with P_ij = scale · Σ_d q_id k_jd exp(b_id − b_jd) for j ≤ i, so o = P v.

    Each channel's decay exp(b_id − b_jd) is a 1-semiseparable mask built by ``segsum`` (stable,
    masked before exp), so P is a sum of K masked rank-1 matrices: the "generalised matmul" that a
    tensor core cannot do directly, which is why the fast path is chunked.
    """
    _, scale = _check("matrix", q, k, None, g, scale, values=False)
    f = compute_dtype(q.dtype)
    P = scale * torch.einsum("bhdij,bihd,bjhd->bhij", _channel_masks(g, f), q.to(f), k.to(f))
    return P.to(q.dtype)


def parallel(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False):
    """O = P V plus the initial state's read-out scale · (q_i ∘ exp b_i)ᵀ S_0; the final state is
    Σ_j diag(exp(b_T − b_j)) k_j v_jᵀ + diag(exp b_T) S_0 (from the masks' last rows)."""
    _, scale = _check("parallel", q, k, v, g, scale, initial_state)
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


def chunked(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    """GLA's chunkwise algorithm with secondary (sub-chunk) tiling, math.md §3.2.

    Chunks of C = chunk_size tokens, sub-chunks of c = 16 (or C if 16 does not divide it); b is the
    chunk-local cumsum of g, so every exponent below is ≤ 0:
      1. chunk states:    S_c = diag(exp b_C) S_{c-1} + (K ∘ exp(b_C − b))ᵀ V     (sequential)
      2. inter output:    O_inter = scale · (Q ∘ exp b) S_{c-1}
      3. off-diagonal sub-blocks (query sub-chunk I, key sub-chunk J < I), with the reference
         point b_ref = b at I's first row:  A_IJ = (Q_I ∘ exp(b_I − b_ref)) (K_J ∘ exp(b_ref − b_J))ᵀ,
         an ordinary matmul with both factors bounded by 1 (safe in half precision on tensor cores)
      4. diagonal sub-blocks pairwise: A_rs = Σ_d q_rd k_sd exp(b_rd − b_sd), s ≤ r, masked before exp
      5. O = O_inter + scale · tril(A) V
    """
    sig, scale = _check("chunked", q, k, v, g, scale, initial_state)
    C = sig.chunk_size(chunk_size)
    c = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    n_sub = C // c
    f = compute_dtype(q.dtype)
    Bsz, T, H, K = q.shape

    def chunks(t):   # [B, T, H, D] -> [B, H, n_c, C, D]
        t = pad_time(t.to(f), C)
        return t.reshape(Bsz, -1, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4)

    Qc, Kc, Vc, Gc = chunks(q), chunks(k), chunks(v), chunks(g)
    b = Gc.cumsum(dim=-2)                                                       # chunk-local, ≤ 0
    b_last = b[..., -1:, :]                                                     # b_C [B, H, n, 1, K]

    # 1. chunk states, then pass them along (the only sequential step)
    local_states = (Kc * torch.exp(b_last - b)).transpose(-1, -2) @ Vc          # [B, H, n, K, V]
    S = q.new_zeros(Bsz, H, K, v.shape[-1], dtype=f) if initial_state is None else initial_state.to(f)
    entering = []
    for i in range(Qc.shape[2]):
        entering.append(S)
        S = torch.exp(b_last[:, :, i, 0, :, None]) * S + local_states[:, :, i]
    entering = torch.stack(entering, dim=2)                                     # [B, H, n, K, V]
    # 2. inter-chunk output
    O_inter = (Qc * torch.exp(b)) @ entering

    # sub-chunk views [B, H, n, I, c, K]
    sub = lambda t: t.reshape(*t.shape[:3], n_sub, c, t.shape[-1])
    Qs, Ks, bs = sub(Qc), sub(Kc), sub(b)
    b_ref = bs[..., :1, :]                                                      # [B, H, n, I, 1, K]
    # 3. off-diagonal sub-blocks: exponent b_ref(I) − b_s(J), kept only for J < I (masked before exp)
    I_before = torch.ones(n_sub, n_sub, dtype=torch.bool, device=q.device).tril(-1)   # [I, J]
    key_exp = b_ref[:, :, :, :, None] - bs[:, :, :, None]                       # [B, H, n, I, J, c, K]
    key_exp = key_exp.masked_fill(~I_before[:, :, None, None], float("-inf"))
    A_off = torch.einsum("bhnirk,bhnijsk->bhnijrs", Qs * torch.exp(bs - b_ref), Ks[:, :, :, None] * torch.exp(key_exp))
    # 4. diagonal sub-blocks, pairwise in the compute dtype
    s_le_r = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(0)
    pair_exp = (bs[..., :, None, :] - bs[..., None, :, :]).masked_fill(~s_le_r[:, :, None], float("-inf"))
    A_diag = torch.einsum("bhnirk,bhnisk,bhnirsk->bhnirs", Qs, Ks, torch.exp(pair_exp))
    A_blocks = A_off.clone()                                                    # [B, H, n, I, J, c, c]
    idx = torch.arange(n_sub, device=q.device)
    A_blocks[:, :, :, idx, idx] = A_diag                                        # I = J blocks were 0
    A = A_blocks.permute(0, 1, 2, 3, 5, 4, 6).reshape(*Qc.shape[:3], C, C)      # [B, H, n, C, C]
    # 5. combine
    O = scale * (O_inter + A @ Vc)                                              # [B, H, n, C, V]
    o = O.permute(0, 2, 3, 1, 4).reshape(Bsz, -1, H, v.shape[-1])[:, :T]
    return o.to(q.dtype), (S if output_final_state else None)


def kernel(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    """The Triton chunkwise kernel (``lecture_kit/kernels/gla.py``): the algorithm of ``chunked``,
    with the chunk states kept in fp32 and the C×C score matrix never leaving the chip.

    bf16, fp16 or fp32 inputs (fp64: use ``chunked``); K and V powers of two in 16..256;
    chunk_size a power of two in 16..128.  Differentiable in every input.
    """
    from .kernels.gla import gla_chunked
    return gla_chunked(q, k, v, g, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, chunk_size=chunk_size)
