"""Two interactive pictures: the semiseparable explorer (zone 2) and the hidden-attention viewer (zone 5).

Each is an object holding ipywidgets controls and a matplotlib ``figure`` that the controls redraw
(``render()``).  Displayed in a notebook (as a cell's last value, or with ``display``), it is one
output that offers two views of itself, and each front end shows the one it can run:

* a widget: the controls above the picture (an ``ipywidgets.Image``), redrawn live by the kernel,
  which JupyterLab, Colab or VS Code show;
* HTML that moves without a kernel (``static_html``): the picture precomputed for a grid of the main
  controls' values, behind HTML controls and a few lines of JavaScript that switch between the
  pictures.  The book's pages show this view (its ``_config.yml`` ranks text/html above widget
  views).  Drawing the grid takes about a second a picture, so it is drawn only where the
  environment variable ``LECTURE_KIT_STATIC_FRAMES`` is ``1`` (the book build sets it); elsewhere
  the HTML holds the current picture alone, and no notebook waits for pictures nobody will see.

    semiseparable_explorer()        which mixer, T, state size, decay, chunk size, seed → the T×T
                                    matrix with its chunk grid, its measured semiseparable rank, and
                                    the singular values of one off-diagonal block
    hidden_attention_viewer(model)  a TinyMamba2LM (or any model with ``hidden_attention``), a layer,
                                    a head, a token sequence → that head's M = L ∘ (C Bᵀ)·diag(Δ)

Sizes stay CPU-friendly: T ≤ 256 (the rank measurement is T singular value decompositions).
"""
from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import os
import uuid
from typing import Callable, NamedTuple, Sequence

import ipywidgets
import PIL.Image
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import retnet
from .blocks import TinyMamba2LM, seeded
from .plots import highlight_block, matrix_heatmap, singular_values
from .semiseparable import default_tolerance, semiseparable_rank
from .testing import MIXERS, matrix_args, mixer, random_inputs

#: The matrices the explorer can draw: label shown in the menu → key.
MATRIX_KINDS = {"SSD (Mamba-2)": "ssd", "RetNet": "retnet", "GLA": "gla", "RWKV-7": "rwkv7",
                "linear attention": "linear", "softmax attention": "softmax"}
#: Largest sequence length the widgets accept.
MAX_LENGTH = 256
#: The state sizes the explorer's HTML view offers (with the explorer's own).
STATIC_STATE_SIZES = (1, 2, 4, 8, 16)


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def example_matrix(kind: str, *, length: int, state_size: int, decay: float = 0.1, seed: int = 0) -> torch.Tensor:
    """The T×T mixing matrix [T, T] (fp64) that the explorer draws, from seeded random inputs.

    * ``"ssd"``, ``"retnet"``, ``"gla"``, ``"rwkv7"``: the mixer's ``matrix(...)`` on
      ``testing.random_inputs(kind, batch=1, heads=1, key_dim=state_size, decay=decay, seed=seed)``;
      semiseparable rank ≤ state_size N.
    * ``"linear"``: causal linear attention tril(Q Kᵀ)/√N, i.e. ``retnet.matrix`` with γ = 1;
      rank ≤ N.  ``decay`` is ignored.
    * ``"softmax"``: causal softmax attention softmax(Q Kᵀ/√N + causal mask), rows summing to 1;
      generically of full semiseparable rank ⌈T/2⌉ whatever N (notebook 02).  ``decay`` is ignored.

    The two attention matrices use the q, k that RetNet's inputs would.
    """
    if kind not in MATRIX_KINDS.values():
        raise ValueError(f"kind must be one of {tuple(MATRIX_KINDS.values())}, got {kind!r}")
    _check_int("length", length, 1, MAX_LENGTH)
    _check_int("state_size", state_size, 1, MAX_LENGTH)
    sizes = dict(batch=1, heads=1, length=length, key_dim=state_size, value_dim=1, seed=seed)
    if kind in MIXERS:
        args, _ = random_inputs(kind, decay=decay, **sizes)
        return mixer(kind).matrix(*matrix_args(kind, args))[0, 0]
    (q, k, _, _), _ = random_inputs("retnet", **sizes)
    if kind == "linear":
        return retnet.matrix(q, k, torch.zeros(1, dtype=q.dtype))[0, 0]
    scores = torch.einsum("td,sd->ts", q[0, :, 0], k[0, :, 0]) / state_size ** 0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


