"""The claims ledger's records: every checked claim, written down where the book is built.

A checking cell states a claim, asserts it and prints one line, ``✓ claim   measured (bound)``,
through ``lecture_kit.testing``: ``check`` for two tensors that must agree within a tolerance,
``check_equal`` for an exact value, ``check_bound`` for one number on one side of a bound.  Each of
them also calls ``record``, which appends the claim, the measured value, the bound and the verdict
to the file named by the environment variable ``LECTURE_KIT_CLAIMS``, one JSON object per line,
and does nothing when the variable is unset: in JupyterLab and under nbval nothing is written.

The book build sets it, page by page: ``lecture_kit.ledger`` (a Sphinx extension) points it at a
file of the page's own just before the page's notebook is executed, and gathers the files into the
ledger page (``book/claims.md``).  One line, as ``record`` writes it::

    {"claim": "chunked = recurrent", "passed": true,
     "measured": {"rel_rms": 2.1e-16, "max_abs": 4.4e-16}, "relation": "≤",
     "bound": {"rel_rms": 1e-12, "max_abs": 1e-11}, "device": "cpu", "cell": 12,
     "machine": {"cpu": "...", "gpu": null, "python": "3.11.9", "torch": "2.13.0+cpu", ...}}

``cell`` is the execution count of the IPython cell that made the check (None outside IPython),
which is how the ledger links a row to its cell.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: The environment variable that names the file ``record`` appends to.
ENV = "LECTURE_KIT_CLAIMS"

#: How a measured value must stand to its bound: ``check`` holds each error ≤ its bound,
#: ``check_equal`` a value = the expected one, ``check_bound`` a number on either side.
RELATIONS = ("≤", "<", "≥", ">", "=")


def record(claim: str, passed: bool, measured, relation: str, bound, *, device=None) -> None:
    """Append one checked claim to the file named by ``$LECTURE_KIT_CLAIMS``; nothing when unset.

    Args:
        claim: what was checked, in the words of the verdict line.
        passed: the verdict.
        measured, bound: what was measured and what it was held to, each a number, a dict of
            numbers with the same keys (``check``: ``{"rel_rms": ..., "max_abs": ...}``) or any
            value ``check_equal`` compares; stored as JSON holds them (``plain``).
        relation: how ``measured`` must stand to ``bound``, one of ``RELATIONS``.
        device: the device of the compared tensors, where there were tensors.

    The arguments are checked even when nothing is recorded, so that a wrong call fails in
    JupyterLab too, not only in the book build.
    """
    if not isinstance(claim, str) or not claim.strip():
        raise ValueError(f"claim must be a non-empty string, got {claim!r}")
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    path = os.environ.get(ENV)
    if not path:
        return
    line = {"claim": claim, "passed": bool(passed), "measured": plain(measured),
            "relation": relation, "bound": plain(bound),
            "device": None if device is None else str(device),
            "cell": _execution_count(), "machine": machine()}
    with open(path, "a", encoding="utf8") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")


def read(path) -> list[dict]:
    """The records in the file at ``path``, in the order they were made ([] if there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plain(value):
    """``value`` as JSON holds it: None, bools, numbers and strings as they are (numpy's and other
    numeric types as int or float), lists and tuples as lists, dicts with string keys, tensors and
    arrays as their ``tolist()`` (a number for one element); anything else as its ``repr``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if callable(getattr(value, "tolist", None)):
        return plain(value.tolist())
    return repr(value)


def show(value, near=None) -> str:
    """A measured value or a bound as the ledger and ``check_bound`` write it: integers with
    thousands separators, other numbers to three significant digits, lists in brackets, the values
    of a dict joined by `` / ``.

    ``near``, a number (or a dict of numbers with ``value``'s keys), is what the value is written
    beside: it gets as many more digits as it takes for the two to read differently, if they
    differ.  So 0.99995 beside the bound 1 is written 0.99995, not 1, and ``show(1, near=0.99995)``
    is 1.
    """
    if isinstance(value, dict):
        near = near if isinstance(near, dict) else {}
        return " / ".join(show(v, near.get(k)) for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{value:,}"
    value, digits = float(value), 3
    if (isinstance(near, numbers.Real) and not isinstance(near, bool) and value != near
            and math.isfinite(value) and math.isfinite(near)):
        while digits < 17 and f"{value:.{digits}g}" == f"{float(near):.{digits}g}":
            digits += 1
    return f"{value:.{digits}g}"


@functools.lru_cache(maxsize=None)
def machine() -> dict:
    """The machine and the software that checked the claims, read once per process: the CPU and
    its cores, the GPU (None without CUDA), the system, and the versions of Python, PyTorch (and
    the CUDA it was built for), Triton (and whether it runs through its CPU interpreter) and
    lecture_kit."""
    import torch

    import lecture_kit
    from . import hardware

    return {"cpu": _cpu_name(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if hardware.HAS_CUDA else None,
            "system": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _installed("triton") if hardware.HAS_TRITON else None,
            "triton_interpreted": hardware.TRITON_INTERPRETED,
            "lecture_kit": lecture_kit.__version__}


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _installed(package: str) -> str | None:
    """The installed version of ``package``, without importing it (None if it is not installed)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _execution_count() -> int | None:
    """The execution count of the IPython cell running now (the number the notebook stores with
    the cell), None outside IPython.  IPython files a cell's input under its number before running
    it, so the input history (``In``, ``In[0]`` empty) ends with this cell; its own counter is no
    guide, as IPython 9 moves it on before the cell runs and earlier versions after."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    history = getattr(getattr(shell, "history_manager", None), "input_hist_parsed", None)
    return len(history) - 1 if history else None
