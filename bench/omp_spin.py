"""Measure what libgomp's spin setting costs a CPU predict, and the CPU it burns after.

After each parallel region, libgomp's idle threads busy-wait for
GOMP_SPINCOUNT iterations before they sleep. This script runs hot
``yolov8n.yaml`` predicts at 480 px in child processes, one per spin
setting. For each setting it reports the median predict time, and the
median CPU time the process burns in the 20 ms after a predict returns,
while its Python thread sleeps. The settings take turns in every
repetition, in a rotating order, so drift on the machine affects all of
them. The runners' default (``runner/openmp.py``) comes from these figures.

    .venv/bin/python bench/omp_spin.py --out var/bench/omp_spin.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS = ("default", "1000", "10000", "50000")
# Long enough for libgomp's default spin to end, on the 2-core machine where
# it lasted about 8 ms.
IDLE_WINDOW_S = 0.02

CHILD = r"""
import json, sys, time
import cv2, numpy as np, torch
from ultralytics import YOLO
sys.path.insert(0, {root!r})
from bench.overhead import IMAGE_LONG_SIDE, benchmark_jpeg

jpeg, _, _ = benchmark_jpeg()
pixels = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
model = YOLO("yolov8n.yaml", task="detect")
model.predict(pixels, imgsz=IMAGE_LONG_SIDE, verbose=False)
# ultralytics drops torch to one thread at its first predict.
torch.set_num_threads({threads})
for _ in range(5):
    model.predict(pixels, imgsz=IMAGE_LONG_SIDE, verbose=False)
predict_ms, idle_cpu_ms = [], []
for _ in range({calls}):
    started = time.perf_counter()
    model.predict(pixels, imgsz=IMAGE_LONG_SIDE, verbose=False)
    predict_ms.append((time.perf_counter() - started) * 1000)
    cpu = time.process_time()
    time.sleep({idle_s})
    idle_cpu_ms.append((time.process_time() - cpu) * 1000)
print(json.dumps({{"predict_ms": predict_ms, "idle_cpu_ms": idle_cpu_ms}}))
"""


def measure(setting: str, calls: int, threads: int) -> dict[str, list[float]]:
    env = dict(os.environ)
    env.pop("GOMP_SPINCOUNT", None)
    env.pop("OMP_WAIT_POLICY", None)
    if setting != "default":
        env["GOMP_SPINCOUNT"] = setting
    code = CHILD.format(
        root=str(ROOT), threads=threads, calls=calls, idle_s=IDLE_WINDOW_S
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=list(DEFAULT_SETTINGS),
        help="GOMP_SPINCOUNT values; 'default' leaves it unset.",
    )
    args = parser.parse_args(argv)

    samples = {s: {"predict_ms": [], "idle_cpu_ms": []} for s in args.settings}
    for repetition in range(args.repetitions):
        shift = repetition % len(args.settings)
        for setting in args.settings[shift:] + args.settings[:shift]:
            measured = measure(setting, args.calls, args.threads)
            for key, values in measured.items():
                samples[setting][key].extend(values)

    summary = {
        setting: {
            "predict_p50_ms": round(statistics.median(values["predict_ms"]), 3),
            "idle_cpu_p50_ms": round(statistics.median(values["idle_cpu_ms"]), 3),
            "calls": len(values["predict_ms"]),
        }
        for setting, values in samples.items()
    }
    baseline = summary.get("default", next(iter(summary.values())))
    print(f"GOMP_SPINCOUNT, {args.threads} torch threads, yolov8n.yaml at 480 px")
    print(f"  {'setting':<10}{'predict p50':>13}{'vs default':>12}{'idle CPU p50':>14}")
    for setting, entry in summary.items():
        ratio = entry["predict_p50_ms"] / baseline["predict_p50_ms"]
        entry["predict_ratio_to_default"] = round(ratio, 3)
        print(
            f"  {setting:<10}{entry['predict_p50_ms']:>10.2f} ms{ratio:>12.3f}"
            f"{entry['idle_cpu_p50_ms']:>11.2f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "repetitions": args.repetitions,
                "idle_window_s": IDLE_WINDOW_S,
                "summary": summary,
                "samples": samples,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
