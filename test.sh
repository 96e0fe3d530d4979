#!/usr/bin/env bash
# Install everything (as setup.sh does), then run every test.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
exec .venv/bin/python -m pytest "$@"
