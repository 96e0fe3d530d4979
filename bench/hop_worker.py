"""A second process that only predicts, for the floor of (b) in overhead.py.

It takes JPEG bytes from a Redis list, decodes them and predicts exactly as
the benchmark's direct calls do. Then it pushes back the box count and its
model time, counted as a runner's breakdown counts it: the decode and
ultralytics' preprocess, inference and postprocess timers. Nothing else
happens on the way: no HTTP, database, authentication, plan, breakdown or
bill. So a round trip through it, minus its model time, is what it costs to
hand a job to another process over Redis and get the result back. That
includes ultralytics' own work around its timed stages. It is the least
that any design with a separate runner process pays.

Usage: python bench/hop_worker.py REDIS_SOCKET DEVICE THREADS OPTIONS_JSON
"""

import json
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.overhead import direct_predict, load_model  # noqa: E402

JOBS_KEY = "bench:hop:jobs"
DONE_KEY = "bench:hop:done"
READY_KEY = "bench:hop:ready"
# Pushed instead of JPEG bytes to end the loop.
STOP = b"stop"


def main(socket_path: str, device: str, threads: int, options: dict) -> None:
    connection = redis.Redis(unix_socket_path=socket_path)
    model = load_model(device, threads)
    connection.set(READY_KEY, "1")
    while True:
        _, jpeg = connection.blpop([JOBS_KEY])
        if jpeg == STOP:
            return
        boxes, stages, decode_ms = direct_predict(model, device, jpeg, options)
        seconds = (decode_ms + sum(stages.values())) / 1000
        connection.rpush(DONE_KEY, json.dumps({"boxes": len(boxes), "s": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
