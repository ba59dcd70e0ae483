"""Check a built book: every _toc.yml entry has an HTML page, and no notebook failed to execute.

Run after ``jupyter-book build .`` (``.ci/build_book.sh`` does both):

    python .ci/check_book.py [--log _build/book-build.log] [--html _build/html] [--local-widgets]

The claims ledger (book/claims.md, filled by lecture_kit.ledger) must hold every verdict the pages
show: each ✓/✗ line of a cell's printed output is a row of the ledger for that page (the row's
claim begins the line), every row links to a cell that is there, and no row is marked failed. A ✓
line printed by hand, not through lecture_kit.testing, is listed page by page (41 lines in six
notebooks still do this; each is to move onto check, check_equal or check_bound, and then this
listing becomes a failure).

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
# The claims ledger's table and its rows (lecture_kit.ledger), a row's link to its checking cell,
# the text of a table cell; what a cell printed (myst-nb's stream outputs).
LEDGER_TABLE = re.compile(r'<table class="claims-ledger\b[^"]*">(.*?)</table>', re.S)
LEDGER_ROW = re.compile(r'<tr class="claim (held|failed)\b[^"]*">(.*?)</tr>', re.S)
ROW_LINK = re.compile(r'href="([^"#]*)(?:#([^"]*))?"')
TABLE_CELL = re.compile(r"<td>(.*?)</td>", re.S)
STREAM_OUTPUT = re.compile(r'<div class="output stream\b[^"]*"><div class="highlight"><pre>(.*?)</pre>',
                           re.S)
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


def html_text_of(fragment: str) -> str:
    """The text of an HTML fragment, tags dropped, entities decoded, runs of spaces made one."""
    return " ".join(html_text.unescape(TAG.sub("", fragment)).split())


def verdict_lines(page: str) -> list[str]:
    """The ✓/✗ lines that the cells of a page printed, as the page shows them (spaces collapsed)."""
    return [" ".join(line.split()) for block in STREAM_OUTPUT.findall(page)
            for line in html_text.unescape(TAG.sub("", block)).splitlines()
            if line.lstrip().startswith(("✓", "✗"))]


def check_ledger(html_dir: Path, docs: list[str]) -> list[str]:
    """Problems with the claims ledger: none found, empty, a failed claim, a link that misses its
    cell, or a ✓/✗ line on a page that is no row of the ledger."""
    pages = {doc: (html_dir / f"{doc}.html").read_text(encoding="utf8", errors="replace")
             for doc in docs if (html_dir / f"{doc}.html").is_file()}
    ledgers = [doc for doc, page in pages.items() if LEDGER_TABLE.search(page)]
    if not ledgers:
        return ["no page shows the claims ledger (book/claims.md's {claims-ledger} table)"]
    ledger = ledgers[0]
    rows = LEDGER_ROW.findall(LEDGER_TABLE.search(pages[ledger]).group(1))
    problems = [] if rows else [f"the claims ledger ({ledger}.html) has no rows"]
    recorded: dict[str, list[str]] = {}             # page -> "✓ claim" of each of its rows
    for verdict, row in rows:
        href, anchor = ROW_LINK.search(row).groups()
        doc = (html_dir / ledger).parent.joinpath(href).resolve().relative_to(html_dir.resolve())
        doc = doc.with_suffix("").as_posix()
        claim = html_text_of(TABLE_CELL.findall(row)[1])
        recorded.setdefault(doc, []).append(f"{'✓' if verdict == 'held' else '✗'} {claim}")
        if verdict == "failed":
            problems.append(f"claims ledger: a claim of {doc} failed: {claim}")
        if anchor is not None and f'id="{anchor}"' not in pages.get(doc, ""):
            problems.append(f"claims ledger: the row {claim!r} links to {doc}.html#{anchor}, "
                            "which is not there")
    printed, by_hand = 0, 0
    for doc, page in pages.items():
        lines, rows_left = verdict_lines(page), list(recorded.get(doc, []))
        printed += len(lines)
        unrecorded = []
        for line in lines:                          # each line is the first row left that begins it
            row = next((r for r in rows_left if line == r or line.startswith(r + " ")), None)
            if row is None:
                unrecorded.append(line)
            else:
                rows_left.remove(row)
        if unrecorded:
            by_hand += len(unrecorded)
            print(f"  note     {doc}.html: {len(unrecorded)} of its {len(lines)} ✓/✗ lines are printed by "
                  f"hand, not by lecture_kit.testing, so not in the ledger; first: {unrecorded[0][:100]}")
    if not problems:
        print(f"✓ ledger   {len(rows)} claims in {ledger}.html, from {len(recorded)} pages; "
              f"{printed - by_hand} of the {printed} ✓/✗ lines the pages show are among them")
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
    problems += check_ledger(args.html, docs)

    if problems:
        for p in problems:
            print(f"✗ {p}", file=sys.stderr)
        print(f"book check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"book check: {len(docs)} pages, all present, no execution errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
