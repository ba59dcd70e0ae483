"""The two widgets, headless: each builds its figure without a kernel, its controls redraw it, the
numbers it shows are the right ones (the rank equals the state size for every mixer and ⌈T/2⌉ for
softmax attention; the hidden attention is the model's), and displayed it is one output with two
views: the live widget, whose picture later redraws replace, and HTML whose precomputed pictures
are the ones the live widget draws at each setting, switched by its script in a real browser.
Plus the plotting helpers they draw with."""
import base64
import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from matplotlib.figure import Figure

from lecture_kit import plots, widgets
from lecture_kit.blocks import TinyMamba2LM, seeded
from lecture_kit.semiseparable import default_tolerance
from lecture_kit.testing import random_inputs
from lecture_kit.widgets import (MATRIX_KINDS, NORMALISATIONS, STATIC_COLOURS, STATIC_DPI, STATIC_FRAMES_ENV,
                                 FrameAxis, HiddenAttentionViewer, SemiseparableExplorer, example_matrix,
                                 frame_player, hidden_attention_viewer, normalise_attention,
                                 semiseparable_explorer)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

MIXER_KINDS = ["ssd", "retnet", "gla", "rwkv7", "linear"]


def drawn(widget):
    """The array of the first heatmap in the widget's figure."""
    return np.ma.filled(widget.figure.axes[0].images[0].get_array(), np.nan).copy()


def test_explorer_draws_the_matrix_and_redraws_when_a_control_changes():
    explorer = semiseparable_explorer()
    before, png_before = drawn(explorer), explorer.png()
    assert png_before.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.nan_to_num(before), explorer.matrix.numpy())   # upper triangle shown masked
    assert np.isnan(before[0, 1]) and not np.isnan(before[1, 0])
    explorer.state_size.value = 6
    assert explorer.rank == 6 and not np.array_equal(drawn(explorer), before, equal_nan=True)
    assert explorer.png() != png_before
    explorer.seed.value = 5
    after_seed = drawn(explorer)
    explorer.decay.value = 1.0
    assert not np.array_equal(drawn(explorer), after_seed, equal_nan=True)


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_explorer_rank_equals_the_state_size_for_every_mixer(kind):
    explorer = SemiseparableExplorer(length=40, chunk_size=8)
    explorer.kind.value = kind
    for N in (3, 7):
        explorer.state_size.value = N
        assert explorer.rank == N == explorer.bound
        assert f"semiseparable rank {N} ≤ state size N = {N}" in explorer.readout.value
        assert f"rank {N}" in explorer.figure.get_suptitle()
        above_cut_off = (explorer.block_singular_values
                         > default_tolerance(explorer.matrix) * torch.linalg.matrix_norm(explorer.matrix, 2)).sum()
        assert above_cut_off == min(N, 8)                    # the 8×8 block M[8:16, 0:8]


@pytest.mark.parametrize("T", [40, 41])
def test_explorer_softmax_attention_has_full_semiseparable_rank(T):
    explorer = SemiseparableExplorer(kind="softmax", length=T, state_size=4)
    assert explorer.rank == explorer.bound == (T + 1) // 2
    assert f"⌈T/2⌉ = {(T + 1) // 2}" in explorer.readout.value
    assert explorer.decay.disabled
    explorer.kind.value = "gla"
    assert not explorer.decay.disabled and explorer.rank == 4


def test_explorer_chunk_size_follows_the_length_and_one_chunk_has_no_off_diagonal_block():
    explorer = SemiseparableExplorer(length=48, chunk_size=16)
    assert len(explorer.figure.axes[0].patches) == 3 + 1      # 3 diagonal blocks + the highlighted block
    explorer.length.value = 12
    assert explorer.chunk_size.value == 12 and explorer.block_singular_values is None
    assert explorer.matrix.shape == (12, 12)
    explorer.chunk_size.value = 5
    assert explorer.block_singular_values.shape == (5,)


def test_example_matrices_are_what_they_claim():
    T, N = 20, 4
    M = example_matrix("linear", length=T, state_size=N, seed=3)
    (q, k, _, _), _ = random_inputs("retnet", batch=1, heads=1, length=T, key_dim=N, value_dim=1, seed=3)
    torch.testing.assert_close(M, (q[0, :, 0] @ k[0, :, 0].T).tril() / N ** 0.5)
    S = example_matrix("softmax", length=T, state_size=N, seed=3)
    torch.testing.assert_close(S.sum(-1), torch.ones(T, dtype=torch.float64))
    assert torch.equal(S.triu(1), torch.zeros(T, T, dtype=torch.float64))
    weak, strong = (example_matrix("ssd", length=T, state_size=N, decay=d) for d in (0.01, 3.0))
    assert strong[-1, 0].abs() < 1e-12 < weak[-1, 0].abs()   # strong decay forgets the first token


