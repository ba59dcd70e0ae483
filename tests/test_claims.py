"""The claims ledger: check, check_equal and check_bound record what they measured (only when
LECTURE_KIT_CLAIMS names a file), a record knows its cell in a kernel, and a Sphinx build with
lecture_kit.ledger gathers every page's records into one table whose rows link to their cells, read
last although its name sorts first; .ci/check_book.py accepts it and names a ✓ printed by hand."""
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

from lecture_kit import claims
from lecture_kit.testing import TOLERANCE, check, check_bound, check_equal, errors

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ledger_file(tmp_path, monkeypatch):
    path = tmp_path / "claims.jsonl"
    monkeypatch.setenv(claims.ENV, str(path))
    return path


def test_nothing_is_written_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(claims.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    x = torch.randn(5, dtype=torch.float64)
    check("x = x", x, x, "fp64")
    check_equal("one", 1, 1)
    check_bound("half", 0.5, "<", 1)
    assert list(tmp_path.iterdir()) == []


def test_each_check_records_what_it_measured(ledger_file):
    x = torch.randn(20, dtype=torch.float64)
    y = x * (1 + 1e-14)
    e = check("y = x", y, x, "fp64")
    check_equal("shape", tuple(torch.zeros(2, 3).shape), (2, 3))
    check_bound("largest exponent", torch.tensor(-0.25), "<=", 0)
    close, equal, bound = claims.read(ledger_file)
    assert close["claim"] == "y = x" and close["passed"] and close["device"] == "cpu"
    assert close["measured"] == e._asdict() == errors(y, x)._asdict()
    assert close["relation"] == "≤" and list(close["bound"].values()) == list(TOLERANCE["fp64"])
    assert (equal["measured"], equal["relation"], equal["bound"]) == ([2, 3], "=", [2, 3])
    assert (bound["measured"], bound["relation"], bound["bound"]) == (-0.25, "≤", 0)
    assert equal["device"] is None and close["cell"] is None        # no tensors; not in IPython
    assert close["machine"] == claims.machine() and close["machine"]["torch"] == torch.__version__


@pytest.mark.parametrize("failing", ["check", "check_equal", "check_bound"])
def test_a_failed_claim_is_recorded_then_raises(ledger_file, failing):
    x = torch.randn(8, dtype=torch.float64)
    calls = {"check": lambda: check("x + 1e-3 = x", x + 1e-3, x, "fp32"),
             "check_equal": lambda: check_equal("rank", 3, 4),
             "check_bound": lambda: check_bound("growth", 9.5, "<", 8)}
    with pytest.raises(AssertionError, match="✗"):
        calls[failing]()
    (entry,) = claims.read(ledger_file)
    assert entry["passed"] is False


@pytest.mark.parametrize("value, relation, bound, holds", [
    (1, "<", 2, True), (2, "<", 2, False), (2, "<=", 2, True), (2.5, "<=", 2, False),
    (3, ">", 2, True), (2, ">", 2, False), (2, ">=", 2, True), (1.5, ">=", 2, False),
    (float("nan"), "<", 1, False), (float("nan"), ">=", 1, False)])
def test_check_bound_holds_exactly_when_the_relation_does(value, relation, bound, holds, capsys):
    if holds:
        assert check_bound("claim", value, relation, bound) == value
    else:
        with pytest.raises(AssertionError):
            check_bound("claim", value, relation, bound)
    assert capsys.readouterr().out.startswith("✓" if holds else "✗")


def test_check_bound_refuses_what_is_not_one_real_number():
    with pytest.raises(ValueError, match="^relation"):
        check_bound("claim", 1, "≤", 2)
    for value in (torch.ones(2), "1", True, 1j, None):
        with pytest.raises(ValueError, match="^value"):
            check_bound("claim", value, "<", 2)
    with pytest.raises(ValueError, match="^bound"):
        check_bound("claim", 1, "<", torch.ones(3))


def test_record_refuses_a_bad_call_even_when_it_writes_nothing(monkeypatch):
    monkeypatch.delenv(claims.ENV, raising=False)
    with pytest.raises(ValueError, match="^claim"):
        claims.record(" ", True, 1, "=", 1)
    with pytest.raises(ValueError, match="^relation"):
        claims.record("c", True, 1, "==", 1)


def test_plain_values_and_how_they_are_shown():
    assert claims.plain(torch.Size([2, 3])) == [2, 3] and claims.plain(torch.tensor(3)) == 3
    assert claims.plain(np.float32(1.5)) == 1.5 and claims.plain({1: (np.int64(2),)}) == {"1": [2]}
    assert claims.plain(torch.float32) == "torch.float32"
    assert claims.show(1234567) == "1,234,567" and claims.show([1, 2.5]) == "[1, 2.5]"
    assert claims.show({"rel_rms": 2.1e-16, "max_abs": 4.44e-16}) == "2.1e-16 / 4.44e-16"
    assert claims.show(0.99995, near=1) == "0.99995" and claims.show(0.5, near=1) == "0.5"
    assert claims.show(9.99996e-6, near=1e-5) == "9.99996e-06" and claims.show(1.0, near=1.0) == "1"
    assert claims.show(1e-5, near=9.99996e-6) == "1e-05" and claims.show(-0.25, near=0) == "-0.25"
    assert claims.show(-0.60653065971258, near=-0.60653065971263) == "-0.60653065971258"
    assert math.isnan(float(claims.show(float("nan"), near=1)))


def code_notebook(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def test_a_record_made_in_a_kernel_knows_its_cell(ledger_file):
    nb = code_notebook("from lecture_kit.testing import check_equal", "",
                       "check_equal('two', 2, 2)\ncheck_equal('three', 3, 3)", "x = 1",
                       "for n in range(2):\n    check_equal(f'n = {n}', n, n)")
    NotebookClient(nb, timeout=120).execute()
    counts = [nb.cells[i].execution_count for i in (2, 2, 4, 4)]
    assert None not in counts
    assert [r["cell"] for r in claims.read(ledger_file)] == counts


def load_check_book():
    spec = importlib.util.spec_from_file_location("check_book", ROOT / ".ci" / "check_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_book_build_gathers_every_claim_into_the_ledger(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "pages").mkdir(parents=True)
    (src / "conf.py").write_text(
        "extensions = ['myst_nb', 'lecture_kit.ledger']\n"
        "nb_execution_mode = 'force'\nclaims_ledger = 'a_ledger'\n")
    (src / "index.md").write_text("# Book\n\n```{toctree}\na_ledger\npages/b\npages/c\n```\n")
    (src / "a_ledger.md").write_text("# Ledger\n\n```{claims-ledger}\n```\n")
    imports = "import torch\nfrom lecture_kit.testing import check, check_bound, check_equal"
    b = code_notebook(imports,
                      "x = torch.randn(9, dtype=torch.float64)\ncheck('x = x', x, x, 'fp64')",
                      "for n in range(3):\n    check_equal(f'n = {n}', n, n)")
    c = code_notebook(imports, "check_bound(\"the SSM's max |λ| -- below 1\", 0.99995, '<', 1)",
                      "print('✓ a claim checked by hand')")
    b.cells.insert(0, nbformat.v4.new_markdown_cell("# Page B"))
    c.cells.insert(0, nbformat.v4.new_markdown_cell("# Page C"))
    nbformat.write(b, src / "pages" / "b.ipynb")
    nbformat.write(c, src / "pages" / "c.ipynb")
    out = tmp_path / "_build" / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-n", "-b", "html", str(src),
                           str(out), "-d", str(tmp_path / "_build" / ".doctrees")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    order = re.findall(r"reading sources\.\.\. \[\s*\d+%\] (\S+)", done.stdout)
    assert order[-1] == "a_ledger" and sorted(order)[0] == "a_ledger"

    check_book = load_check_book()
    page = (out / "a_ledger.html").read_text()
    rows = check_book.LEDGER_ROW.findall(page)
    assert len(rows) == 5 and all(verdict == "held" for verdict, _ in rows)
    assert "This build checked 5 claims on 2 pages, and all held" in page
    assert "0.99995" in page and "(fp64)" in page
    docs = ["index", "a_ledger", "pages/b", "pages/c"]
    problems = check_book.check_ledger(out, docs)        # a ✓ printed by hand is named, not failed
    assert problems == []
    note = capsys.readouterr().out
    assert "pages/c.html: 1 of its 2 ✓/✗ lines are printed by hand" in note
    assert "first: ✓ a claim checked by hand" in note
    for anchor in ("claim-cell-2-pages-b", "claim-cell-3-pages-b"):
        assert f'id="{anchor}"' in (out / "pages" / "b.html").read_text()
    records = claims.read(tmp_path / "_build" / ".doctrees" / "claims" / "pages" / "c.jsonl")
    assert [(r["claim"], r["cell"]) for r in records] == [("the SSM's max |λ| -- below 1", 2)]
