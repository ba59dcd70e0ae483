"""Semiseparable matrices: the one class of matrices this lecture is about.

Definitions (Dao & Gu 2024, §3; notebook 03a).  A lower-triangular T×T matrix M is
*N-semiseparable* when every submatrix taken from on or below the diagonal has rank at most N.
The maximal such blocks are ``M[j:, :j+1]`` (rows j..T-1, columns 0..j), and every other one sits
inside one of them, so

    semiseparable rank(M) = max_j rank(M[j:, :j+1]).

This is *not* rank(M): the 1-semiseparable mask below has a unit diagonal, so it is invertible
(rank T), yet every block under its diagonal has rank 1.

An N-SSS (sequentially semiseparable) representation writes M through N×N transitions A_t:

    M_ij = C_iᵀ A_i A_{i-1} ⋯ A_{j+1} B_j      (i ≥ j),   M_ij = 0 (i < j),

and M is N-semiseparable exactly when it has one.  Every mixer of this lecture is such a product:
SSD and RetNet with A_t = a_t·I, GLA with A_t = diag(α_t), RWKV-7 with A_t = diag(w_t) + b_t a_tᵀ.
Derived in notebooks 02 and 03a.  ``help()`` on each function lists its parameters, returns and a
checked example.
"""
from __future__ import annotations

import torch

from ._docs import descriptions, document
from ._validate import FLOAT_DTYPES, Signature


def _check_log_decays(function: str, log_a) -> None:
    """log_a is a floating tensor with a time dimension (integer log-decays have no −∞ to mask with)."""
    if not isinstance(log_a, torch.Tensor) or log_a.dtype not in FLOAT_DTYPES or log_a.dim() < 1:
        got = f"{log_a.dtype} of shape {tuple(log_a.shape)}" if isinstance(log_a, torch.Tensor) \
            else type(log_a).__name__
        raise ValueError(f"{function}: log_a must be a floating-point tensor [..., T] (at least one "
                         f"dimension), got {got}; pass torch.tensor(..., dtype=torch.float64), say")


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """Segment sums of log-decays, the exponent of the 1-semiseparable mask.

        segsum(ℓ)[..., i, j] = ℓ_{j+1} + ⋯ + ℓ_i    (i ≥ j; 0 on the diagonal),   −∞ (i < j)

    Shapes: ``log_a [..., T]`` → ``[..., T, T]``.

    Stable by construction: each entry is a cumulative sum of the ℓ_k themselves, taken down a
    column after zeroing the entries at or above the diagonal, so no difference of two large
    cumulative sums ever appears (that difference, cumsum_i − cumsum_j, cancels catastrophically in
    fp32 and bf16; notebook 05b shows it).  The upper triangle is set to −∞ *before* anyone calls
    ``exp``, so ``exp(segsum)`` is exactly zero there.
    """
    _check_log_decays("segsum", log_a)
    T = log_a.shape[-1]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=log_a.device).tril(-1)
    lower = torch.ones(T, T, dtype=torch.bool, device=log_a.device).tril(0)
    # column j of `terms` holds ℓ_k in row k for k > j, zero elsewhere
    terms = log_a.unsqueeze(-1).expand(*log_a.shape, T).masked_fill(~strictly_lower, 0)
    sums = terms.cumsum(dim=-2)              # sums[i, j] = Σ_{j<k≤i} ℓ_k
    return sums.masked_fill(~lower, float("-inf"))


def one_semiseparable_mask(log_a: torch.Tensor) -> torch.Tensor:
    """The 1-semiseparable mask L of scalar decays a_t = exp(ℓ_t):

        L_ij = a_i a_{i-1} ⋯ a_{j+1} = exp(ℓ_{j+1} + ⋯ + ℓ_i)   (i ≥ j),   0 (i < j).

    Shapes: ``log_a [..., T]`` → ``[..., T, T]``.  Computed as ``exp(segsum(ℓ))``, never as a ratio
    of cumulative products (those underflow to 0/0 = NaN on long sequences).
    """
    _check_log_decays("one_semiseparable_mask", log_a)
    return torch.exp(segsum(log_a))


def default_tolerance(M: torch.Tensor) -> float:
    """Singular values below ``σ_max(M) · T · eps(dtype)`` count as zero (numpy's matrix_rank
    rule); this returns the factor T · eps(dtype)."""
    return M.shape[-1] * torch.finfo(M.dtype).eps


