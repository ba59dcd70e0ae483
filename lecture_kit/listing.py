"""Listings of lecture_kit's own source, read from the installed package when a page runs.

The kernel walk-throughs (notebooks 04a–04c) never re-type code: they display it with ``show``, so
what the reader reads is what was executed.  ``show(fn)`` displays a whole function; ``show(fn,
start, stop)`` displays a marked block of it, from the first line that contains the text ``start``
up to (not including) the next line that contains ``stop``.  The markers are plain substrings of the
source, so when a kernel changes and a marker disappears, ``show`` raises a ``ValueError`` naming
the marker instead of silently showing the wrong lines.
"""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

#: The folder that holds ``lecture_kit/`` (the repository root for an editable install); listing
#: titles give file paths relative to it.
ROOT = Path(__file__).resolve().parent.parent


class Listing:
    """Source code displayed highlighted and unwrapped (long lines scroll), with a text fallback.

    ``title`` names the file and line range, ``code`` is the dedented source.  In Jupyter the HTML
    form is shown (Pygments, ``white-space: pre`` so that lines are never wrapped); elsewhere
    ``repr`` gives the title and the code as plain text.
    """

    def __init__(self, title: str, code: str):
        self.title, self.code = title, code

    def _repr_html_(self) -> str:
        from pygments import highlight                      # a dependency of IPython, hence of myst-nb
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer
        pre = HtmlFormatter(prestyles="white-space: pre; overflow-x: auto; overflow-wrap: normal")
        return f"<p><code>{self.title}</code></p>" + highlight(self.code, PythonLexer(), pre)

    def __repr__(self) -> str:
        return f"{self.title}\n{self.code}"


def _unwrap(fn):
    """The Python function under Triton's decorators: Autotuner -> JITFunction -> function."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def show(fn, start: str | None = None, stop: str | None = None) -> Listing:
    """``fn``'s source as installed (for a Triton kernel, the Python function under its decorators).

    Whole, or from the first line containing ``start`` up to the next line (after it) containing
    ``stop``; either marker may be omitted (from the first line, to the last).  The title reads
    ``lecture_kit/kernels/ssd.py, lines 120–134`` (file relative to ``ROOT``, 1-based, inclusive).

    Raises ``ValueError`` naming the function and the marker when no line contains it.
    """
    fn = _unwrap(fn)
    lines, first = inspect.getsourcelines(fn)
    find = lambda text, after: next((n for n in range(after, len(lines)) if text in lines[n]), None)
    i = 0 if start is None else find(start, 0)
    j = len(lines) if stop is None else find(stop, (i or 0) + 1)
    if i is None or j is None:
        raise ValueError(f"{fn.__name__}: no line contains {start if i is None else stop!r}")
    path = Path(inspect.getsourcefile(fn)).resolve()
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return Listing(f"{where}, lines {first + i}–{first + j - 1}",
                   textwrap.dedent("".join(lines[i:j])).rstrip())