#: Environment variable that, set to "1", makes the HTML view hold the precomputed pictures.
STATIC_FRAMES_ENV = "LECTURE_KIT_STATIC_FRAMES"
#: Resolution of the precomputed pictures (the live one is drawn at 100 dpi; a page column is narrower).
STATIC_DPI = 80
#: Colours of the precomputed pictures (indexed PNGs: some 15 to 25 kB each, a third more in base64).
STATIC_COLOURS = 256
#: Most pictures the viewer's HTML view holds (the explorer's holds at most 6 × 6).
MAX_STATIC_FRAMES = 48

# The HTML view's script: on every move of a control, show the picture and readout of the grid
# point the controls select.  Frame i of the grid point (i_0, ..., i_{k-1}) is sum_a i_a * stride_a.
_PLAYER_JS = """(function () {
  var root = document.getElementById(%(id)s);
  var data = JSON.parse(root.querySelector("script.lk-frames-data").textContent);
  var picture = root.querySelector("img.lk-frames-picture");
  var readout = root.querySelector(".lk-frames-readout");
  var controls = root.querySelectorAll("[data-axis]");
  data.frames[data.initial] = picture.src;     // the first picture is stored only in the <img>
  function show() {
    var frame = 0;
    controls.forEach(function (control) {
      var axis = Number(control.dataset.axis), index = Number(control.value);
      frame += index * data.strides[axis];
      var value = root.querySelector("output[data-value-of='" + axis + "']");
      if (value) value.textContent = data.options[axis][index];
    });
    picture.src = data.frames[frame];
    readout.innerHTML = data.readouts[frame];
  }
  controls.forEach(function (control) { control.addEventListener("input", show); });
})();"""


class FrameAxis(NamedTuple):
    """One control of an HTML view: its ``label``, the label of each of its values (``options``),
    the index of the value shown first (``initial``), and whether it is a slider (ordered values)
    or a menu.  An axis with one value is written as text, without a control."""
    label: str
    options: Sequence[str]
    initial: int
    slider: bool


def frame_player(axes: Sequence[FrameAxis], frames: Sequence[bytes], readouts: Sequence[str], *,
                 facts: Sequence[str] = (), note: str = "") -> str:
    """HTML that switches between precomputed pictures as the reader moves its controls; no kernel.

    ``frames`` are PNG images and ``readouts`` the HTML line shown above each, one per grid point,
    in row-major order over ``axes``: the picture for the option indices (i_0, …, i_{k−1}) is
    number Σ_a i_a·stride_a, with stride_a = Π_{b>a} len(axes[b].options).  A slider is an
    ``<input type=range>`` over the option indices (its value label beside it), a menu a
    ``<select>``; ``facts`` (plain text, e.g. "T = 48") stand after the controls and ``note``
    (plain text) closes the block.  The pictures travel as data URIs inside
    the HTML, so the block needs no file and no server.  Returns the HTML (a ``<div>``).
    """
    if not axes or any(not axis.options or not 0 <= axis.initial < len(axis.options) for axis in axes):
        raise ValueError("axes must be a non-empty list of FrameAxis, each with options and an initial "
                         "index among them")
    sizes = [len(axis.options) for axis in axes]
    if len(frames) != math.prod(sizes) or len(readouts) != len(frames):
        raise ValueError(f"frames and readouts must hold one entry per grid point, {math.prod(sizes)} "
                         f"for axes of sizes {sizes}; got {len(frames)} and {len(readouts)}")
    strides = [math.prod(sizes[a + 1:]) for a in range(len(sizes))]
    initial = sum(axis.initial * stride for axis, stride in zip(axes, strides))
    uris = [f"data:image/png;base64,{base64.b64encode(frame).decode()}" for frame in frames]

    controls = []
    for a, axis in enumerate(axes):
        label = html.escape(axis.label)
        if len(axis.options) == 1:
            controls.append(f"<span>{label} = {html.escape(axis.options[0])}</span>")
        elif axis.slider:
            controls.append(f'<label>{label} <input type="range" data-axis="{a}" min="0" '
                            f'max="{len(axis.options) - 1}" step="1" value="{axis.initial}"> '
                            f'<output data-value-of="{a}">{html.escape(axis.options[axis.initial])}</output>'
                            f'</label>')
        else:
            options = "".join(f'<option value="{i}"{" selected" if i == axis.initial else ""}>'
                              f'{html.escape(option)}</option>' for i, option in enumerate(axis.options))
            controls.append(f'<label>{label} <select data-axis="{a}">{options}</select></label>')
    controls += [f"<span>{html.escape(fact)}</span>" for fact in facts]
    data = {"strides": strides, "initial": initial, "options": [list(axis.options) for axis in axes],
            "frames": [uri if i != initial else "" for i, uri in enumerate(uris)], "readouts": list(readouts)}
    block_id = f"lk-frames-{uuid.uuid4().hex}"
    script_safe = json.dumps(data).replace("</", "<\\/")       # no "</script>" inside the script
    block = (f'<div class="lk-frames" id="{block_id}">'
            f'<div class="lk-frames-controls" style="display:flex;flex-wrap:wrap;gap:0.3em 1.5em;'
            f'align-items:center">{"".join(controls)}</div>'
            f'<div class="lk-frames-readout">{readouts[initial]}</div>'
            f'<img class="lk-frames-picture" style="max-width:100%" alt="{html.escape(note)}" '
            f'src="{uris[initial]}">'
            f'<div class="lk-frames-note" style="font-size:85%;opacity:0.75">{html.escape(note)}</div>'
            f'<script type="application/json" class="lk-frames-data">{script_safe}</script>'
            f'<script>{_PLAYER_JS % {"id": json.dumps(block_id)}}</script></div>')
    return block.encode("ascii", "xmlcharrefreplace").decode()     # whatever the page's charset


