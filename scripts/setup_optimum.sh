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
pip_install() {  # pip's output less the "Location ... is ignored" lines of this host's index config
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip_install --upgrade pip
pip_install torch==2.13.0
pip_install -r "$REQ"
cp "$REQ" "$STAMP"
versions=$("$VENV/bin/python" -c 'import optimum.version as o, transformers as t; print(o.__version__, t.__version__)')
echo "optimum venv ready ($VENV: optimum, transformers $versions)"
