"""The cross-scan (lecture_kit.vision): scan orders are permutations that cross_merge inverts, each
direction is exactly ssd.recurrent on its permuted sequence, gradients reach every parameter, the
receptive field of a raster scan is causal in raster order while the cross-scan's covers the grid,
and bad input raises ValueError naming the argument.  The snake and Hilbert orders move to a
neighbour at every step, neighbour_distances agrees with enumeration, and scan_2d equals its
unrolled form (values and gradients), decays by Manhattan distance for a constant decay, and is SSD
on a single row or column."""
import re

import pytest
import torch
import torch.nn.functional as F

from lecture_kit import ssd
from lecture_kit.blocks import seeded
from lecture_kit.testing import TOLERANCE, errors
from lecture_kit.vision import (DIRECTIONS, CrossScan2D, cross_merge, cross_scan, hilbert_order,
                                 neighbour_distances, scan_2d, scan_orders, snake_order)

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


# ---- scan orders beyond the cross-scan, and the distances they leave ----

def steps_apart_each_move(order, w):
    """|Δrow| + |Δcolumn| of every move of an order: 1 where it steps to a neighbour."""
    r, c = order // w, order % w
    return (r.diff().abs() + c.diff().abs()).tolist()


def test_snake_order_by_hand_and_every_move_is_to_a_neighbour():
    assert snake_order(3, 4).tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    assert snake_order(1, 1).tolist() == [0]
    for h, w in [(1, 6), (5, 1), (4, 7)]:
        order = snake_order(h, w)
        assert torch.equal(order.sort().values, torch.arange(h * w))
        assert set(steps_apart_each_move(order, w)) <= {1}


def test_hilbert_order_visits_every_patch_by_neighbour_moves_corner_to_corner():
    assert hilbert_order(2).tolist() == [0, 2, 3, 1]              # down, right, up: a U
    for n in (1, 2, 4, 8, 32):
        order = hilbert_order(n)
        assert torch.equal(order.sort().values, torch.arange(n * n))
        assert set(steps_apart_each_move(order, n)) <= {1}
        assert order[0] == 0 and order[-1] == n - 1                # top left to top right


def test_hilbert_order_is_self_similar():
    """Each quadrant of the 8×8 curve is visited as one whole block of 16 steps: a 4×4 curve."""
    step = hilbert_order(8).argsort().reshape(8, 8)
    quadrants = [step[:4, :4], step[4:, :4], step[4:, 4:], step[:4, 4:]]     # the visiting order
    for k, q in enumerate(quadrants):
        assert sorted(q.flatten().tolist()) == list(range(16 * k, 16 * (k + 1)))


def brute_force_distances(orders, h, w):
    """Every 4-neighbour pair by enumeration, horizontal pairs first: min over orders of |t(p) − t(q)|."""
    steps = [{p: t for t, p in enumerate(order.tolist())} for order in orders]
    pairs = [(i * w + j, i * w + j + 1) for i in range(h) for j in range(w - 1)] + \
            [(i * w + j, (i + 1) * w + j) for i in range(h - 1) for j in range(w)]
    return [min(abs(s[p] - s[q]) for s in steps) for p, q in pairs]


@pytest.mark.parametrize("h,w", [(1, 5), (4, 1), (3, 4), (6, 7)])
def test_neighbour_distances_by_enumeration(h, w):
    g = torch.Generator().manual_seed(h * w)
    random_orders = torch.stack([torch.randperm(h * w, generator=g) for _ in range(3)])
    for orders in (scan_orders(h, w), scan_orders(h, w)[:1], snake_order(h, w)[None], random_orders):
        d = neighbour_distances(orders, h, w)
        assert d.dtype == torch.int64 and d.tolist() == brute_force_distances(orders, h, w)


def test_neighbour_distances_of_the_named_orders():
    h, w = 5, 8
    raster = neighbour_distances(scan_orders(h, w)[0], h, w)      # one order may come without a K axis
    n_horizontal = h * (w - 1)
    assert (raster[:n_horizontal] == 1).all() and (raster[n_horizontal:] == w).all()
    assert (neighbour_distances(scan_orders(h, w), h, w) == 1).all()          # rows and columns together
    assert torch.equal(neighbour_distances(scan_orders(h, w)[2:3], h, w), raster)   # reversal changes nothing
    snake = neighbour_distances(snake_order(h, w), h, w)
    j = torch.arange(w).repeat(h - 1)                              # column of each vertical pair
    row = torch.arange(h - 1).repeat_interleave(w)
    expected_vertical = torch.where(row % 2 == 0, 2 * (w - 1 - j) + 1, 2 * j + 1)
    assert (snake[:n_horizontal] == 1).all() and torch.equal(snake[n_horizontal:], expected_vertical)


# ---- the two-dimensional scan ----

def grid_inputs(B=2, h=3, w=4, H=4, P=3, G=2, N=5, dtype=torch.float64, seed=3, constant_step=False):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    dt = torch.full((B, h, w, H), 0.3, dtype=dtype) if constant_step else \
        F.softplus(rand(B, h, w, H) - 1)
    A = -torch.rand(H, generator=g, dtype=dtype) - 0.2
    return rand(B, h, w, H, P), dt, A, rand(B, h, w, G, N), rand(B, h, w, G, N)