def _static_frames_wanted() -> bool:
    """Whether this process draws the HTML views' grids (``STATIC_FRAMES_ENV`` is ``1``)."""
    return os.environ.get(STATIC_FRAMES_ENV) == "1"


class _LiveFigure:
    """Controls (``self.controls``) above a figure (``self.figure``): one output, two views.

    Subclasses draw one setting of the controls with ``_draw`` (picture and readout), redraw from
    the controls with ``render()``, and give their HTML view's grid in ``static_html``.
    """

    def __init__(self, figsize: tuple[float, float]):
        self.figure = Figure(figsize=figsize)
        FigureCanvasAgg(self.figure)                 # draws without pyplot, whatever the backend
        self.picture = ipywidgets.Image(format="png", layout=ipywidgets.Layout(max_width="100%"))
        self._view = None                            # the widget view, made when first shown
        self._shown = False

    def png(self, dpi: float = 100, palette: int | None = None) -> bytes:
        """The current figure as PNG bytes (what the notebook output shows).

        ``palette``: reduce the picture to at most this many colours (an indexed PNG, about a third
        of the size: the precomputed pictures of ``static_html`` use 256).
        """
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=dpi)
        if palette is None:
            return buffer.getvalue()
        buffer.seek(0)
        indexed = PIL.Image.open(buffer).convert("RGB").quantize(
            colors=palette, method=PIL.Image.Quantize.MEDIANCUT, dither=PIL.Image.Dither.NONE)
        buffer = io.BytesIO()
        indexed.save(buffer, format="png", optimize=True)
        return buffer.getvalue()

    def _redraw(self, draw: Callable, *point) -> None:
        """``draw(*point)`` into the cleared figure, laid out once and then held in place.

        Constrained layout runs again at every draw and moves the axes a little each time (for
        the viewer it never settles), so the same figure would give a different PNG at each save.
        Laid out here once and switched off, it gives one picture per setting of the controls.
        """
        self.figure.clear()
        self.figure.set_layout_engine("constrained")
        draw(*point)
        self.figure.canvas.draw()
        self.figure.set_layout_engine("none")

    def _publish(self) -> None:
        if self._shown:                              # a picture nobody sees is not drawn
            self.picture.value = self.png()

    def _static_page(self, axes: Sequence[FrameAxis], values: Sequence[Sequence], draw: Callable,
                     *, facts: Sequence[str], note: str) -> str:
        """``frame_player`` over the grid ``values`` (one list per axis): ``draw(*point)`` draws the
        picture and sets the readout of one grid point.

        Draws every grid point, then the controls' own setting again (``render``): the figure, the
        readout and the attributes that ``render`` sets are left as they were.
        """
        frames, readouts = [], []
        try:
            for point in itertools.product(*values):
                self._redraw(draw, *point)
                frames.append(self.png(dpi=STATIC_DPI, palette=STATIC_COLOURS))
                readouts.append(self.readout.value)
        finally:
            self.render()
        return frame_player(axes, frames, readouts, facts=facts, note=note)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """The widget (controls above the picture) and ``static_html()``: each front end picks one."""
        self.picture.value = self.png()
        self._shown = True
        if self._view is None:
            self._view = ipywidgets.VBox([self.controls, self.picture])
        bundle = self._view._repr_mimebundle_()
        bundle["text/plain"] = repr(self)
        bundle["text/html"] = self.static_html()
        return bundle