@pytest.mark.parametrize("name", ["ssd", "retnet", "gla", "rwkv7"])
def test_random_inputs_decay_sets_the_mean_log_decay_per_token(name):
    args, _ = random_inputs(name, length=30, decay=0.7, seed=1)
    log_decay = args[1] * args[2] if name == "ssd" else args[{"retnet": 3, "gla": 3, "rwkv7": 1}[name]]
    assert abs(log_decay.abs().mean().item() - 0.7) < 1e-12 and (log_decay <= 0).all()
    with pytest.raises(ValueError, match="decay"):
        random_inputs(name, decay=0.0)


def test_explorer_rejects_bad_arguments():
    for kwargs, name in ((dict(kind="mamba"), "kind"), (dict(length=1000), "length"), (dict(state_size=0), "state_size"),
                         (dict(decay=0.0), "decay"), (dict(chunk_size=100), "chunk_size"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=name):
            SemiseparableExplorer(**kwargs)


def html_view(html):
    """What an HTML view holds: its script's data, and its pictures as pixel arrays in grid order."""
    data = json.loads(re.search(r'<script type="application/json" class="lk-frames-data">(.*?)</script>',
                                html, re.S).group(1))
    data["frames"][data["initial"]] = re.search(r'<img class="lk-frames-picture"[^>]*src="([^"]+)"', html).group(1)
    pictures = [pixels(base64.b64decode(uri.removeprefix("data:image/png;base64,"))) for uri in data["frames"]]
    return data, pictures


def pixels(png):
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))


def static_picture(widget):
    """The widget's current figure as the HTML view stores it."""
    return pixels(widget.png(dpi=STATIC_DPI, palette=STATIC_COLOURS))


def test_displayed_it_offers_the_live_widget_and_html_whose_picture_redraws_replace(monkeypatch):
    monkeypatch.delenv(STATIC_FRAMES_ENV, raising=False)
    explorer = SemiseparableExplorer(length=16, chunk_size=4)
    explorer.state_size.value = 3
    assert explorer.picture.value == b""                     # not shown yet: no PNG drawn
    bundle = explorer._repr_mimebundle_()
    assert bundle["text/plain"] == repr(explorer)
    assert bundle[WIDGET_VIEW]["model_id"] == explorer._view.model_id
    assert explorer._view.children == (explorer.controls, explorer.picture)
    first = explorer.picture.value
    np.testing.assert_array_equal(pixels(first), pixels(explorer.png()))
    data, pictures = html_view(bundle["text/html"])           # no frames asked for: the current picture alone
    assert len(pictures) == 1 and "<input" not in bundle["text/html"] and "<select" not in bundle["text/html"]
    np.testing.assert_array_equal(pictures[0], static_picture(explorer))
    assert "N = 3" in bundle["text/html"] and data["readouts"] == [explorer.readout.value]
    explorer.state_size.value = 2
    assert explorer.picture.value != first
    np.testing.assert_array_equal(pixels(explorer.picture.value), pixels(explorer.png()))


def test_explorer_html_view_holds_the_live_picture_of_every_matrix_and_state_size(monkeypatch):
    monkeypatch.setenv(STATIC_FRAMES_ENV, "1")
    # three of the six matrices and, with the explorer's own N = 3, two state sizes: 3 × 2 pictures
    kinds = {label: key for label, key in MATRIX_KINDS.items() if key in ("ssd", "rwkv7", "softmax")}
    monkeypatch.setattr(widgets, "MATRIX_KINDS", kinds)
    monkeypatch.setattr(widgets, "STATIC_STATE_SIZES", (2,))
    explorer = SemiseparableExplorer(kind="rwkv7", length=12, state_size=3, chunk_size=4)
    before = static_picture(explorer), explorer.readout.value, explorer.rank
    html = explorer.static_html()
    data, pictures = html_view(html)
    assert data["options"] == [list(kinds), ["2", "3"]] and data["strides"] == [2, 1]
    assert data["initial"] == 2 * 1 + 1 and len(pictures) == len(data["readouts"]) == 6
    assert re.search(r'<select data-axis="0">(<option [^>]*>[^<]*</option>){3}</select>', html)
    assert re.search(r'<input type="range" data-axis="1" min="0" max="1" step="1" value="1">', html)
    assert len({picture.tobytes() for picture in pictures}) == 6            # six different pictures
    for kind, N in (("ssd", 2), ("softmax", 3), ("rwkv7", 2)):
        fresh = SemiseparableExplorer(kind=kind, length=12, state_size=N, chunk_size=4)
        index = 2 * list(kinds.values()).index(kind) + N - 2
        np.testing.assert_array_equal(pictures[index], static_picture(fresh))
        assert data["readouts"][index] == fresh.readout.value
    after = static_picture(explorer), explorer.readout.value, explorer.rank
    np.testing.assert_array_equal(after[0], before[0])          # the widget is left as it was
    assert after[1:] == before[1:]


