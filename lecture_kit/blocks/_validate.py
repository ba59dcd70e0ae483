"""The layers' own argument checks, beside the generic ones of ``lecture_kit._validate``
(``positive_int``, ``positive_float``, ``interval``, ``Signature``)."""
from __future__ import annotations

import torch

from .._validate import positive_int


def head_dim(owner: str, name: str, expand, d_model: int, n_heads: int, *, even: bool = False) -> int:
    """Channels per head of a projection to expand·d_model channels split into n_heads heads."""
    width = expand * d_model if isinstance(expand, (int, float)) and not isinstance(expand, bool) else float("nan")
    head = width / n_heads
    if not (head >= 1 and head == int(head) and (not even or int(head) % 2 == 0)):
        raise ValueError(f"{owner}: {name} must make {name}·d_model / n_heads a positive {'even ' if even else ''}"
                         f"integer (d_model = {d_model}, n_heads = {n_heads}), got {name} = {expand!r}")
    return int(head)


def layer_ratios(owner: str, layer_id, n_layers) -> tuple[float, float]:
    """RWKV's depth-dependent initialisation: (layer_id / (n_layers − 1), 1 − layer_id / n_layers)."""
    positive_int(owner, "n_layers", n_layers)
    if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < n_layers:
        raise ValueError(f"{owner}: layer_id must be an int in [0, n_layers = {n_layers}), got {layer_id!r}")
    return layer_id / max(n_layers - 1, 1), 1 - layer_id / n_layers


def feature_width(owner: str, name: str, t, width: int) -> None:
    """``t`` is a floating-point tensor [..., width] (a norm's input, say)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1 or t.shape[-1] != width:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{owner}: {name} must be a floating-point tensor [..., {width}], got {got}")
