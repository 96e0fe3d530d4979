#!/usr/bin/env bash
# Install everything, then start Redis, runners and the web server and run the
# people-detector demo on bus.jpg.  Stays up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
exec .venv/bin/python manage.py up --demo "$@"
