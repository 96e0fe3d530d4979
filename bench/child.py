"""Run a measurement in a fresh Python process, as a new runner would start.

Each child gets the runners' OpenMP spin setting and prints its result as
JSON on its last line of output (ultralytics may print before it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` with ``args`` in a new interpreter; return its last line as JSON."""
    finished = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "GOMP_SPINCOUNT": "10000"},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(finished.stdout.strip().splitlines()[-1])
