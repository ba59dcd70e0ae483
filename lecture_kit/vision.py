"""Cross-scan: Mamba-2's SSD on a grid of image patches, VMamba style (Liu et al. 2024).  Notebook 04e.

An image cut into an h×w grid of patches has no causal order, and a causal mixer needs one.  Patches
are numbered in raster order, p = i·w + j for row i and column j (L = h·w of them).  The cross-scan
reads the grid in K orders π_k, a permutation of 0..L−1 each (π_k[t] = the patch visited at step t):

    k = 0  row-major            k = 1  column-major
    k = 2  row-major, reversed  k = 3  column-major, reversed        (VMamba's order of the four)

runs one SSD per order, maps every output back to its patch and sums over the orders:

    s_k = u[π_k]                               scan: grid → sequence k             u [B, L, d_model]
    x_k, Δ_k, B_k, C_k = W_k s_k               per-direction projection: x_k [B, L, H, P],
                                                   Δ_k = softplus(· + dt_bias_k) [B, L, H], B_k, C_k [B, L, N]
    y_k = SSD(x_k, Δ_k, A_k, B_k, C_k) + D_k x_k     A_k = −exp(A_log_k) [H], as in Mamba-2
    out = W_out Σ_k y_k[π_k⁻¹]                 merge: sequence k → grid, summed over the K orders

On the patches, head by head, direction k mixes its own projection of the input with the matrix
Π_kᵀ (M_k + D_k I) Π_k, where Π_k is the permutation matrix of π_k and M_k = L_k ∘ (C_k B_kᵀ) · diag(Δ_k)
is the semiseparable matrix of ``lecture_kit.ssd``: each direction is semiseparable in its own order,
and the merge sums K such mixings.  A single raster scan (K = 1) is lower-triangular in raster order,
so patch p never sees a patch after it; the reversed orders supply the other triangle, and the column
orders make vertical neighbours adjacent.

The K directions run as one SSD call: direction k owns heads k·H … k·H + H − 1 and B/C group k, so
heads never mix across directions.  Left out, to keep the mixing visible: VMamba's depthwise 2D
convolution before the scan, its output norm and its gate (all per patch or local, none a scan).

Layout: channels last, u [B, h, w, d_model] → out [B, h, w, d_model].

What an order does to distances (notebook 04e measures it): ``snake_order`` (rows,
alternately left to right and right to left) and ``hilbert_order`` (a Hilbert curve on
a 2ⁿ×2ⁿ grid) are two more orders beside ``scan_orders``' four, and
``neighbour_distances`` reports, for every pair of patches that touch in the image, how
many steps apart a set of orders puts them.  ``scan_2d`` is the alternative to ordering
at all: a recurrence over both axes, whose state at a patch comes from the patch to its
left and the one above it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ssd
from ._validate import Signature, compute_dtype
from ._validate import interval as _interval, positive_int as _positive_int
from .blocks import SSD, SSDInputs

#: The names of the four orders, in the order of ``scan_orders``' rows.
DIRECTIONS = ("rows", "columns", "rows, reversed", "columns, reversed")


def scan_orders(h: int, w: int, *, device=None) -> torch.Tensor:
    """The four scan orders of an h×w grid as permutations: LongTensor [4, h·w].

    Row k lists the raster indices p = i·w + j of the patches in the order direction k visits them
    (``DIRECTIONS[k]``): row-major, column-major, and the same two reversed.
    """
    for name, value in (("h", h), ("w", w)):
        _positive_int("scan_orders", name, value)
    grid = torch.arange(h * w, device=device).reshape(h, w)
    rows, cols = grid.flatten(), grid.T.flatten()
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


def _check_orders(sig: Signature, orders, L: int) -> None:
    if not isinstance(orders, torch.Tensor) or orders.dtype != torch.int64 or orders.dim() != 2 \
            or orders.shape[1] != L:
        got = f"{orders.dtype} {tuple(orders.shape)}" if isinstance(orders, torch.Tensor) else type(orders).__name__
        raise sig.error(f"orders must be a LongTensor [K, L={L}] (see scan_orders), got {got}")
    if sig.device is not None and orders.device != sig.device:
        raise sig.error(f"orders is on {orders.device} but the patches are on {sig.device}")
    if not torch.equal(orders.sort(dim=1).values, torch.arange(L, device=orders.device).expand_as(orders)):
        raise sig.error("orders must hold one permutation of 0 … L−1 per row")


def cross_scan(x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Grid → K sequences: x [B, h, w, C], orders [K, h·w] → s [B, L, K, C],  s[:, t, k] = x_p, p = π_k[t]."""
    sig = Signature("cross_scan")
    sig.tensor("x", x, "B h w C")
    _check_orders(sig, orders, x.shape[1] * x.shape[2])
    return x.flatten(1, 2)[:, orders.T]                       # [B, L, K, C]


