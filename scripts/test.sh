#!/usr/bin/env bash
# README command B: install everything the tests need, then run the whole suite (unit, integration, end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec .venv/bin/pytest "$@"
