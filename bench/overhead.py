"""Measure glassbox's per-request overhead on loopback, in one run.

Usage, from the repository root::

    .venv/bin/python bench/overhead.py --out var/bench/overhead.json

The script starts its own stack with ``manage.py up --runners 1`` in a fresh
temporary data directory (with ``WARMUP_IMAGE_SIZE=480``, so the runner
predicts at 480 px), and Roboflow's ``inference`` server as a peer when
``bench/peer_inference.py`` finds it. Both listen on 127.0.0.1 only. Every
loop is bounded, and every server the script started is stopped before it
exits, including the embedded Redis server. It measures four things:

a. Overhead without a model. The image-height workflow is sent with
   ``POST /workflows/run`` and an inline specification, to glassbox and to
   the peer, with one keep-alive connection per server (``http.client``).
   The two servers alternate in rounds so that machine drift affects both.
   The script reports client-side p50 and p99, the CPU time per request of
   each process, and for glassbox the median of each ``Server-Timing``
   component.
b. The cost of serving a hot detector over HTTP. A ``yolov8n.yaml`` detection
   workflow at 480 px is sent over HTTP, alternating with a direct call in this
   process on the same JPEG bytes. The direct call is ``cv2.imdecode``, then
   ultralytics' ``predict`` with the block's default thresholds and the
   runner's torch thread count and OpenMP spin setting. The figure is the
   ratio of the medians. The same body also goes to ``bench/floor_app.py``,
   the smallest Django and DRF application that parses it, under the same
   gunicorn options, to show what the web stack costs before glassbox's code.
c. Runner memory. The runner's RSS is read with psutil before any model
   loads, with ``yolov8n.yaml`` loaded, and with a second model loaded too.
d. What a request costs by what came before it. The no-model request of (a)
   is timed right after another no-model request, right after a hot
   detection, and after the stack was idle for a while, in turns.

The input is ultralytics' ``bus.jpg``, resized to 480 px on its long side and
encoded once as JPEG (quality 90). Results are printed as a table and written
as JSON to ``--out``. The method and recorded figures are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import logging
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.peer_inference import peer_python, start_peer, stop_peer  # noqa: E402
from bench.stack import Stack  # noqa: E402
from runner.openmp import SPINCOUNT_VARIABLE, apply_spin_default  # noqa: E402

logger = logging.getLogger("bench.overhead")

HOST = "127.0.0.1"
IMAGE_LONG_SIDE = 480
JPEG_QUALITY = 90
DETECTION_MODEL = "yolov8n.yaml"
USERNAME = "bench"

# Targets that the report compares the results with.
TARGET_NO_MODEL_P50_MS = 5.0
TARGET_NO_MODEL_P99_MS = 20.0
TARGET_DETECTION_RATIO = 1.10

STACK_STARTUP_TIMEOUT_S = 180.0
STACK_STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
# A cold load of a YOLO architecture took about 2 s on the 2-core machine
# in docs/benchmarks.md.
COLD_REQUEST_TIMEOUT_S = 300.0
HEARTBEAT_WAIT_S = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="Path of the JSON results file to write.",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=400,
        help="Measured requests per server in the no-model benchmark (default 400).",
    )
    parser.add_argument(
        "--round-size",
        type=int,
        default=10,
        help="Consecutive requests to one server before the "
        "next server takes its turn (default 10).",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=30,
        help="Unmeasured requests per server before measuring (default 30).",
    )
    parser.add_argument(
        "--detect-requests",
        type=int,
        default=60,
        help="Measured HTTP requests, and as many direct "
        "predict calls, in the detection benchmark "
        "(default 60).",
    )
    parser.add_argument(
        "--second-model",
        default="yolo11n.yaml",
        help="Model loaded second for the memory figure (default yolo11n.yaml).",
    )
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="Skip Roboflow's inference server even if it is installed.",
    )
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="Keep the temporary data directory (database, "
        "logs) instead of deleting it.",
    )
    args = parser.parse_args(argv)
    for name in ("requests", "round_size", "detect_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


# -- statistics ------------------------------------------------------------


def percentile(samples: list[float], fraction: float) -> float:
    """Return the smallest sample with ``fraction`` of all samples at or below it.

    This is the nearest-rank percentile.
    """
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize_ms(samples_s: list[float]) -> dict[str, float | int]:
    samples_ms = [s * 1000 for s in samples_s]
    return {
        "n": len(samples_ms),
        "p50_ms": round(statistics.median(samples_ms), 3),
        "p90_ms": round(percentile(samples_ms, 0.90), 3),
        "p99_ms": round(percentile(samples_ms, 0.99), 3),
        "min_ms": round(min(samples_ms), 3),
        "max_ms": round(max(samples_ms), 3),
    }


def parse_server_timing(header: str | None) -> dict[str, float]:
    """Read ``name;dur=ms`` entries of a Server-Timing header."""
    if not header:
        return {}
    entries = {}
    for entry in header.split(","):
        name, _, rest = entry.strip().partition(";")
        if rest.startswith("dur="):
            entries[name] = float(rest[len("dur=") :])
    return entries


def median_components(timings: list[dict[str, float]]) -> dict[str, float]:
    names = list(timings[0]) if timings else []
    return {
        name: round(statistics.median(t.get(name, 0.0) for t in timings), 3)
        for name in names
    }


# -- machine and inputs ----------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_bytes = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_bytes = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "ram_bytes": ram_bytes,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def package_versions() -> dict[str, str]:
    versions = {}
    for name in (
        "django",
        "gunicorn",
        "rq",
        "redis",
        "torch",
        "ultralytics",
        "opencv-python",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain")),
    }


def benchmark_jpeg() -> tuple[bytes, int, int]:
    """Return bus.jpg resized to 480 px on its long side, as JPEG, with its size."""
    import cv2
    from ultralytics import ASSETS

    source = Path(ASSETS) / "bus.jpg"
    pixels = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if pixels is None:
        raise RuntimeError(f"failed to read {source}")
    height, width = pixels.shape[:2]
    scale = IMAGE_LONG_SIDE / max(height, width)
    size = (round(width * scale), round(height * scale))
    resized = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(
        ".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError("JPEG encoding of the benchmark image failed")
    return encoded.tobytes(), size[0], size[1]


def free_port(*, with_next: bool = False) -> int:
    """Return a free port on 127.0.0.1. With ``with_next``, port + 1 is free too.

    ``manage.py up`` serves websockets with daphne on the port after the
    HTTP port, so the stack needs two adjacent ports.
    """
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        if not with_next or _port_is_free(port + 1):
            return port
    raise RuntimeError("found no two adjacent free ports on 127.0.0.1")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


# -- HTTP ------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]
    seconds: float


class KeepAliveClient:
    """One persistent HTTP/1.1 connection to one server, timing each request."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.reconnects = 0
        self.connection = http.client.HTTPConnection(
            HOST, port, timeout=REQUEST_TIMEOUT_S
        )

    def post(
        self,
        path: str,
        body: bytes,
        timeout_s: float = REQUEST_TIMEOUT_S,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Send one POST and time it, from sending the request to reading the body.

        When the server has closed the idle connection, the request is sent
        again on a new connection, and the new connection is opened before
        the clock starts.
        """
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        self.connection.timeout = timeout_s
        if self.connection.sock is not None:
            self.connection.sock.settimeout(timeout_s)
        try:
            return self._timed_post(path, body, all_headers)
        except (
            http.client.RemoteDisconnected,
            BrokenPipeError,
            ConnectionResetError,
        ) as error:
            logger.info(
                "%s closed the keep-alive connection (%s); reconnecting",
                self.name,
                type(error).__name__,
            )
            self.reconnects += 1
            self.connection.close()
            self.connection.connect()
            return self._timed_post(path, body, all_headers)

    def _timed_post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        started = time.perf_counter()
        self.connection.request("POST", path, body=body, headers=headers)
        response = self.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        return Reply(response.status, data, dict(response.getheaders()), elapsed)

    def close(self) -> None:
        self.connection.close()


def run_body(api_key: str, jpeg: bytes, specification: dict) -> bytes:
    """Build the body of a Roboflow-style ``POST /workflows/run`` request."""
    image = {"type": "base64", "value": base64.b64encode(jpeg).decode("ascii")}
    return json.dumps(
        {"api_key": api_key, "inputs": {"image": image}, "specification": specification}
    ).encode()


def check_reply(
    reply: Reply, server: str, expect: dict[str, Any] | None = None
) -> dict:
    """Return the first output of a successful run, or raise naming the server."""
    if reply.status != 200:
        raise RuntimeError(
            f"{server} returned HTTP {reply.status}: "
            f"{reply.body[:500].decode(errors='replace')}"
        )
    outputs = json.loads(reply.body)["outputs"]
    first = outputs[0]
    for key, value in (expect or {}).items():
        if first.get(key) != value:
            raise RuntimeError(
                f"{server} returned {key}={first.get(key)!r}, expected {value!r}"
            )
    return first


# -- the stack under test --------------------------------------------------


def glassbox_stack(data_dir: Path, port: int, root: Path = ROOT) -> Stack:
    """Return the stack under test: one runner that predicts at 480 px."""
    return Stack(
        data_dir,
        port,
        runners=1,
        environment={"WARMUP_IMAGE_SIZE": str(IMAGE_LONG_SIDE)},
        root=root,
    )


@dataclass
class FloorServer:
    """``bench/floor_app.py`` under gunicorn, started as ``up`` starts glassbox's."""

    port: int
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        # Imported here: the module reads Django settings, set up by now.
        from runner.management.commands.up import (
            DEFAULT_WEB_WORKERS,
            gunicorn_command,
        )

        command = gunicorn_command(
            "bench.floor_app:application", f"{HOST}:{self.port}", DEFAULT_WEB_WORKERS
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + STACK_STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the floor application exited with code "
                    f"{self.process.returncode}\n{self.log_path.read_text()}"
                )
            if not _port_is_free(self.port):
                logger.info(
                    "started the floor application, pid %d, port %d",
                    self.process.pid,
                    self.port,
                )
                return
            time.sleep(0.2)
        raise RuntimeError("the floor application did not start listening")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STACK_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        logger.info("stopped the floor application, pid %d", self.process.pid)


def setup_django(data_dir: Path) -> None:
    """Point this process's Django at the stack's data directory.

    Call this only after ``up`` has started Redis, because the first Redis
    call from a process starts an embedded server when none responds.
    """
    os.environ["GLASSBOX_DATA_DIR"] = str(data_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "webapp.settings"
    import django

    django.setup()


def issue_api_key() -> str:
    from django.contrib.auth import get_user_model

    from webapp.models import ApiToken

    user, _ = get_user_model().objects.get_or_create(username=USERNAME)
    _, key = ApiToken.issue(user, "overhead benchmark")
    return key


def runner_state(wanted_models: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Return the runner's heartbeat once it lists ``wanted_models`` as loaded."""
    from runner import fleet

    deadline = time.monotonic() + HEARTBEAT_WAIT_S
    while True:
        runners = fleet.live_runners()
        models = runners[0].data["models"] if runners else []
        if runners and wanted_models <= {model["model_id"] for model in models}:
            return runners[0].data
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the runner's heartbeat did not list models "
                f"{sorted(wanted_models)} within "
                f"{HEARTBEAT_WAIT_S:.0f} s"
            )
        time.sleep(0.2)


# -- (a) no-model workflow ---------------------------------------------------


def warm_up(
    clients: list[KeepAliveClient], body: bytes, expected_height: int, requests: int
) -> None:
    for client in clients:
        for _ in range(requests):
            check_reply(
                client.post("/workflows/run", body),
                client.name,
                {"height": expected_height},
            )


def bench_no_model(
    clients: list[KeepAliveClient],
    body: bytes,
    expected_height: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Alternate the servers in rounds of ``round_size`` requests."""
    expect = {"height": expected_height}
    latencies: dict[str, list[float]] = {client.name: [] for client in clients}
    timings: dict[str, list[dict[str, float]]] = {client.name: [] for client in clients}
    rounds = math.ceil(args.requests / args.round_size)
    for round_index in range(rounds):
        # Reverse the order every other round, so no server always goes first.
        order = clients if round_index % 2 == 0 else clients[::-1]
        for client in order:
            remaining = args.requests - len(latencies[client.name])
            for _ in range(min(args.round_size, remaining)):
                reply = client.post("/workflows/run", body)
                check_reply(reply, client.name, expect)
                latencies[client.name].append(reply.seconds)
                breakdown = parse_server_timing(reply.headers.get("Server-Timing"))
                if breakdown:
                    timings[client.name].append(breakdown)

    results = {}
    for client in clients:
        entry: dict[str, Any] = summarize_ms(latencies[client.name])
        entry["reconnects"] = client.reconnects
        if timings[client.name]:
            entry["server_timing_median_ms"] = median_components(timings[client.name])
        results[client.name] = entry
    return results


def stack_processes(stack: Stack) -> dict[str, list]:
    """Group the stack's processes by role: web, runner, websockets, redis."""
    roles: dict[str, list] = {"web": [], "runner": [], "websockets": [], "redis": []}
    for child in psutil.Process(stack.process.pid).children(recursive=True):
        command = " ".join(child.cmdline())
        if "gunicorn" in command:
            roles["web"].append(child)
        elif "manage.py runner" in command:
            roles["runner"].append(child)
        elif "webapp.websocket_server" in command:
            roles["websockets"].append(child)
    redis_pid = int((stack.data_dir / "redis.pid").read_text().strip())
    roles["redis"].append(psutil.Process(redis_pid))
    return roles


def cpu_seconds(roles: dict[str, list]) -> dict[str, float]:
    """Sum the user and system CPU time of each role's processes, in seconds."""
    return {
        role: sum(sum(p.cpu_times()[:2]) for p in processes)
        for role, processes in roles.items()
    }


# -- (b) hot detection -------------------------------------------------------


def detection_definition(model_id: str) -> dict:
    from tests.definitions import detection

    return detection(model_id)


def block_defaults() -> dict[str, Any]:
    """Return the object-detection block's default options by field name."""
    from workflows.blocks.object_detection.v1 import ObjectDetectionBlock

    return {f.name: f.default for f in ObjectDetectionBlock.fields if not f.required}


def load_direct_model():
    """Load the model for the direct calls, with the runners' device and threads."""
    from django.conf import settings

    from runner.model_cache import pick_device

    device = pick_device()
    threads = settings.GLASSBOX["TORCH_THREADS"] or os.cpu_count() or 1
    return load_model(device, threads), device, threads


def load_model(device: str, threads: int):
    """Load ``yolov8n.yaml`` the way the runner does, warm it up, set threads."""
    import numpy as np
    import torch
    from ultralytics import YOLO

    model = YOLO(DETECTION_MODEL, task="detect")
    model.to(device)
    blank = np.zeros((IMAGE_LONG_SIDE, IMAGE_LONG_SIDE, 3), dtype=np.uint8)
    model.predict(blank, device=device, imgsz=IMAGE_LONG_SIDE, verbose=False)
    # ultralytics sets torch to one thread at its first predict. The runner
    # (runner/model_cache.py) sets its configured count back after the warm-up,
    # and this function does the same.
    torch.set_num_threads(threads)
    return model


def direct_predict(model, device: str, jpeg: bytes, options: dict[str, Any]):
    """Decode and predict; return the boxes, ultralytics' stage timers and
    the decode time in ms."""
    import cv2
    import numpy as np

    started = time.perf_counter()
    pixels = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
    decode_ms = (time.perf_counter() - started) * 1000
    result = model.predict(
        pixels,
        imgsz=IMAGE_LONG_SIDE,
        device=device,
        verbose=False,
        conf=options["confidence"],
        iou=options["iou_threshold"],
        max_det=options["max_detections"],
        agnostic_nms=options["class_agnostic_nms"],
    )[0]
    return result.boxes.xyxy.cpu().numpy(), result.speed, decode_ms


class HopWorker:
    """``bench/hop_worker.py`` in its own process, reached over the stack's Redis."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        import redis

        self.socket_path = socket_path
        self.log_path = log_path
        self.connection = redis.Redis(unix_socket_path=str(socket_path))
        self.process: subprocess.Popen | None = None

    def start(self, device: str, threads: int, options: dict[str, Any]) -> None:
        from bench import hop_worker

        self.connection.delete(
            hop_worker.JOBS_KEY, hop_worker.DONE_KEY, hop_worker.READY_KEY
        )
        command = [
            sys.executable,
            str(ROOT / "bench" / "hop_worker.py"),
            str(self.socket_path),
            device,
            str(threads),
            json.dumps(options),
        ]
        # The worker inherits this process's OpenMP spin setting, the runners'.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STACK_STARTUP_TIMEOUT_S
        while not self.connection.get(hop_worker.READY_KEY):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "the hop worker did not start:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.1)

    def call(self, jpeg: bytes) -> tuple[float, float, int]:
        """Return the round trip's seconds, the worker's model seconds, and boxes.

        The model seconds are counted as the runner counts them: the decode
        and ultralytics' three stage timers.
        """
        from bench import hop_worker

        started = time.perf_counter()
        self.connection.rpush(hop_worker.JOBS_KEY, jpeg)
        popped = self.connection.blpop([hop_worker.DONE_KEY], timeout=REQUEST_TIMEOUT_S)
        seconds = time.perf_counter() - started
        if popped is None:
            raise RuntimeError("the hop worker returned no result in time")
        reply = json.loads(popped[1])
        return seconds, reply["s"], reply["boxes"]

    def stop(self) -> None:
        from bench import hop_worker

        if self.process is None or self.process.poll() is not None:
            return
        self.connection.rpush(hop_worker.JOBS_KEY, hop_worker.STOP)
        try:
            self.process.wait(timeout=STACK_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def model_ms(timing: dict[str, float]) -> float:
    """Return a run's model time from its Server-Timing, decode included."""
    return sum(
        timing.get(part, 0.0) for part in ("preprocess", "inference", "postprocess")
    )


def bench_detection(
    client: KeepAliveClient,
    floor: KeepAliveClient,
    hop: HopWorker,
    api_key: str,
    jpeg: bytes,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Time hot detections over HTTP, direct predicts, the floor app and the hop.

    Each round sends the HTTP request, makes a direct call, sends the JPEG
    to the hop worker, makes another direct call, and sends the HTTP body to
    the floor application. So every request and every direct call follows
    an inference in another process, as a detection in a stream of them
    follows the previous one.
    """

    body = run_body(api_key, jpeg, detection_definition(DETECTION_MODEL))
    cold = client.post("/workflows/run", body, timeout_s=COLD_REQUEST_TIMEOUT_S)
    check_reply(cold, client.name)
    cold_entry = {
        "client_ms": round(cold.seconds * 1000, 3),
        "model_cold_start": cold.headers.get("X-Model-Cold-Start"),
        "model_load_s": cold.headers.get("X-Model-Load-Time"),
    }

    model, device, threads = load_direct_model()
    options = block_defaults()
    hop.start(device, threads, options)
    for _ in range(5):
        check_reply(client.post("/workflows/run", body), client.name)
        direct_predict(model, device, jpeg, options)
        hop.call(jpeg)
        direct_predict(model, device, jpeg, options)
        check_floor_reply(floor.post("/workflows/run", body))

    http_seconds, direct_seconds, floor_seconds = [], [], []
    timings, direct_stages, http_counts, direct_counts = [], [], set(), set()
    hop_seconds, hop_own_seconds, hop_counts = [], [], set()

    # Direct call times by the request that came just before them.
    direct_after: dict[str, list[float]] = {"glassbox": [], "hop": []}

    # Each direct call's time outside its decode and ultralytics' stage
    # timers: ultralytics' own untimed work, which every path pays.
    direct_outside: list[float] = []

    def timed_direct_call(after: str) -> None:
        started = time.perf_counter()
        boxes, stages, decode_ms = direct_predict(model, device, jpeg, options)
        seconds = time.perf_counter() - started
        direct_seconds.append(seconds)
        direct_outside.append(seconds * 1000 - decode_ms - sum(stages.values()))
        direct_after[after].append(seconds)
        direct_counts.add(len(boxes))
        direct_stages.append(stages)

    for _ in range(args.detect_requests):
        reply = client.post("/workflows/run", body)
        output = check_reply(reply, client.name)
        http_seconds.append(reply.seconds)
        http_counts.add(output["count"])
        timings.append(parse_server_timing(reply.headers.get("Server-Timing")))
        timed_direct_call("glassbox")

        seconds, own_seconds, count = hop.call(jpeg)
        hop_seconds.append(seconds)
        hop_own_seconds.append(own_seconds)
        hop_counts.add(count)
        timed_direct_call("hop")

        # Last in the round, so that no direct call follows it: a direct
        # call 2 ms after the previous one finds the model in the CPU caches.
        floor_reply = floor.post("/workflows/run", body)
        check_floor_reply(floor_reply)
        floor_seconds.append(floor_reply.seconds)

    http_summary = summarize_ms(http_seconds)
    direct_summary = summarize_ms(direct_seconds)
    floor_summary = summarize_ms(floor_seconds)
    hop_summary = summarize_ms(hop_seconds)
    allowed_ms = (TARGET_DETECTION_RATIO - 1) * direct_summary["p50_ms"]
    # Each path's time outside its decode and ultralytics' stage timers, as
    # glassbox's breakdown and the hop worker report them.
    http_outside = [
        s * 1000 - model_ms(t) for s, t in zip(http_seconds, timings, strict=True)
    ]
    hop_outside = [
        (s - own) * 1000 for s, own in zip(hop_seconds, hop_own_seconds, strict=True)
    ]
    direct_outside_ms = statistics.median(direct_outside)
    return {
        "model_id": DETECTION_MODEL,
        "image_size": IMAGE_LONG_SIDE,
        "device": device,
        "torch_threads": threads,
        "gomp_spincount": os.environ.get(SPINCOUNT_VARIABLE),
        "options": options,
        "cold_request": cold_entry,
        "http": {
            **http_summary,
            "server_timing_median_ms": median_components(timings),
            "detection_counts": sorted(http_counts),
        },
        "direct": {
            **direct_summary,
            "stage_median_ms": median_components(direct_stages),
            "after_median_ms": {
                after: round(statistics.median(samples) * 1000, 3)
                for after, samples in direct_after.items()
            },
            "outside_model_median_ms": round(direct_outside_ms, 3),
            "detection_counts": sorted(direct_counts),
        },
        "floor": floor_summary,
        "hop": {
            **hop_summary,
            "model_median_ms": round(statistics.median(hop_own_seconds) * 1000, 3),
            "outside_model_median_ms": round(statistics.median(hop_outside), 3),
            "added_median_ms": round(
                statistics.median(hop_outside) - direct_outside_ms, 3
            ),
            "detection_counts": sorted(hop_counts),
        },
        "http_outside_model_median_ms": round(statistics.median(http_outside), 3),
        # What each path adds to a direct call when its own decode and predict
        # take as long as the direct call's: the excess that the target
        # bounds, free of the process-to-process spread in predict speed.
        "http_added_median_ms": round(
            statistics.median(http_outside) - direct_outside_ms, 3
        ),
        "ratio_of_medians": round(http_summary["p50_ms"] / direct_summary["p50_ms"], 3),
        "excess_over_direct_ms": round(
            http_summary["p50_ms"] - direct_summary["p50_ms"], 3
        ),
        "target_allows_ms": round(allowed_ms, 3),
    }


def check_floor_reply(reply: Reply) -> None:
    if reply.status != 200:
        raise RuntimeError(
            f"the floor application returned HTTP {reply.status}: {reply.body[:300]!r}"
        )


# -- (c) runner memory -------------------------------------------------------


def runner_rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def model_memory(state: dict[str, Any]) -> dict[str, int]:
    return {m["model_id"]: m["memory_bytes"] for m in state.get("models", [])}


# -- (d) what precedes a request -------------------------------------------

IDLE_BEFORE_S = 0.03
PRECEDED_BY = (
    "no-model request",
    "hot detection",
    f"{IDLE_BEFORE_S * 1000:.0f} ms idle",
)


def bench_preceded_by(
    client: KeepAliveClient,
    api_key: str,
    jpeg: bytes,
    expected_height: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Time the no-model request after each kind of predecessor, in turns."""
    from tests.definitions import image_height

    no_model = run_body(api_key, jpeg, image_height())
    detection = run_body(api_key, jpeg, detection_definition(DETECTION_MODEL))
    expect = {"height": expected_height}
    latencies: dict[str, list[float]] = {name: [] for name in PRECEDED_BY}
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in PRECEDED_BY}
    for _ in range(args.detect_requests):
        for name in PRECEDED_BY:
            if name == "no-model request":
                check_reply(client.post("/workflows/run", no_model), client.name)
            elif name == "hot detection":
                check_reply(client.post("/workflows/run", detection), client.name)
            else:
                time.sleep(IDLE_BEFORE_S)
            reply = client.post("/workflows/run", no_model)
            check_reply(reply, client.name, expect)
            latencies[name].append(reply.seconds)
            timings[name].append(
                parse_server_timing(reply.headers.get("Server-Timing"))
            )
    return {
        name: {
            **summarize_ms(latencies[name]),
            "server_timing_median_ms": median_components(timings[name]),
        }
        for name in PRECEDED_BY
    }


def load_second_model(
    client: KeepAliveClient, api_key: str, jpeg: bytes, model_id: str
) -> None:
    body = run_body(api_key, jpeg, detection_definition(model_id))
    check_reply(
        client.post("/workflows/run", body, timeout_s=COLD_REQUEST_TIMEOUT_S),
        client.name,
    )
    for _ in range(5):
        check_reply(client.post("/workflows/run", body), client.name)


# -- report --------------------------------------------------------------------


def print_report(results: dict[str, Any]) -> None:
    machine = results["machine"]
    print(f"\nglassbox overhead benchmark, {results['date']}")
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{(machine['ram_bytes'] or 0) / 2**30:.1f} GiB RAM, "
        f"load average before/after: {results['load_average_before'][0]:.2f}/"
        f"{results['load_average_after'][0]:.2f}"
    )

    no_model = results["no_model"]
    print(
        f"\n(a) no-model workflow, POST /workflows/run, "
        f"{results['parameters']['requests']} requests per server"
    )
    print(f"  {'server':<26}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, entry in no_model["servers"].items():
        print(
            f"  {name:<26}{entry['p50_ms']:>9.2f}{entry['p90_ms']:>9.2f}"
            f"{entry['p99_ms']:>9.2f}{entry['max_ms']:>9.2f}"
        )
    ours = no_model["servers"]["glassbox"]
    print(
        "  glassbox Server-Timing medians (ms): "
        + ", ".join(
            f"{k} {v:.2f}"
            for k, v in ours.get("server_timing_median_ms", {}).items()
            if v > 0 or k == "total"
        )
    )
    cpu = no_model["cpu_ms_per_request"]
    print(
        "  CPU time per request by process (ms): "
        + ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items())
    )
    for check in no_model["checks"]:
        print(f"  {check}")

    detection = results["detection"]
    print(
        f"\n(b) hot {detection['model_id']} at {detection['image_size']} px, "
        f"{detection['device']}, {detection['torch_threads']} torch threads, "
        f"GOMP_SPINCOUNT {detection['gomp_spincount']}"
    )
    print(f"  {'path':<26}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    rows = (
        ("HTTP (glassbox)", "http"),
        ("direct predict", "direct"),
        ("HTTP (floor application)", "floor"),
        ("hop worker (Redis only)", "hop"),
    )
    for label, key in rows:
        if key not in detection:
            continue
        entry = detection[key]
        print(
            f"  {label:<26}{entry['p50_ms']:>9.2f}{entry['p90_ms']:>9.2f}"
            f"{entry['p99_ms']:>9.2f}"
        )
    print(
        f"  ratio of medians HTTP/direct: {detection['ratio_of_medians']:.3f} "
        f"(target <= {TARGET_DETECTION_RATIO:.2f})"
    )
    print(
        f"  HTTP p50 - direct p50: {detection['excess_over_direct_ms']:.2f} ms; "
        f"the target allows {detection['target_allows_ms']:.2f} ms, "
        f"the floor application's p50 is {detection['floor']['p50_ms']:.2f} ms"
    )
    if "hop" in detection:
        hop = detection["hop"]
        print(
            "  outside the decode and ultralytics' stage timers, medians per "
            f"request: glassbox {detection['http_outside_model_median_ms']:.2f} ms, "
            f"hop worker {hop['outside_model_median_ms']:.2f} ms (inside: "
            f"{hop['model_median_ms']:.2f} ms), direct call "
            f"{detection['direct']['outside_model_median_ms']:.2f} ms"
        )
        print(
            "  added to a direct call (outside minus the direct call's outside): "
            f"glassbox {detection['http_added_median_ms']:.2f} ms, hop worker "
            f"{hop['added_median_ms']:.2f} ms; floor application plus hop "
            f"{detection['floor']['p50_ms'] + hop['added_median_ms']:.2f} ms, "
            f"the target allows {detection['target_allows_ms']:.2f} ms"
        )
    print(
        "  glassbox Server-Timing medians (ms): "
        + ", ".join(
            f"{k} {v:.2f}"
            for k, v in detection["http"]["server_timing_median_ms"].items()
            if v > 0 or k == "total"
        )
    )
    print(
        "  direct predict stage medians (ms, ultralytics' own timing): "
        + ", ".join(
            f"{k} {v:.2f}" for k, v in detection["direct"]["stage_median_ms"].items()
        )
    )
    cold = detection["cold_request"]
    print(
        f"  first (cold) request: {cold['client_ms']:.0f} ms, "
        f"model load {cold['model_load_s']} s"
    )

    memory = results["memory"]
    print("\n(c) runner RSS")
    rows = (
        ("no model", "rss_no_model_bytes"),
        (f"1 model ({DETECTION_MODEL})", "rss_one_model_bytes"),
        (f"2 models (+ {memory['second_model']})", "rss_two_models_bytes"),
    )
    for label, key in rows:
        print(f"  {label:<36}{memory[key] / 2**20:>9.1f} MiB")

    print("\n(d) no-model request by what came just before it")
    print(f"  {'preceded by':<26}{'p50 ms':>9}   Server-Timing medians (ms)")
    for name, entry in results["preceded_by"].items():
        components = entry["server_timing_median_ms"]
        parts = ", ".join(
            f"{k} {components[k]:.2f}"
            for k in ("request", "queue", "overhead", "handoff", "total")
        )
        print(f"  {name:<26}{entry['p50_ms']:>9.2f}   {parts}")


def target_checks(no_model: dict[str, Any]) -> list[str]:
    ours = no_model["glassbox"]
    checks = [
        f"glassbox p50 {ours['p50_ms']:.2f} ms vs aim {TARGET_NO_MODEL_P50_MS:.0f} ms: "
        + ("met" if ours["p50_ms"] <= TARGET_NO_MODEL_P50_MS else "missed"),
        f"glassbox p99 {ours['p99_ms']:.2f} ms vs target "
        f"{TARGET_NO_MODEL_P99_MS:.0f} ms: "
        + ("met" if ours["p99_ms"] <= TARGET_NO_MODEL_P99_MS else "missed"),
    ]
    peer = no_model.get("inference")
    if peer:
        ratio = ours["p50_ms"] / peer["p50_ms"]
        checks.append(
            f"glassbox p50 / inference p50 = {ratio:.2f} (target <= 1.00): "
            + ("met" if ratio <= 1.0 else "missed")
        )
    return checks


# -- main --------------------------------------------------------------------


def run(args: argparse.Namespace, data_dir: Path, peer_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": package_versions(),
        "git": git_revision(),
        "load_average_before": os.getloadavg(),
        "parameters": {
            "requests": args.requests,
            "round_size": args.round_size,
            "warmup": args.warmup,
            "detect_requests": args.detect_requests,
            "image_long_side": IMAGE_LONG_SIDE,
            "jpeg_quality": JPEG_QUALITY,
            "warmup_image_size_env": IMAGE_LONG_SIDE,
        },
    }
    jpeg, width, height = benchmark_jpeg()
    results["parameters"]["image"] = {
        "width": width,
        "height": height,
        "jpeg_bytes": len(jpeg),
    }

    data_dir.mkdir(parents=True)
    stack = glassbox_stack(data_dir, free_port(with_next=True))
    peer_process = None
    clients: list[KeepAliveClient] = []
    try:
        stack.start()
        setup_django(data_dir)
        api_key = issue_api_key()
        runner = runner_state()
        results["memory"] = {
            "runner_pid": runner["pid"],
            "rss_at_start_bytes": runner_rss_bytes(runner["pid"]),
        }

        ours = KeepAliveClient("glassbox", stack.port)
        clients.append(ours)
        python = None if args.no_peer else peer_python()
        if python is not None:
            peer_port = free_port()
            peer_process = start_peer(python, peer_port, peer_dir)
            clients.append(KeepAliveClient("inference", peer_port))
            results["versions"]["inference (peer)"] = _peer_version(python)
        else:
            logger.warning(
                "Roboflow's inference server was not found or was "
                "skipped; measuring glassbox alone"
            )

        from tests.definitions import image_height

        body = run_body(api_key, jpeg, image_height())
        warm_up(clients, body, height, args.warmup)
        roles = stack_processes(stack)
        if peer_process is not None:
            roles["inference"] = [psutil.Process(peer_process.pid)]
        cpu_before = cpu_seconds(roles)
        servers = bench_no_model(clients, body, height, args)
        cpu_after = cpu_seconds(roles)
        results["no_model"] = {
            "servers": servers,
            "checks": target_checks(servers),
            # Idle work (heartbeats) is included, so this slightly overstates
            # the CPU time that requests take. "inference" is the peer.
            "cpu_ms_per_request": {
                role: round(
                    (cpu_after[role] - cpu_before[role]) * 1000 / args.requests, 3
                )
                for role in roles
            },
        }
        if "inference" in servers:
            results["no_model"]["p50_ratio_glassbox_to_inference"] = round(
                servers["glassbox"]["p50_ms"] / servers["inference"]["p50_ms"], 3
            )
        if peer_process is not None:
            results["no_model"]["peer_rss_bytes"] = (
                psutil.Process(peer_process.pid).memory_info().rss
            )
            stop_peer(peer_process)
            peer_process = None
        # Measured after the no-model runs, so the figure includes what the
        # runner allocates for serving runs, and only the models differ later.
        results["memory"]["rss_no_model_bytes"] = runner_rss_bytes(runner["pid"])

        floor_server = FloorServer(free_port(), data_dir / "floor.log")
        floor_server.start()
        floor = KeepAliveClient("floor", floor_server.port)
        clients.append(floor)
        hop = HopWorker(data_dir / "redis.sock", data_dir / "hop.log")
        try:
            results["detection"] = bench_detection(
                ours, floor, hop, api_key, jpeg, args
            )
        finally:
            hop.stop()
            floor_server.stop()
        state = runner_state(frozenset({DETECTION_MODEL}))
        results["memory"]["rss_one_model_bytes"] = runner_rss_bytes(runner["pid"])
        results["memory"]["model_memory_bytes"] = model_memory(state)

        results["preceded_by"] = bench_preceded_by(ours, api_key, jpeg, height, args)
        load_second_model(ours, api_key, jpeg, args.second_model)
        state = runner_state(frozenset({DETECTION_MODEL, args.second_model}))
        results["memory"]["second_model"] = args.second_model
        results["memory"]["rss_two_models_bytes"] = runner_rss_bytes(runner["pid"])
        results["memory"]["model_memory_bytes"] = model_memory(state)
        results["load_average_after"] = os.getloadavg()
    except Exception:
        logger.error("benchmark failed; logs of the stack:\n%s", stack.log_tail())
        raise
    finally:
        for client in clients:
            client.close()
        if peer_process is not None:
            stop_peer(peer_process)
        stack.stop()
    return results


def _peer_version(python: str) -> str:
    completed = subprocess.run(
        [
            python,
            "-c",
            "from importlib.metadata import version; print(version('inference'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return completed.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The runner's OpenMP spin setting, for the direct calls in (b), before
    # anything loads torch. With libgomp's default, this process's idle
    # threads would spin for about 8 ms after each direct call, into the
    # HTTP request that follows.
    if apply_spin_default() is None:
        raise RuntimeError("torch was imported before the OpenMP setting")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # Turn SIGTERM into an exception, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="glassbox-overhead-"))
    try:
        results = run(args, scratch / "data", scratch / "peer")
    finally:
        if args.keep_data:
            logger.info("kept the data directory %s", scratch)
        else:
            _remove_tree(scratch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_report(results)
    print(f"\nresults written to {args.out}")
    return 0


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