def cross_merge(y: torch.Tensor, orders: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """K sequences → grid, summed: y [B, L, K, C] (step t of direction k) → [B, h, w, C],

        out_p = Σ_k y[:, π_k⁻¹(p), k],

    so ``cross_merge(cross_scan(x, orders), orders, h, w) = K·x``.
    """
    sig = Signature("cross_merge")
    for name, value in (("h", h), ("w", w)):
        _positive_int("cross_merge", name, value)
    sig.tensor("y", y, "B L K C")
    if sig.sizes["L"] != h * w:
        raise sig.error(f"y must have L = h·w = {h * w} steps, got shape {tuple(y.shape)}")
    _check_orders(sig, orders, h * w)
    sig.expect("y", y, K=orders.shape[0])
    step = orders.argsort(dim=1)                               # π_k⁻¹: when each patch is visited
    on_grid = torch.gather(y, 1, step.T[None, :, :, None].expand_as(y))    # [B, L, K, C], patch order
    return on_grid.sum(dim=2).unflatten(1, (h, w))


# ---- what a scan order does to distances ----

def snake_order(h: int, w: int, *, device=None) -> torch.Tensor:
    """The snake (boustrophedon) order of an h×w grid: LongTensor [h·w].

    Row i is read left to right for even i and right to left for odd i, so that every
    step moves to a neighbouring patch."""
    for name, value in (("h", h), ("w", w)):
        _positive_int("snake_order", name, value)
    grid = torch.arange(h * w, device=device).reshape(h, w)
    grid[1::2] = grid[1::2].flip(1)
    return grid.flatten()


def hilbert_order(n: int, *, device=None) -> torch.Tensor:
    """A Hilbert curve through an n×n grid, n a power of two: LongTensor [n²], patches.

    Built from the grid of visiting steps G_n (G[i, j] = the step at which patch (i, j)
    is visited): G_1 = [[0]], and G_2n puts four copies of G_n in its quadrants, visited
    top left, bottom left, bottom right, top right:

        G_2n = [[ G_nᵀ,        rot180(G_n)ᵀ + 3n² ],
                [ G_n + n²,    G_n + 2n²          ]]

    G_n starts at the top-left patch and ends at the top-right one; transposed, the
    first copy ends at the bottom left, next to the start of the second, and the
    anti-transposed last copy starts at the bottom right of its quadrant, next to the
    end of the third.  Every step of the curve therefore moves to a neighbouring patch.
    """
    _positive_int("hilbert_order", "n", n)
    if n & (n - 1):
        raise ValueError(f"hilbert_order: n must be a power of two, got {n}")
    G = torch.zeros(1, 1, dtype=torch.int64, device=device)
    while G.shape[0] < n:
        m = G.numel()
        G = torch.cat([torch.cat([G.T, G.flip(0, 1).T + 3 * m], dim=1),
                       torch.cat([G + m, G + 2 * m], dim=1)], dim=0)
    return G.flatten().argsort()


def neighbour_distances(orders: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """How far apart in the sequence the orders put patches that touch in the image.

    ``orders`` [K, h·w] (or one order [h·w]) are permutations, ``orders[k, t]`` the
    patch visited at step t of order k, so t_k = π_k⁻¹ gives each patch's step.  Returns
    a LongTensor with one entry per pair {p, q} of 4-neighbours, the h·(w−1) horizontal
    pairs in raster order followed by the (h−1)·w vertical ones:

        d(p, q) = min_k |t_k(p) − t_k(q)|,

    the distance in the order that brings the pair closest (a mixer that runs all K
    orders and sums them can use the shortest).  Reversing an order changes no distance.
    """
    sig = Signature("neighbour_distances")
    for name, value in (("h", h), ("w", w)):
        _positive_int("neighbour_distances", name, value)
    if isinstance(orders, torch.Tensor) and orders.dim() == 1:
        orders = orders[None]
    _check_orders(sig, orders, h * w)
    step = orders.argsort(dim=1).reshape(-1, h, w)              # [K, h, w]: t_k(i, j)
    horizontal = (step[:, :, 1:] - step[:, :, :-1]).abs().flatten(1)
    vertical = (step[:, 1:, :] - step[:, :-1, :]).abs().flatten(1)
    return torch.cat([horizontal, vertical], dim=1).min(dim=0).values


# ---- a recurrence over both axes ----

def scan_2d(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            C: torch.Tensor) -> torch.Tensor:
    """A two-dimensional selective scan from the top-left patch: SSD's recurrence along
    the rows, then down the columns of the row states.  Per batch element and head, with
    a = exp(Δ A) and states g, h ∈ R^{P×N}:

        g_{i,j} = a_{i,j} g_{i,j−1} + Δ_{i,j} x_{i,j} B_{i,j}ᵀ    rows, g_{i,−1} = 0
        h_{i,j} = a_{i,j} h_{i−1,j} + g_{i,j}                      columns, h_{−1,j} = 0
        y_{i,j} = h_{i,j} C_{i,j}

    Unrolled, patch (i', j') with i' ≤ i and j' ≤ j reaches (i, j) with the weight

        (a_{i',j'+1} ⋯ a_{i',j}) (a_{i'+1,j} ⋯ a_{i,j}) · C_{i,j}ᵀ B_{i',j'} Δ_{i',j'},

    the decays on the path right along row i', then down column j: for a constant a it
    is a^{(i−i') + (j−j')}, a decay by distance in the image.  Patches below or to the
    right are not reached (scan the flipped grid for the other corners).  Unlike the
    chunked 1-D forms it keeps a P×N state at every patch, in w + h sequential steps.

    Shapes: x [B, h, w, H, P], dt [B, h, w, H] (≥ 0), A [H] (< 0), B, C [B, h, w, G, N]
    (G divides H; head n reads group n // (H/G)) → y [B, h, w, H, P] in x's dtype,
    computed in fp32 (fp64 for fp64 inputs).
    """
    sig = Signature("scan_2d")
    sig.tensor("x", x, "B h w H P")
    sig.tensor("dt", dt, "B h w H", same_dtype=False)
    sig.tensor("A", A, "H", same_dtype=False)
    sig.tensor("B", B, "B h w G N")
    sig.tensor("C", C, "B h w G N")
    sig.at_least_one("h")
    sig.at_least_one("w")
    sig.groups_divide("G", "H")
    sig.values([("dt", dt, ">= 0"), ("A", A, "< 0")])
    f, per_group = compute_dtype(x.dtype), sig.sizes["H"] // sig.sizes["G"]
    heads = lambda t: t.to(f).repeat_interleave(per_group, dim=3)    # [B, h, w, H, N]
    dt = dt.to(f)
    a = torch.exp(dt * A.to(f))[..., None, None]                  # [B, h, w, H, 1, 1]
    u = torch.einsum("bijhp,bijhn->bijhpn", dt[..., None] * x.to(f), heads(B))  # Δ x Bᵀ
    g, rows = torch.zeros_like(u[:, :, 0]), []
    for j in range(sig.sizes["w"]):                                  # along the rows
        g = a[:, :, j] * g + u[:, :, j]
        rows.append(g)
    g, C = torch.stack(rows, dim=2), heads(C)                     # [B, h, w, H, P, N]
    state, y = torch.zeros_like(g[:, 0]), []
    for i in range(sig.sizes["h"]):                                  # down the columns
        state = a[:, i] * state + g[:, i]
        y.append(torch.einsum("bjhpn,bjhn->bjhp", state, C[:, i]))
    return torch.stack(y, dim=1).to(x.dtype)


class CrossScan2D(nn.Module):
    """VMamba-style 2D selective scan (module docstring): u [B, h, w, d_model] → [B, h, w, d_model].

    Arguments: ``d_state`` N = 16, ``headdim`` P = 16, ``expand`` = 1 (E = expand·d_model = H·P inner
    channels per direction), ``directions`` K = 4 (the cross-scan) or 1 (a single raster scan, for
    comparison), ``chunk_size`` of the SSD's chunked form, and Mamba-2's initial ranges
    ``A_init_range`` = (1, 16) for −A and ``dt_init_range`` = (1e-3, 1e-1) for Δ.  Each direction has
    its own projection W_k [E + 2N + H, d_model], A_log_k, dt_bias_k and D_k [H]; the output
    projection W_out [d_model, E] is shared.
    """

    def __init__(self, d_model: int, d_state: int = 16, headdim: int = 16, *, expand: int = 1,
                 directions: int = 4, chunk_size: int = 64,
                 A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_init_range: tuple[float, float] = (1e-3, 1e-1)):
        super().__init__()
        owner = "CrossScan2D"
        for name, value in (("d_model", d_model), ("d_state", d_state), ("headdim", headdim), ("expand", expand)):
            _positive_int(owner, name, value)
        if isinstance(directions, bool) or not isinstance(directions, int) or directions not in (1, 4):
            raise ValueError(f"{owner}: directions must be 4 (cross-scan) or 1 (raster scan), got {directions!r}")
        E = expand * d_model
        if E % headdim:
            raise ValueError(f"{owner}: headdim = {headdim} must divide expand·d_model = {E}")
        A_low, A_high = _interval(owner, "A_init_range", A_init_range)
        dt_low, dt_high = _interval(owner, "dt_init_range", dt_init_range)
        self.d_model, self.d_state, self.headdim, self.directions = d_model, d_state, headdim, directions
        self.d_inner, self.nheads = E, E // headdim                          # E, H (per direction)
        K, H = directions, self.nheads

        self.in_proj = nn.ModuleList(nn.Linear(d_model, E + 2 * d_state + H, bias=False) for _ in range(K))
        self.A_log = nn.Parameter(torch.empty(K, H).uniform_(A_low, A_high).log())
        dt = torch.empty(K, H).uniform_(math.log(dt_low), math.log(dt_high)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))      # softplus⁻¹(Δ)
        self.D = nn.Parameter(torch.ones(K, H))
        self.mixer = SSD(chunk_size)
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def _check(self, fn: str, u) -> Signature:
        sig = Signature(f"CrossScan2D.{fn}")
        sig.tensor("u", u, "B h w d_model")
        if sig.sizes["h"] < 1 or sig.sizes["w"] < 1:
            raise sig.error(f"u must hold at least one patch (h, w >= 1), got shape {tuple(u.shape)}")
        sig.expect("u", u, d_model=self.d_model)
        weight = self.out_proj.weight
        if u.dtype != weight.dtype or u.device != weight.device:
            raise sig.error(f"u is {u.dtype} on {u.device} but the module's parameters are {weight.dtype} "
                            f"on {weight.device}; move one to the other (module.to(...))")
        return sig

    def orders(self, h: int, w: int, device=None) -> torch.Tensor:
        """The scan orders this module uses: ``scan_orders(h, w)[:directions]``, LongTensor [K, h·w]."""
        return scan_orders(h, w, device=device)[: self.directions]

    def ssd_inputs(self, u: torch.Tensor) -> SSDInputs:
        """u [B, h, w, d_model] → the inputs of the one SSD call, in scan order (step t, not patch p):

        x [B, L, K·H, P], Δ [B, L, K·H], A [K·H], B, C [B, L, K, N]; direction k owns heads
        k·H … k·H + H − 1 and group k of B and C.
        """
        self._check("ssd_inputs", u)
        K, H, N, E = self.directions, self.nheads, self.d_state, self.d_inner
        s = cross_scan(u, self.orders(u.shape[1], u.shape[2], u.device))        # [B, L, K, d_model]
        proj = torch.stack([W(s[:, :, k]) for k, W in enumerate(self.in_proj)], dim=2)
        x, B, C, dt_raw = proj.split([E, N, N, H], dim=-1)                        # [B, L, K, ·]
        f = compute_dtype(self.A_log.dtype)
        dt = F.softplus(dt_raw.to(f) + self.dt_bias.to(f))                         # [B, L, K, H]
        A = -torch.exp(self.A_log.to(f))                                           # [K, H]
        return SSDInputs(x.reshape(*x.shape[:2], K * H, self.headdim), dt.flatten(2), A.flatten(), B, C)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, h, w, d_model] → out [B, h, w, d_model] (module docstring)."""
        inputs = self.ssd_inputs(u)
        y, _ = self.mixer(*inputs, D=self.D.flatten())                            # [B, L, K·H, P]
        y = y.reshape(*y.shape[:2], self.directions, self.d_inner)                 # [B, L, K, E]
        h, w = u.shape[1], u.shape[2]
        return self.out_proj(cross_merge(y, self.orders(h, w, u.device), h, w))

    def mixing_matrices(self, u: torch.Tensor) -> torch.Tensor:
        """Each direction's SSD matrix in patch coordinates: [B, K, H, L, L],

            M̃_k[p, q] = M_k[π_k⁻¹(p), π_k⁻¹(q)],     M_k = ssd.matrix(Δ_k, A_k, B_k, C_k),

        so that, head by head, the merged SSD output at patch p is Σ_k Σ_q M̃_k[p, q] x_k(q) + D_k x_k(p),
        with x_k(q) the x of direction k at patch q.  Raster order is lower-triangular; the others are
        lower-triangular only after their own permutation.
        """
        x, dt, A, B, C = self.ssd_inputs(u)
        K, H = self.directions, self.nheads
        M = ssd.matrix(dt, A, B, C).unflatten(1, (K, H))                           # [B, K, H, L, L], scan order
        step = self.orders(u.shape[1], u.shape[2], u.device).argsort(dim=1)        # [K, L]
        return torch.stack([M[:, k][:, :, step[k]][..., step[k]] for k in range(K)], dim=1)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, headdim={self.headdim}, "
                f"nheads={self.nheads}, directions={self.directions}")
