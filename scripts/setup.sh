#!/usr/bin/env bash
# Create .venv and install ldmseg (CPU torch pinned by constraints-cpu.txt) with its dev extra.
# As root on Debian/Ubuntu it also installs chromium and chromium-driver (apt) for the browser
# test of the serve web page (tests/pipelines/test_serve_browser.py), and g++ when no C++ compiler is there.
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
if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing g++ with apt-get (tests/ldmseg/test_fake_cuda.py compiles a small C++ device guard)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
  else
    echo "[setup] note: tests/ldmseg/test_fake_cuda.py needs a C++ compiler (apt package g++, or set CXX)"
  fi
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium and chromium-driver with apt-get (for the browser test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  else
    echo "[setup] note: tests/pipelines/test_serve_browser.py needs /usr/bin/chromium and /usr/bin/chromedriver (apt packages chromium, chromium-driver); run this script as root to install them"
  fi
fi
echo "[setup] done: $(.venv/bin/ldmseg --version)"
