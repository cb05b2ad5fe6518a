#!/usr/bin/env bash
# Record the quality-at-speed numbers of issue 16 (run from the repository root, under the heavy lock):
#   flock /tmp/sdopt-heavy.lock bash benchmarks/quality_record.sh [sd15|sd15-fp16|tiny|tiny-fp16|recorded]
# Writes benchmarks/results/<config>-<date>/ per config; see benchmarks/README.md for what each shows.
# sd15-fp16 scores against the torch set of the sd15 run of the same date (--ref-images), so run sd15 first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
stamp=$(date +%Y%m%d)
run() { echo "== $1 ($(date +%T))"; "$PY" -m sdopt bench --config "$@" --out "benchmarks/results/$1-$stamp"; }
case ${1:-sd15} in
  sd15) run sd15-256-quality-cpu ;;
  sd15-fp16) run sd15-256-quality-fp16-cpu --ref-images "benchmarks/results/sd15-256-quality-cpu-$stamp/quality/torch" ;;
  tiny) run tiny-quality-cpu ;;
  tiny-fp16) run tiny-quality-fp16-cpu ;;
  recorded) run sd15-256-quality-cpu; run tiny-quality-fp16-cpu ;;  # what benchmarks/README.md shows
  *) echo "usage: $0 [sd15|sd15-fp16|tiny|tiny-fp16|recorded]" >&2; exit 2 ;;
esac
