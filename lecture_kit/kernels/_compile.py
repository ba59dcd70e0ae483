"""What the kernels share to run under ``torch.compile``.

torch.compile cannot trace into a Triton launch made from Python (an autotuner and a launcher are
plain Python objects), so under compilation each kernel's forward and backward run as registered
PyTorch operators (``torch.library.custom_op``), opaque to the compiler: a graph holding them
compiles with ``fullgraph=True``, and their gradient is the Triton backward, wired in with
``register_autograd``.  Eager calls keep the direct path, since the dispatcher costs host time on
every call.  An operator cannot return None, so an absent result travels as an empty tensor.
"""
from __future__ import annotations

import torch


def absent(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t``, or an empty tensor on ``like``'s device where ``t`` is None."""
    return like.new_empty(0) if t is None else t


def present(g: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient ``g`` of input ``x`` in ``x``'s dtype, or None where ``x`` is None or ``g`` is
    the empty stand-in of an absent gradient."""
    return g.to(x.dtype) if x is not None and g.numel() == x.numel() else None
