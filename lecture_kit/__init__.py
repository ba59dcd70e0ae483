"""lecture_kit: the code of Lecture 17, "Mamba-2 and its kin".

One module per token mixer (``ssd``, ``retnet``, ``gla``, ``rwkv7``), each with the same five forms
(``recurrent``, ``parallel``, ``chunked``, ``matrix`` and the Triton ``kernel``), and
``semiseparable`` for the matrix class they all belong to.

What the machine offers is decided here, once, before anything imports Triton (``hardware``): with
CUDA the kernels compile for the GPU; without it ``TRITON_INTERPRET=1`` makes the *same* kernel source
run on the CPU through Triton's interpreter; without Triton (macOS, Windows) every form but ``kernel``
works (and ``skip_triton_cells()`` lets a notebook say so instead of failing).  ``fast_dtype()`` is the
dtype the notebooks give the kernels on this device.
"""
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError, version as _version

from .hardware import (DEVICE, HAS_CUDA, HAS_TRITON, TRITON_INTERPRETED, by_device, capability,
                       fast_dtype, skip_triton_cells, warn_if_gpu_unused as _warn_if_gpu_unused)

try:
    #: The installed version, from the package metadata (pyproject.toml's ``version``).
    __version__ = _version("lecture_kit")
except _PackageNotFoundError:                      # imported from a source tree that was never installed
    __version__ = "unknown"

if not HAS_CUDA:
    _warn_if_gpu_unused()

from ._validate import set_value_checks  # noqa: E402
from . import semiseparable, ssd, retnet, gla, rwkv7  # noqa: E402  (after the environment is set)

__all__ = ["HAS_CUDA", "HAS_TRITON", "DEVICE", "TRITON_INTERPRETED", "by_device", "capability", "fast_dtype",
           "set_value_checks", "skip_triton_cells", "semiseparable", "ssd", "retnet", "gla", "rwkv7",
           "__version__"]