def semiseparable_rank(M: torch.Tensor,
                       rtol: float | None = None) -> int | torch.Tensor:
    """Numerical semiseparable rank of a lower-triangular matrix: max_j rank(M[j:, :j+1]).

    Shapes: ``M [T, T]`` → ``int``; ``M [..., T, T]`` → ``LongTensor [...]`` (one rank per
    matrix).

    A singular value of a block counts when it exceeds ``rtol · σ_max(M)``, with σ_max the largest
    singular value of the *whole* matrix (default ``rtol`` = T·eps of M's dtype).  Measuring
    against the whole matrix rather than the block means a block whose entries have decayed to
    rounding level counts as rank 0, as it should.  Integer or bool matrices are converted to
    fp64.
    """
    if not isinstance(M, torch.Tensor) or M.dim() < 2 or M.shape[-1] != M.shape[-2] or M.is_complex():
        raise ValueError(f"semiseparable_rank: M must be a real square matrix [..., T, T], got "
                         f"{tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
    if not M.is_floating_point():
        M = M.double()
    M = M.float() if M.dtype in (torch.float16, torch.bfloat16) else M
    Signature("semiseparable_rank").values([("M", M, "finite")])    # an inf made every σ NaN: rank 0
    if rtol is None:
        rtol = default_tolerance(M)
    T = M.shape[-1]
    threshold = rtol * torch.linalg.matrix_norm(M, ord=2)          # [...]
    ranks = torch.zeros(M.shape[:-2], dtype=torch.long, device=M.device)
    for j in range(T):
        sigma = torch.linalg.svdvals(M[..., j:, : j + 1])           # [..., min(T-j, j+1)]
        ranks = torch.maximum(ranks, (sigma > threshold.unsqueeze(-1)).sum(-1))
    return int(ranks) if M.dim() == 2 else ranks


def sss_matrix(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Build M from an SSS representation: M_ij = C_iᵀ A_i ⋯ A_{j+1} B_j for i ≥ j, else 0.

    Shapes: ``C [..., T, N]``, ``A [..., T, N, N]``, ``B [..., T, N]`` → ``M [..., T, T]``.
    (A_0 is never used: nothing precedes token 0.)

    Computed by carrying every column forward at once: after step i, ``U[..., j, :]`` holds
    A_i ⋯ A_{j+1} B_j for all j ≤ i, and row i of M is ``U @ C_i``.  Cost O(T² N²): a reference, not
    a fast path.
    """
    for name, t in (("C", C), ("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"sss_matrix: {name} must be a floating-point tensor, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if (t.dtype, t.device) != (C.dtype, C.device):
            raise ValueError(f"sss_matrix: {name} is {t.dtype} on {t.device} but C is {C.dtype} on "
                             f"{C.device}; pass all three in one dtype, on one device")
    if C.dim() < 2 or B.shape != C.shape or A.shape != (*C.shape, C.shape[-1]):
        raise ValueError(f"sss_matrix: expected C [..., T, N], A [..., T, N, N], B [..., T, N]; "
                         f"got C {tuple(C.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    T = C.shape[-2]
    if T == 0:
        return C.new_zeros(*C.shape[:-2], 0, 0)
    rows = []
    U = B[..., :0, :]                                                # no columns carried yet
    for i in range(T):
        U = torch.einsum("...mn,...jn->...jm", A[..., i, :, :], U)  # advance columns j < i by A_i
        U = torch.cat([U, B[..., i : i + 1, :]], dim=-2)             # column j = i starts as B_i
        row = torch.einsum("...jn,...n->...j", U, C[..., i, :])      # M[i, :i+1]
        rows.append(torch.nn.functional.pad(row, (0, T - i - 1)))
    return torch.stack(rows, dim=-2)


# ---- reference sections for help() ---------------------------------------------------
# ``document`` (lecture_kit/_docs.py) appends Parameters, Returns, Raises and Examples
# to each docstring above, whose math is what the notebooks print.

_LOG_A = descriptions("""
log_a
    Log-decays ℓ ``[..., T]`` along the last dimension, a tensor of any float dtype with
    at least one dimension; the mixers' are ≤ 0, so that exp(segsum(ℓ)) ≤ 1.
""")

_LOG_A_ERROR = """
ValueError
    If log_a is not a floating-point tensor with at least one dimension (a list, a 0-d
    or an integer tensor).
"""

document(segsum, _LOG_A, raises=[_LOG_A_ERROR], returns="""
torch.Tensor
    ``[..., T, T]`` in log_a's dtype: ℓ_{j+1} + ⋯ + ℓ_i at (i, j) on and below the
    diagonal (0 on it), −inf above.
""", examples="""
>>> import torch
>>> from lecture_kit.semiseparable import segsum
>>> segsum(torch.tensor([-1.0, -2.0, -3.0]))
tensor([[ 0., -inf, -inf],
        [-2.,  0., -inf],
        [-5., -3.,  0.]])
""")

document(one_semiseparable_mask, _LOG_A, raises=[_LOG_A_ERROR], returns="""
torch.Tensor
    The mask L ``[..., T, T]`` in log_a's dtype, exactly 0 above the diagonal.
""", examples="""
>>> import torch
>>> from lecture_kit.semiseparable import one_semiseparable_mask
>>> one_semiseparable_mask(torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5])))
tensor([[1.0000, 0.0000, 0.0000, 0.0000],
        [0.5000, 1.0000, 0.0000, 0.0000],
        [0.2500, 0.5000, 1.0000, 0.0000],
        [0.1250, 0.2500, 0.5000, 1.0000]])