def test_viewer_html_view_holds_every_layer_head_and_normalisation_within_the_cap(monkeypatch):
    model = seeded(TinyMamba2LM, 6, 8, 2, seed=3, d_state=4, headdim=8)       # 2 layers of 2 heads
    viewer = HiddenAttentionViewer(model, tokens=[0, 1, 2, 3, 4, 5, 0, 1])
    viewer.head.value = 1
    data, pictures = html_view(viewer.static_html(frames=True))
    hows = list(NORMALISATIONS.values())
    assert data["options"] == [["0", "1"], ["0", "1"], list(NORMALISATIONS)]
    assert len(pictures) == 2 * 2 * 3 and data["initial"] == 1 * 3
    assert len({picture.tobytes() for picture in pictures}) == 12
    other = HiddenAttentionViewer(model, tokens=[0, 1, 2, 3, 4, 5, 0, 1])
    for layer, head, how in ((1, 0, "rows"), (0, 1, "minmax")):
        other.layer.value, other.head.value, other.normalisation.value = layer, head, how
        index = 6 * layer + 3 * head + hows.index(how)
        np.testing.assert_array_equal(pictures[index], static_picture(other))
        assert data["readouts"][index] == other.readout.value
    assert viewer.head.value == 1 and torch.equal(viewer.matrix, normalise_attention(viewer.matrices[0][1], "raw"))
    monkeypatch.setattr(widgets, "MAX_STATIC_FRAMES", 4)       # too many: layer, then normalisation held
    data, pictures = html_view(viewer.static_html(frames=True))
    assert data["options"] == [["0"], ["0", "1"], ["raw"]] and len(pictures) == 2


def test_frame_player_rejects_a_grid_that_does_not_match_its_frames():
    axes = [FrameAxis("x", ["a", "b"], 0, slider=True), FrameAxis("y", ["c", "d", "e"], 2, slider=False)]
    with pytest.raises(ValueError, match="frames"):
        frame_player(axes, [b"png"] * 5, ["r"] * 5)
    with pytest.raises(ValueError, match="frames and readouts"):
        frame_player(axes, [b"png"] * 6, ["r"] * 5)
    with pytest.raises(ValueError, match="axes"):
        frame_player([FrameAxis("x", ["a"], 1, slider=True)], [b"png"], ["r"])


def colour_png(rgb):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (2, 2), rgb).save(buffer, format="png")
    return buffer.getvalue()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_frame_player_script_switches_the_picture_in_a_browser(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "screenshot_pages", Path(__file__).resolve().parent.parent / "tools" / "screenshot_pages.py")
    screenshot_pages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot_pages)
    axes = [FrameAxis("x", ["a", "b", "c"], 0, slider=True), FrameAxis("y", ["d", "e"], 1, slider=False)]
    frames = [colour_png((40 * i, 0, 0)) for i in range(6)]
    page = tmp_path / "player.html"
    page.write_text(frame_player(axes, frames, [f"frame <b>{i}</b>" for i in range(6)], facts=["T = 8"]))
    uri = lambda i: "data:image/png;base64," + base64.b64encode(frames[i]).decode()
    state = """(() => ({src: document.querySelector('img').src,
                        readout: document.querySelector('.lk-frames-readout').innerHTML,
                        x: document.querySelector('output').textContent}))()"""
    move = "const c = document.querySelector('[data-axis=\"%d\"]'); c.value = %d; c.dispatchEvent(new Event('input'))"
    browser = screenshot_pages.Chromium(shutil.which("chromium"), offline=True, width=600, height=400)
    try:
        _, session = browser.open(page.as_uri())
        assert browser.evaluate(state, session) == {"src": uri(1), "readout": "frame <b>1</b>", "x": "a"}
        browser.evaluate(move % (0, 2), session)                  # slider x to "c": frame 2·2 + 1
        assert browser.evaluate(state, session) == {"src": uri(5), "readout": "frame <b>5</b>", "x": "c"}
        browser.evaluate(move % (1, 0), session)                  # menu y to "d": frame 2·2 + 0
        assert browser.evaluate(state, session) == {"src": uri(4), "readout": "frame <b>4</b>", "x": "c"}
    finally:
        browser.close()