def scan_2d_by_paths(x, dt, A, B, C):
    """The unrolled form, patch pair by patch pair: the weight of (i', j') at (i, j) is the product of
    the decays a = exp(Δ A) right along row i' (columns j'+1 … j), then down column j (rows i'+1 … i)."""
    Bsz, h, w, H, P = x.shape
    per_group = H // B.shape[3]
    a = torch.exp(dt * A)
    y = torch.zeros_like(x)
    for i, j in ((i, j) for i in range(h) for j in range(w)):
        for i0, j0 in ((i0, j0) for i0 in range(i + 1) for j0 in range(j + 1)):
            decay = a[:, i0, j0 + 1:j + 1].prod(dim=1) * a[:, i0 + 1:i + 1, j].prod(dim=1)      # [B, H]
            for n in range(H):
                gr = n // per_group
                score = (C[:, i, j, gr] * B[:, i0, j0, gr]).sum(-1) * dt[:, i0, j0, n] * decay[:, n]
                y[:, i, j, n] += score[:, None] * x[:, i0, j0, n]
    return y


def test_scan_2d_is_its_unrolled_form():
    args = grid_inputs()
    y = scan_2d(*args)
    assert y.shape == args[0].shape and y.dtype == torch.float64
    within(y, scan_2d_by_paths(*args))


def test_scan_2d_with_a_constant_decay_decays_by_manhattan_distance():
    h, w, N, step = 4, 5, 5, 0.3
    _, dt, A, B, C = grid_inputs(B=1, h=h, w=w, H=1, G=1, N=N, constant_step=True)
    a = torch.exp(step * A[0])
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i0, j0 in [(0, 0), (1, 2), (3, 4)]:
        x = torch.zeros(1, h, w, 1, 1, dtype=torch.float64)
        x[0, i0, j0] = 1.0                                          # one patch carries a unit input
        response = scan_2d(x, dt, A, torch.ones_like(B), torch.ones_like(C))[0, :, :, 0, 0]
        reached = (i >= i0) & (j >= j0)                             # the quadrant below and to the right
        expected = step * N * a ** ((i - i0) + (j - j0)).double()   # Δ · Cᵀ B · a^{|di| + |dj|}
        within(response, torch.where(reached, expected, 0.0))


@pytest.mark.parametrize("axis", ["one row", "one column"])
def test_scan_2d_on_a_single_row_or_column_is_ssd(axis):
    x, dt, A, B, C = grid_inputs(h=1, w=9) if axis == "one row" else grid_inputs(h=9, w=1)
    line = lambda t: t.flatten(1, 2)                               # [B, h, w, ...] → [B, T, ...]
    y_ssd, _ = ssd.recurrent(line(x), line(dt), A, line(B), line(C))
    within(line(scan_2d(x, dt, A, B, C)), y_ssd)


def test_scan_2d_in_fp32_matches_fp64():
    args = grid_inputs(h=6, w=7)
    y32 = scan_2d(*(t.float() for t in args))
    assert y32.dtype == torch.float32
    within(y32, scan_2d(*args), "fp32")


def test_scan_2d_gradients_match_the_unrolled_form():
    args = [t.clone().requires_grad_(True) for t in grid_inputs(B=1, h=3, w=3, H=2, G=1, N=2, P=2)]
    cotangent = torch.randn(1, 3, 3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fast = torch.autograd.grad((scan_2d(*args) * cotangent).sum(), args)
    slow = torch.autograd.grad((scan_2d_by_paths(*args) * cotangent).sum(), args)
    for f, s in zip(fast, slow):
        within(f, s)


def test_scan_2d_bad_input_names_the_argument():
    x, dt, A, B, C = grid_inputs()
    raises_naming("x", lambda: scan_2d(x[0], dt, A, B, C))
    raises_naming("dt", lambda: scan_2d(x, dt[:, :2], A, B, C))
    raises_naming("dt", lambda: scan_2d(x, -dt, A, B, C))
    raises_naming("A", lambda: scan_2d(x, dt, -A, B, C))
    raises_naming("A", lambda: scan_2d(x, dt, A[:3], B, C))
    raises_naming("B", lambda: scan_2d(x, dt, A, B.float(), C))
    raises_naming("C", lambda: scan_2d(x, dt, A, B, C[..., :2]))
    three_groups = lambda t: t[:, :, :, :1].expand(-1, -1, -1, 3, -1)     # 3 does not divide H = 4
    raises_naming("G", lambda: scan_2d(x, dt, A, three_groups(B), three_groups(C)))
    raises_naming("h", lambda: scan_2d(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0]))


def test_new_orders_bad_input_names_the_argument():
    raises_naming("h", lambda: snake_order(0, 3))
    raises_naming("w", lambda: snake_order(2, 2.0))
    raises_naming("n", lambda: hilbert_order(6))
    raises_naming("n", lambda: hilbert_order(0))
    raises_naming("orders", lambda: neighbour_distances(torch.arange(6).float(), 2, 3))
    raises_naming("orders", lambda: neighbour_distances(torch.zeros(6, dtype=torch.int64), 2, 3))
    raises_naming("orders", lambda: neighbour_distances(torch.arange(6), 2, 4))
    raises_naming("h", lambda: neighbour_distances(torch.arange(6), 0, 6))
