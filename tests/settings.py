"""Settings for the test run: a data directory of its own, fast heartbeats.

Runner processes started by the tests inherit these through the environment
(DJANGO_SETTINGS_MODULE, GLASSBOX_DATA_DIR and GLASSBOX_TEST_DB_NAME).
"""

import os
from pathlib import Path

_base = Path(__file__).resolve().parent.parent
# One data directory (database, embedded Redis, logs) per test session, so
# sessions running side by side do not share queues or a database.
os.environ.setdefault(
    "GLASSBOX_DATA_DIR", str(_base / "var" / "test" / str(os.getpid()))
)
os.environ.setdefault("MODEL_DIR", str(_base / "var" / "models"))
os.environ.setdefault("RUNNER_HEARTBEAT_S", "0.25")
os.environ.setdefault("RUNNER_DEAD_AFTER_S", "2")
os.environ.setdefault("SYNC_TIMEOUT_S", "120")
os.environ.setdefault("ROBOFLOW_SYNC_TIMEOUT_S", "120")

from webapp.settings import *  # noqa: E402,F403
from webapp.settings import DATA_DIR, DATABASES  # noqa: E402

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-db.sqlite3")}
else:
    # Consumers under test query from channels' worker threads, and a kept
    # connection there would stop the test database from being dropped.
    DATABASES["default"]["CONN_MAX_AGE"] = 0

# Runner processes connect to the database the test run created.
if os.environ.get("GLASSBOX_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["GLASSBOX_TEST_DB_NAME"]

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