On a long sequence the ratio of cumulative products is 0/0, the mask is not:

>>> log_a = torch.full((2000,), -0.1)
>>> a_cum = torch.exp(log_a).cumprod(0)
>>> (a_cum[:, None] / a_cum[None, :]).isnan().any().item()
True
>>> one_semiseparable_mask(log_a).isnan().any().item()
False
""")

document(default_tolerance, descriptions("""
M
    A floating-point matrix ``[..., T, T]``; only its size T and its dtype matter.
"""), returns="""
float
    T · eps(M.dtype), the ``rtol`` that ``semiseparable_rank`` uses by default.
""", examples="""
>>> import torch
>>> from lecture_kit.semiseparable import default_tolerance
>>> default_tolerance(torch.zeros(100, 100)) == 100 * torch.finfo(torch.float32).eps
True
""")

document(semiseparable_rank, descriptions("""
M
    A lower-triangular matrix ``[T, T]``, or a batch of them ``[..., T, T]``, any dtype:
    float16 and bfloat16 are measured in float32, integer and bool matrices in float64.
rtol
    Relative threshold on the singular values, against σ_max of the whole matrix; None
    means ``default_tolerance(M)``.
"""), raises=["""
ValueError
    If M is not a real tensor with at least two dimensions and square in the last two,
    or holds an inf or NaN (checked while value checks are on).
"""], returns="""
int | torch.Tensor
    The semiseparable rank: an ``int`` for one matrix, a LongTensor ``[...]`` for a
    batch.
""", examples="""
>>> import torch
>>> from lecture_kit.semiseparable import one_semiseparable_mask, semiseparable_rank
>>> L = one_semiseparable_mask(torch.full((8,), -0.5, dtype=torch.float64))
>>> torch.linalg.matrix_rank(L).item(), semiseparable_rank(L)    # invertible, yet 1-SS
(8, 1)
>>> semiseparable_rank(torch.stack([L, L @ L]))
tensor([1, 2])
""")

document(sss_matrix, descriptions("""
C
    Output factors C_i ``[..., T, N]``.
A
    Transitions A_t ``[..., T, N, N]``, in C's dtype.
B
    Input factors B_j ``[..., T, N]``, in C's dtype.
"""), raises=["""
ValueError
    If the shapes are not ``C [..., T, N]``, ``A [..., T, N, N]`` and ``B [..., T, N]``,
    or the three are not floating-point tensors of one dtype on one device.
"""], returns="""
torch.Tensor
    M ``[..., T, T]``, lower triangular, in C's dtype (``[..., 0, 0]`` for T = 0).
""", examples="""
With scalar transitions A_t = a_t I, the SSS matrix is the 1-semiseparable mask times
C Bᵀ (the SSD theorem):

>>> import torch
>>> from lecture_kit.semiseparable import one_semiseparable_mask, sss_matrix
>>> T, N = 6, 3
>>> log_a = -torch.rand(T, dtype=torch.float64)
>>> C, B = torch.randn(2, T, N, dtype=torch.float64)
>>> A = torch.exp(log_a)[:, None, None] * torch.eye(N, dtype=torch.float64)
>>> torch.allclose(sss_matrix(C, A, B), one_semiseparable_mask(log_a) * (C @ B.T))
True
""")
