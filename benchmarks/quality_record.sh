#!/usr/bin/env bash
# Record the quality-at-speed numbers of issue 16 (run from the repository root, under the heavy lock):
#   flock /tmp/sdopt-heavy.lock bash benchmarks/quality_record.sh [sd15|sd15-fp16|tiny|tiny-fp16|recorded]
# Writes benchmarks/results/<config>-n<N>-<date>/ per config (N: the config's "quality", or QUALITY=N to
# override it); see benchmarks/README.md for what each shows and how long each takes.
# sd15-fp16 scores against the torch set of an sd15 run (--ref-images): REF=<that run's folder>, default the
# newest benchmarks/results/sd15-256-quality-cpu-*/ with a quality/torch set, so run sd15 first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
stamp=$(date +%Y%m%d)
quality() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["quality"])' "benchmarks/configs/$1.json"; }
run() {
  local config=$1 n=${QUALITY:-$(quality "$1")}
  shift
  echo "== $config, N = $n ($(date +%T))"
  "$PY" -m sdopt bench --config "$config" --quality "$n" "$@" --out "benchmarks/results/$config-n$n-$stamp"
}
sd15_ref() {
  local ref=${REF:-$(ls -d benchmarks/results/sd15-256-quality-cpu-*/quality/torch 2>/dev/null | sort | tail -n 1)}
  [[ -n $ref ]] || { echo "no sd15 torch set: run '$0 sd15' first, or set REF" >&2; exit 2; }
  [[ $ref == */quality/torch ]] || ref=$ref/quality/torch
  echo "$ref"
}
case ${1:-sd15} in
  sd15) run sd15-256-quality-cpu ;;
  sd15-fp16) run sd15-256-quality-fp16-cpu --ref-images "$(sd15_ref)" ;;
  tiny) run tiny-quality-cpu ;;
  tiny-fp16) run tiny-quality-fp16-cpu ;;
  recorded) run sd15-256-quality-cpu; run tiny-quality-fp16-cpu ;;  # what benchmarks/README.md shows
  *) echo "usage: $0 [sd15|sd15-fp16|tiny|tiny-fp16|recorded]" >&2; exit 2 ;;
esac
