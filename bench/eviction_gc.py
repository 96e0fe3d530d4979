"""Measure what an eviction costs a run, with and without the frozen heap.

``ModelCache.evict`` runs a full garbage collection so that the evicted
model's memory is returned at once. In a runner, that collection also scans
every object that lives as long as the process (modules, Django, torch),
unless the runner froze them after its warm-up (``gc.freeze``, in
``manage.py runner``). The time lands in the run's overhead, and so in its
bill. This script loads two models in fresh child processes, alternately
without and with the freeze, evicts each several times, and reports the
median eviction.

    .venv/bin/python bench/eviction_gc.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from child import run_child

CHILD = """
import gc, json, os, sys, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
import django
django.setup()
from runner.model_cache import ModelCache
from runner.registry import resolve_model
from workflows.timing import ModelUse

freeze, evictions, threads = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3])
cache = ModelCache(
    budget_bytes=4 << 30, device="cpu", warmup_size=640, torch_threads=threads
)
cache.warm_up_process()
if freeze:
    gc.collect()
    gc.freeze()
times = []
for index in range(evictions):
    model_id = ("yolov8n.yaml", "yolo11n.yaml")[index % 2]
    source = resolve_model(model_id)
    cache.get(source, ModelUse(model_id=model_id))
    started = time.perf_counter()
    cache.evict(source.cache_key)
    times.append((time.perf_counter() - started) * 1e3)
print(json.dumps({"evict_ms": times, "frozen": gc.get_freeze_count()}))
"""


def measure(freeze: bool, evictions: int, threads: int) -> dict:
    return run_child(CHILD, "1" if freeze else "0", str(evictions), str(threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--evictions", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    results: dict[str, list[float]] = {"without": [], "with": []}
    frozen = 0
    for _ in range(args.rounds):
        for label, freeze in (("without", False), ("with", True)):
            row = measure(freeze, args.evictions, args.threads)
            results[label].extend(row["evict_ms"])
            frozen = max(frozen, row["frozen"])

    print(
        f"eviction of an untrained yolov8n/yolo11n, {args.rounds} processes x "
        f"{args.evictions} evictions each; {frozen} objects frozen"
    )
    for label, times in results.items():
        print(
            f"  {label:<8} freeze: median {statistics.median(times):7.1f} ms, "
            f"max {max(times):7.1f} ms"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
