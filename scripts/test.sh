#!/usr/bin/env bash
# Set up (scripts/setup.sh) plus headless Chromium for the web-UI tests, then lint (ruff) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
