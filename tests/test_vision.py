"""The cross-scan (lecture_kit.vision): scan orders are permutations that cross_merge inverts, each
direction is exactly ssd.recurrent on its permuted sequence, gradients reach every parameter, the
receptive field of a raster scan is causal in raster order while the cross-scan's covers the grid,
and bad input raises ValueError naming the argument."""
import re

import pytest
import torch
import torch.nn.functional as F

from lecture_kit import ssd
from lecture_kit.blocks import seeded
from lecture_kit.testing import TOLERANCE, errors
from lecture_kit.vision import DIRECTIONS, CrossScan2D, cross_merge, cross_scan, scan_orders

D_MODEL = 16
SMALL = dict(d_state=8, headdim=8, chunk_size=8)       # E = 16, H = 2 heads per direction


def module(directions=4, dtype=torch.float64, **options):
    return seeded(CrossScan2D, D_MODEL, seed=0, directions=directions, **{**SMALL, **options}).to(dtype)


def patches(B=2, h=5, w=7, C=D_MODEL, dtype=torch.float64, seed=1):
    return torch.randn(B, h, w, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


def raises_naming(arg, fn):
    with pytest.raises(ValueError, match=rf"(?<![\w.]){re.escape(arg)}(?![\w])"):
        fn()


def within(actual, reference, key="fp64"):
    e = errors(actual, reference)
    assert e.within(TOLERANCE[key]), e


# ---- scan orders ----

@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (4, 1), (3, 4), (6, 6)])
def test_scan_orders_are_the_four_permutations(h, w):
    orders = scan_orders(h, w)
    L = h * w
    assert orders.shape == (4, L) and orders.dtype == torch.int64 and len(DIRECTIONS) == 4
    for row in orders:
        assert torch.equal(row.sort().values, torch.arange(L))
    grid = torch.arange(L).reshape(h, w)
    assert torch.equal(orders[0], grid.flatten()) and torch.equal(orders[1], grid.T.flatten())
    assert torch.equal(orders[2], orders[0].flip(0)) and torch.equal(orders[3], orders[1].flip(0))


def test_scan_orders_of_a_small_grid_by_hand():
    assert scan_orders(2, 3).tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5],
                                          [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]


@pytest.mark.parametrize("K", [1, 4])
def test_cross_merge_inverts_cross_scan(K):
    x = patches(h=3, w=5)
    orders = scan_orders(3, 5)[:K]
    s = cross_scan(x, orders)
    assert s.shape == (2, 15, K, D_MODEL)
    for k in range(K):                                   # step t of direction k holds patch π_k[t]
        assert torch.equal(s[:, :, k], x.flatten(1, 2)[:, orders[k]])
    assert torch.equal(cross_merge(s, orders, 3, 5), K * x)   # identity mixing: K × the input


# ---- the module ----

@pytest.mark.parametrize("directions", [1, 4])
@pytest.mark.parametrize("h,w", [(1, 1), (1, 9), (5, 7), (4, 4)])
def test_shapes(directions, h, w):
    m = module(directions)
    u = patches(3, h, w)
    assert m(u).shape == (3, h, w, D_MODEL)
    x, dt, A, B, C = m.ssd_inputs(u)
    K, H, L = directions, m.nheads, h * w
    assert x.shape == (3, L, K * H, 8) and dt.shape == (3, L, K * H) and A.shape == (K * H,)
    assert B.shape == C.shape == (3, L, K, 8)
    assert m.mixing_matrices(u).shape == (3, K, H, L, L)


def reference_direction(m, u, k):
    """Direction k from the module's parameters alone: permute, project, ssd.recurrent (fp64)."""
    E, N, H = m.d_inner, m.d_state, m.nheads
    perm = scan_orders(u.shape[1], u.shape[2])[k]
    seq = u.flatten(1, 2)[:, perm]                                          # [B, L, d_model]
    x, B, C, dt_raw = (seq @ m.in_proj[k].weight.T).split([E, N, N, H], dim=-1)
    dt = F.softplus(dt_raw + m.dt_bias[k])
    y, _ = ssd.recurrent(x.unflatten(-1, (H, m.headdim)), dt, -torch.exp(m.A_log[k]),
                         B[:, :, None], C[:, :, None], D=m.D[k])
    return y, perm                                                          # y [B, L, H, P], scan order


@pytest.mark.parametrize("directions", [1, 4])
def test_each_direction_is_ssd_recurrent_on_its_permuted_sequence(directions):
    m, u = module(directions), patches(h=5, w=7)                           # L = 35: chunks of 8, padded
    with torch.no_grad():
        y_all, _ = m.mixer(*m.ssd_inputs(u), D=m.D.flatten())             # [B, L, K·H, P]
        H = m.nheads
        merged = 0
        for k in range(directions):
            y_ref, perm = reference_direction(m, u, k)
            within(y_all[:, :, k * H:(k + 1) * H], y_ref)                 # ≤ 1e-12 relative RMS
            merged = merged + y_ref.flatten(-2)[:, perm.argsort()]         # back to patch order
        within(m(u), m.out_proj(merged).unflatten(1, (5, 7)))