class SemiseparableExplorer(_LiveFigure):
    """The semiseparable explorer; see ``semiseparable_explorer``.

    Controls: ``kind`` (dropdown), ``length`` T, ``state_size`` N, ``decay`` (mean |log-decay| per
    token), ``chunk_size`` Q, ``seed``; ``readout`` (HTML text).  After each ``render()``:
    ``matrix`` [T, T] is the drawn matrix, ``rank`` its measured semiseparable rank, ``bound`` what
    theory allows (N, or ⌈T/2⌉ for softmax attention), ``block_singular_values`` those of the block
    M[Q:2Q, 0:Q] (None when T ≤ Q).
    """

    def __init__(self, kind: str = "ssd", length: int = 48, state_size: int = 4, decay: float = 0.1,
                 chunk_size: int = 16, seed: int = 0):
        super().__init__(figsize=(11, 4.6))
        if kind not in MATRIX_KINDS.values():
            raise ValueError(f"kind must be one of {tuple(MATRIX_KINDS.values())}, got {kind!r}")
        _check_int("length", length, 4, MAX_LENGTH)
        _check_int("state_size", state_size, 1, 32)
        _check_int("chunk_size", chunk_size, 1, length)
        _check_int("seed", seed, 0, 999)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 1e-3 <= decay <= 10:
            raise ValueError(f"decay must be a float in [0.001, 10], got {decay!r}")

        style = {"description_width": "initial"}
        self.kind = ipywidgets.Dropdown(options=list(MATRIX_KINDS.items()), value=kind, description="matrix")
        self.length = ipywidgets.IntSlider(value=length, min=4, max=MAX_LENGTH, description="T",
                                           style=style)
        self.state_size = ipywidgets.IntSlider(value=state_size, min=1, max=32, description="state size N",
                                               style=style)
        self.decay = ipywidgets.FloatLogSlider(value=decay, base=10, min=-3, max=1, step=0.1, description="decay",
                                               readout_format=".3f", style=style)
        self.chunk_size = ipywidgets.IntSlider(value=chunk_size, min=1, max=length, description="chunk Q",
                                               style=style)
        self.seed = ipywidgets.IntSlider(value=seed, min=0, max=999, description="seed", style=style)
        self.readout = ipywidgets.HTML()
        self.controls = ipywidgets.VBox([ipywidgets.HBox([self.kind, self.length, self.state_size]),
                                         ipywidgets.HBox([self.decay, self.chunk_size, self.seed]),
                                         self.readout])
        self._syncing = False
        self._sync_controls()
        self.render()
        for control in (self.kind, self.length, self.state_size, self.decay, self.chunk_size, self.seed):
            control.observe(self._on_change, names="value")

    def _sync_controls(self) -> None:
        """Chunk size at most T; the decay slider only for the mixers that decay."""
        self._syncing = True                        # clamping chunk_size must not redraw twice
        try:
            self.chunk_size.max = self.length.value
            self.decay.disabled = self.kind.value not in MIXERS
        finally:
            self._syncing = False

    def _on_change(self, _change) -> None:
        if not self._syncing:
            self._sync_controls()
            self.render()

    def render(self) -> None:
        """Recompute the matrix, its rank and the block's singular values; redraw."""
        self._redraw(self._draw, self.kind.value, self.state_size.value, self.length.value,
                     self.decay.value, self.chunk_size.value, self.seed.value)
        self._publish()

    def _draw(self, kind: str, N: int, T: int, decay: float, Q: int, seed: int) -> None:
        """Draw the picture (into the cleared figure) and set the readout and the attributes for one
        setting of the controls."""
        name = next(label for label, key in MATRIX_KINDS.items() if key == kind)
        M = example_matrix(kind, length=T, state_size=N, decay=decay, seed=seed)
        self.matrix, self.rank = M, semiseparable_rank(M)
        self.bound = (T + 1) // 2 if kind == "softmax" else N
        sigma_max = torch.linalg.matrix_norm(M, ord=2).item()
        cut_off = default_tolerance(M)              # semiseparable_rank's rule, relative to σ_max(M)
        rows, cols = range(Q, min(2 * Q, T)), range(0, Q)
        self.block_singular_values = torch.linalg.svdvals(M[rows.start:rows.stop, :Q]) if len(rows) else None

        if kind == "softmax":
            verdict = f"semiseparable rank {self.rank}; the largest possible for T = {T} is ⌈T/2⌉ = {self.bound}"
        else:
            verdict = f"semiseparable rank {self.rank} ≤ state size N = {N}"
        self.readout.value = f"<b>{name}</b>: {verdict}"

        ax_matrix, ax_sigma = self.figure.subplots(1, 2, width_ratios=[1.3, 1])
        self.figure.suptitle(f"{name}, T = {T}: {verdict}")
        matrix_heatmap(ax_matrix, M, chunk_size=Q, title=f"M (chunk grid Q = {Q})")
        if self.block_singular_values is None:
            ax_sigma.text(0.5, 0.5, "T ≤ Q: one chunk,\nno off-diagonal block", ha="center", va="center")
            ax_sigma.set_axis_off()
        else:
            block = f"M[{rows.start}:{rows.stop}, 0:{Q}]"
            highlight_block(ax_matrix, rows, cols)
            singular_values(ax_sigma, self.block_singular_values, relative_to=sigma_max, threshold=cut_off,
                            state_size=None if kind == "softmax" else N,
                            title=f"singular values of the block {block}")

    def static_html(self, frames: bool | None = None) -> str:
        """The explorer as HTML that moves without a kernel (``frame_player``).

        With ``frames`` (default: whether ``LECTURE_KIT_STATIC_FRAMES`` is ``1``), a menu of every
        matrix and a slider over the state sizes ``STATIC_STATE_SIZES`` (and the current N), each
        pair drawn at the current T, decay, chunk size and seed: 6 × 5 or 6 × 6 pictures.  Without,
        the current picture alone.  The widgets and the figure are left as they were.
        """
        frames = _static_frames_wanted() if frames is None else frames
        kind, N = self.kind.value, self.state_size.value
        kinds = list(MATRIX_KINDS.values()) if frames else [kind]
        sizes = sorted({*STATIC_STATE_SIZES, N}) if frames else [N]
        T, decay, Q, seed = self.length.value, self.decay.value, self.chunk_size.value, self.seed.value
        label_of = {key: label for label, key in MATRIX_KINDS.items()}
        axes = [FrameAxis("matrix", [label_of[k] for k in kinds], kinds.index(kind), slider=False),
                FrameAxis("state size N", [str(n) for n in sizes], sizes.index(N), slider=True)]
        facts = [f"T = {T}", f"decay = {decay:.3g}", f"chunk Q = {Q}", f"seed = {seed}"]
        note = (f"{len(kinds) * len(sizes)} pictures, precomputed when the page was built: every "
                f"matrix, N in {{{', '.join(map(str, sizes))}}}. " if frames else
                "The picture for these settings, drawn when the page was built. ")
        return self._static_page(axes, [kinds, sizes], lambda k, n: self._draw(k, n, T, decay, Q, seed),
                                 facts=facts, note=note + "Run the notebook to move every control.")

    def __repr__(self) -> str:
        return (f"SemiseparableExplorer(kind={self.kind.value!r}, T={self.length.value}, "
                f"N={self.state_size.value}: rank {self.rank})")


