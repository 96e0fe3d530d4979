"""Compare each run's estimate, taken just before it was sent, with the run.

Usage, from the repository root::

    .venv/bin/python bench/estimate_accuracy.py --out var/bench/estimate.json

The script starts its own stack with ``manage.py up --runners 2`` in a fresh
temporary data directory (SQLite and an embedded Redis), and sends runs as
the command line does (``runner.service.start_run``) from this process, on
the stack's database and Redis. Each round sends the same workflows in the
same order, on ultralytics' bus.jpg and zidane.jpg in turns:

1. one at a time, each waited for: no model (image height), one detection
   (people-detector), people-detector then a dynamic crop and an untrained
   ``yolov8n.yaml`` on each crop, and two models on the whole image
   (people-detector, then ``yolov8n.yaml``);
2. under load: the two-model workflow twice without waiting, so both
   runners are busy, then the detection, the crop workflow and the no-model
   workflow without waiting, then all five are waited for.

Before each run, the script calls ``runner.estimate.estimate_run`` for the
same definition, batch and priority. For every run it records four
comparisons. The first is whether the estimate's ``hot`` matched the run (a
run is hot when it loaded no model). The others are the predicted runner
time against the measured one, the predicted time of one call of each
model against the run's mean per call, and the predicted price against
the bill. The call time leaves out how many crops an image
gave, which the estimate cannot know before the detections exist. Runs
whose estimate left a figure unknown (no history yet, or the queue time
under load) count only for what was predicted. Results are printed as a
table and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stack import STARTUP_TIMEOUT_S, Stack  # noqa: E402
from tests.definitions import detect_then_crops, detection, image_height  # noqa: E402

logger = logging.getLogger("bench.estimate_accuracy")

USERNAME = "estimate-bench"
RUN_TIMEOUT_S = 300.0
IMAGES = ("bus.jpg", "zidane.jpg")


def two_models() -> dict:
    definition = detection("people-detector")
    second = dict(definition["steps"][0], name="second", model_id="yolov8n.yaml")
    definition["steps"].append(second)
    return definition


WORKFLOWS = {
    "no-model": image_height(),
    "detection": detection("people-detector"),
    "crop+detection": detect_then_crops("yolov8n.yaml"),
    "two-models": two_models(),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="Rounds of the mix.")
    parser.add_argument(
        "--port", type=int, default=9700, help="Web port of the stack (and +1)."
    )
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    return parser.parse_args(argv)


def setup_django(data_dir: Path) -> None:
    os.environ["GLASSBOX_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("MODEL_DIR", str(ROOT / "var" / "models"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "webapp.settings"
    os.environ.pop("REDIS_URL", None)
    os.environ.pop("DATABASE_URL", None)
    import django

    django.setup()


def wait_for_runners(count: int) -> None:
    from runner import fleet

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(fleet.live_runners()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} runners sent a heartbeat")
        time.sleep(0.2)


def take_estimate(owner_id: int, definition: dict) -> dict[str, Any]:
    from runner.estimate import estimate_run
    from workflows.compiler import plan_cache

    plan = plan_cache.compile(definition, owner_id).plan
    return estimate_run(plan, {}, owner_id)


def send(owner_id: int, definition: dict, image: str, wait_s: float):
    from runner.service import start_run
    from tests.conftest import image_bytes

    return start_run(
        owner_id=owner_id,
        source="cli",
        definition=definition,
        raw_inputs={},
        uploads={"image": image_bytes(image)},
        started_ns=time.perf_counter_ns(),
        wait_s=wait_s,
    ).run


def wait_finished(run_id) -> Any:
    from runner.models import Run

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        run = Run.objects.select_related("bill").get(pk=run_id)
        if run.is_finished and hasattr(run, "bill"):
            return run
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} did not finish in {RUN_TIMEOUT_S} s")
        time.sleep(0.1)


def record(name: str, phase: str, estimate: dict, run) -> dict[str, Any]:
    breakdown = run.breakdown or {}
    models = breakdown.get("models", [])
    predicted_calls = {m["model_id"]: m["calls"] for m in estimate["models"]}
    return {
        "workflow": name,
        "phase": phase,
        "status": run.status,
        "runner": run.runner_name,
        "predicted_runner": estimate["runner"],
        "predicted_hot": estimate["hot"],
        "hot": not run.cold,
        "predicted_runner_us": estimate["runner_total"],
        "runner_us": breakdown.get("runner_total"),
        "predicted_total_us": estimate["total"],
        "total_us": breakdown.get("total"),
        "predicted_price": (estimate["price"] or {}).get("amount_microcredits"),
        "price": run.bill.amount_microcredits,
        "predicted_calls": predicted_calls,
        "calls": {m["model_id"]: m["calls"] for m in models},
        "predicted_per_call_us": {
            m["model_id"]: (
                None
                if m["per_call_us"] is None
                else round(sum(m["per_call_us"].values()))
            )
            for m in estimate["models"]
        },
        "per_call_us": {
            m["model_id"]: round(
                (m["preprocess"] + m["inference"] + m["postprocess"]) / m["calls"]
            )
            for m in models
            if m["calls"]
        },
    }


def run_round(owner_id: int, round_index: int) -> list[dict[str, Any]]:
    results = []
    images = iter(IMAGES * 8)
    if round_index % 2:
        images = iter(tuple(reversed(IMAGES)) * 8)
    for name, definition in WORKFLOWS.items():
        estimate = take_estimate(owner_id, definition)
        run = send(owner_id, definition, next(images), wait_s=RUN_TIMEOUT_S)
        results.append(record(name, "idle", estimate, wait_finished(run.pk)))

    pending = []
    for name in ("two-models", "two-models", "detection", "crop+detection"):
        estimate = take_estimate(owner_id, WORKFLOWS[name])
        run = send(owner_id, WORKFLOWS[name], next(images), wait_s=0)
        pending.append((name, estimate, run))
    estimate = take_estimate(owner_id, WORKFLOWS["no-model"])
    run = send(owner_id, WORKFLOWS["no-model"], next(images), wait_s=0)
    pending.append(("no-model", estimate, run))
    for name, estimate, run in pending:
        busy = "load" if estimate["runner"] is None else "load, runner idle"
        results.append(record(name, busy, estimate, wait_finished(run.pk)))
    return results


def relative_errors(rows, predicted: str, actual: str) -> list[float]:
    return [
        (row[predicted] - row[actual]) / row[actual]
        for row in rows
        if row[predicted] is not None and row[actual]
    ]


def call_time_errors(rows: list[dict[str, Any]]) -> list[float]:
    """Return the relative error of each predicted time of one model call."""
    errors = []
    for row in rows:
        for model_id, actual in row["per_call_us"].items():
            predicted = row["predicted_per_call_us"].get(model_id)
            if predicted is not None and actual:
                errors.append((predicted - actual) / actual)
    return errors


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    hot_known = [row for row in rows if row["status"] == "succeeded"]
    runner_errors = relative_errors(rows, "predicted_runner_us", "runner_us")
    price_errors = relative_errors(rows, "predicted_price", "price")
    call_errors = call_time_errors(rows)

    def error_summary(errors: list[float]) -> dict[str, Any]:
        if not errors:
            return {"count": 0, "median_abs": None, "worst": None}
        return {
            "count": len(errors),
            "median_abs": statistics.median(abs(e) for e in errors),
            "worst": max(errors, key=abs),
        }

    return {
        "runs": len(rows),
        "hot_right": sum(r["predicted_hot"] == r["hot"] for r in hot_known),
        "predicted_cold_ran_hot": sum(
            not r["predicted_hot"] and r["hot"] for r in hot_known
        ),
        "predicted_hot_ran_cold": sum(
            r["predicted_hot"] and not r["hot"] for r in hot_known
        ),
        "runner_time": error_summary(runner_errors),
        "call_time": error_summary(call_errors),
        "price": error_summary(price_errors),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:+.0f}%"

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        phase = "idle" if row["phase"] == "idle" else "load"
        groups.setdefault((row["workflow"], phase), []).append(row)
    print(
        f"{'workflow':<16}{'phase':<6}{'runs':>5}{'hot right':>10}"
        f"{'runner time err':>17}{'worst':>8}{'call time err':>15}{'worst':>8}"
        f"{'price err':>11}{'worst':>8}"
    )
    for (workflow, phase), group in [*groups.items(), (("all", ""), rows)]:
        summary = summarize(group)
        runner, call = summary["runner_time"], summary["call_time"]
        price = summary["price"]
        print(
            f"{workflow:<16}{phase:<6}{summary['runs']:>5}"
            f"{summary['hot_right']:>6}/{summary['runs']:<3}"
            f"{percent(runner['median_abs']):>12} ({runner['count']:>2})"
            f"{percent(runner['worst']):>8}"
            f"{percent(call['median_abs']):>15}{percent(call['worst']):>8}"
            f"{percent(price['median_abs']):>11}{percent(price['worst']):>8}"
        )


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--", "runner")),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="estimate-bench-") as data:
        data_dir = Path(data)
        stack = Stack(
            data_dir,
            args.port,
            runners=2,
            web_workers=1,
        )
        try:
            stack.start()
            setup_django(data_dir)
            wait_for_runners(2)
            from django.contrib.auth import get_user_model

            owner, _ = get_user_model().objects.get_or_create(username=USERNAME)
            rows = []
            for index in range(args.rounds):
                rows += run_round(owner.id, index)
                logger.info("round %d of %d done", index + 1, args.rounds)
        finally:
            stack.stop()
    print_table(rows)
    result = {
        "started": started.isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        **git_commit(),
        "rounds": args.rounds,
        "summary": summarize(rows),
        "runs": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
