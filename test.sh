#!/usr/bin/env bash
# Install everything (as setup.sh does), then run every test.
#
# With arguments, they go to pytest as they are. Without, the whole suite runs
# on the embedded defaults (SQLite, embedded Redis). Then, where PostgreSQL and
# Redis respond at TEST_DATABASE_URL and TEST_REDIS_URL (by default on
# 127.0.0.1), the runner-pool tests run again against them: the configuration
# runners on several machines use. DATABASE_URL and REDIS_URL, if set, replace
# the embedded defaults in the first pass, and the second pass ignores them.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
if .venv/bin/python scripts/services_up.py; then
    echo "== runner-pool tests against PostgreSQL and Redis on 127.0.0.1"
    DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test} \
    REDIS_URL=${TEST_REDIS_URL:-redis://127.0.0.1:6379/0} \
    GLASSBOX_DATA_DIR=var/test-shared \
        .venv/bin/python -m pytest tests/test_runs.py tests/test_runner_pool.py \
        tests/test_run_events.py tests/test_concurrent_writes.py \
        tests/test_model_upload.py
else
    echo "PostgreSQL or Redis not answering on 127.0.0.1; shared-server tests skipped"
fi