def semiseparable_explorer(kind: str = "ssd", length: int = 48, state_size: int = 4, decay: float = 0.1,
                           chunk_size: int = 16, seed: int = 0) -> SemiseparableExplorer:
    """The semiseparable explorer: pick a mixer and watch its T×T matrix and its ranks.

    Left: the matrix M (seeded random inputs, ``example_matrix``) with the chunk grid of the chunked
    algorithm; the block M[Q:2Q, 0:Q] under the first diagonal block is outlined.  Right: that
    block's singular values relative to σ_max(M), with the numerical-rank cut-off (T·eps) and the
    line after the N-th value.  Above: the measured semiseparable rank (``semiseparable_rank``)
    beside the state size N — equal for every mixer and for linear attention at moderate decay
    (strong decay can push the smallest singular values under the cut-off), ⌈T/2⌉ for softmax.

    Returns the explorer; as a cell's last value it displays itself: live controls above the
    picture where a kernel runs, and ``static_html()`` on a page without one.
    """
    return SemiseparableExplorer(kind, length, state_size, decay, chunk_size, seed)


#: Normalisations of a hidden-attention matrix: label → key (see ``normalise_attention``).
NORMALISATIONS = {"raw": "raw", "|M| min–max": "minmax", "row-normalised": "rows"}


