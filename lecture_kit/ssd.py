"""Mamba-2's state space duality layer, SSD (Dao & Gu, 2024).  Derived in notebook 03b.

Per batch and head, with scalar decay a_t = exp(Δ_t A) and state h_t ∈ R^{P×N} (mamba_ssm's
layout):

    h_t = a_t h_{t-1} + Δ_t x_t B_tᵀ
    y_t = h_t C_t + D x_t

Unrolled, y = M x + D x with the T×T matrix (the SSD theorem: a 1-semiseparable mask times a
rank-N "attention" matrix)

    M_ij = L_ij (C_iᵀ B_j) Δ_j,    L_ij = a_i ⋯ a_{j+1} = exp(Δ_{j+1}A + ⋯ + Δ_i A)  (i ≥ j).

Shapes: x [B, T, H, P]; dt [B, T, H] (Δ ≥ 0, already discretised, e.g. softplus(dt + dt_bias));
A [H] (< 0); B, C [B, T, G, N] with G dividing H (heads h·G/H .. share a group, like GQA);
D None, [H] or [H, P]; initial_state and final state [B, H, P, N].

Every form returns ``(y, final_state or None)``; y has x's dtype, the state is fp32 (fp64 for fp64
inputs).  Decays and their cumulative sums are computed in fp32 (fp64), chunk-locally.
``help(ssd.chunked)`` and the others list each form's parameters, returns and a checked example.
"""
from __future__ import annotations

import torch

from ._docs import document_form
from ._spec import Arg, MixerSpec, chunk_description, initial_state, kernel_note
from ._validate import compute_dtype, pad_time
from .semiseparable import segsum


def _sample(draw, n, gate):
    """Mamba-2's initialisation: Δ log-uniform in [1e-3, 1e-1] (``gate="strong"``: uniform in
    [0.5, 2]), A = −U[1, 16]; x, B, C and D standard normal."""
    B, T, H, G, N, P = (n[d] for d in ("B", "T", "H", "G", "N", "P"))
    if gate == "weak":
        log_range = torch.log(torch.tensor([1e-3, 1e-1])).tolist()
        dt = torch.exp(draw.uniform(*log_range, B, T, H))
    else:
        dt = 0.5 + 1.5 * draw.rand(B, T, H)
    A = -(1 + 15 * draw.rand(H))
    randn = draw.randn
    return (randn(B, T, H, P), dt, A, randn(B, T, G, N), randn(B, T, G, N)), {"D": randn(H)}


#: What SSD takes, checks and defaults to (``lecture_kit/_spec.py``); read by every form, the docs,
#: ``testing.random_inputs`` and the Mamba-2 block.
SPEC = MixerSpec(
    name="ssd", title="SSD",
    inputs=(
        Arg("x", "B T H P", """
            Inputs ``[B, T, H, P]``, T ≥ 1: float16, bfloat16, float32 or float64.  ``B`` and
            ``C`` share its dtype and every tensor its device.  B = 0, H = 0 or P = 0 give
            empty results of the right shapes.""", kernel=kernel_note("P")),
        Arg("dt", "B T H", """
            Step sizes Δ ``[B, T, H]``, finite and ≥ 0, already discretised (Mamba-2 passes
            ``softplus(dt + dt_bias)``).  Any float dtype.  Δ = 0 skips a token: decay 1 and no
            input, whatever A (even −inf).""", activation=False, sign=">= 0"),
        Arg("A", "H", """
            Per-head decay rate ``[H]``, < 0 everywhere (Mamba-2 uses ``-exp(A_log)``); token
            t's decay is a_t = exp(Δ_t A), and A = −inf makes a head forget everything at every
            token.  Any float dtype.""", activation=False, sign="< 0"),
        Arg("B", "B T G N", """
            Input projections ``[B, T, G, N]``, N ≥ 1 and G ≥ 1 groups dividing H: head h reads
            group ``h // (H // G)``, as grouped-query attention shares keys.""",
            kernel="``kernel``: N a power of two from 16 to 256."),
        Arg("C", "B T G N", """
            Output projections ``[B, T, G, N]``, grouped as ``B``."""),
    ),
    values="x",
    keywords=(
        Arg("D", "H | H P", """
            Skip weight ``[H]`` or ``[H, P]``, any float dtype, adding D x to the output; None
            for no skip term.""", activation=False),
        initial_state("B H P N", "h_0"),
    ),
    key_dim="N", value_dim="P",
    scale=None, scale_description="",
    chunk_description=chunk_description("the last chunk is padded with Δ = 0, which is exact"),
    log_decay=("dt", "A"),
    sample=_sample,
    constraint=lambda sig: sig.groups_divide("G", "H"),
    kernel_names={"q": "C", "k": "B", "v": "x", "log_decay": "A", "K": "N", "V": "P"},
)


