"""Timing on the reader's device, and reading the recorded GPU benchmarks beside it.

The ladder pages (notebooks 04a–04c) time every form of a mixer on the machine that runs them and
plot the result beside timings recorded on an H200 by ``benchmarks/bench_kernels.py``.  This module
holds both halves:

* **live timing**: ``median_ms`` (one call's median time) and ``time_forms`` (every form of one mixer
  over a range of lengths), plus ``calls_to``, which counts the calls a block makes to a function
  (e.g. whether a kernel's backward pass recomputes the forward pass in PyTorch);
* **the record**: ``load_record`` reads ``benchmarks/results/*.json``, a dict with

  - ``"runs"``: one dict per benchmark run: ``device``, ``torch``, ``triton``, ``fla``, ``date``
    (ISO 8601), …;
  - ``"records"``: one dict per measurement: ``mixer`` (``"ssd"``, …, or ``"attention"``), ``impl``
    (e.g. ``"lecture_kit kernel"``, ``"fla chunk_gla"``, ``"torch sdpa"``), ``mode`` (``"fwd"`` or
    ``"fwdbwd"``), batch ``B``, length ``T``, ``run`` (an index into ``runs``) and either ``ms`` (the
    median time of one call) or ``error`` (why it failed);

  ``run_label`` names a run, ``record_notes`` summarises what the record holds for one mixer and
  ``bench_defaults`` / ``bench_constant`` read the recorded shapes from the benchmark script itself.

The plot of both halves is ``lecture_kit.plots.plot_ladder``.
"""
from __future__ import annotations

import ast
import contextlib
import json
import time
from pathlib import Path

import torch

from . import DEVICE
from .testing import random_inputs

#: The forms that ``time_forms`` times, in the order of the ladder (``matrix`` is not a forward pass).
FORMS = ("recurrent", "parallel", "chunked", "kernel")


# ---------------------------------------------------------------------------------------------------
# live timing

def median_ms(fn, repeats: int = 3, *, device: torch.device | None = None) -> float:
    """Median time of ``fn()`` in milliseconds, under ``torch.no_grad()``.

    CUDA: ``triton.testing.do_bench(fn, return_mode="median")``, which warms up, synchronises and
    repeats for a fixed time (as the H200 record was taken; ``repeats`` is unused).  CPU: one warm-up
    call, then ``repeats`` calls timed with ``time.perf_counter``, and their median.
    ``device`` defaults to ``lecture_kit.DEVICE``.
    """
    device = DEVICE if device is None else torch.device(device)
    with torch.no_grad():
        if device.type == "cuda":
            from triton.testing import do_bench
            return do_bench(fn, return_mode="median")
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def time_forms(name: str, module, shape: dict, lengths, longest: dict, dtype: torch.dtype,
               *, device: torch.device | None = None, seed: int = 4) -> dict:
    """Forward time of every form of one mixer at batch 1: ``{form: [(T, ms), ...]}``.

    ``name`` and ``module``: the mixer (``"ssd"``, ``lecture_kit.ssd``); ``shape``: the size keywords
    of ``testing.random_inputs`` (``heads``, ``key_dim``, ``value_dim``, and ``groups`` for SSD);
    ``lengths``: the sequence lengths T; ``longest[form]``: the largest T at which ``form`` is timed
    (the quadratic and sequential forms stop early).  A form that runs out of GPU memory at some T is
    left out at that T.  Inputs are drawn with ``seed`` on ``device`` (default ``lecture_kit.DEVICE``).
    """
    device = DEVICE if device is None else device
    live = {}
    for L in lengths:
        targs, tkw = random_inputs(name, batch=1, length=L, **shape, dtype=dtype, device=device, seed=seed)
        for form in FORMS:
            if L > longest[form]:
                continue
            try:
                ms = median_ms(lambda: getattr(module, form)(*targs, **tkw), device=device)
                live.setdefault(form, []).append((L, ms))
            except torch.cuda.OutOfMemoryError:       # a quadratic form too large for this GPU
                torch.cuda.empty_cache()
    return live


@contextlib.contextmanager
def calls_to(module, name: str):
    """Count the calls to ``module.<name>`` made inside the block (e.g. by a backward pass).

        with calls_to(gla, "chunked") as calls:
            ...
        len(calls)          # how many times gla.chunked was called

    The attribute is replaced by a counting wrapper for the duration of the block and restored after
    it, also when the block raises.  Calls made through a reference taken before the block (``from
    gla import chunked``) are not seen.
    """
    calls, original = [], getattr(module, name)
    setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        yield calls
    finally:
        setattr(module, name, original)


