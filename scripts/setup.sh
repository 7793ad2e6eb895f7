#!/usr/bin/env bash
# Create .venv (once) and install share-diffusers with everything the demo, app and tests use.
# torch: the CPU build torch==2.13.0 is installed only when the venv has no torch yet, so a GPU
# user can put their own build in first (`.venv/bin/pip install torch --index-url …`), or set
# TORCH_SPEC. Every other dependency is pinned by constraints.txt (the versions the tests ran on).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
$py -m pip install -q --disable-pip-version-check --upgrade pip
$py -c "import torch" 2>/dev/null || $py -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
$py -m pip install -q -c constraints.txt -e ".[train,app,test]" -e ./lab