def test_chunk_size_does_not_change_the_output():
    u = patches(h=6, w=5)
    with torch.no_grad():
        within(module(chunk_size=4)(u), module(chunk_size=64)(u))


def test_fp32_matches_the_fp64_reference():
    m64, u64 = module(), patches()
    with torch.no_grad():
        within(module(dtype=torch.float32)(u64.float()), m64(u64), "fp32")


def test_mixing_matrices_reproduce_the_output():
    m, u = module(), patches(h=4, w=6)
    K, H, P = m.directions, m.nheads, m.headdim
    with torch.no_grad():
        M = m.mixing_matrices(u)                                           # [B, K, H, L, L], patch coords
        x = m.ssd_inputs(u).x.unflatten(2, (K, H))                         # [B, L, K, H, P], scan order
        step = m.orders(4, 6).argsort(dim=1)
        x_patch = torch.stack([x[:, step[k], k] for k in range(K)], dim=2)   # patch order
        y = torch.einsum("bkhpq,bqkhc->bpkhc", M, x_patch) + m.D[:, :, None] * x_patch
        within(m.out_proj(y.sum(2).flatten(-2)).unflatten(1, (4, 6)), m(u))
        # raster order is causal in patch coordinates; its reverse is anti-causal
        assert torch.equal(M[:, 0], M[:, 0].tril()) and torch.equal(M[:, 2], M[:, 2].triu())
        assert not torch.equal(M[:, 1], M[:, 1].tril())


@pytest.mark.parametrize("directions", [1, 4])
def test_gradients_reach_every_parameter(directions):
    m = module(directions, dtype=torch.float32)
    m(patches(dtype=torch.float32)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---- effective receptive field ----

def input_gradient(m, u, i, j):
    """|∂ out[:, i, j] / ∂ u| summed over batch and channels: [h, w]."""
    u = u.clone().requires_grad_(True)
    out = m(u)
    weights = torch.randn(out.shape[0], out.shape[-1], generator=torch.Generator().manual_seed(2), dtype=u.dtype)
    (out[:, i, j] * weights).sum().backward()
    return u.grad.abs().sum(dim=(0, 3))


@pytest.mark.parametrize("i,j", [(0, 0), (2, 3), (4, 6), (3, 0)])
def test_raster_scan_sees_only_earlier_patches(i, j):
    h, w = 5, 7
    g = input_gradient(module(1), patches(h=h, w=w), i, j).flatten()
    p = i * w + j
    assert torch.all(g[p + 1:] == 0)                                        # exactly: causal in raster order
    assert torch.all(g[: p + 1] > 0)                                        # and everything before it counts


@pytest.mark.parametrize("i,j", [(0, 0), (2, 3), (4, 6)])
def test_cross_scan_sees_the_whole_grid(i, j):
    g = input_gradient(module(4), patches(h=5, w=7), i, j)
    assert torch.all(g > 0)


# ---- argument checking ----

def test_bad_input_names_the_argument():
    m, u = module(), patches()
    for bad in (u[0], u.to(torch.int64), u.tolist(), u.float(), u[..., :8], u[:, :0]):
        raises_naming("u", lambda: m(bad))
    raises_naming("u", lambda: m.mixing_matrices(u[0]))
    for arg, kw in (("d_model", dict(d_model=0)), ("d_state", dict(d_state=-1)), ("headdim", dict(headdim=5)),
                    ("expand", dict(expand=1.5)), ("directions", dict(directions=2)),
                    ("directions", dict(directions=True)), ("chunk_size", dict(chunk_size=0)),
                    ("A_init_range", dict(A_init_range=(0, 1))), ("dt_init_range", dict(dt_init_range=(0.1, 1e-3)))):
        raises_naming(arg, lambda: CrossScan2D(**{**dict(d_model=D_MODEL, **SMALL), **kw}))
    raises_naming("h", lambda: scan_orders(0, 3))
    raises_naming("w", lambda: scan_orders(3, "4"))
    orders = scan_orders(5, 7)
    for bad in (orders[:, :-1], orders.float(), orders[0], orders.clone().fill_(0), orders.tolist()):
        raises_naming("orders", lambda: cross_scan(u, bad))
    raises_naming("x", lambda: cross_scan(u[0], orders))
    s = cross_scan(u, orders)
    raises_naming("y", lambda: cross_merge(s, orders, 7, 6))
    raises_naming("y", lambda: cross_merge(s[:, :, :2], orders, 5, 7))
    raises_naming("h", lambda: cross_merge(s, orders, 0, 7))
