#!/usr/bin/env bash
# Artifact size and peak RSS of an sd15 export and of `sdopt generate` (256x256, exact and --fast).
# Usage: flock /tmp/sdopt-heavy.lock bash benchmarks/unet_layout.sh OUT_DIR [LABEL]
# Needs ~10 GB RAM and ~14 GB disk; run it with nothing else heavy on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output folder}; LABEL=${2:-$(git rev-parse --short HEAD)}
PY=${PYTHON:-.venv/bin/python}
ART=${ART:-/tmp/sdopt-layout-sd15}
mkdir -p "$OUT"
rss() { grep -E "Maximum resident|Elapsed \(wall" "$1" | sed 's/^\s*//'; }
/usr/bin/time -v "$PY" -m sdopt export synthetic:sd15 --out "$ART" --force > "$OUT/export.log" 2> "$OUT/export.time"
{ echo "# $LABEL: sd15 artifact"; du -b --apparent-size "$ART"/*/* | sort -k2; echo; du -sb "$ART"; } > "$OUT/sizes.txt"
for mode in exact fast; do
  flag=""; [ "$mode" = fast ] && flag="--fast"
  /usr/bin/time -v "$PY" -m sdopt generate "$ART" "a photo of an astronaut" --height 256 --width 256 --steps 6 \
    --seed 0 $flag --out "$OUT/$mode.png" > "$OUT/generate-$mode.log" 2> "$OUT/generate-$mode.time"
done
{ echo "# $LABEL"; for f in export generate-exact generate-fast; do echo "## $f"; rss "$OUT/$f.time"; done; } > "$OUT/rss.txt"
cat "$OUT/rss.txt"; tail -n 1 "$OUT/sizes.txt"