def normalise_attention(M: torch.Tensor, how: str) -> torch.Tensor:
    """A causal T×T matrix M [T, T], normalised for display (Ali et al. 2024; notebook 05d):

    * ``"raw"``: M itself (signed: the hidden attention can be negative);
    * ``"minmax"``: (|M| − min|M|) / (max|M| − min|M|) over the causal entries j ≤ i, 0 above;
    * ``"rows"``: |M_ij| / Σ_j |M_ij|, each row summing to 1, like a softmax attention row.
    """
    if how == "raw":
        return M
    causal = torch.ones_like(M, dtype=torch.bool).tril()
    magnitude = M.abs()
    if how == "minmax":
        low, high = magnitude[causal].min(), magnitude[causal].max()
        return ((magnitude - low) / (high - low if high > low else 1.0)).masked_fill(~causal, 0.0)
    if how == "rows":
        return magnitude / magnitude.sum(-1, keepdim=True).clamp_min(torch.finfo(M.dtype).tiny)
    raise ValueError(f"how must be one of {tuple(NORMALISATIONS.values())}, got {how!r}")


def _presets(vocab_size: int, given: list[int] | None) -> dict[str, list[int]]:
    """A few token sequences to start from (token ids)."""
    ascending = list(range(min(vocab_size, 24)))
    pattern = ascending[:6] * 3
    random = torch.randint(vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    presets = {"ascending": ascending, "repeated pattern": pattern, "random (seed 0)": random}
    return {"given": given, **presets} if given is not None else presets


class HiddenAttentionViewer(_LiveFigure):
    """The hidden-attention viewer; see ``hidden_attention_viewer``.

    Controls: ``preset`` (dropdown), ``text`` (space-separated tokens), ``layer``, ``head``,
    ``normalisation``; ``readout`` (HTML text).  After each ``render()``: ``tokens`` [T] is the
    sequence, ``matrices`` the model's hidden attention (one [H, T, T] per layer, fp64, CPU) and
    ``matrix`` [T, T] the drawn, normalised matrix of the chosen layer and head.
    """

    def __init__(self, model=None, tokens=None, labels: Sequence[str] | None = None):
        super().__init__(figsize=(6.4, 5.6))
        if labels is not None:
            labels = [str(label) for label in labels]
            if len(set(labels)) != len(labels) or any(not label or label != "".join(label.split()) for label in labels):
                raise ValueError("labels must be distinct, non-empty and without spaces: each names one token id "
                                 "in a space-separated text box")
        if model is None:
            model = seeded(TinyMamba2LM, len(labels) if labels else 16, 32, 2, seed=0, d_state=16, headdim=16)
        if not (hasattr(model, "hidden_attention") and isinstance(getattr(model, "vocab_size", None), int)):
            raise ValueError(f"model must have hidden_attention(tokens) and vocab_size (e.g. a TinyMamba2LM), "
                             f"got {type(model).__name__}")
        if labels is not None and len(labels) != model.vocab_size:
            raise ValueError(f"labels must name all vocab_size = {model.vocab_size} tokens, got {len(labels)}")
        self.model = model
        self.labels = labels if labels is not None else [str(i) for i in range(model.vocab_size)]
        self._ids = {label: i for i, label in enumerate(self.labels)}
        given = None if tokens is None else self._check_tokens(tokens)

        self._preset_tokens = _presets(model.vocab_size, given)
        self.preset = ipywidgets.Dropdown(options=list(self._preset_tokens), description="preset")
        self.text = ipywidgets.Text(value=self._to_text(self._preset_tokens[self.preset.value]),
                                    continuous_update=False, description="tokens",
                                    layout=ipywidgets.Layout(width="60%"))
        self.layer = ipywidgets.IntSlider(value=0, min=0, max=0, description="layer")
        self.head = ipywidgets.IntSlider(value=0, min=0, max=0, description="head")
        self.normalisation = ipywidgets.ToggleButtons(options=list(NORMALISATIONS.items()), value="raw",
                                                      description="normalise")
        self.readout = ipywidgets.HTML()
        self.controls = ipywidgets.VBox([ipywidgets.HBox([self.preset, self.text]),
                                         ipywidgets.HBox([self.layer, self.head]),
                                         self.normalisation, self.readout])
        self._syncing = False
        self._compute(self._parse(self.text.value))
        self.render()
        self.preset.observe(self._on_preset, names="value")
        self.text.observe(self._on_text, names="value")
        for control in (self.layer, self.head, self.normalisation):
            control.observe(self._on_view_change, names="value")

    def _check_tokens(self, tokens) -> list[int]:
        try:
            ids = torch.as_tensor(tokens).reshape(-1).tolist()
        except (TypeError, RuntimeError, ValueError):
            ids = None
        if ids is None or not 1 <= len(ids) <= MAX_LENGTH \
                or not all(isinstance(i, int) and 0 <= i < self.model.vocab_size for i in ids):
            raise ValueError(f"tokens must be 1 to {MAX_LENGTH} token ids in [0, {self.model.vocab_size}), got {tokens!r}")
        return ids

    def _to_text(self, ids: list[int]) -> str:
        return " ".join(self.labels[i] for i in ids)

    def _parse(self, text: str) -> list[int]:
        """Space-separated token labels → ids; ValueError naming the first unknown one."""
        words = text.split()
        if not 1 <= len(words) <= MAX_LENGTH:
            raise ValueError(f"give 1 to {MAX_LENGTH} tokens, got {len(words)}")
        unknown = [word for word in words if word not in self._ids]
        if unknown:
            raise ValueError(f"unknown token {unknown[0]!r}; the vocabulary is {' '.join(self.labels[:32])}"
                             + (" …" if len(self.labels) > 32 else ""))
        return [self._ids[word] for word in words]

    def _compute(self, ids: list[int]) -> None:
        """Run the model on the sequence; keep every layer's matrices; fit the layer/head sliders."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            matrices = self.model.hidden_attention(torch.tensor([ids], device=device))
        self.tokens = torch.tensor(ids)
        self.matrices = [m[0].detach().to("cpu", torch.float64) for m in matrices]
        self._fit_sliders()

    def _fit_sliders(self) -> None:
        """Layer and head sliders span the model's layers and the chosen layer's heads."""
        self._syncing = True                        # clamping a slider must not redraw
        try:
            self.layer.max = len(self.matrices) - 1
            self.head.max = self.matrices[self.layer.value].shape[0] - 1
        finally:
            self._syncing = False

    def _on_preset(self, change) -> None:
        self.text.value = self._to_text(self._preset_tokens[change["new"]])   # redraws through _on_text

    def _on_text(self, change) -> None:
        try:
            ids = self._parse(change["new"])
        except ValueError as error:
            self.readout.value = f"<span style='color:#b00'>{error}</span> (picture unchanged)"
            return
        self._compute(ids)
        self.render()

    def _on_view_change(self, _change) -> None:
        if not self._syncing:
            self._fit_sliders()
            self.render()

    def render(self) -> None:
        """Redraw the chosen layer's and head's matrix with the chosen normalisation."""
        self._redraw(self._draw, self.layer.value, self.head.value, self.normalisation.value)
        self._publish()

    def _draw(self, layer: int, head: int, how: str) -> None:
        """Draw one head's normalised matrix (into the cleared figure); set the readout and ``matrix``."""
        self.matrix = normalise_attention(self.matrices[layer][head], how)
        how_label = next(label for label, key in NORMALISATIONS.items() if key == how)
        T = len(self.tokens)
        self.readout.value = (f"layer {layer}, head {head} of {self.matrices[layer].shape[0]}; T = {T}; "
                              f"M = L ∘ (C Bᵀ)·diag(Δ), {how_label}")
        ax = self.figure.subplots()
        matrix_heatmap(ax, self.matrix, labels=[self.labels[i] for i in self.tokens.tolist()],
                       title=f"hidden attention, layer {layer}, head {head} ({how_label})")

    def static_html(self, frames: bool | None = None) -> str:
        """The viewer as HTML that moves without a kernel (``frame_player``), on the current tokens.

        With ``frames`` (default: whether ``LECTURE_KIT_STATIC_FRAMES`` is ``1``), a slider over
        the layers, one over the heads and a menu of the normalisations: every combination drawn,
        as long as that makes at most ``MAX_STATIC_FRAMES`` pictures; beyond, the layer is held at
        the current one, then the normalisation, then the head.  Without, the current picture
        alone.  The widgets and the figure are left as they were.
        """
        frames = _static_frames_wanted() if frames is None else frames
        layer, head, how = self.layer.value, self.head.value, self.normalisation.value
        heads_per_layer = {m.shape[0] for m in self.matrices}
        layers = list(range(len(self.matrices))) if frames and len(heads_per_layer) == 1 else [layer]
        heads = list(range(self.matrices[layer].shape[0])) if frames else [head]
        hows = list(NORMALISATIONS.values()) if frames else [how]
        if len(layers) * len(heads) * len(hows) > MAX_STATIC_FRAMES:
            layers = [layer]
        if len(heads) * len(hows) > MAX_STATIC_FRAMES:
            hows = [how]
        if len(heads) > MAX_STATIC_FRAMES:
            heads = [head]
        label_of = {key: label for label, key in NORMALISATIONS.items()}
        axes = [FrameAxis("layer", [str(i) for i in layers], layers.index(layer), slider=True),
                FrameAxis("head", [str(i) for i in heads], heads.index(head), slider=True),
                FrameAxis("normalise", [label_of[h] for h in hows], hows.index(how), slider=False)]
        count = len(layers) * len(heads) * len(hows)
        note = (f"{count} pictures, precomputed when the page was built for these tokens. " if count > 1
                else "The picture for these settings, drawn when the page was built. ")
        return self._static_page(axes, [layers, heads, hows], self._draw,
                                 facts=[f"tokens: {self._to_text(self.tokens.tolist())}"],
                                 note=note + "Run the notebook to type other tokens.")

    def __repr__(self) -> str:
        return (f"HiddenAttentionViewer(T={len(self.tokens)}, layer={self.layer.value}, head={self.head.value}, "
                f"normalisation={self.normalisation.value!r})")


def hidden_attention_viewer(model=None, tokens=None, labels: Sequence[str] | None = None) -> HiddenAttentionViewer:
    """The hidden-attention viewer: one head's M = L ∘ (C Bᵀ)·diag(Δ) on a token sequence.

    ``model``: a TinyMamba2LM, e.g. one trained in the notebook (default: a seeded random one, vocab
    16 or len(labels), d_model 32, 2 layers, 4 heads, N = 16); any model with ``vocab_size`` and
    ``hidden_attention(tokens [1, T]) → list of [1, H, T, T]`` works.  ``tokens``: the first
    sequence shown (ids; default: a preset).  ``labels``: the name of each token id, used on the
    axes and in the text box (default: the ids themselves).  The text box takes space-separated
    token names; the normalisation is raw, |M| min–max or row-normalised (``normalise_attention``).

    Returns the viewer; as a cell's last value it displays itself: live controls above the picture
    where a kernel runs, and ``static_html()`` on a page without one.
    """
    return HiddenAttentionViewer(model, tokens, labels)
