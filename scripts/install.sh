#!/usr/bin/env bash
# Creates .venv and installs flow_pipeline into it (torch 2.13.0: the CPU wheel where pip is configured with one).
#   scripts/install.sh              the pipeline itself
#   scripts/install.sh test         plus what the test suite needs (and, as root, Debian's chromium and postgresql)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PYTHON="${PYTHON:-python3}"

if [ "$extras" = "test" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  # Servers and browser for the end-to-end tests (started by the tests themselves, on 127.0.0.1).
  missing=""
  command -v chromium >/dev/null || missing="$missing chromium"
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
  if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [ "$extras" = "test" ]; then
  .venv/bin/pip install -q -e '.[test,postgres,k8s]'
else
  .venv/bin/pip install -q -e .
fi
