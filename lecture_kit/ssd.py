"""Mamba-2's state space duality layer, SSD (Dao & Gu, 2024).  Derived in notebook 03b.

Per batch and head, with scalar decay a_t = exp(Δ_t A) and state h_t ∈ R^{P×N} (mamba_ssm's layout):

    h_t = a_t h_{t-1} + Δ_t x_t B_tᵀ
    y_t = h_t C_t + D x_t

Unrolled, y = M x + D x with the T×T matrix (the SSD theorem: a 1-semiseparable mask times a
rank-N "attention" matrix)

    M_ij = L_ij (C_iᵀ B_j) Δ_j,    L_ij = a_i ⋯ a_{j+1} = exp(Δ_{j+1}A + ⋯ + Δ_i A)   (i ≥ j).

Shapes: x [B, T, H, P]; dt [B, T, H] (Δ ≥ 0, already discretised, e.g. softplus(dt + dt_bias));
A [H] (< 0); B, C [B, T, G, N] with G dividing H (heads h·G/H .. share a group, like GQA);
D None, [H] or [H, P]; initial_state and final state [B, H, P, N].

Every form returns ``(y, final_state or None)``; y has x's dtype, the state is fp32 (fp64 for fp64
inputs).  Decays and their cumulative sums are computed in fp32 (fp64), chunk-locally.
"""
from __future__ import annotations

import torch

from ._validate import Signature, compute_dtype, pad_time
from .semiseparable import segsum


