"""lecture_kit: the code of Lecture 17, "Mamba-2 and its kin".

One module per token mixer (``ssd``, ``retnet``, ``gla``, ``rwkv7``), each with the same five forms
(``recurrent``, ``parallel``, ``chunked``, ``matrix`` and the Triton ``kernel``), and
``semiseparable`` for the matrix class they all belong to.

Device choice happens here, once, before anything imports Triton: with CUDA the kernels compile for
the GPU; without it we set ``TRITON_INTERPRET=1`` so that the *same* kernel source runs on the CPU
through Triton's interpreter (slowly, at small sizes: this is how CI executes the real kernels).
"""
import os as _os

import torch as _torch

#: True when a CUDA GPU is visible to PyTorch.
HAS_CUDA = _torch.cuda.is_available()

if not HAS_CUDA:
    # Must precede the first ``import triton`` anywhere in the process to take effect.
    _os.environ.setdefault("TRITON_INTERPRET", "1")

#: Where the notebooks put their tensors.
DEVICE = _torch.device("cuda" if HAS_CUDA else "cpu")

#: Whether Triton kernels run through the CPU interpreter in this process.
TRITON_INTERPRETED = _os.environ.get("TRITON_INTERPRET") == "1"


def by_device(gpu, cpu):
    """The one place notebooks choose sizes: ``T = by_device(gpu=8192, cpu=256)``.

    Full, realistic sizes on a GPU; small ones on a CPU, where the same notebook must run in CI
    within minutes (and the Triton kernels run through the interpreter).
    """
    return gpu if HAS_CUDA else cpu

from . import semiseparable, ssd, retnet, gla, rwkv7  # noqa: E402  (after the environment is set)

__all__ = ["HAS_CUDA", "DEVICE", "TRITON_INTERPRETED", "by_device", "semiseparable", "ssd", "retnet", "gla", "rwkv7"]