def test_viewer_shows_the_models_hidden_attention_and_its_controls_redraw():
    viewer = hidden_attention_viewer()
    model = viewer.model
    with torch.no_grad():
        expected = model.hidden_attention(viewer.tokens[None])
    np.testing.assert_allclose(np.nan_to_num(drawn(viewer)), expected[0][0, 0].double().numpy())
    assert viewer.layer.max == 1 and viewer.head.max == 3
    before = drawn(viewer)
    viewer.head.value = 2
    np.testing.assert_allclose(viewer.matrix, expected[0][0, 2].double())
    viewer.layer.value = 1
    np.testing.assert_allclose(viewer.matrix, expected[1][0, 2].double())
    assert not np.array_equal(drawn(viewer), before, equal_nan=True)


def test_viewer_normalisations():
    viewer = HiddenAttentionViewer()
    raw = viewer.matrix.clone()
    viewer.normalisation.value = "rows"
    torch.testing.assert_close(viewer.matrix.sum(-1), torch.ones(len(viewer.tokens), dtype=torch.float64))
    viewer.normalisation.value = "minmax"
    causal = torch.ones_like(raw, dtype=torch.bool).tril()
    assert viewer.matrix[causal].min() == 0 and viewer.matrix[causal].max() == 1
    torch.testing.assert_close(viewer.matrix, normalise_attention(raw, "minmax"))
    assert np.nanmin(drawn(viewer)) >= 0                           # a magnitude: drawn with a sequential map
    with pytest.raises(ValueError, match="how"):
        normalise_attention(raw, "softmax")


def test_viewer_text_box_and_presets():
    viewer = HiddenAttentionViewer()
    viewer.text.value = "3 1 4 1 5"
    assert viewer.tokens.tolist() == [3, 1, 4, 1, 5] and viewer.matrix.shape == (5, 5)
    assert [t.get_text() for t in viewer.figure.axes[0].get_xticklabels()] == ["3", "1", "4", "1", "5"]
    before = viewer.matrix.clone()
    viewer.text.value = "3 1 four"
    assert "unknown token 'four'" in viewer.readout.value and torch.equal(viewer.matrix, before)
    viewer.preset.value = "repeated pattern"
    assert viewer.text.value == " ".join(["0 1 2 3 4 5"] * 3) and len(viewer.tokens) == 18


def test_viewer_with_a_given_model_tokens_and_labels():
    words = ["the", "cat", "sat", "on", "mat", "."]
    model = seeded(TinyMamba2LM, len(words), 16, 3, seed=4, d_state=4, headdim=8, tie_embeddings=False)
    viewer = hidden_attention_viewer(model, tokens=torch.tensor([0, 1, 2, 3, 0, 4, 5]), labels=words)
    assert viewer.preset.value == "given" and viewer.text.value == "the cat sat on the mat ."
    assert viewer.layer.max == 2 and viewer.head.max == 3
    viewer.text.value = "the mat sat"
    assert viewer.tokens.tolist() == [0, 4, 2]


def test_viewer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="model"):
        HiddenAttentionViewer(model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="tokens"):
        HiddenAttentionViewer(tokens=[0, 99])
    with pytest.raises(ValueError, match="labels"):
        HiddenAttentionViewer(labels=["a", "a"])
    model = seeded(TinyMamba2LM, 5, 16, 1, seed=0, d_state=4, headdim=8)
    with pytest.raises(ValueError, match="labels"):
        HiddenAttentionViewer(model, labels=["a", "b"])


def test_matrix_heatmap_marks_the_chunk_grid_and_the_causal_mask():
    ax = Figure().subplots()
    M = torch.randn(10, 10, dtype=torch.float64).tril()
    image = plots.matrix_heatmap(ax, M, chunk_size=4, labels=list("abcdefghij"), colorbar=False)
    assert image.get_array().mask[0, 1] and not image.get_array().mask[1, 0]
    assert image.get_clim() == (-M.abs().max().item(), M.abs().max().item())      # signed: centred on 0
    assert len(ax.patches) == 3                                 # diagonal blocks 0:4, 4:8, 8:10
    assert sum(line.get_linestyle() == "--" for line in ax.lines) == 4        # two boundaries, two dashes each
    square = plots.matrix_heatmap(Figure().subplots(), torch.rand(6, 6), colorbar=False)
    assert not np.ma.getmaskarray(square.get_array()).any() and square.get_clim()[0] == 0
    with pytest.raises(ValueError, match="labels"):
        plots.matrix_heatmap(ax, M, labels=["a"])
    with pytest.raises(ValueError, match="square"):
        plots.matrix_heatmap(ax, M[:3])


def test_singular_values_counts_the_values_above_the_cut_off():
    ax = Figure().subplots()
    assert plots.singular_values(ax, torch.tensor([1.0, 1e-3, 1e-9, 0.0]), threshold=1e-6, state_size=2) == 2
    assert ax.get_yscale() == "log"
