"""Measure a new runner process's first cold load, with and without its warm-up.

A runner builds and runs an untrained ``yolov8n.yaml`` once before it takes
jobs (``ModelCache.warm_up_process``), so that work done once per process
is not billed as the first run's cold load. This script loads one model in
fresh child processes, alternately without and with that warm-up, and
reports the median cold load of each and its phases.

    .venv/bin/python bench/first_load.py --model people-detector --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from child import run_child

CHILD = """
import json, os, sys, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
import django
django.setup()
from runner.model_cache import ModelCache
from runner.registry import resolve_model
from workflows.timing import ModelUse

model_id, warm, threads = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
cache = ModelCache(
    budget_bytes=4 << 30, device="cpu", warmup_size=640, torch_threads=threads
)
warm_up_s = cache.warm_up_process() if warm else 0.0
use = ModelUse(model_id=model_id)
cache.get(resolve_model(model_id), use)
print(json.dumps({
    "warm_up_ms": warm_up_s * 1e3,
    "cold_load_ms": use.cold_load_ns / 1e6,
    "read_ms": use.load_read_ns / 1e6,
    "to_device_ms": use.load_to_device_ns / 1e6,
    "warmup_ms": use.load_warmup_ns / 1e6,
}))
"""


def measure(model_id: str, warm: bool, threads: int) -> dict[str, float]:
    return run_child(CHILD, model_id, "1" if warm else "0", str(threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="people-detector")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    for _ in range(args.rounds):
        for label, warm in (("without", False), ("with", True)):
            results[label].append(measure(args.model, warm, args.threads))

    print(f"first cold load of {args.model} in a new process, {args.rounds} each")
    print(f"  {'warm-up':<10}{'cold load':>11}{'read':>9}{'warmup':>9}{'took':>9}")
    for label, rows in results.items():

        def median(name: str, rows=rows) -> float:
            return statistics.median(row[name] for row in rows)

        print(
            f"  {label:<10}{median('cold_load_ms'):>9.0f}ms{median('read_ms'):>7.0f}ms"
            f"{median('warmup_ms'):>7.0f}ms{median('warm_up_ms'):>7.0f}ms"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
