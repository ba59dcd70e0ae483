"""The synthetic tasks of zone 5: batch shapes, targets that are right by construction (parity, MQAR, delayed
recall and its distances), determinism under a seed, the masked accuracy, and a training loop that learns a
task that is trivially learnable."""
import math

import pytest
import torch
from torch import nn

from lecture_kit.blocks import seeded
from lecture_kit.tasks import (IGNORE, PARITY_START, delayed_recall_batch, masked_accuracy, mqar_batch,
                               parity_batch, train)

TASK = dict(pairs=5, n_keys=12, n_values=7)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_parity_batch_shapes_and_prefix_parities():
    tokens, targets = parity_batch(9, 20, gen())
    assert tokens.shape == targets.shape == (9, 21) and tokens.dtype == targets.dtype == torch.int64
    assert (tokens[:, 0] == PARITY_START).all() and (targets[:, 0] == IGNORE).all()
    bits = tokens[:, 1:]
    assert ((bits == 0) | (bits == 1)).all()
    for row_bits, row_targets in zip(bits.tolist(), targets[:, 1:].tolist()):
        ones = 0
        for bit, parity in zip(row_bits, row_targets):       # the parity, counted one bit at a time
            ones += bit
            assert parity == ones % 2


def test_mqar_batch_shapes_and_layout():
    tokens, targets = mqar_batch(11, gen(), **TASK)
    p, n_keys = TASK["pairs"], TASK["n_keys"]
    assert tokens.shape == targets.shape == (11, 3 * p) and tokens.dtype == targets.dtype == torch.int64
    keys, values, queries = tokens[:, 0:2 * p:2], tokens[:, 1:2 * p:2], tokens[:, 2 * p:]
    assert ((keys >= 0) & (keys < n_keys)).all() and ((queries >= 0) & (queries < n_keys)).all()
    assert ((values >= n_keys) & (values < n_keys + TASK["n_values"])).all()
    assert (targets[:, :2 * p] == IGNORE).all() and (targets[:, 2 * p:] != IGNORE).all()
    for row_keys, row_queries in zip(keys.tolist(), queries.tolist()):
        assert len(set(row_keys)) == p                     # distinct keys ...
        assert sorted(row_queries) == sorted(row_keys)     # ... each asked exactly once


def test_mqar_target_is_the_value_that_followed_the_key():
    tokens, targets = mqar_batch(16, gen(3), **TASK)
    p = TASK["pairs"]
    for row, answers in zip(tokens.tolist(), targets.tolist()):
        followed = {row[i]: row[i + 1] for i in range(0, 2 * p, 2)}
        for position in range(2 * p, 3 * p):
            assert answers[position] == followed[row[position]]


def test_mqar_queries_are_reordered():
    tokens, _ = mqar_batch(64, gen(4), pairs=8, n_keys=16, n_values=16)
    keys, queries = tokens[:, 0:16:2], tokens[:, 16:]
    assert not torch.equal(keys, queries)                  # not simply the keys in the same order


RECALL = dict(n_values=6, n_fillers=9)


def test_delayed_recall_batch_layout():
    n, length = 40, 13
    tokens, targets = delayed_recall_batch(n, length, gen(5), **RECALL)
    assert tokens.shape == targets.shape == (n, length) and tokens.dtype == targets.dtype == torch.int64
    query, n_values = RECALL["n_values"] + RECALL["n_fillers"], RECALL["n_values"]
    assert (tokens[:, -1] == query).all() and (targets[:, :-1] == IGNORE).all()
    for row, answers in zip(tokens.tolist(), targets.tolist()):
        values = [(i, t) for i, t in enumerate(row[:-1]) if t < n_values]      # exactly one value ...
        assert len(values) == 1 and answers[-1] == values[0][1]                 # ... and it is the answer
        assert all(n_values <= t < query for t in row[:-1] if t >= n_values)    # the rest are fillers


def test_delayed_recall_batch_distances():
    length = 9
    tokens, _ = delayed_recall_batch(2000, length, gen(6), **RECALL)
    position = (tokens[:, :-1] < RECALL["n_values"]).int().argmax(dim=1)
    distances = length - 1 - position
    assert sorted(distances.unique().tolist()) == list(range(1, length))     # every distance 1 … length − 1
    counts = torch.bincount(distances, minlength=length)[1:].double()
    assert counts.min() > 0.8 * counts.mean()                                # roughly uniform
    for D in (1, 4, length - 1):
        tokens, _ = delayed_recall_batch(50, length, gen(7), distance=D, **RECALL)
        assert (tokens[:, length - 1 - D] < RECALL["n_values"]).all()
        assert (tokens[:, :-1] < RECALL["n_values"]).sum(dim=1).tolist() == [1] * 50


