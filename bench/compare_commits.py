"""Compare request latency at an earlier commit with the working tree, side by side.

Usage, from the repository root::

    .venv/bin/python bench/compare_commits.py --before f7b4474

The script checks the earlier commit out into a temporary git worktree and
starts one stack from it and one from this tree, each with
``manage.py up --runners 1`` in its own data directory, both on 127.0.0.1.
Both run on this environment's packages. It then sends the no-model
workflow and a hot ``yolov8n.yaml`` detection workflow (the inputs of
``bench/overhead.py``) to both stacks, alternating in rounds with the order
reversed every round, so drift on the machine affects both. It prints the
median latency of each and the ratio after/before, and removes the
worktree and both stacks at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import overhead  # noqa: E402
from bench.stack import Stack  # noqa: E402

WARMUP_REQUESTS = 20
ISSUE_KEY = (
    "import sys; from pathlib import Path; from bench import overhead; "
    "overhead.setup_django(Path(sys.argv[1])); print(overhead.issue_api_key())"
)


def start_stack(tree: Path, data_dir: Path) -> Stack:
    """Start ``manage.py up`` from ``tree``, as bench/overhead.py starts it."""
    data_dir.mkdir(parents=True)
    port = overhead.free_port(with_next=True)
    stack = overhead.glassbox_stack(data_dir, port, root=tree)
    stack.start()
    return stack


def issue_key(tree: Path, stack: Stack) -> str:
    """Issue an API key in the stack's own database, with the tree's own code."""
    completed = subprocess.run(
        [sys.executable, "-c", ISSUE_KEY, str(stack.data_dir)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    return completed.stdout.strip().splitlines()[-1]


def compare(
    clients: dict[str, overhead.KeepAliveClient],
    bodies: dict[str, bytes],
    requests: int,
    round_size: int,
) -> dict[str, float]:
    for name, client in clients.items():
        for _ in range(WARMUP_REQUESTS):
            reply = client.post(
                "/workflows/run",
                bodies[name],
                timeout_s=overhead.COLD_REQUEST_TIMEOUT_S,
            )
            overhead.check_reply(reply, name)
    latencies: dict[str, list[float]] = {name: [] for name in clients}
    order = list(clients)
    for round_index in range(requests // round_size):
        for name in order if round_index % 2 == 0 else order[::-1]:
            for _ in range(round_size):
                reply = clients[name].post("/workflows/run", bodies[name])
                overhead.check_reply(reply, name)
                latencies[name].append(reply.seconds * 1000)
    return {name: statistics.median(values) for name, values in latencies.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="Git revision to compare.")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--detect-requests", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from tests.definitions import image_height

    with tempfile.TemporaryDirectory(prefix="glassbox-compare-") as scratch:
        scratch_dir = Path(scratch)
        before_tree = scratch_dir / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before_tree), args.before],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        trees = {"before": before_tree, "after": ROOT}
        stacks: dict[str, Stack] = {}
        try:
            for name, tree in trees.items():
                stacks[name] = start_stack(tree, scratch_dir / f"data-{name}")
            keys = {name: issue_key(trees[name], stacks[name]) for name in trees}
            clients = {
                name: overhead.KeepAliveClient(name, stack.port)
                for name, stack in stacks.items()
            }
            jpeg, _, _ = overhead.benchmark_jpeg()
            workloads = (
                ("no-model", image_height(), args.requests, 10),
                (
                    "detection",
                    overhead.detection_definition(overhead.DETECTION_MODEL),
                    args.detect_requests,
                    5,
                ),
            )
            print(f"before: {args.before}, after: the working tree")
            for label, specification, requests, round_size in workloads:
                bodies = {
                    name: overhead.run_body(keys[name], jpeg, specification)
                    for name in clients
                }
                medians = compare(clients, bodies, requests, round_size)
                print(
                    f"  {label:<10} p50 before {medians['before']:.2f} ms, "
                    f"after {medians['after']:.2f} ms, "
                    f"after/before {medians['after'] / medians['before']:.3f}"
                )
        finally:
            for stack in stacks.values():
                stack.stop()
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(before_tree)],
                cwd=ROOT,
                check=False,
                capture_output=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
