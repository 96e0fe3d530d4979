#!/usr/bin/env bash
# Install everything the project needs into .venv, idempotently: Python
# packages (torch from this machine's local wheels), the demo's pretrained
# weights, the database schema, and Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned: the project's dependency pins match, so the next
# install finds it satisfied and downloads nothing.
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[test]"

# Browser libraries for the dashboard, exactly as locked in package-lock.json.
npm ci --no-audit --no-fund --loglevel=error

if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "chromium is not installed; browser tests will be skipped" >&2
    fi
fi

.venv/bin/python manage.py migrate --verbosity 0
.venv/bin/python manage.py fetch_models
