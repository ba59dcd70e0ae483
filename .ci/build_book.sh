#!/usr/bin/env bash
# Build the book with every notebook executed afresh, then check the result.
#
#   bash .ci/build_book.sh          (from anywhere; uses the jupyter-book and python on PATH)
#
# Every notebook is executed on every run (execute_notebooks: force, --all).
# Fails on: any Sphinx warning (-W) or broken reference (-n), any exception raised in a notebook
# cell, a _toc.yml entry without an HTML page, Jupyter Book 2 (which ignores _config.yml).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python}"
# lecture_kit is importable even when it was not pip-installed (notebooks run in notebooks/).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
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

status=0
jupyter-book build . --all -W -n --keep-going 2>&1 | tee "$LOG" || status=$?

"$PYTHON" .ci/check_book.py --log "$LOG" || status=$((status == 0 ? 1 : status))

if [ "$status" -ne 0 ]; then
    echo "BOOK BUILD FAILED (exit $status); see $LOG and _build/html/reports/" >&2
fi
exit "$status"
