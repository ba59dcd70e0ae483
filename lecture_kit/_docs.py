"""The reference sections of lecture_kit's public functions, added to their docstrings.

In the source, a public function's docstring holds what the book is about: its math, in
a few lines, because the notebooks print that source (``listing.show``,
``inspect.getsource``).  What a user looks up, the Parameters, Returns, Raises and
Examples sections of the numpy docstring standard, is appended by :func:`document` when
the module is imported, so that ``help()`` shows the math first and the reference after
it.

A Parameters entry is built from the signature (name, annotation, default) and a
description looked up in a per-module table: every form of a mixer takes the same ``q``,
so ``gla.py`` describes ``q`` once, and no entry can disagree with the signature it
documents.
"""
from __future__ import annotations

import inspect
import textwrap
import typing
from collections.abc import Callable, Sequence


def descriptions(text: str) -> dict[str, str]:
    """Parse a table of parameter descriptions into ``{name: description}``.

    The table is laid out as a numpy Parameters section without the types (those come
    from the annotations): a line at the left margin names a parameter, the indented
    lines below it describe it.
    """
    table: dict[str, list[str]] = {}
    for line in textwrap.dedent(text).strip("\n").splitlines():
        if line[:1].isspace() or not line:
            if not table:
                raise ValueError(f"descriptions: text before the first name: {line!r}")
            table[next(reversed(table))].append(line)
        else:
            table[line.strip()] = []
    return {name: textwrap.dedent("\n".join(lines)).strip()
            for name, lines in table.items()}


def document(fn: Callable, parameters: dict[str, str], *, returns: str, examples: str,
             raises: Sequence[str] = ()) -> None:
    """Append Parameters, Returns, Raises (when given) and Examples to ``fn.__doc__``.

    ``parameters`` maps names to descriptions (see :func:`descriptions`); each entry's
    head reads ``name : annotation, default value``.  ``returns`` and ``examples`` are
    the bodies of their sections, in numpy layout, and ``raises`` the entries of its
    section (such as :data:`VALUE_ERROR`).  The string annotations that
    ``from __future__ import annotations`` leaves are resolved too, so that ``help()``
    prints ``q: torch.Tensor`` rather than ``q: 'torch.Tensor'``.

    Raises ``ValueError`` when ``fn`` has no docstring, or a parameter has no annotation
    or no description.
    """
    where = f"{fn.__module__}.{fn.__name__}"
    if not fn.__doc__:
        raise ValueError(f"{where}: the math goes in a docstring first")
    entries = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.annotation is p.empty or name not in parameters:
            raise ValueError(f"{where}: parameter {name!r} needs an annotation and a "
                             f"description")
        kind = p.annotation if isinstance(p.annotation, str) \
            else inspect.formatannotation(p.annotation)
        default = "" if p.default is p.empty else f", default {p.default!r}"
        entries.append(f"{name} : {kind}{default}\n"
                       + textwrap.indent(parameters[name], "    "))
    sections = {"Parameters": "\n".join(entries), "Returns": returns,
                "Raises": "\n".join(textwrap.dedent(r).strip() for r in raises) or None,
                "Examples": examples}
    fn.__doc__ = "\n\n".join([inspect.cleandoc(fn.__doc__)] + [
        f"{title}\n{'-' * len(title)}\n{textwrap.dedent(body).strip()}"
        for title, body in sections.items() if body is not None])
    fn.__annotations__ = typing.get_type_hints(fn)


#: What every mixer form raises: ``_validate.Signature`` (and each kernel's own checks)
#: enforce what its Parameters section states.
VALUE_ERROR = """
ValueError
    If an argument breaks a requirement stated under Parameters (its type, shape, dtype,
    device or range).  The message names the argument and what it expects.
"""

#: What the ``kernel`` forms raise besides (``lecture_kit/kernels/__init__.py``).
NO_TRITON = """
ModuleNotFoundError
    Where Triton cannot be imported (it has wheels only for Linux on x86_64 and
    aarch64).  Every other form works without it, and ``chunked`` takes the same
    arguments.
"""