def test_batches_are_deterministic_under_a_seed():
    for draw in (lambda g: parity_batch(5, 30, g), lambda g: mqar_batch(5, g, **TASK),
                 lambda g: delayed_recall_batch(5, 30, g, **RECALL)):
        a, b, c = draw(gen(7)), draw(gen(7)), draw(gen(8))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("call, name", [
    (lambda: parity_batch(0, 4, gen()), "n"),
    (lambda: parity_batch(2, 0, gen()), "length"),
    (lambda: mqar_batch(2, gen(), pairs=0, n_keys=4, n_values=4), "pairs"),
    (lambda: mqar_batch(2, gen(), pairs=5, n_keys=4, n_values=4), "pairs"),
    (lambda: mqar_batch(2, gen(), pairs=2, n_keys=4, n_values=0), "n_values"),
    (lambda: delayed_recall_batch(2, 1, gen(), **RECALL), "length"),
    (lambda: delayed_recall_batch(2, 5, gen(), distance=5, **RECALL), "distance"),
    (lambda: delayed_recall_batch(2, 5, gen(), distance=0, **RECALL), "distance"),
    (lambda: delayed_recall_batch(2, 5, gen(), n_values=3, n_fillers=0), "n_fillers"),
])
def test_bad_sizes_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"(?<![\w.]){name}(?![\w])"):
        call()


def test_masked_accuracy_skips_ignored_positions():
    targets = torch.tensor([[IGNORE, 1, 2, 0], [IGNORE, 1, IGNORE, 2]])
    predicted = torch.tensor([[0, 1, 0, 0], [1, 1, 2, 1]])
    logits = nn.functional.one_hot(predicted, 3).float()
    assert masked_accuracy(logits, targets) == pytest.approx(3 / 5)
    per_position = masked_accuracy(logits, targets, per_position=True)
    assert math.isnan(per_position[0]) and per_position[1:].tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="scored"):
        masked_accuracy(logits, torch.full_like(targets, IGNORE))
    with pytest.raises(ValueError, match="logits"):
        masked_accuracy(logits[0], targets)


class Lookup(nn.Module):
    """Logits from the current token alone: enough to copy, nothing more."""

    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, tokens):
        return self.table(tokens)


def copy_batches(g):
    tokens = torch.randint(0, 5, (32, 6), generator=g)
    targets = tokens.clone()
    targets[:, ::2] = IGNORE                    # half the positions are not scored
    return tokens, targets


def test_train_learns_a_copy_task_in_a_few_steps():
    model = seeded(Lookup, 5, seed=0)
    losses = train(model, copy_batches, 40, lr=0.3, seed=0, progress=False)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.1 * losses[0]
    tokens, targets = copy_batches(gen(1))
    with torch.no_grad():
        assert masked_accuracy(model(tokens), targets) == 1.0


def test_train_is_deterministic_under_a_seed():
    runs = []
    for seed in (5, 5, 6):
        model = seeded(Lookup, 5, seed=0)
        runs.append((train(model, copy_batches, 20, lr=0.1, seed=seed, progress=False), model.table.weight.detach()))
    (losses_a, weights_a), (losses_b, weights_b), (losses_c, _) = runs
    assert losses_a == losses_b and torch.equal(weights_a, weights_b)
    assert losses_a != losses_c


def test_train_shows_a_bar_with_the_last_loss_unless_told_not_to(capsys):
    losses = train(seeded(Lookup, 5, seed=0), copy_batches, 20, lr=0.1, seed=0, label="copy")
    bar = capsys.readouterr().err.split("\r")[-1]          # tqdm's last redraw (text outside Jupyter)
    assert bar.startswith("copy: 100%") and "20/20" in bar and f"loss={losses[-1]:.3f}" in bar, bar
    train(seeded(Lookup, 5, seed=0), copy_batches, 20, lr=0.1, seed=0, progress=False)
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="steps"):
        train(seeded(Lookup, 5, seed=0), copy_batches, 10, lr=0.1, seed=0)
