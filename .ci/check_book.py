"""Check a built book: every _toc.yml entry has an HTML page, and no notebook failed to execute.

Run after ``jupyter-book build .`` (``.ci/build_book.sh`` does both):

    python .ci/check_book.py [--log _build/book-build.log] [--html _build/html] [--local-widgets]
                             [--executed _build/jupyter_execute]

The claims ledger (book/claims.md, filled by lecture_kit.ledger) must list every verdict the
notebooks printed: for each executed cell (the notebooks as run, in ``--executed``), at least as
many rows linking to that cell as the ✓/✗ lines in its output, every link reaching its cell, and
no row marked failed. A ✓ line printed by hand, not through lecture_kit.testing, fails this.

Every notebook that imports ``lecture_kit.widgets`` must show an explorer as HTML that moves
without a kernel, with its precomputed pictures (more than one).

It also checks that the site is self-contained, so that it reads offline: every page loads its
scripts and stylesheets from the site itself, each of them exists, every page with math loads
MathJax from ``_static/mathjax`` (fonts included), and every page with widgets loads the widget
loader; with ``--local-widgets`` the files that loader looks for in ``_static/widgets`` exist.

Exit status 0 when all checks pass, 1 otherwise; one line per check either way.
"""
from __future__ import annotations

import argparse
import html as html_text
import json
import re
import sys
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Lines that myst-nb / Sphinx write when a notebook could not be executed.
FAILURE_PATTERNS = [
    re.compile(r"Executing notebook failed"),
    re.compile(r"Notebook exception traceback saved in"),
    re.compile(r"CellExecutionError|CellTimeoutError|DeadKernelError"),
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TIMING = re.compile(r"([\w/.-]+\.ipynb).*?Executed notebook in ([0-9.]+) seconds")
# What a page loads: <script src=...> and <link rel="stylesheet" href=...>.
SCRIPT_SRC = re.compile(r"<script\b[^>]*?\bsrc=\"([^\"]+)\"")
STYLESHEET = re.compile(r"<link\b(?=[^>]*\brel=\"stylesheet\")[^>]*?\bhref=\"([^\"]+)\"")
REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
# The files that book/_static/widget-manager.js loads from _static/widgets/ (its npm/file lines).
WIDGET_PACKAGE = re.compile(r"npm: \"([^\"]+)\", file: \"([^\"]+)\"")
MATHJAX_FONTS = Path("_static/mathjax/output/chtml/fonts/woff-v2")
# The data of an explorer's HTML view (lecture_kit.widgets.frame_player).
EXPLORER_DATA = re.compile(r'<script type="application/json" class="lk-frames-data">(.*?)</script>', re.S)
# The claims ledger's table and its rows (lecture_kit.ledger), a row's link to its checking cell
# (the cell's anchor ends in its execution count), and the text of a table cell.
LEDGER_TABLE = re.compile(r'<table class="claims-ledger\b[^"]*">(.*?)</table>', re.S)
LEDGER_ROW = re.compile(r'<tr class="claim (held|failed)\b[^"]*">(.*?)</tr>', re.S)
ROW_LINK = re.compile(r'href="([^"#]*)(?:#([^"]*))?"')
CELL_ANCHOR = re.compile(r"^claim-cell-(\d+)-")
TABLE_CELL = re.compile(r"<td>(.*?)</td>", re.S)
TAG = re.compile(r"<[^>]+>")


def toc_files(toc: dict) -> list[str]:
    """All documents named in a jb-book table of contents, root first, without suffix."""
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return [re.sub(r"\.(md|ipynb|rst)$", "", f) for f in files]


def check_explorers(html_dir: Path, docs: list[str]) -> list[str]:
    """Problems with the explorers' HTML views: missing where a notebook uses lecture_kit.widgets,
    or holding one picture (the build's LECTURE_KIT_STATIC_FRAMES=1 did not reach the kernel)."""
    problems: list[str] = []
    for doc in docs:
        notebook, page = ROOT / f"{doc}.ipynb", html_dir / f"{doc}.html"
        if not (notebook.is_file() and page.is_file()):
            continue
        html = page.read_text(encoding="utf8", errors="replace")
        views = [json.loads(block) for block in EXPLORER_DATA.findall(html)]
        found = []
        if "lecture_kit.widgets import" in notebook.read_text(encoding="utf8") and not views:
            found.append(f"{doc}.html shows no explorer that moves without a kernel (lk-frames)")
        if any(len(view["frames"]) < 2 for view in views):
            found.append(f"{doc}.html: an explorer holds one picture only (was LECTURE_KIT_STATIC_FRAMES=1 "
                         "set for the build?)")
        problems += found
        if views and not found:
            print(f"✓ explorer {doc}: {' + '.join(str(len(v['frames'])) for v in views)} pictures; "
                  f"page {page.stat().st_size / 1e6:.1f} MB")
    return problems


def verdict_lines(notebook: Path) -> dict[int, list[str]]:
    """The ✓/✗ lines each cell of an executed notebook printed (stdout), by execution count."""
    found = {}
    for cell in json.loads(notebook.read_text(encoding="utf8"))["cells"]:
        if cell["cell_type"] != "code" or cell.get("execution_count") is None:
            continue
        text = "".join("".join(out["text"]) for out in cell.get("outputs", [])
                       if out["output_type"] == "stream" and out["name"] == "stdout")
        lines = [line.strip() for line in text.splitlines() if line.lstrip().startswith(("✓", "✗"))]
        if lines:
            found[cell["execution_count"]] = lines
    return found


def check_ledger(html_dir: Path, executed_dir: Path, docs: list[str]) -> list[str]:
    """Problems with the claims ledger: none found, empty, a failed claim, a link that misses its
    cell, or a cell that printed more ✓/✗ lines than the ledger has rows for it."""
    pages = {doc: (html_dir / f"{doc}.html").read_text(encoding="utf8", errors="replace")
             for doc in docs if (html_dir / f"{doc}.html").is_file()}
    ledgers = [doc for doc, page in pages.items() if LEDGER_TABLE.search(page)]
    if not ledgers:
        return ["no page shows the claims ledger (book/claims.md's {claims-ledger} table)"]
    ledger = ledgers[0]
    rows = LEDGER_ROW.findall(LEDGER_TABLE.search(pages[ledger]).group(1))
    problems = [] if rows else [f"the claims ledger ({ledger}.html) has no rows"]
    rows_per_cell: Counter = Counter()
    for verdict, row in rows:
        href, anchor = ROW_LINK.search(row).groups()
        doc = (html_dir / ledger).parent.joinpath(href).resolve().relative_to(html_dir.resolve())
        doc = doc.with_suffix("").as_posix()
        claim = html_text.unescape(TAG.sub("", TABLE_CELL.findall(row)[1])).strip()
        if verdict == "failed":
            problems.append(f"claims ledger: a claim of {doc} failed: {claim}")
        if anchor is None:
            continue
        if f'id="{anchor}"' not in pages.get(doc, ""):
            problems.append(f"claims ledger: the row {claim!r} links to {doc}.html#{anchor}, "
                            "which is not there")
        cell = CELL_ANCHOR.match(anchor)
        if cell is None:
            problems.append(f"claims ledger: the row {claim!r} links to #{anchor}, not to a cell")
        else:
            rows_per_cell[doc, int(cell.group(1))] += 1
    printed = 0
    for doc in docs:
        executed = executed_dir / f"{doc}.ipynb"
        if not executed.is_file():
            continue
        for count, lines in verdict_lines(executed).items():
            printed += len(lines)
            if rows_per_cell[doc, count] < len(lines):
                problems.append(f"{doc}, cell [{count}]: {len(lines)} ✓/✗ line(s) printed but "
                                f"{rows_per_cell[doc, count]} row(s) in the claims ledger (a "
                                f"verdict printed by hand, not by lecture_kit.testing?): "
                                f"{lines[0][:100]}")
    if not problems:
        pages_with_claims = len({doc for doc, _ in rows_per_cell})
        print(f"✓ ledger   {len(rows)} claims in {ledger}.html, from {pages_with_claims} pages: "
              f"the notebooks printed {printed} ✓ lines, every one of them in the ledger")
    return problems


def check_assets(html_dir: Path, docs: list[str], local_widgets: bool) -> list[str]:
    """Problems that would keep the built site from working offline (see the module docstring)."""
    problems: list[str] = []
    math_pages = widget_pages = 0
    for doc in docs:
        page = html_dir / f"{doc}.html"
        if not page.is_file():
            continue                                # reported as a missing page already
        html = page.read_text(encoding="utf8", errors="replace")
        scripts = SCRIPT_SRC.findall(html)
        for url in scripts + STYLESHEET.findall(html):
            if REMOTE.match(url):
                problems.append(f"{doc}.html loads {url} from another site (offline it would fail)")
            elif not (page.parent / url.split("?")[0].split("#")[0]).is_file():
                problems.append(f"{doc}.html loads {url}, which the site does not have")
        if 'class="math' in html:
            math_pages += 1
            if not any("_static/mathjax/" in url for url in scripts):
                problems.append(f"{doc}.html has math but does not load MathJax from _static/mathjax")
        if "application/vnd.jupyter.widget-state+json" in html:
            widget_pages += 1
            if not any(url.split("?")[0].endswith("_static/widget-manager.js") for url in scripts):
                problems.append(f"{doc}.html has widgets but does not load _static/widget-manager.js")
    if math_pages and not any((html_dir / MATHJAX_FONTS).glob("*.woff")):
        problems.append(f"no MathJax fonts in {html_dir / MATHJAX_FONTS}")

    source = "the CDN (not fetched: see the build log)"
    if local_widgets:
        loader = html_dir / "_static" / "widget-manager.js"
        files = WIDGET_PACKAGE.findall(loader.read_text(encoding="utf8")) if loader.is_file() else []
        if not files:
            problems.append(f"{loader} is missing or names no npm package")
        for spec, file in files:
            if not (html_dir / "_static" / "widgets" / Path(file).name).is_file():
                problems.append(f"{spec}: _static/widgets/{Path(file).name} missing from the site")
        source = "the site (_static/widgets)"
    if not problems:
        print(f"✓ assets   every page loads only the site's own files; MathJax from _static/mathjax on "
              f"{math_pages} page(s); the widget manager on {widget_pages} page(s), from {source}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--toc", type=Path, default=ROOT / "_toc.yml")
    parser.add_argument("--log", type=Path, default=None, help="captured output of the build")
    parser.add_argument("--local-widgets", action="store_true",
                        help="the build copied the widget manager into _static/widgets: check its files")
    parser.add_argument("--executed", type=Path, default=ROOT / "_build" / "jupyter_execute",
                        help="the notebooks as the build executed them (myst-nb writes them there)")
    args = parser.parse_args()

    problems: list[str] = []

    if not (args.html / "index.html").is_file():
        problems.append(f"no {args.html / 'index.html'}: the build produced no HTML")

    # 1. every toc entry has a page
    docs = toc_files(yaml.safe_load(args.toc.read_text(encoding="utf8")))
    for doc in docs:
        page = args.html / f"{doc}.html"
        if page.is_file():
            print(f"✓ page   {doc}.html")
        else:
            problems.append(f"missing page for toc entry {doc!r}: {page}")

    # 2. no notebook execution failed: reports folder, build log, and the pages themselves
    reports = sorted((args.html / "reports").rglob("*.err.log")) if (args.html / "reports").is_dir() else []
    for rep in reports:
        tb = ANSI.sub("", rep.read_text(encoding="utf8", errors="replace")).strip().splitlines()
        problems.append(f"execution error reported in {rep.relative_to(args.html)}: {tb[-1] if tb else '?'}")

    if args.log is not None:
        if not args.log.is_file():
            problems.append(f"build log {args.log} not found")
        else:
            text = ANSI.sub("", args.log.read_text(encoding="utf8", errors="replace"))
            for line in text.splitlines():
                if any(p.search(line) for p in FAILURE_PATTERNS):
                    problems.append(f"build log: {line.strip()}")
            executed = {}
            for nb, secs in TIMING.findall(text):
                executed[Path(nb).stem] = float(secs)
                print(f"✓ executed {Path(nb).name:<32} {float(secs):8.1f} s")
            # execute_notebooks: force only applies to documents Sphinx re-reads: a notebook
            # missing here was rendered from a stale cache, not executed by this build
            for doc in docs:
                if (ROOT / f"{doc}.ipynb").is_file() and Path(doc).stem not in executed:
                    problems.append(f"{doc}.ipynb was not executed in this build (stale cache?)")

    for doc in docs:
        if not doc.startswith("notebooks/"):
            continue
        page = args.html / f"{doc}.html"
        if not page.is_file():
            continue
        html = page.read_text(encoding="utf8", errors="replace")
        # an error output cell (possible only if allow_errors were switched on)
        if 'class="output traceback' in html or 'class="output error' in html:
            problems.append(f"{doc}.html shows an error output")
        print(f"✓ notebook {doc}: {html.count('✓')} check mark(s) on the page")

    # 3. the explorers move without a kernel; 4. the site is self-contained: it reads offline;
    # 5. the claims ledger holds every verdict the notebooks printed
    problems += check_explorers(args.html, docs)
    problems += check_assets(args.html, docs, args.local_widgets)
    problems += check_ledger(args.html, args.executed, docs)

    if problems:
        for p in problems:
            print(f"✗ {p}", file=sys.stderr)
        print(f"book check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"book check: {len(docs)} pages, all present, no execution errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
