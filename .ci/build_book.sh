#!/usr/bin/env bash
# Build the book with every notebook executed afresh, then check the result.
#
#   bash .ci/build_book.sh          (from anywhere; uses the jupyter-book and python on PATH)
#
# Every notebook is executed on every run (execute_notebooks: force, --all).
# Fails on: any Sphinx warning (-W) or broken reference (-n), any exception raised in a notebook
# cell, a _toc.yml entry without an HTML page, Jupyter Book 2 (which ignores _config.yml), a page
# that loads a script from another site or a file the site lacks, a ✓ line that the claims ledger
# lacks (see .ci/check_book.py).
#
# The claims ledger (book/claims.md) is written during the same build: lecture_kit.ledger, a
# Sphinx extension, has each notebook's kernel record its checks into _build/.doctrees/claims/
# and reads the ledger page after all the others (see that module).
#
# The site serves its own MathJax (sphinx-mathjax-offline) and, when npm is at hand, its own widget
# manager (below), so that a book built here shows its math and widgets offline.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python}"
# lecture_kit is importable even when it was not pip-installed (notebooks run in notebooks/).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# lecture_kit's explorers embed their precomputed pictures, so that they move on the static page
# (lecture_kit/widgets.py; a minute of drawing in all, spent only here, not in JupyterLab).
export LECTURE_KIT_STATIC_FRAMES=1
# Figures must reach the page through the kernel's inline backend: a MPLBACKEND such as Agg
# (common on CI machines) would replace it, and every figure would silently vanish from the book.
unset MPLBACKEND

"$PYTHON" - <<'EOF'
import sys
from importlib.metadata import version
v = version("jupyter-book")
if int(v.split(".")[0]) >= 2:
    sys.exit(f"jupyter-book {v} found: this book needs jupyter-book>=1.0.4.post1,<2 "
             "(version 2 ignores _config.yml and _toc.yml)")
print(f"jupyter-book {v}")
EOF

# Start from a clean output folder so that a stale page can never hide a missing one, and build
# with --all: Sphinx otherwise reuses the cached doctree (outputs included) of every notebook whose
# source did not change, so a change in lecture_kit alone would never re-execute it.
rm -rf _build/html _build/jupyter_execute _build/.doctrees
mkdir -p _build
LOG=_build/book-build.log

# Copy the widget manager into the built site (_static/widgets/): the npm packages named on the
# `npm: ..., file: ...` lines of book/_static/widget-manager.js, the loader that falls back to the
# CDN for a site built without them. Each package is fetched once with npm into _build/npm; its
# file is copied with the fonts and licence notices beside it (webpack loads those relative to it).
fetch_widget_manager() {
    local dest=_build/html/_static/widgets packages spec file name tarball unpacked
    packages=$(sed -n 's/.*npm: "\([^"]*\)", file: "\([^"]*\)".*/\1 \2/p' book/_static/widget-manager.js)
    if [ -z "$packages" ]; then
        echo "widget manager: no 'npm: ..., file: ...' line found in book/_static/widget-manager.js" >&2
        return 1
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "widget manager: npm not found, so the pages load it from the CDN (widgets need the internet)"
        return 1
    fi
    mkdir -p _build/npm "$dest"
    while read -r spec file; do
        name=${spec#@}                              # @scope/pkg@1.2.3 -> scope-pkg-1.2.3.tgz
        name=${name//\//-}
        tarball="_build/npm/${name%@*}-${name##*@}.tgz"
        if [ ! -f "$tarball" ] && ! npm pack "$spec" --pack-destination _build/npm --silent >/dev/null; then
            echo "widget manager: npm could not fetch $spec, so the pages load it from the CDN" >&2
            return 1
        fi
        unpacked=$(mktemp -d)
        tar -xzf "$tarball" -C "$unpacked" && cp "$unpacked/package/$file" "$dest/" || return 1
        find "$unpacked/package/$(dirname "$file")" -maxdepth 1 -type f \( -name '*.woff' -o -name '*.woff2' \
            -o -name '*.ttf' -o -name '*.eot' -o -name '*.svg' -o -name '*LICENSE*' \) -exec cp {} "$dest/" \;
        rm -rf "$unpacked"
        echo "widget manager: $spec served from the site ($dest)"
    done <<< "$packages"
}

status=0
jupyter-book build . --all -W -n --keep-going 2>&1 | tee "$LOG" || status=$?

widgets=()
if fetch_widget_manager; then
    widgets=(--local-widgets)
elif [ "${CI:-}" = true ]; then
    echo "CI: the widget manager must be served from the site" >&2
    status=$((status == 0 ? 1 : status))
fi

"$PYTHON" .ci/check_book.py --log "$LOG" "${widgets[@]}" || status=$((status == 0 ? 1 : status))

if [ "$status" -ne 0 ]; then
    echo "BOOK BUILD FAILED (exit $status); see $LOG and _build/html/reports/" >&2
fi
exit "$status"
