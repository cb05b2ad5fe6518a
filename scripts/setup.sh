#!/usr/bin/env bash
# Create .venv and install sdopt with its export, bench and test extras, from nothing.
# torch is pinned to 2.13.0 first: on CPU hosts that is the local CPU wheel, while any other
# spec would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
echo "sdopt installed in .venv ($(.venv/bin/python -c 'import sdopt, torch; print("sdopt", sdopt.__version__, "torch", torch.__version__)'))"
