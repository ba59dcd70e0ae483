"""The fact the lecture's thesis rests on: every mixer's matrix is semiseparable with rank at most its
state size, while causal softmax attention's is not; plus the tools that measure it."""
import pytest
import torch

from lecture_kit import semiseparable as ss
from lecture_kit import ssd
from lecture_kit._validate import set_value_checks
from lecture_kit.testing import TOLERANCE, errors, matrix_args, mixer, random_inputs

T, STATE = 48, 6


def test_segsum_matches_its_definition_and_masks_the_upper_triangle():
    ell = -torch.rand(2, 9, dtype=torch.float64)
    S = ss.segsum(ell)
    for i in range(9):
        for j in range(9):
            expected = ell[:, j + 1 : i + 1].sum(-1) if i >= j else torch.full((2,), float("-inf"), dtype=torch.float64)
            assert torch.allclose(S[:, i, j], expected, atol=1e-15) or torch.equal(S[:, i, j], expected)
    L = ss.one_semiseparable_mask(ell)
    assert torch.equal(L.triu(1), torch.zeros_like(L)) and torch.equal(L.diagonal(dim1=-2, dim2=-1), torch.ones(2, 9, dtype=torch.float64))


def test_stable_segsum_is_finite_where_the_ratio_of_cumprods_is_not():
    ell = -torch.rand(2048, dtype=torch.float32) * 0.5           # total log-decay ≈ −512
    L = ss.one_semiseparable_mask(ell)
    cumprod = torch.cumprod(torch.exp(ell), 0)
    ratio = (cumprod[:, None] / cumprod[None, :]).tril()
    assert torch.isfinite(L).all()
    assert torch.isnan(ratio).any(), "the naive ratio should underflow to 0/0 here"


def test_one_semiseparable_mask_is_full_rank_but_semiseparable_rank_one():
    L = ss.one_semiseparable_mask(-0.1 * torch.rand(T, dtype=torch.float64))
    assert torch.linalg.matrix_rank(L).item() == T                 # rank(M) ≤ N is the wrong definition
    assert ss.semiseparable_rank(L) == 1


@pytest.mark.parametrize("name", ["ssd", "retnet", "gla", "rwkv7"])
def test_each_mixer_matrix_has_semiseparable_rank_equal_to_its_state_size(name):
    args, _ = random_inputs(name, batch=1, heads=1, length=T, key_dim=STATE, value_dim=3, seed=3)
    M = mixer(name).matrix(*matrix_args(name, args))[0, 0]
    assert ss.semiseparable_rank(M) == STATE                       # ≤ N by the theorem, = N generically
    assert torch.linalg.matrix_rank(M).item() > STATE              # yet M itself is not low rank


def test_causal_softmax_attention_is_not_semiseparable_of_low_rank():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(T, STATE, generator=g, dtype=torch.float64), torch.randn(T, STATE, generator=g, dtype=torch.float64)
    scores = (q @ k.T / STATE ** 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    softmax = torch.softmax(scores, dim=-1)
    linear = (q @ k.T).tril()
    assert ss.semiseparable_rank(linear) == STATE
    assert ss.semiseparable_rank(softmax) == T // 2                # the largest possible: min(T−j, j+1)


def test_semiseparable_rank_is_batched():
    args, _ = random_inputs("gla", batch=2, heads=3, length=20, key_dim=4, value_dim=2)
    ranks = ss.semiseparable_rank(mixer("gla").matrix(*matrix_args("gla", args)))
    assert ranks.shape == (2, 3) and torch.equal(ranks, torch.full((2, 3), 4))


def test_ssd_matrix_is_the_sss_product_with_scalar_transitions():
    """The SSD theorem: A_t = a_t·I turns C_iᵀ A_i⋯A_{j+1} B_j Δ_j into L_ij (C_iᵀ B_j) Δ_j."""
    (x, dt, A, B, C), _ = random_inputs("ssd", batch=1, heads=1, length=30, key_dim=STATE, value_dim=2, gate="strong")
    a = torch.exp(dt[0, :, 0] * A[0])
    transitions = a[:, None, None] * torch.eye(STATE, dtype=torch.float64)
    M_sss = ss.sss_matrix(C[0, :, 0], transitions, B[0, :, 0] * dt[0, :, 0, None])
    e = errors(ssd.matrix(dt, A, B, C)[0, 0], M_sss)
    assert e.within(TOLERANCE["fp64"]), e


def test_semiseparable_rank_rejects_non_square_input():
    with pytest.raises(ValueError, match="square"):
        ss.semiseparable_rank(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="sss_matrix"):
        ss.sss_matrix(torch.zeros(5, 3), torch.zeros(5, 3, 2), torch.zeros(5, 3))


@pytest.mark.parametrize("fn", [ss.segsum, ss.one_semiseparable_mask])
def test_segsum_and_mask_refuse_what_has_no_log_decays_to_mask(fn):
    """A list, a 0-d tensor (no time dimension) or an integer tensor (no −∞ for the upper triangle):
    a ValueError naming log_a, where they crashed inside torch."""
    for bad in ([-1.0, -2.0], torch.tensor(-1.0), torch.tensor([-1, -2]), torch.tensor([True]),
                torch.tensor([-1j])):
        with pytest.raises(ValueError, match=f"{fn.__name__}: log_a must be a floating-point tensor"):
            fn(bad)
    assert fn(torch.zeros(3, 0)).shape == (3, 0, 0)                # T = 0: empty, as torch gives


def test_semiseparable_rank_refuses_an_inf_or_nan():
    """An inf made every singular value NaN, and the rank came out 0."""
    L = ss.one_semiseparable_mask(torch.full((6,), -0.5, dtype=torch.float64))
    for value in (float("inf"), float("nan")):
        M = L.clone()
        M[4, 1] = value
        with pytest.raises(ValueError, match="semiseparable_rank: M must be finite"):
            ss.semiseparable_rank(M)
    with set_value_checks(False), pytest.raises(torch.linalg.LinAlgError):    # unchecked: torch's SVD says
        ss.semiseparable_rank(M)
    with pytest.raises(ValueError, match="real square"):
        ss.semiseparable_rank(L.to(torch.complex128))


def test_sss_matrix_at_t_zero_and_refuses_mixed_dtypes_devices_and_non_tensors():
    C, B = torch.randn(2, 0, 3, dtype=torch.float64), torch.randn(2, 0, 3, dtype=torch.float64)
    assert ss.sss_matrix(C, torch.zeros(2, 0, 3, 3, dtype=torch.float64), B).shape == (2, 0, 0)
    C, B = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    A = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    for name, bad in (("A", (C, A.float(), B)), ("B", (C, A, B.float())), ("B", (C, A, B.to("meta"))),
                      ("C", (C.tolist(), A, B)), ("C", (C.long(), A, B))):
        with pytest.raises(ValueError, match=f"sss_matrix: {name} "):
            ss.sss_matrix(*bad)
    assert torch.equal(ss.sss_matrix(C, A, B), (C @ B.T).tril())      # A_t = I: the masked C Bᵀ
