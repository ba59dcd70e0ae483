"""The reference sections of lecture_kit's public functions, added to their docstrings.

In the source, a public function's docstring holds what the book is about: its math, in
a few lines, because the notebooks print that source (``listing.show``,
``inspect.getsource``).  What a user looks up, the Parameters, Returns, Raises and
Examples sections of the numpy docstring standard, is appended by :func:`document` when
the module is imported, so that ``help()`` shows the math first and the reference after
it.

A Parameters entry is built from the signature (name, annotation, default) and a
description: for the five forms of a mixer, its ``SPEC`` (``lecture_kit/_spec.py``), where
each argument is described once for all forms, beside the checks that enforce it
(:func:`document_form`); elsewhere a table parsed by :func:`descriptions`.  No entry can
disagree with the signature it documents.
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
             raises: Sequence[str] = (), notes: str | None = None) -> None:
    """Append Parameters, Returns, Raises and Notes (when given) and Examples to ``fn.__doc__``.

    ``parameters`` maps names to descriptions (see :func:`descriptions`); each entry's
    head reads ``name : annotation, default value``.  ``returns``, ``notes`` and
    ``examples`` are the bodies of their sections, in numpy layout, and ``raises`` the
    entries of its section (such as :data:`VALUE_ERROR`).  The string annotations that
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
                "Notes": notes, "Examples": examples}
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


#: What a NaN or ±inf in one token's activations does to the other outputs, form by form
#: (tests/test_forms.py checks each statement).
NON_FINITE = {
    "recurrent": """
A NaN or ±inf in an activation of token t stays in its own sequence and reaches only
what depends on it: token t's output and, through the state, later ones.  Earlier
outputs and the other sequences of the batch are exact.  (NaN decays are refused while
value checks are on.)
""",
    "parallel": """
A NaN or ±inf in an activation of token t leaves the other sequences of the batch exact
and makes token t's output non-finite, but may reach every output of its own sequence,
earlier ones too: the T×T product multiplies the zeros above the diagonal by it
(0·NaN = NaN).  ``recurrent`` keeps the earlier outputs exact.
""",
    "chunked": """
A NaN or ±inf in an activation of token t leaves the other sequences of the batch and
the chunks before token t's exact, and makes token t's output non-finite, but may reach
the earlier outputs of its own chunk, whose masked products compute 0·NaN.
``recurrent`` keeps every earlier output exact.
""",
    "matrix": """
A NaN or ±inf in token t's inputs leaves the matrices of the other sequences of the
batch and the entries between earlier tokens (i, j < t) exact; any other entry may be
non-finite, above the diagonal too (0·NaN in the mask).
""",
}
NON_FINITE["kernel"] = NON_FINITE["chunked"]


def document_form(fn: Callable, spec, *, returns: str, examples: str) -> None:
    """``document`` for one of a mixer's five forms: its Parameters from the mixer's
    ``spec`` (``lecture_kit/_spec.py``), the Raises every form shares (and the kernel's),
    and the Notes on non-finite activations that hold for its kind of form."""
    form = fn.__name__
    document(fn, spec.descriptions(form), returns=returns, examples=examples,
             raises=[VALUE_ERROR] + ([NO_TRITON] if form == "kernel" else []),
             notes=NON_FINITE[form])
