"""What this machine offers lecture_kit: a CUDA GPU and its compute capability, Triton, and the dtype
the kernels are fastest in.  Read once, when ``lecture_kit`` is imported (which re-exports the names
below).

``HAS_CUDA``, ``DEVICE``
    PyTorch sees a CUDA GPU; notebooks put their tensors on ``DEVICE`` and choose realistic sizes on a
    GPU, small ones on a CPU (``by_device``).
``HAS_TRITON``
    Triton can be imported.  Triton publishes wheels only for Linux on x86_64 and aarch64, so on macOS
    and Windows it is absent: every form but ``kernel`` works, and the ``kernel`` forms raise
    ``ModuleNotFoundError`` with ``triton_missing_message()``, which says why and what to use instead.
``TRITON_INTERPRETED``
    Triton is present but no GPU is: ``TRITON_INTERPRET=1``, set here before anything imports Triton,
    runs the *same* kernel source on the CPU through Triton's interpreter (slowly, at small sizes: this
    is how CI executes the real kernels).
``fast_dtype(device)``
    bf16 from compute capability 8.0 (NVIDIA Ampere) on; fp16 below it, where Triton's tensor-core
    product ``tl.dot`` has no bf16 form (Colab's T4 is 7.5); fp32 on a CPU.  The kernels' entry
    points call ``check_kernel_dtype``, which turns bf16 on such a GPU into a ``ValueError``.
``skip_triton_cells()``
    In a notebook where Triton is missing, the cells whose first line is ``# needs Triton`` print that
    they were skipped instead of failing, so the page still runs top to bottom.

An NVIDIA driver that PyTorch cannot use (typically a PyTorch built for a newer CUDA than the driver
supports) would otherwise send everything to the CPU in silence: ``warn_if_gpu_unused``, called at
import, says so once, with the versions involved (``unused_gpu_message``).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch

#: From this compute capability on, Triton's ``tl.dot`` takes bf16 operands (sm_80, NVIDIA Ampere).
BF16_CAPABILITY = (8, 0)


def _triton_importable() -> bool:
    """Whether ``import triton`` would find Triton.  Looked up, not imported: the import has to wait
    until ``TRITON_INTERPRET`` is decided (a finder that refuses Triton counts as absent)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:
        return False


#: True when a CUDA GPU is visible to PyTorch.
HAS_CUDA: bool = torch.cuda.is_available()

#: True when Triton can be imported (Linux on x86_64 or aarch64; see the module docstring).
HAS_TRITON: bool = _triton_importable()

if HAS_TRITON and not HAS_CUDA:
    # Must precede the first ``import triton`` anywhere in the process to take effect.
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: Where the notebooks put their tensors.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

#: Whether Triton kernels run through the CPU interpreter in this process.
TRITON_INTERPRETED: bool = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

_Size = TypeVar("_Size")


def by_device(gpu: _Size, cpu: _Size) -> _Size:
    """The one place notebooks choose sizes: ``T = by_device(gpu=8192, cpu=256)``.

    Full, realistic sizes on a GPU; small ones on a CPU, where the same notebook must run in CI
    within minutes (and the Triton kernels run through the interpreter).
    """
    return gpu if HAS_CUDA else cpu


