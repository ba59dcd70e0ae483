"""The claims ledger page: a Sphinx extension that gathers the claims every page checked while the
book was built (``_config.yml`` lists it; ``lecture_kit.claims`` writes the records).

A notebook's checks run in a kernel that myst-nb starts while Sphinx reads the page, and that
kernel cannot tell which notebook it runs.  The Sphinx process can, and the kernel inherits its
environment.  So, in the process that builds the book, this extension

1. points ``LECTURE_KIT_CLAIMS`` at a file of the page's own, ``<doctrees>/claims/<page>.jsonl``,
   just before each page is read (``source-read``), and unsets it once all are read: the file a
   record lands in is the page it came from;
2. names every cell of a page that recorded a claim (its container, by the execution count
   ``record`` stored), so that a cross-reference reaches it: a missing cell is a Sphinx warning;
3. reads the ledger page (``claims_ledger``, default ``book/claims``) last, whatever order Sphinx
   reads the others in, and at every build, so that its ``claims-ledger`` directive finds every
   page's records: a summary, the count per page, the machines and versions of the run, and a
   table with one row per record, linked to its cell.

This needs the notebooks executed as they are read (myst-nb's ``force``, ``auto`` and ``inline``
modes: a notebook whose outputs come from a cache records nothing) and a serial read, so the
extension declares itself unsafe for parallel reading.
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import date
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.transforms import SphinxTransform
from sphinx.util.docutils import SphinxDirective

from . import claims
from .testing import TOLERANCE

#: The ledger page, when ``_config.yml`` does not name another (``sphinx.config.claims_ledger``).
DEFAULT_PAGE = "book/claims"

#: The table's columns and their relative widths.
COLUMNS = (("Page", 12), ("Claim", 44), ("Measured", 16), ("Bound", 16), ("Device", 7), ("", 5))


def record_file(doctreedir, docname: str) -> Path:
    """Where the kernel of page ``docname`` writes its records during a build."""
    return Path(doctreedir) / "claims" / f"{docname}.jsonl"


def cell_label(docname: str, cell: int) -> str:
    """The cross-reference label of the cell with execution count ``cell`` on page ``docname``."""
    return f"claim-cell-{cell}-{docname}"


def _point_records_at_page(app, docname: str, source: list[str]) -> None:
    """source-read: a fresh record file for the page about to be read (none for the ledger)."""
    if docname == app.config.claims_ledger:
        os.environ.pop(claims.ENV, None)
        return
    path = record_file(app.doctreedir, docname)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.environ[claims.ENV] = str(path)


def _stop_recording(app, env) -> None:
    """env-updated: every page is read; nothing more belongs to any of them."""
    os.environ.pop(claims.ENV, None)


def _read_ledger_at_every_build(app, env, added, changed, removed) -> list[str]:
    """env-get-outdated: the ledger is out of date whenever anything is read."""
    return [app.config.claims_ledger] if app.config.claims_ledger in env.found_docs else []


def _read_ledger_last(app, env, docnames: list[str]) -> None:
    """env-before-read-docs: move the ledger to the end of the reading order (in place)."""
    if app.config.claims_ledger in docnames:
        docnames.remove(app.config.claims_ledger)
        docnames.append(app.config.claims_ledger)


class NameCheckingCells(SphinxTransform):
    """Name the container of every notebook cell that recorded a claim (``cell_label``), as an
    explicit target.  Runs before Sphinx's domains file explicit targets as labels (priority 850)
    and after myst-nb, which executes the notebook while parsing it, has built the containers."""

    default_priority = 700

    def apply(self) -> None:
        records = claims.read(record_file(self.env.doctreedir, self.env.docname))
        cells = {r["cell"] for r in records if r["cell"] is not None}
        for node in self.document.findall(nodes.container):
            if node.get("nb_element") == "cell_code" and node.get("exec_count") in cells:
                node["names"].append(cell_label(self.env.docname, node["exec_count"]))
                self.document.note_explicit_target(node, node)


def _commit(srcdir) -> str | None:
    """The commit the book was built from, its date and whether the tree had changes; None when
    git cannot tell."""
    def git(*args):
        done = subprocess.run(["git", "-C", str(srcdir), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        head, changes = git("log", "-1", "--format=%h of %cs"), git("status", "--porcelain")
    except OSError:                                 # no git on this machine
        return None
    if not head:
        return None
    return f"commit {head}" + (", with uncommitted changes" if changes else "")


def _machine_text(m: dict) -> str:
    """One sentence for a run's ``claims.machine()``."""
    gpu = f"GPU {m['gpu']} (CUDA {m['cuda']})" if m["gpu"] else "no GPU"
    if m["triton"] is None:
        triton = "no Triton"
    else:
        triton = f"Triton {m['triton']}"
        if m["triton_interpreted"]:
            triton += " through its CPU interpreter"
    return (f"{m['cpu']} ({m['cores']} cores), {gpu}; {m['system']}; Python {m['python']}, "
            f"PyTorch {m['torch']}, {triton}, lecture_kit {m['lecture_kit']}")