def _log_decay(dt, A, f):
    """ℓ_t = Δ_t A  [B, T, H] in dtype f, and 0 where Δ_t = 0: a skipped token, even for A = −inf,
    where the product would be 0·(−inf) = NaN."""
    dt, A = dt.to(f), A.to(f)
    return torch.where(dt == 0, 0.0, dt * A)


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """Expand grouped B or C [B, T, G, N] to one copy per head [B, T, H, N] (reference forms)."""
    return t.repeat_interleave(H // t.shape[2], dim=2)


def _skip(y, x, D):
    """y + D x, with D [H] or [H, P] broadcast over batch and time."""
    if D is None:
        return y
    D = D.to(y.dtype)
    return y + x * (D[:, None] if D.dim() == 1 else D)


def recurrent(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, *, D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition, one token at a time:
    h_t = a_t h_{t-1} + Δ_t x_t B_tᵀ,  y_t = h_t C_t + D x_t."""
    SPEC.check("recurrent", x, dt, A, B, C, D=D, initial_state=initial_state,
               output_final_state=output_final_state)
    f = compute_dtype(x.dtype)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    x_, dt_ = x.to(f), dt.to(f)
    B_, C_ = _heads(B, H).to(f), _heads(C, H).to(f)
    a = torch.exp(_log_decay(dt, A, f))                                # [B, T, H]
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
    log_a = _log_decay(dt, A, f).transpose(1, 2)                         # ℓ [B, H, T]
    L = torch.exp(segsum(log_a))                                         # 1-SS mask [B, H, T, T]
    CB = torch.einsum("bign,bjgn->bgij", C.to(f), B.to(f))               # once per group
    CB = CB.repeat_interleave(H // B.shape[2], dim=1)                    # [B, H, T, T]
    return L * CB * dt.to(f).transpose(1, 2)[:, :, None, :]


def matrix(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
           C: torch.Tensor) -> torch.Tensor:
    """The mixing matrix M = L ∘ (C Bᵀ) · diag(Δ)  [B, H, T, T], so that y = M x + D x.

    This is also Mamba-2's "hidden attention" (Ali et al., 2024): one T×T matrix per head, shared by
    the head's P channels.
    """
    SPEC.check("matrix", dt, A, B, C)
    return _matrix(dt, A, B, C, compute_dtype(B.dtype)).to(B.dtype)


def parallel(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, *, D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The quadratic ("attention") form: y = M x + D x, plus the initial state's decayed read-out.

    With an initial state h_0: y_t gains exp(ℓ_0 + ⋯ + ℓ_t) h_0 C_t, and the final state is
    Σ_j L_{T-1, j} Δ_j x_j B_jᵀ + exp(ℓ_0 + ⋯ + ℓ_{T-1}) h_0  (the last row of the same mask).
    """
    SPEC.check("parallel", x, dt, A, B, C, D=D, initial_state=initial_state,
               output_final_state=output_final_state)
    f = compute_dtype(x.dtype)
    H = x.shape[2]
    M = _matrix(dt, A, B, C, f)
    x_ = x.to(f)
    y = torch.einsum("bhij,bjhp->bihp", M, x_)
    log_a = _log_decay(dt, A, f)                                         # [B, T, H]
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


def chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, *, D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2's chunkwise algorithm (notebooks 03b and 04a): four steps, three of them matmuls.

    Split time into chunks of Q = chunk_size tokens (the last one padded with Δ = 0, which is
    exact); within chunk c, ℓ_s = Δ_s A and Λ_s = Σ_{r ≤ s in c} ℓ_r is a chunk-local cumsum.
      1. diagonal blocks:  Y_diag = (L_c ∘ C_c B_cᵀ) X_c      with X = Δ·x, L_c = exp(segsum(ℓ_c))
      2. chunk states:     S_c = Σ_s exp(Λ_last − Λ_s) X_s B_sᵀ
      3. state passing:    h_c = exp(Λ_last) h_{c-1} + S_c          (sequential over chunks)
      4. state → output:   Y_off[s] = exp(Λ_s) h_{c-1} C_s
    Steps 1, 2 and 4 are batched matmuls; step 3 touches only n_c = T/Q states.
    """
    Q = SPEC.check("chunked", x, dt, A, B, C, D=D, initial_state=initial_state,
                   output_final_state=output_final_state, chunk_size=chunk_size).chunk_size
    f = compute_dtype(x.dtype)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]

    def chunks(t):   # [B, T, ...] -> [B, n_c, Q, ...]
        t = pad_time(t, Q)
        return t.reshape(Bsz, t.shape[1] // Q, Q, *t.shape[2:])

    X = chunks(x.to(f) * dt.to(f)[..., None])                            # Δ x      [B, c, Q, H, P]
    ell = chunks(_log_decay(dt, A, f)).permute(0, 3, 1, 2)               # ℓ        [B, H, c, Q]
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

    y = (Y_diag + Y_off).reshape(Bsz, X.shape[1] * Q, H, P)[:, :T]
    return _skip(y, x.to(f), D).to(x.dtype), (h if output_final_state else None)


def kernel(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, *, D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton chunkwise kernel (``lecture_kit/kernels/scalar_decay.py``): the four steps of
    ``chunked``, with B and C read per group (never expanded to H heads in memory) and D x fused.

    In the kernel's terms SSD is q = C, k = B, v = x, log-decay Δ_t A, value weight Δ_t, scale 1;
    its state is key-major [B, H, N, P], so ours (mamba_ssm's [B, H, P, N]) is transposed on the way
    in and out.  bf16, fp16 or fp32 inputs (fp64: use ``chunked``); N and P powers of two in
    16..256; chunk_size 16, 32, 64 or 128.  Forward and backward are Triton kernels.
    """
    call = SPEC.check("kernel", x, dt, A, B, C, D=D, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size)
    from .kernels.scalar_decay import scalar_decay_chunked
    h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    y, final = scalar_decay_chunked(C, B, x, A, dt=dt, scale=1.0, D=D, initial_state=h0,
                                    output_final_state=output_final_state, chunk_size=call.chunk_size,
                                    checked=call.sig)
    return y, (None if final is None else final.transpose(-1, -2))


# ---- reference sections for help() ---------------------------------------------------
# Every form takes the same inputs, described once in SPEC; ``document``
# (lecture_kit/_docs.py) appends Parameters, Returns, Raises and Examples to each form's
# docstring above, whose math is what the notebooks' listings show.

_RETURNS = """
y : torch.Tensor
    The output ``[B, T, H, P]``, in x's dtype.
final_state : torch.Tensor | None
    The state after the last token ``[B, H, P, N]``, float32 (float64 for float64
    inputs); None unless ``output_final_state``.
"""

_SETUP = """
>>> import torch, lecture_kit as lk
>>> _ = torch.manual_seed(0)
>>> batch, T, H, P, G, N = 2, 50, 4, 16, 2, 16
>>> x = torch.randn(batch, T, H, P)
>>> dt = torch.nn.functional.softplus(torch.randn(batch, T, H) - 2)      # Δ ≥ 0
>>> A = -torch.linspace(1, 16, H)                                         # A < 0
>>> B, C = torch.randn(batch, T, G, N), torch.randn(batch, T, G, N)
>>> D = torch.ones(H)
"""

document_form(recurrent, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> y, h = lk.ssd.recurrent(x, dt, A, B, C, D=D, output_final_state=True)
>>> y.shape, h.shape, h.dtype
(torch.Size([2, 50, 4, 16]), torch.Size([2, 4, 16, 16]), torch.float32)

A sequence in two pieces, the state passed along, gives the same output and state:

>>> pieces = [t.split([20, 30], dim=1) for t in (x, dt, B, C)]
>>> (x1, x2), (dt1, dt2), (B1, B2), (C1, C2) = pieces
>>> y1, h1 = lk.ssd.recurrent(x1, dt1, A, B1, C1, D=D, output_final_state=True)
>>> y2, h2 = lk.ssd.recurrent(x2, dt2, A, B2, C2, D=D, initial_state=h1,
...                           output_final_state=True)
>>> torch.allclose(torch.cat([y1, y2], dim=1), y, atol=1e-5)
True
>>> torch.allclose(h2, h, atol=1e-5)
True
""")

document_form(parallel, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> kw = dict(D=D, initial_state=torch.randn(batch, H, P, N), output_final_state=True)
>>> y, h = lk.ssd.parallel(x, dt, A, B, C, **kw)
>>> y_ref, h_ref = lk.ssd.recurrent(x, dt, A, B, C, **kw)
>>> torch.allclose(y, y_ref, atol=1e-5), torch.allclose(h, h_ref, atol=1e-5)
(True, True)

Half-precision activations with fp32 Δ and A: the output is bf16, the state stays fp32.

>>> y, h = lk.ssd.parallel(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(),
...                        output_final_state=True)
>>> y.dtype, h.dtype
(torch.bfloat16, torch.float32)
""")

document_form(chunked, SPEC, returns=_RETURNS,
              examples=_SETUP + """
T = 50 is not a multiple of the chunk size, so the last chunk is ragged:

>>> kw = dict(D=D, initial_state=torch.randn(batch, H, P, N), output_final_state=True)
>>> y, h = lk.ssd.chunked(x, dt, A, B, C, **kw, chunk_size=16)
>>> y_ref, h_ref = lk.ssd.recurrent(x, dt, A, B, C, **kw)
>>> torch.allclose(y, y_ref, atol=1e-5), torch.allclose(h, h_ref, atol=1e-5)
(True, True)
""")

document_form(matrix, SPEC, returns="""
M : torch.Tensor
    The mixing matrix ``[B, H, T, T]``, in B's dtype, lower triangular and shared by a
    head's P channels: with a zero initial state,
    ``y[b, :, h] = M[b, h] @ x[b, :, h] + D[h] x[b, :, h]``.
""", examples=_SETUP + """
>>> M = lk.ssd.matrix(dt, A, B, C)
>>> M.shape
torch.Size([2, 4, 50, 50])
>>> y = torch.einsum("bhij,bjhp->bihp", M, x) + D[:, None] * x
>>> torch.allclose(y, lk.ssd.recurrent(x, dt, A, B, C, D=D)[0], atol=1e-5)
True

Every block on or below the diagonal has rank at most N (measured in fp64):

>>> M64 = lk.ssd.matrix(dt.double(), A.double(), B.double(), C.double())[0, 0]
>>> lk.semiseparable.semiseparable_rank(M64)
16
""")

document_form(kernel, SPEC, returns=_RETURNS,
              examples=_SETUP + """
>>> dev = lk.DEVICE     # CUDA if visible, else the CPU with Triton's interpreter
>>> args = [t.to(dev) for t in (x, dt, A, B, C)]
>>> y, h = lk.ssd.kernel(*args, D=D.to(dev), output_final_state=True, chunk_size=16)
>>> y_ref, h_ref = lk.ssd.chunked(x, dt, A, B, C, D=D, output_final_state=True)
>>> torch.allclose(y.cpu(), y_ref, atol=1e-4), torch.allclose(h.cpu(), h_ref, atol=1e-4)
(True, True)
""")