def capability(device: torch.device | str | None = None) -> tuple[int, int] | None:
    """The compute capability ``(major, minor)`` of a CUDA ``device`` (default ``DEVICE``), e.g.
    ``(9, 0)`` for an H200 and ``(7, 5)`` for a T4; ``None`` for a device that is not CUDA."""
    device = DEVICE if device is None else torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def fast_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The dtype the notebooks and benchmarks give the kernels on ``device`` (default ``DEVICE``).

    ``torch.bfloat16`` on a GPU of compute capability ≥ 8.0; ``torch.float16`` below it (no bf16
    ``tl.dot`` there; fp16 has bf16's speed and more mantissa, less range); ``torch.float32`` on
    a CPU, where half precision buys nothing and the interpreter emulates it.
    """
    cap = capability(device)
    if cap is None:
        return torch.float32
    return torch.bfloat16 if cap >= BF16_CAPABILITY else torch.float16


def check_kernel_dtype(function: str, name: str, t: torch.Tensor) -> None:
    """Refuse a bf16 tensor ``t`` (argument ``name`` of ``function``) on a GPU below compute capability
    8.0, where Triton has no bf16 tensor-core product: a ``ValueError`` that names the GPU and the
    dtypes that do run there.  fp16 and fp32, and every dtype on a CPU or a newer GPU, pass."""
    if t.dtype != torch.bfloat16:
        return
    cap = capability(t.device)
    if cap is not None and cap < BF16_CAPABILITY:
        need = ".".join(map(str, BF16_CAPABILITY))
        raise ValueError(
            f"{function}: {name} is bfloat16, and the Triton kernels take bfloat16 only on a GPU of "
            f"compute capability {need} or newer (Triton has no bf16 tensor-core product below it); "
            f"this GPU, {torch.cuda.get_device_name(t.device)}, is {cap[0]}.{cap[1]}. Pass float16 or "
            f"float32 inputs (lecture_kit.fast_dtype() gives float16 here), or use the chunked form.")


def triton_missing_message() -> str:
    """What the ``kernel`` forms say where Triton cannot be imported: why, and what to use instead."""
    here = f"{platform.system()} {platform.machine()}"
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64"):
        why = f"Triton has wheels for this machine ({here}) but cannot be imported: pip install triton"
    else:
        why = (f"Triton publishes wheels only for Linux on x86_64 and aarch64, not for this machine "
               f"({here}), so lecture_kit installs it only there")
    return (f"lecture_kit's kernel forms (ssd.kernel, retnet.kernel, gla.kernel, rwkv7.kernel) need Triton. "
            f"{why}. Every other form works without it: use chunked, the same chunkwise algorithm in "
            f"PyTorch, with the same arguments (e.g. lecture_kit.gla.chunked instead of gla.kernel).")


#: The first line of a notebook cell that lists or runs the Triton kernels (see ``skip_triton_cells``).
NEEDS_TRITON = "# needs Triton"

_SKIPPED = "skipped: this cell needs Triton, which this machine lacks (see the note at the top of the page)"


def _skip_if_marked(lines: list[str]) -> list[str]:
    """An IPython input transformer: a cell whose first line starts with ``NEEDS_TRITON`` becomes one
    ``print`` of the skip note; every other cell passes unchanged."""
    if lines and lines[0].startswith(NEEDS_TRITON):
        return [f"print({_SKIPPED!r})\n"]
    return lines


def skip_triton_cells() -> None:
    """Let a notebook run top to bottom where Triton is missing (macOS, Windows).

    Every later cell whose first line starts with ``# needs Triton`` prints a one-line note instead of
    running, and this call prints what is skipped and why.  Does nothing where Triton is present, or
    outside IPython.  Works through IPython's ``input_transformers_post``, registered once per shell.
    """
    if HAS_TRITON:
        return
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or _skip_if_marked in shell.input_transformers_post:
        return
    shell.input_transformers_post.append(_skip_if_marked)
    print(f"Triton is not installed on this machine ({platform.system()} {platform.machine()}): the cells "
          f"that list or run the Triton kernels (marked '{NEEDS_TRITON}') are skipped, each with a note. "
          f"Every PyTorch form runs and is checked as usual.")


class Driver(NamedTuple):
    """An installed NVIDIA driver: its version and the newest CUDA it supports (None when unknown)."""
    version: str | None
    cuda: str | None


def nvidia_driver() -> Driver | None:
    """The NVIDIA driver of this machine, or ``None`` if there is none (no ``nvidia-smi`` on PATH and
    no ``/proc/driver/nvidia``).  ``nvidia-smi``'s banner gives both versions; Linux's
    ``/proc/driver/nvidia/version`` only the driver's."""
    smi, proc = shutil.which("nvidia-smi"), Path("/proc/driver/nvidia/version")
    if smi is None and not proc.parent.exists():
        return None
    banner = ""
    if smi is not None:
        try:
            banner = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            pass                                   # a driver that does not answer: versions unknown
    version = re.search(r"Driver Version:\s*([\d.]+)", banner)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    if version is None and proc.exists():
        version = re.search(r"Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\s", proc.read_text())
    return Driver(version and version.group(1), cuda and cuda.group(1))


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def unused_gpu_message() -> str | None:
    """Why PyTorch sees no GPU although an NVIDIA driver is installed, or ``None`` when that is not so
    (PyTorch sees a GPU, no driver is installed, or ``CUDA_VISIBLE_DEVICES`` hides the GPUs on purpose).

    The reasons told apart: a CPU-only build of PyTorch; a PyTorch built for a newer CUDA than the
    driver supports; anything else (PyTorch's own CUDA warning, if any, has the details).
    """
    if torch.cuda.is_available() or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return None
    driver = nvidia_driver()
    if driver is None:
        return None
    found = f"an NVIDIA driver is installed (version {driver.version or 'unknown'}"
    found += f", for CUDA up to {driver.cuda})" if driver.cuda else ")"
    built = f"this PyTorch, {torch.__version__}"
    if torch.version.cuda is None:
        why = f"{built}, is a CPU-only build"
        fix = "install PyTorch's CUDA build (for this book: a fresh .venv made by make without CPU=1)"
    elif driver.cuda and _version_tuple(torch.version.cuda) > _version_tuple(driver.cuda):
        why = f"{built}, is built for CUDA {torch.version.cuda}, newer than the driver supports"
        fix = ("update the NVIDIA driver, or install a PyTorch built for CUDA "
               f"{driver.cuda} or older")
    else:
        why = f"{built} (built for CUDA {torch.version.cuda}), could not initialise it"
        fix = "check that the driver is loaded (nvidia-smi lists the GPU) and that it supports that CUDA"
    return (f"lecture_kit: {found}, but PyTorch cannot use it: {why}. lecture_kit runs on the CPU "
            f"instead: the Triton kernels through Triton's interpreter, the notebooks at their CPU sizes. "
            f"To use the GPU, {fix}.")


def warn_if_gpu_unused() -> None:
    """Warn (``RuntimeWarning``) with ``unused_gpu_message()`` when it is not ``None``.  Called once,
    when lecture_kit is imported on a machine where PyTorch sees no GPU."""
    message = unused_gpu_message()
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
