"""Matplotlib helpers for the pictures this lecture draws again and again: a T×T mixing matrix with
its chunk grid, the singular values of one of its blocks, and the timings of a mixer's forms
(this machine beside the recorded H200 runs).

Every helper draws on an ``Axes`` it is given and returns what it drew, so a notebook or a widget
lays out its own figure.  Conventions (as in notebook 00): rows are targets i, columns are sources j;
signed matrices use a diverging map centred on 0 ("RdBu_r"), non-negative ones a sequential map
("viridis"); the structural zeros above the diagonal of a causal matrix are shown in light grey, so
that a zero the mask imposes is never confused with a zero the data produced.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from .bench import run_label

#: Colour of the structural zeros above the diagonal of a lower-triangular matrix.
MASKED_COLOUR = "0.9"
#: At most this many tick labels per axis; longer label lists are thinned evenly.
MAX_TICK_LABELS = 48


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def matrix_heatmap(ax: Axes, M, *, chunk_size: int | None = None, labels: Sequence[str] | None = None,
                   title: str | None = None, signed: bool | None = None, colorbar: bool = True) -> AxesImage:
    """Draw a T×T matrix M (row i = target token, column j = source token) as a heatmap.

    Shapes: ``M [T, T]`` (tensor or array); ``labels``: T strings, the tokens, written along both
    axes (thinned to at most ``MAX_TICK_LABELS``).

    * Colours: if ``signed`` (default: M has a negative entry) a diverging map with limits ±max|M|,
      else a sequential map from 0 to max M.
    * If M is lower-triangular (causal), its upper triangle is drawn in grey, not as zeros.
    * ``chunk_size=Q`` draws the grid of the chunked algorithm (notebooks 03b and 04a): the **diagonal
      blocks** M[cQ:(c+1)Q, cQ:(c+1)Q], which the chunked form computes as small dense "attention"
      matrices, are outlined in solid black; the **off-diagonal blocks** below them, which it never
      forms but passes through the state (they have rank ≤ N), are separated by dashed grey lines.

    Returns the ``AxesImage``; ``image.get_array()`` is the drawn matrix.
    """
    M = _as_numpy(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"matrix_heatmap: M must be a square matrix [T, T], got shape {M.shape}")
    T = M.shape[0]
    if labels is not None and len(labels) != T:
        raise ValueError(f"matrix_heatmap: labels must have T = {T} entries, got {len(labels)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"matrix_heatmap: chunk_size must be a positive int or None, got {chunk_size!r}")

    signed = bool((M < 0).any()) if signed is None else signed
    largest = float(np.abs(M).max()) or 1.0
    cmap = colormaps["RdBu_r" if signed else "viridis"].with_extremes(bad=MASKED_COLOUR)
    causal = not np.triu(M, 1).any()
    shown = np.ma.masked_array(M, mask=np.triu(np.ones_like(M, dtype=bool), 1)) if causal else M
    image = ax.imshow(shown, cmap=cmap, vmin=-largest if signed else 0.0, vmax=largest,
                      interpolation="nearest")

    if chunk_size is not None:
        _draw_chunk_grid(ax, T, chunk_size)
    if labels is not None:
        step = -(-T // MAX_TICK_LABELS)
        ticks = np.arange(0, T, step)
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize="small")
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize="small")
    ax.set_xlabel("j (source token)")
    ax.set_ylabel("i (target token)")
    if title is not None:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, shrink=0.85)
    return image


def _draw_chunk_grid(ax: Axes, T: int, Q: int) -> None:
    """Solid outlines round the diagonal blocks, dashed lines between the blocks below them."""
    edges = list(range(0, T, Q)) + [T]
    for start, stop in zip(edges[:-1], edges[1:]):
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), stop - start, stop - start,
                               fill=False, edgecolor="black", linewidth=1.6))
    for boundary in edges[1:-1]:
        ax.plot([-0.5, boundary - 0.5], [boundary - 0.5, boundary - 0.5], color="0.35", linestyle="--", linewidth=0.8)
        ax.plot([boundary - 0.5, boundary - 0.5], [boundary - 0.5, T - 0.5], color="0.35", linestyle="--", linewidth=0.8)


def highlight_block(ax: Axes, rows: range, cols: range, *, colour: str = "tab:orange",
                    label: str | None = None) -> Rectangle:
    """Outline the block M[rows, cols] (contiguous ranges of row and column indices) on a heatmap
    drawn by ``matrix_heatmap``, e.g. the off-diagonal block whose singular values are plotted beside
    it; ``label`` is written just inside its top-left corner."""
    box = ax.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), len(cols), len(rows),
                                 fill=False, edgecolor=colour, linewidth=2.2))
    if label is not None:
        ax.text(cols.start, rows.start, label, color=colour, fontsize="small", fontweight="bold",
                ha="left", va="top")
    return box


def singular_values(ax: Axes, s, *, relative_to: float | None = None, threshold: float | None = None,
                    state_size: int | None = None, title: str | None = None):
    """Draw singular values σ_1 ≥ σ_2 ≥ … as points (k, σ_k / relative_to) on a logarithmic axis.

    Shapes: ``s [k]``.  ``relative_to`` defaults to σ_1; pass σ_max of the *whole* matrix to read a
    block's values on the scale that ``semiseparable.semiseparable_rank`` uses.  ``threshold`` (in the
    same relative units) draws the numerical-rank cut-off: points above it count towards the rank and
    are drawn in colour, points below it in grey.  ``state_size=N`` draws a vertical line after the
    N-th value: the theorem allows at most N values above the cut-off.  Exact zeros are drawn at the
    bottom of the axis (1e-18).

    Returns the number of values above ``threshold`` (None when no threshold is given).
    """
    s = _as_numpy(s).ravel()
    if s.size == 0:
        raise ValueError("singular_values: s is empty")
    scale = float(relative_to) if relative_to is not None else float(s[0])
    floor = 1e-18
    relative = np.maximum(s / (scale or 1.0), floor)
    k = np.arange(1, s.size + 1)
    counted = None
    if threshold is None:
        ax.plot(k, relative, "o", color="tab:blue", markersize=4)
    else:
        above = relative > threshold
        counted = int(above.sum())
        ax.plot(k[above], relative[above], "o", color="tab:blue", markersize=4, label=f"{counted} above cut-off")
        ax.plot(k[~above], relative[~above], "o", color="0.6", markersize=4)
        ax.axhline(threshold, color="tab:red", linestyle=":", linewidth=1, label="rank cut-off")
    if state_size is not None:
        ax.axvline(state_size + 0.5, color="black", linestyle="--", linewidth=1, label=f"N = {state_size}")
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, 3)
    ax.set_xlim(0.3, s.size + 0.7)
    ax.set_xlabel("k")
    ax.set_ylabel("σ_k (relative)" if relative_to is None else "σ_k / σ_max(M)")
    if threshold is not None or state_size is not None:
        ax.legend(loc="upper right", fontsize="small")
    if title is not None:
        ax.set_title(title)
    return counted


def plot_ladder(axes, live: dict, record: dict, mixer: str, *, title: str):
    """Timings of one mixer's ladder on two Axes, ``axes = (ax_live, ax_rec)``, both log–log, T in
    tokens against ms per call.

    * ``ax_live``: this machine's timings, ``live = {form: [(T, ms), ...]}`` as returned by
      ``bench.time_forms``, one line per form; titled ``title``.
    * ``ax_rec``: the recorded runs of ``record`` (``bench.load_record``) for ``mixer``, one line per
      (implementation, mode): forward ``o-``, forward plus backward ``s--``, each implementation in
      its own colour, with the "attention" baseline (PyTorch's SDPA, ``impl`` starting "torch") in grey
      for scale.  Failed measurements are left out.  Titled with the ``bench.run_label`` of the runs.

    Returns ``(live_lines, recorded_lines)``, the ``Line2D`` objects drawn on each Axes.
    """
    ax_live, ax_rec = axes
    live_lines = [ax_live.loglog(*zip(*points), "o-", label=form)[0] for form, points in live.items()]
    rows = [r for r in record["records"] if r["mixer"] in (mixer, "attention") and r.get("ms")]
    impls = sorted({r["impl"] for r in rows})
    recorded_lines = []
    for impl, mode in sorted({(r["impl"], r["mode"]) for r in rows}):
        pts = sorted((r["T"], r["ms"]) for r in rows if (r["impl"], r["mode"]) == (impl, mode))
        colour = "0.6" if impl.startswith("torch") else f"C{impls.index(impl)}"
        recorded_lines += ax_rec.loglog(*zip(*pts), "o-" if mode == "fwd" else "s--", color=colour,
                                        label=f"{impl} ({mode})")
    labels = sorted({run_label(record, r["run"]) for r in rows})
    for ax, text in ((ax_live, title), (ax_rec, "recorded: " + "; ".join(labels))):
        ax.set_title(text, fontsize=8); ax.set_xlabel("T (tokens)"); ax.set_ylabel("ms per call")
        ax.legend(fontsize=7)
    return live_lines, recorded_lines
