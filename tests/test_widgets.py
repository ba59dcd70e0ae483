"""The two widgets, headless: each builds its figure without a kernel, its controls redraw it, the
numbers it shows are the right ones (the rank equals the state size for every mixer and ⌈T/2⌉ for
softmax attention; the hidden attention is the model's), and displayed it leaves a PNG that later
redraws replace in place.  Plus the plotting helpers they draw with."""
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lecture_kit import plots, widgets
from lecture_kit.blocks import TinyMamba2LM, seeded
from lecture_kit.semiseparable import default_tolerance
from lecture_kit.testing import random_inputs
from lecture_kit.widgets import (HiddenAttentionViewer, SemiseparableExplorer, example_matrix,
                                 hidden_attention_viewer, normalise_attention, semiseparable_explorer)

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


def test_displaying_leaves_a_png_that_redraws_replace_in_place(monkeypatch):
    shown, updated = [], []
    monkeypatch.setattr(widgets, "display", lambda obj, **kw: shown.append((obj, kw)))
    monkeypatch.setattr(widgets, "update_display", lambda obj, **kw: updated.append((obj, kw)))
    explorer = SemiseparableExplorer(length=16, chunk_size=4)
    assert not updated                                       # nothing shown yet, nothing to update
    explorer._ipython_display_()
    (controls, _), (picture, picture_kw) = shown
    assert controls is explorer.controls
    assert picture.format == "png" and picture.data.startswith(b"\x89PNG") and picture_kw["display_id"]
    explorer.state_size.value = 2
    (new_picture, new_kw), = updated
    assert new_kw["display_id"] == picture_kw["display_id"] and new_picture.data != picture.data


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
