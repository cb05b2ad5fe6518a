#!/usr/bin/env bash
# Create (once) .venv-optimum: Hugging Face Optimum with transformers 4.x, for tests/test_optimum.py.
# Cached: re-created only when scripts/optimum-requirements.txt changes. ~1.3 GB, ~2 min on first run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SDOPT_OPTIMUM_VENV:-.venv-optimum}
REQ=scripts/optimum-requirements.txt
STAMP="$VENV/.sdopt-requirements"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && cmp -s "$REQ" "$STAMP"; then
  echo "optimum venv up to date ($VENV)"; exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -r "$REQ"
cp "$REQ" "$STAMP"
echo "optimum venv ready ($VENV: $("$VENV/bin/python" -c 'import optimum.version as v, transformers as t; print("optimum", v.__version__, "transformers", t.__version__)'))"
