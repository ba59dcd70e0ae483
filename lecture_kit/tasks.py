"""Synthetic tasks for the expressivity experiments, and the loop that trains on them.  Zone 5
(notebooks 05c, parity and recall; 05d, hidden attention).

Each task draws a batch ``(tokens, targets)`` of two int64 tensors of one shape [n, T]: a model reads
``tokens`` and is scored, position by position, on predicting ``targets``.  A target equal to
``IGNORE`` (−100, the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``) marks a
position that is not scored; ``train``'s loss and ``masked_accuracy`` both skip it.

    parity_batch          a start token, then random bits       target at bit t: the parity of bits 1 … t
    mqar_batch            key–value pairs, then the keys again   target at a repeated key: the value paired with it
    delayed_recall_batch  one value among fillers, then a query  target at the query: the value, D tokens back

``train`` fits a model tokens [B, T] → logits [B, T, vocab] on batches drawn from one seeded
generator (AdamW, a one-cycle schedule, gradients clipped to norm 1); ``masked_accuracy`` scores the
greedy predictions at the scored positions, overall or per position.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from ._validate import positive_int as _positive_int

#: The target of a position that is not scored (``cross_entropy``'s default ``ignore_index``).
IGNORE = -100

#: The token that opens every parity string; the bits are the tokens 0 and 1, so the vocabulary is {0, 1, 2}.
PARITY_START = 2


def parity_batch(n: int, length: int, generator: torch.Generator, *, device=None):
    """``n`` random bit strings of ``length`` bits, each after a start token, and the parity of every prefix.

        tokens   [n, 1 + length]   PARITY_START, b_1, …, b_length          b_t ∈ {0, 1}, uniform, independent
        targets  [n, 1 + length]   IGNORE,       p_1, …, p_length          p_t = (b_1 + ⋯ + b_t) mod 2

    The start token is not scored.  Both tensors are int64, drawn on the CPU from ``generator`` and
    moved to ``device``; the same generator state gives the same batch.
    """
    _positive_int("parity_batch", "n", n)
    _positive_int("parity_batch", "length", length)
    bits = torch.randint(0, 2, (n, length), generator=generator)
    tokens = torch.cat([torch.full((n, 1), PARITY_START), bits], dim=1)
    targets = torch.cat([torch.full((n, 1), IGNORE), bits.cumsum(dim=1) % 2], dim=1)
    return tokens.to(device), targets.to(device)


def mqar_batch(n: int, generator: torch.Generator, *, pairs: int, n_keys: int, n_values: int, device=None):
    """Multi-query associative recall (Arora et al. 2023): ``n`` sequences of ``pairs`` key–value pairs,
    then the same keys again, each once, in a new random order.

        tokens   [n, 3·pairs]   κ_1 ν_1 κ_2 ν_2 … κ_p ν_p   κ_σ(1) … κ_σ(p)        (p = pairs)
        targets  [n, 3·pairs]   IGNORE on the 2p context positions            ν_σ(1) … ν_σ(p)

    Keys are the tokens 0 … n_keys − 1, distinct within a sequence (so ``pairs`` ≤ ``n_keys``); values
    are the tokens n_keys … n_keys + n_values − 1, drawn independently (they may repeat); the
    vocabulary has n_keys + n_values tokens.  σ is a uniform random permutation per sequence, so the
    target at each query is the value that followed that key in the context.  int64, drawn on the
    CPU from ``generator`` and moved to ``device``.
    """
    owner = "mqar_batch"
    for name, value in (("n", n), ("pairs", pairs), ("n_keys", n_keys), ("n_values", n_values)):
        _positive_int(owner, name, value)
    if pairs > n_keys:
        raise ValueError(f"{owner}: pairs must be at most n_keys = {n_keys} (keys are distinct), got {pairs}")
    keys = torch.rand(n, n_keys, generator=generator).argsort(dim=-1)[:, :pairs]       # distinct keys
    values = n_keys + torch.randint(0, n_values, (n, pairs), generator=generator)
    order = torch.rand(n, pairs, generator=generator).argsort(dim=-1)                  # σ
    context = torch.stack([keys, values], dim=-1).flatten(1)                           # κ_1 ν_1 … κ_p ν_p
    tokens = torch.cat([context, keys.gather(1, order)], dim=1)
    targets = torch.cat([torch.full_like(context, IGNORE), values.gather(1, order)], dim=1)
    return tokens.to(device), targets.to(device)


def delayed_recall_batch(n: int, length: int, generator: torch.Generator, *, n_values: int, n_fillers: int,
                         distance: int | None = None, device=None):
    """Recall one value across a distance: ``n`` sequences of ``length`` filler tokens, one of them replaced
    by a value D positions before the last, and a query token last; the target at the query is the value.

        tokens   [n, length]   φ … φ ν φ … φ ?        ν at position length − 1 − D, ? the query token
        targets  [n, length]   IGNORE …      IGNORE ν    only the query (the last position) is scored

    Values ν are the tokens 0 … n_values − 1, fillers φ the tokens n_values … n_values + n_fillers − 1
    (each drawn uniformly and independently), and the query token is n_values + n_fillers, so the
    vocabulary has n_values + n_fillers + 1 tokens.  The distance D from the value to the query is
    ``distance`` for every sequence (1 ≤ distance ≤ length − 1), or, when ``distance`` is None, drawn
    uniformly from 1 … length − 1 per sequence.  int64, drawn on the CPU from ``generator`` and moved to
    ``device``.
    """
    owner = "delayed_recall_batch"
    for name, value in (("n", n), ("n_values", n_values), ("n_fillers", n_fillers)):
        _positive_int(owner, name, value)
    _positive_int(owner, "length", length)
    if length < 2:
        raise ValueError(f"{owner}: length must be at least 2 (a value and the query), got {length}")
    if distance is None:
        D = torch.randint(1, length, (n,), generator=generator)
    else:
        _positive_int(owner, "distance", distance)
        if distance > length - 1:
            raise ValueError(f"{owner}: distance must be at most length − 1 = {length - 1}, got {distance}")
        D = torch.full((n,), distance)
    tokens = n_values + torch.randint(0, n_fillers, (n, length), generator=generator)
    values = torch.randint(0, n_values, (n,), generator=generator)
    tokens[torch.arange(n), length - 1 - D] = values
    tokens[:, -1] = n_values + n_fillers
    targets = torch.full_like(tokens, IGNORE)
    targets[:, -1] = values
    return tokens.to(device), targets.to(device)


def train(model: nn.Module, batches: Callable, steps: int, *, lr: float, seed: int, label: str = "training",
          progress: bool = True) -> list[float]:
    """Train ``model`` (tokens [B, T] → logits [B, T, vocab]) for ``steps`` steps; return every step's loss.

    Step s draws ``inputs, targets = batches(generator)`` from one ``torch.Generator`` seeded with
    ``seed`` (so a given seed and initial model give the same run), takes the mean cross-entropy over
    the positions whose target is not ``IGNORE``, clips the gradient to norm 1 and takes one AdamW step
    (no weight decay) at the learning rate of a one-cycle schedule that rises to ``lr`` over the first
    10 % of the steps and anneals after (so ``steps`` > 10).  The loop draws no other random numbers.

    ``progress``: a progress bar named ``label`` (``tqdm.auto``: a widget in JupyterLab, text in a
    terminal), which stays after the run with its last loss; ``progress=False`` trains silently.
    """
    _positive_int("train", "steps", steps)
    if steps <= 10:
        raise ValueError(f"train: steps must be more than 10 (the warm-up is 10 % of them), got {steps}")
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    bar = trange(steps, desc=label, disable=not progress)
    every = max(1, steps // 20)                 # the loss shown on the bar: ~20 updates (each a device sync)
    losses = []
    for step in bar:
        inputs, targets = batches(generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.detach())
        if progress and ((step + 1) % every == 0 or step + 1 == steps):
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return torch.stack(losses).tolist()


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor, *, per_position: bool = False):
    """How often the greedy prediction ``logits.argmax(-1)`` equals the target, at the scored positions only.

    logits [B, T, vocab], targets [B, T] (``IGNORE`` where not scored).  ``per_position=False``: one
    float, over all scored positions of the batch.  ``per_position=True``: a float tensor [T], the
    accuracy at each position over the sequences that score it (NaN at a position none scores).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"masked_accuracy: logits must be [B, T, vocab] and targets [B, T], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    scored = targets != IGNORE
    hit = (logits.argmax(dim=-1) == targets) & scored
    if per_position:
        return hit.sum(dim=0) / scored.sum(dim=0)
    if not scored.any():
        raise ValueError("masked_accuracy: no position is scored (every target is IGNORE)")
    return (hit.sum() / scored.sum()).item()