def _check(fn, x, dt, A, B, C, D=None, initial_state=None, values=True):
    sig = Signature(f"ssd.{fn}")
    if values:
        sig.tensor("x", x, "B T H P")
    sig.tensor("dt", dt, "B T H", same_dtype=False)
    sig.tensor("A", A, "H", same_dtype=False)
    sig.tensor("B", B, "B T G N")
    sig.tensor("C", C, "B T G N")
    sig.at_least_one("T")
    H, G = sig.sizes["H"], sig.sizes["G"]
    if G < 1 or H % G:
        raise sig.error(f"the number of groups G = {G} (from B and C [B, T, G, N]) must divide "
                        f"the number of heads H = {H}")
    sig.one_of("D", D, "H", "H P")
    sig.optional("initial_state", initial_state, "B H P N", same_dtype=False)
    sig.nonnegative("dt", dt)
    sig.negative("A", A)
    return sig


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """Expand grouped B or C [B, T, G, N] to one copy per head [B, T, H, N] (reference forms only)."""
    return t.repeat_interleave(H // t.shape[2], dim=2)


def _skip(y, x, D):
    """y + D x, with D [H] or [H, P] broadcast over batch and time."""
    if D is None:
        return y
    D = D.to(y.dtype)
    return y + x * (D[:, None] if D.dim() == 1 else D)


def recurrent(x, dt, A, B, C, *, D=None, initial_state=None, output_final_state=False):
    """The definition, one token at a time: h_t = a_t h_{t-1} + Δ_t x_t B_tᵀ,  y_t = h_t C_t + D x_t."""
    sig = _check("recurrent", x, dt, A, B, C, D, initial_state)
    f = compute_dtype(x.dtype)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    x_, dt_ = x.to(f), dt.to(f)
    B_, C_ = _heads(B, H).to(f), _heads(C, H).to(f)
    a = torch.exp(dt_ * A.to(f))                                       # [B, T, H]
    h = x.new_zeros(Bsz, H, P, N, dtype=f) if initial_state is None else initial_state.to(f)
    ys = []
    for t in range(T):
        h = a[:, t, :, None, None] * h + torch.einsum("bh,bhp,bhn->bhpn", dt_[:, t], x_[:, t], B_[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_[:, t]))
    y = _skip(torch.stack(ys, dim=1), x_, D)
    return y.to(x.dtype), (h if output_final_state else None)


def _matrix(dt, A, B, C, f):
    """M [B, H, T, T] in dtype f; see ``matrix``."""
    H = A.shape[0]
    log_a = (dt.to(f) * A.to(f)).transpose(1, 2)                        # ℓ [B, H, T]
    L = torch.exp(segsum(log_a))                                         # 1-SS mask [B, H, T, T]
    CB = torch.einsum("bign,bjgn->bgij", C.to(f), B.to(f))               # once per group
    CB = CB.repeat_interleave(H // B.shape[2], dim=1)                    # [B, H, T, T]
    return L * CB * dt.to(f).transpose(1, 2)[:, :, None, :]


def matrix(dt, A, B, C):
    """The mixing matrix M = L ∘ (C Bᵀ) · diag(Δ)  [B, H, T, T], so that y = M x + D x.

    This is also Mamba-2's "hidden attention" (Ali et al., 2024): one T×T matrix per head, shared by
    the head's P channels.
    """
    _check("matrix", None, dt, A, B, C, values=False)
    return _matrix(dt, A, B, C, compute_dtype(B.dtype)).to(B.dtype)


def parallel(x, dt, A, B, C, *, D=None, initial_state=None, output_final_state=False):
    """The quadratic ("attention") form: y = M x + D x, plus the initial state's decayed read-out.

    With an initial state h_0: y_t gains exp(ℓ_0 + ⋯ + ℓ_t) h_0 C_t, and the final state is
    Σ_j L_{T-1, j} Δ_j x_j B_jᵀ + exp(ℓ_0 + ⋯ + ℓ_{T-1}) h_0  (the last row of the same mask).
    """
    _check("parallel", x, dt, A, B, C, D, initial_state)
    f = compute_dtype(x.dtype)
    H = x.shape[2]
    M = _matrix(dt, A, B, C, f)
    x_ = x.to(f)
    y = torch.einsum("bhij,bjhp->bihp", M, x_)
    log_a = dt.to(f) * A.to(f)                                           # [B, T, H]
    final = None
    if initial_state is not None or output_final_state:
        C_ = _heads(C, H).to(f)
        h0 = x.new_zeros(x.shape[0], H, x.shape[3], B.shape[-1], dtype=f) if initial_state is None \
            else initial_state.to(f)
        decay_from_start = torch.exp(log_a.cumsum(dim=1))                # a_0 ⋯ a_t, exponent ≤ 0
        y = y + decay_from_start[..., None] * torch.einsum("bhpn,bthn->bthp", h0, C_)
        if output_final_state:
            last_row = torch.exp(segsum(log_a.transpose(1, 2)))[..., -1, :]   # L_{T-1, j} [B, H, T]
            final = torch.einsum("bhj,bjh,bjhp,bjhn->bhpn", last_row, dt.to(f), x_, _heads(B, H).to(f))
            final = final + decay_from_start[:, -1, :, None, None] * h0
    return _skip(y, x_, D).to(x.dtype), final


def chunked(x, dt, A, B, C, *, D=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Mamba-2's chunkwise algorithm (math.md §1.2): four steps, three of them matmuls.

    Split time into chunks of Q = chunk_size tokens (the last one padded with Δ = 0, which is exact);
    within chunk c, ℓ_s = Δ_s A and Λ_s = Σ_{r ≤ s in c} ℓ_r is a chunk-local cumulative sum.
      1. diagonal blocks:  Y_diag = (L_c ∘ C_c B_cᵀ) X_c           with X = Δ·x, L_c = exp(segsum(ℓ_c))
      2. chunk states:     S_c = Σ_s exp(Λ_last − Λ_s) X_s B_sᵀ
      3. state passing:    h_c = exp(Λ_last) h_{c-1} + S_c          (sequential over chunks)
      4. state → output:   Y_off[s] = exp(Λ_s) h_{c-1} C_s
    Steps 1, 2 and 4 are batched matmuls; step 3 touches only n_c = T/Q states.
    """
    sig = _check("chunked", x, dt, A, B, C, D, initial_state)
    Q = sig.chunk_size(chunk_size)
    f = compute_dtype(x.dtype)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]

    def chunks(t):   # [B, T, ...] -> [B, n_c, Q, ...]
        t = pad_time(t, Q)
        return t.reshape(Bsz, t.shape[1] // Q, Q, *t.shape[2:])

    X = chunks(x.to(f) * dt.to(f)[..., None])                            # Δ x      [B, c, Q, H, P]
    ell = chunks(dt.to(f) * A.to(f)).permute(0, 3, 1, 2)                 # ℓ        [B, H, c, Q]
    Bc, Cc = chunks(_heads(B, H).to(f)), chunks(_heads(C, H).to(f))     # [B, c, Q, H, N]
    Lam = ell.cumsum(dim=-1)                                             # Λ, chunk-local

    # 1. diagonal blocks
    L = torch.exp(segsum(ell))                                           # [B, H, c, Q, Q]
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, L, X)
    # 2. chunk states: decay from s to the chunk's end is the last row of L
    S = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bc, L[..., -1, :], X)   # [B, c, H, P, N]
    # 3. state passing: states[:, c] is the state entering chunk c
    h = x.new_zeros(Bsz, H, P, N, dtype=f) if initial_state is None else initial_state.to(f)
    entering = []
    for c in range(S.shape[1]):
        entering.append(h)
        h = torch.exp(Lam[:, :, c, -1])[..., None, None] * h + S[:, c]
    states = torch.stack(entering, dim=1)                                # [B, c, H, P, N]
    # 4. state -> output
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(Lam))

    y = (Y_diag + Y_off).reshape(Bsz, -1, H, P)[:, :T]
    return _skip(y, x.to(f), D).to(x.dtype), (h if output_final_state else None)


def kernel(x, dt, A, B, C, *, D=None, initial_state=None, output_final_state=False, chunk_size=64):
    """The Triton chunkwise kernel (``lecture_kit/kernels/scalar_decay.py``): the four steps of
    ``chunked``, with B and C read per group (never expanded to H heads in memory) and D x fused.

    In the kernel's terms SSD is q = C, k = B, v = x, log-decay Δ_t A, value weight Δ_t, scale 1;
    its state is key-major [B, H, N, P], so ours (mamba_ssm's [B, H, P, N]) is transposed on the way
    in and out.  bf16, fp16 or fp32 inputs (fp64: use ``chunked``); N and P powers of two in
    16..256; chunk_size 16, 32, 64 or 128.  Forward and backward are Triton kernels.
    """
    from .kernels.scalar_decay import scalar_decay_chunked
    h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    y, final = scalar_decay_chunked(C, B, x, A, dt=dt, scale=1.0, D=D, initial_state=h0,
                                    output_final_state=output_final_state, chunk_size=chunk_size)
    return y, (None if final is None else final.transpose(-1, -2))
