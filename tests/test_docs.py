"""The mixer modules' reference documentation: complete, true to the code, checked.

Every public function of ``semiseparable``, ``ssd``, ``retnet``, ``gla`` and ``rwkv7``
must have annotations and a numpy docstring whose Parameters section lists exactly its
parameters, with their annotations and defaults, and whose Returns and Examples sections
are there; every example runs as a doctest, in a namespace of its own (an example
imports what it uses, as a reader's would).
"""
import doctest
import inspect
import re
import textwrap

import pytest

from lecture_kit import _docs, gla, retnet, rwkv7, semiseparable, ssd
from lecture_kit._spec import FORMS
from lecture_kit.hardware import HAS_TRITON

MODULES = [semiseparable, ssd, retnet, gla, rwkv7]


def public_functions(module):
    return [fn for name, fn in vars(module).items()
            if not name.startswith("_") and inspect.isfunction(fn)
            and fn.__module__ == module.__name__]


FUNCTIONS = [fn for m in MODULES for fn in public_functions(m)]
IDS = [f"{fn.__module__.rsplit('.', 1)[1]}.{fn.__name__}" for fn in FUNCTIONS]


def section(doc: str, title: str) -> str | None:
    """The body of numpy section ``title``, up to the next underlined heading, or None."""
    head = rf"^{title}\n-{{{len(title)}}}\n"
    m = re.search(head + r"(.*?)(?=^\w+\n-+\n|\Z)", doc, re.S | re.M)
    return None if m is None else m.group(1).strip()


def test_the_parametrisation_sees_every_form():
    for m in MODULES[1:]:
        assert {fn.__name__ for fn in public_functions(m)} == set(FORMS), m.__name__
    assert {fn.__name__ for fn in public_functions(semiseparable)} == {
        "segsum", "one_semiseparable_mask", "default_tolerance", "semiseparable_rank",
        "sss_matrix"}


@pytest.mark.parametrize("fn", FUNCTIONS, ids=IDS)
def test_annotations_and_sections(fn):
    sig = inspect.signature(fn)
    unannotated = [n for n, p in sig.parameters.items() if p.annotation is p.empty]
    assert not unannotated, f"parameters without annotations: {unannotated}"
    assert sig.return_annotation is not sig.empty, "no return annotation"

    doc = inspect.getdoc(fn)
    assert not doc.startswith("Parameters"), "the math comes first, then the Parameters"
    params = section(doc, "Parameters")
    assert params, "no Parameters section"
    # an entry: "name : type[, default value]", then its description, indented
    entries = re.findall(r"^(\w+) : (.+)\n(?: {4}\S.*(?:\n|$))+", params, re.M)
    assert [name for name, _ in entries] == list(sig.parameters), \
        "the described parameters differ from the signature's"
    for (name, head), p in zip(entries, sig.parameters.values()):
        expected = inspect.formatannotation(p.annotation)
        if p.default is not p.empty:
            expected += f", default {p.default!r}"
        assert head == expected, f"{name}: documented as {head!r}, not {expected!r}"
    assert section(doc, "Returns"), "no Returns section"
    assert ">>>" in (section(doc, "Examples") or ""), "no Examples, or no doctest there"


FORM_FUNCTIONS = [fn for m in MODULES[1:] for fn in public_functions(m)]


@pytest.mark.parametrize("fn", FORM_FUNCTIONS, ids=[f"{fn.__module__[12:]}.{fn.__name__}" for fn in FORM_FUNCTIONS])
def test_a_forms_descriptions_and_notes_are_its_specs(fn):
    """One description per argument: each Parameters entry is the mixer's SPEC text (with the
    kernel's limits added for ``kernel``), and the Notes say what a NaN does in this kind of form."""
    spec = inspect.getmodule(fn).SPEC
    doc = inspect.getdoc(fn)
    params = section(doc, "Parameters")
    for name, text in spec.descriptions(fn.__name__).items():
        assert textwrap.indent(text, "    ") in params, name
    assert section(doc, "Notes") == inspect.cleandoc(_docs.NON_FINITE[fn.__name__])


@pytest.mark.parametrize("fn", FUNCTIONS, ids=IDS)
def test_examples_run(fn):
    if fn.__name__ == "kernel" and not HAS_TRITON:
        pytest.skip("Triton cannot be imported here: the kernel's example cannot run")
    tests = doctest.DocTestFinder(recurse=False).find(fn, globs={})
    runner = doctest.DocTestRunner()
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.tries > 0, "no example ran"
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_every_doctest_of_the_module_is_run(module):
    """``test_examples_run`` covers the public functions; no other docstring has any."""
    with_examples = {t.name.rsplit(".", 1)[1]
                     for t in doctest.DocTestFinder().find(module) if t.examples}
    assert with_examples <= {fn.__name__ for fn in public_functions(module)}


def test_document_refuses_a_missing_annotation_or_description():
    def f(x: int, y):
        """Math."""

    with pytest.raises(ValueError, match="'y'"):
        _docs.document(f, {"x": "An int.", "y": "Any."}, returns="int", examples="")

    def g(x: int) -> int:
        """Math."""

    with pytest.raises(ValueError, match="'x'"):
        _docs.document(g, {}, returns="int", examples="")


def test_descriptions_parses_a_table():
    table = _docs.descriptions("""
    q
        Queries.
        Two lines.
    k
        Keys.
    """)
    assert table == {"q": "Queries.\nTwo lines.", "k": "Keys."}
