#!/usr/bin/env bash
# Create .venv and install ldmseg (CPU torch pinned by constraints-cpu.txt) with its dev extra.
# Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "[setup] installing ldmseg and its dependencies (first run: a few minutes)"
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e '.[dev]'
echo "[setup] done: $(.venv/bin/ldmseg --version)"