# ---------------------------------------------------------------------------------------------------
# the record

def load_record(path) -> dict:
    """The recorded benchmark results at ``path`` (JSON): ``{"runs": [...], "records": [...]}``.

    See the module docstring for the fields.  Raises ``ValueError`` if either key is missing.
    """
    record = json.loads(Path(path).read_text())
    missing = [key for key in ("runs", "records") if key not in record]
    if missing:
        raise ValueError(f"load_record: {path} has no {' or '.join(map(repr, missing))} (expected "
                         "{'runs': [...], 'records': [...]}, as written by benchmarks/bench_kernels.py)")
    return record


def run_label(record: dict, i: int) -> str:
    """A one-line name for run ``i`` of ``record``: device, versions and date (day only).

    ``"NVIDIA H200, torch 2.11.0+cu130, Triton 3.6.0, fla 0.6.0, 2026-11-28"``.
    """
    r = record["runs"][i]
    return f"{r['device']}, torch {r['torch']}, Triton {r['triton']}, fla {r['fla']}, {r['date'][:10]}"


def record_notes(record: dict, mixer: str, glue=None) -> tuple[dict, list]:
    """What ``record`` holds for ``mixer``, and what it lacks: ``(notes, failed)``.

    ``notes`` (strings and one int, ready to quote in the text):

    * ``missing``: the forms of ``FORMS`` that no recorded implementation of ``mixer`` names
      (``"none"`` if all are there);
    * ``lengths``: the lengths T with a successful measurement of ``mixer``; ``all_lengths``: the
      lengths T of the whole record (all mixers);
    * ``labels``: the ``run_label`` of every run that measured ``mixer``;
    * ``failed``: how many measurements of ``mixer`` failed; ``failed_what``: which ``impl (mode)``;
    * ``pairs``: per implementation, the modes that succeeded (``"fla chunk_gla: fwd, fwdbwd; ..."``).

    ``failed`` is the list of failed measurements (each with its ``error``).  If ``glue`` is given
    (``myst_nb.glue``), each note is also glued as ``f"{mixer}_rec_{key}"`` with ``display=False``.
    """
    rows = [r for r in record["records"] if r["mixer"] == mixer]
    ok, failed = [r for r in rows if r.get("ms")], [r for r in rows if r.get("error")]
    notes = {"missing": ", ".join(f for f in FORMS if not any(f in r["impl"] for r in rows)) or "none",
             "lengths": ", ".join(str(t) for t in sorted({r["T"] for r in ok})),
             "all_lengths": ", ".join(str(t) for t in sorted({r["T"] for r in record["records"]})),
             "labels": "; ".join(sorted({run_label(record, r["run"]) for r in rows})),
             "failed": len(failed),
             "failed_what": ", ".join(sorted({f"{r['impl']} ({r['mode']})" for r in failed})) or "none",
             "pairs": "; ".join(f"{i}: {', '.join(sorted({r['mode'] for r in ok if r['impl'] == i}))}"
                                for i in sorted({r["impl"] for r in ok}))}
    if glue is not None:
        for key, value in notes.items():
            glue(f"{mixer}_rec_{key}", value, display=False)
    return notes, failed


def _script(path) -> ast.Module:
    return ast.parse(Path(path).read_text())


def bench_defaults(script, name: str) -> dict:
    """The keyword defaults of the function ``name`` in the benchmark script at path ``script``:
    for an input builder such as ``ssd_inputs(B, T, H=32, P=64, N=128, G=1)``, the recorded shapes
    ``{"H": 32, "P": 64, "N": 128, "G": 1}``.  Read with ``ast``, without importing the script (which
    needs CUDA and fla).  Raises ``ValueError`` if the script defines no such function.
    """
    fn = next((n for n in _script(script).body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if fn is None:
        raise ValueError(f"bench_defaults: {script} defines no function {name!r}")
    names = [a.arg for a in fn.args.args][len(fn.args.args) - len(fn.args.defaults):]
    return dict(zip(names, (ast.literal_eval(d) for d in fn.args.defaults)))


def bench_constant(script, name: str):
    """The value of the module-level constant ``name = <literal>`` in the benchmark script at path
    ``script`` (e.g. ``TOKENS``, the tokens per call, batch × T, of the recorded runs).  Read with
    ``ast``; raises ``ValueError`` if the script assigns no such name.
    """
    for n in _script(script).body:
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets):
            return ast.literal_eval(n.value)
    raise ValueError(f"bench_constant: {script} assigns no module-level constant {name!r}")
