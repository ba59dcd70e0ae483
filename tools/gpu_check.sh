#!/usr/bin/env bash
# Verify the project on a GPU machine: notebooks under nbval (each one timed), or the tests.
#   source .whl/env.sh && bash tools/gpu_check.sh notebooks [notebook ...]   # default: all of them
#   source .whl/env.sh && bash tools/gpu_check.sh tests [pytest arguments]   # default: tests/
# Appends to $OUT/notebooks.log (per notebook: result, seconds, and the tail of a failure) or writes
# $OUT/tests_<first argument>.log.
set -uo pipefail
what=$1; shift
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader > "$out/device.txt"
case $what in
  notebooks)
    (( $# )) || set -- notebooks/*.ipynb
    log=$(mktemp)                # several of these may run at once
    for nb in "$@"; do
      start=$(date +%s)
      python3 -m pytest -q -p no:cacheprovider -o addopts="" --nbval-lax --nbval-current-env "$nb" > "$log" 2>&1
      rc=$?
      echo "$(basename "$nb") rc=$rc $(( $(date +%s) - start )) s $(tail -1 "$log")" | tee -a "$out/notebooks.log"
      [[ $rc == 0 ]] || tail -60 "$log" >> "$out/notebooks.log"
    done ;;
  tests)
    (( $# )) || set -- tests/
    log="$out/tests_$(basename "${1%.py}").log"         # named after the first argument: several may run at once
    python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" --durations=10 "$@" 2>&1 | tee "$log" ;;
  *) echo "usage: $0 notebooks|tests [...]" >&2; exit 2 ;;
esac