def _bound_text(r: dict) -> str:
    """The bound of a record as the ledger writes it, with the ``TOLERANCE`` it is, if it is one."""
    text = f"{r['relation']} {claims.show(r['bound'], near=r['measured'])}"
    if isinstance(r["bound"], dict):
        names = [k for k, v in TOLERANCE.items() if list(v) == list(r["bound"].values())]
        text += f" ({names[0]})" if names else ""
    return text


def _entry(*children) -> nodes.entry:
    """A table cell holding ``children``, which keep their quotes and dashes as the verdict line
    printed them (Sphinx's smart quotes would turn SSM's into SSM’s)."""
    return nodes.entry("", nodes.paragraph("", "", *children, support_smartquotes=False))


def _book_order(env) -> list[str]:
    """Every page, in the order of the book's tables of contents (depth first from the root),
    then any page that no table of contents reaches, sorted."""
    order: list[str] = []

    def visit(doc: str) -> None:
        if doc not in order:
            order.append(doc)
            for child in env.toctree_includes.get(doc, []):
                visit(child)

    visit(env.config.root_doc)
    return order + sorted(env.found_docs - set(order))


class ClaimsLedger(SphinxDirective):
    """``claims-ledger``: every page's records, as a summary, the runs' machines and one table."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        env = self.env
        pages = [(doc, claims.read(record_file(env.doctreedir, doc)))
                 for doc in _book_order(env) if doc != env.docname]
        pages = [(doc, records) for doc, records in pages if records]
        rows = [(doc, r) for doc, records in pages for r in records]
        failed = sum(not r["passed"] for _, r in rows)
        verdict = "all held" if not failed else f"{failed} failed (marked ✗)"
        built = _commit(env.srcdir)
        summary = nodes.paragraph(text=(
            f"This build checked {len(rows)} claims on {len(pages)} pages, and {verdict}; "
            f"built on {date.today().isoformat()}" + (f" from {built}" if built else "") + "."))
        by_page = nodes.paragraph(text="Claims per page: ")
        for i, (doc, records) in enumerate(pages):
            by_page += [nodes.Text(" · " if i else ""), self._link(doc, None),
                        nodes.Text(f" {len(records)}")]

        runs: dict[str, list[str]] = {}
        for doc, records in pages:
            for m in {json.dumps(r["machine"], sort_keys=True) for r in records}:
                runs.setdefault(m, []).append(doc.rsplit("/", 1)[-1])
        machines = nodes.bullet_list()
        for m, docs in runs.items():
            where = "every page" if len(runs) == 1 else ", ".join(docs)
            machines += nodes.list_item("", nodes.paragraph(
                text=f"Run ({where}): {_machine_text(json.loads(m))}."))

        table = nodes.table(classes=["claims-ledger"])
        group = nodes.tgroup(cols=len(COLUMNS))
        table += group
        group += [nodes.colspec(colwidth=width) for _, width in COLUMNS]
        head = nodes.row()
        head += [_entry(nodes.Text(name)) for name, _ in COLUMNS]
        group += nodes.thead("", head)
        body = nodes.tbody()
        group += body
        for doc, r in rows:
            body += self._row(doc, r)
        return [summary, by_page, machines, table]

    def _link(self, doc: str, cell: int | None) -> addnodes.pending_xref:
        """The page's name, linked to the cell with execution count ``cell`` (None: the page)."""
        if cell is None:
            target = dict(reftype="doc", reftarget="/" + doc)
        else:
            target = dict(reftype="ref", reftarget=cell_label(doc, cell))
        return addnodes.pending_xref("", nodes.inline(text=doc.rsplit("/", 1)[-1]),
                                     refdomain="std", refexplicit=True, refwarn=True,
                                     refdoc=self.env.docname, **target)

    def _row(self, doc: str, r: dict) -> nodes.row:
        """One record: its page, linked to its cell (to the page for a check made outside a
        cell), then claim, measured value, bound, device and verdict."""
        row = nodes.row(classes=["claim", "held" if r["passed"] else "failed"])
        row += [_entry(self._link(doc, r["cell"])), _entry(nodes.Text(r["claim"])),
                _entry(nodes.Text(claims.show(r["measured"], near=r["bound"]))),
                _entry(nodes.Text(_bound_text(r))), _entry(nodes.Text(r["device"] or "—")),
                _entry(nodes.Text("✓" if r["passed"] else "✗"))]
        return row


def setup(app) -> dict:
    """Register the ledger with Sphinx (see the module docstring)."""
    app.add_config_value("claims_ledger", DEFAULT_PAGE, "env")
    app.add_directive("claims-ledger", ClaimsLedger)
    app.add_transform(NameCheckingCells)
    app.connect("source-read", _point_records_at_page)
    app.connect("env-updated", _stop_recording)
    app.connect("env-get-outdated", _read_ledger_at_every_build)
    app.connect("env-before-read-docs", _read_ledger_last)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
