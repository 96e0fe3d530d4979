"""``manage.py up``: starts the whole stack, and SIGTERM stops all of it."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.conftest import ROOT

STARTUP_TIMEOUT_S = 180


def free_port_pair() -> int:
    """Return a port that is free together with the one after it."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports found")


class LoadingRedis:
    """A Redis client whose server is loading its dataset for a few PINGs."""

    def __init__(self, loading_pings: int):
        self.loading_pings = loading_pings

    def ping(self) -> bool:
        if self.loading_pings > 0:
            self.loading_pings -= 1
            raise redis.BusyLoadingError("Redis is loading the dataset in memory")
        return True


def test_up_waits_for_redis_loading(monkeypatch):
    from runner.management.commands import up

    client = LoadingRedis(loading_pings=3)
    monkeypatch.setattr(up, "get_redis", lambda: client)
    up.wait_for_redis(timeout_s=10)
    assert client.loading_pings == 0

    monkeypatch.setattr(up, "get_redis", lambda: LoadingRedis(loading_pings=10**6))
    with pytest.raises(CommandError, match="still loading its dataset"):
        up.wait_for_redis(timeout_s=0.2)


def test_up_waits_for_embedded_redis_past_start_timeout(
    monkeypatch, settings, tmp_path
):
    # get_redis() alone gives a loading embedded server START_TIMEOUT_S, so
    # up must wait with its own, longer timeout before calling it.
    from runner.management.commands import up
    from tests.test_redis_outage import serve_loading_redis
    from webapp import redis as webapp_redis

    socket_path = tmp_path / "redis.sock"
    settings.REDIS_URL = ""
    settings.EMBEDDED_REDIS_SOCKET = socket_path
    settings.EFFECTIVE_REDIS_URL = f"unix://{socket_path}"
    monkeypatch.setattr(webapp_redis, "_connection", None)
    monkeypatch.setattr(webapp_redis, "START_TIMEOUT_S", 0.2)
    listener = serve_loading_redis(socket_path, time.monotonic() + 1.0)
    try:
        up.wait_for_redis(timeout_s=10)
    finally:
        listener.close()

    listener = serve_loading_redis(tmp_path / "still.sock", time.monotonic() + 10**6)
    settings.EMBEDDED_REDIS_SOCKET = tmp_path / "still.sock"
    try:
        with pytest.raises(CommandError, match="still loading its data"):
            up.wait_for_redis(timeout_s=0.5)
    finally:
        listener.close()


def test_runner_names_on_shared_redis(settings, monkeypatch):
    from runner.management.commands import up

    monkeypatch.setattr(up.socket, "gethostname", lambda: "gpu-box-2")
    # Two machines' `up` on one Redis must not both name a runner runner-1,
    # because the second one would exit at start-up and `up` would keep
    # restarting it.
    settings.REDIS_URL = "redis://redis-host:6379/0"
    assert up.runner_name(1) == "gpu-box-2-runner-1"
    assert up.runner_name(2) == "gpu-box-2-runner-2"

    settings.REDIS_URL = ""
    assert up.runner_name(1) == "runner-1"


def test_up_rejects_long_host_name(settings, monkeypatch):
    from runner.management.commands import up

    # With REDIS_URL, the host name prefixes the runners' names.
    monkeypatch.setattr(up.socket, "gethostname", lambda: "h" * 181)
    settings.REDIS_URL = "redis://redis-host:6379/0"
    with pytest.raises(CommandError, match="the host name makes runner names of up"):
        call_command("up", "--runners", "10")


def test_up_rejects_runner_names_in_use(settings, monkeypatch):
    from runner.management.commands import up
    from tests.conftest import registered_runner

    # Another `up` on a host of the same name already runs this host's
    # runner-1 on the shared Redis. Its runner would exit at every start.
    monkeypatch.setattr(up.socket, "gethostname", lambda: "same-host")
    settings.REDIS_URL = "redis://redis-host:6379/0"
    with registered_runner("same-host-runner-1"):
        with pytest.raises(CommandError, match="--runner-prefix"):
            up.check_runner_names_free([up.runner_name(1)])
        up.check_runner_names_free([up.runner_name(1, "second-stack")])
    assert up.runner_name(1, "second-stack") == "second-stack-runner-1"


def up_environment(data_dir: Path) -> dict[str, str]:
    """Return this environment, set for up on the embedded defaults in ``data_dir``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")
    }
    env["GLASSBOX_DATA_DIR"] = str(data_dir)
    return env


def start_up(data_dir: Path, port: int) -> tuple[subprocess.Popen, Path]:
    """Start `manage.py up` on ``port`` with the embedded defaults in ``data_dir``.

    Returns the process and the file its output goes to.
    """
    log_path = data_dir / "up-output.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "manage.py", "up", "--port", str(port)],
            cwd=ROOT,
            env=up_environment(data_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return up, log_path


def wait_until_up(up: subprocess.Popen, log_path: Path) -> None:
    """Wait until ``up`` prints that every process it started is serving."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while b"Up. Press Ctrl-C" not in log_path.read_bytes():
        assert up.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)


def test_up_serves_then_stops_every_process(tmp_path):
    port = free_port_pair()
    up, log_path = start_up(tmp_path, port)
    try:
        wait_until_up(up, log_path)
        children = psutil.Process(up.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert any("gunicorn" in command for command in commands)
        assert any("webapp.websocket_server" in command for command in commands)
        assert any("manage.py runner" in command for command in commands)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info") as reply:
            assert reply.status == 200
        redis_pid = int((tmp_path / "redis.pid").read_text())
        send_key_in_request_lines(port)
        check_websocket_port_serves_only_websockets(port)

        second = subprocess.run(
            [sys.executable, "manage.py", "up", "--port", str(free_port_pair())],
            cwd=ROOT,
            env=up_environment(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert f"another 'manage.py up' (pid {up.pid})" in second.stderr
        assert psutil.pid_exists(redis_pid)

        kill_runner_until_paused(up, log_path)
        assert up.poll() is None, log_path.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info") as reply:
            assert reply.status == 200
        children = psutil.Process(up.pid).children(recursive=True)

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        assert not psutil.pid_exists(redis_pid)
        socket_path = str(tmp_path / "redis.sock")
        try:
            redis.Redis(unix_socket_path=socket_path, socket_timeout=2).ping()
            answered = True
        except redis.ConnectionError:
            answered = False
        assert not answered
        assert b"stopped embedded Redis on" in log_path.read_bytes()
        assert b"stopped the embedded Redis server" not in log_path.read_bytes()

        logs = {path.name: path.read_text() for path in (tmp_path / "logs").iterdir()}
        # The part after the prefix, which the encoded form shares.
        secret = LEAK_CHECK_KEY.removeprefix("gbx_")
        assert all(secret not in text for text in logs.values())
        # The requests were logged, without their keys.
        assert "GET /info?api_key=[redacted]" in logs["websockets.log"]
        assert "api_key=[redacted]" in logs["web.log"]
    finally:
        if up.poll() is None:
            # up starts each child in a session of its own, so killing up's
            # process group would leave them running.
            for child in psutil.Process(up.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            os.killpg(up.pid, signal.SIGKILL)
        stop_leftover_redis(tmp_path)


def test_up_children_stop_when_up_is_killed(tmp_path):
    # SIGKILL gives up no chance to stop its children, which run in
    # sessions of their own. They must stop anyway, and free the port.
    port = free_port_pair()
    up, log_path = start_up(tmp_path, port)
    children = []
    try:
        wait_until_up(up, log_path)
        children = psutil.Process(up.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert any("gunicorn" in command for command in commands)
        assert any("manage.py runner" in command for command in commands)

        up.kill()
        up.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=60)
        assert [" ".join(process.cmdline()) for process in alive] == []
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=5)
    finally:
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if up.poll() is None:
            up.kill()
        stop_leftover_redis(tmp_path)


LEAK_CHECK_KEY = "gbx_leakcheck0123456789"


def send_key_in_request_lines(port: int) -> None:
    """Send an API key to both servers of the stack, wherever it can reach a log.

    Both servers get it in query strings, plain and percent-encoded, and in a
    path. The web server also gets it in a malformed request line (two
    spaces), which gunicorn quotes in a warning.
    """
    import socket

    query = f"/info?api_key={LEAK_CHECK_KEY}"
    # Django decodes percent-escapes, so this sends the same key.
    encoded = "/info?api%5Fkey=" + LEAK_CHECK_KEY.replace("_", "%5F")
    # No such key exists, so the web server rejects it, and the websocket
    # server serves no HTTP route at all.
    for server, status in ((port, 401), (port + 1, 404)):
        for path in (query, encoded):
            with pytest.raises(urllib.error.HTTPError) as rejected:
                urllib.request.urlopen(f"http://127.0.0.1:{server}{path}")
            assert rejected.value.code == status
        # A key in the path reaches the access logs, whose format leaves
        # out only the query string.
        with pytest.raises(urllib.error.HTTPError) as rejected:
            urllib.request.urlopen(
                f"http://127.0.0.1:{server}/api/runs/{LEAK_CHECK_KEY}"
            )
        assert rejected.value.code in (401, 404)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(f"GET  {query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert connection.recv(100).startswith(b"HTTP/1.1 400")
    # Django logs a disallowed Host header with a traceback that quotes it.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            f"GET /info HTTP/1.1\r\nHost: {LEAK_CHECK_KEY}\r\n\r\n".encode()
        )
        assert connection.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", port + 1), timeout=10) as connection:
        connection.sendall(
            f"GET /info HTTP/1.1\r\nHost: {LEAK_CHECK_KEY}\r\n\r\n".encode()
        )
        assert connection.recv(100).startswith(b"HTTP/1.1 404")


def check_websocket_port_serves_only_websockets(port: int) -> None:
    """The websocket server responds 404 to HTTP, and reads no request body.

    An upload to it would otherwise be read whole, up to MAX_UPLOAD_BYTES,
    before any check of who sent it.
    """
    import json
    import socket

    with pytest.raises(urllib.error.HTTPError) as rejected:
        urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/api/fleet")
    body = json.loads(rejected.value.read())
    assert rejected.value.code == 404
    assert body["code"] == "not_found"
    assert f"Send HTTP requests to port {port}" in body["hint"]

    with socket.create_connection(("127.0.0.1", port + 1), timeout=10) as connection:
        # A declared 100 MB upload, of which only one byte is sent: the
        # 404 comes without waiting for the rest.
        connection.sendall(
            b"POST /api/models/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000000\r\n\r\n-"
        )
        reply = connection.recv(1000)
        assert reply.startswith(b"HTTP/1.1 404")
        assert b"/api/models/ is not served on this port" in reply

    # The websocket route is still served there: a handshake from a page of
    # the web server, without a session, is refused by the run-event
    # consumer rather than given the 404 above.
    with socket.create_connection(("127.0.0.1", port + 1), timeout=10) as connection:
        connection.sendall(
            b"GET /ws/runs/00000000-0000-0000-0000-000000000000/ HTTP/1.1\r\n"
            b"Host: 127.0.0.1:%d\r\nOrigin: http://127.0.0.1:%d\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" % (port + 1, port)
        )
        assert connection.recv(100).startswith(b"HTTP/1.1 403")


def kill_runner_until_paused(up: subprocess.Popen, log_path) -> None:
    """SIGKILL runner-1 each time ``up`` starts it, until ``up`` stops restarting it."""
    deadline = time.monotonic() + 90
    while b"the rest of the stack stays up" not in log_path.read_bytes():
        assert time.monotonic() < deadline, log_path.read_text()
        for child in psutil.Process(up.pid).children():
            try:
                if "runner-1" in child.cmdline():
                    child.kill()
            except psutil.Error:
                # Exited, or not yet reaped by up, since the listing.
                continue
        time.sleep(0.2)


def stop_leftover_redis(data_dir) -> None:
    """Stop the embedded Redis of ``data_dir`` if a failed test left it running."""
    try:
        process = psutil.Process(int((data_dir / "redis.pid").read_text()))
        if str(data_dir) in " ".join(process.cmdline()):
            process.terminate()
    except (OSError, ValueError, psutil.Error):
        pass


def run_demo(data_dir, *, keep_model_dir: bool) -> subprocess.CompletedProcess:
    """Run ``manage.py up --demo`` on ``data_dir`` until the demo ends."""
    dropped = ["DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"]
    if not keep_model_dir:
        # MODEL_DIR then defaults to models/ in the data directory, empty.
        dropped.append("MODEL_DIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["GLASSBOX_DATA_DIR"] = str(data_dir)
    command = [sys.executable, "manage.py", "up", "--demo", "--exit-after-demo"]
    try:
        return subprocess.run(
            [*command, "--port", str(free_port_pair())],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_S,
        )
    finally:
        stop_leftover_redis(data_dir)


def test_demo_without_weights_names_the_missing_model(tmp_path):
    finished = run_demo(tmp_path, keep_model_dir=False)
    assert finished.returncode != 0
    assert "the demo run was rejected (model_not_found)" in finished.stderr
    assert "people-detector" in finished.stderr
    assert "run None" not in finished.stdout
    # The API's message names no server path: the command adds where the
    # weights go and how to install them.
    assert f"The model directory is {tmp_path.resolve() / 'models'}." in finished.stderr
    assert "manage.py fetch_models" in finished.stderr


def test_demo_finds_people_in_bus_cold_then_hot(tmp_path):
    # The demo that setup.sh runs, on the pretrained weights the tests use.
    finished = run_demo(tmp_path, keep_model_dir=True)
    assert finished.returncode == 0, finished.stderr
    out = finished.stdout
    first = out.index("== first run (cold): run ")
    second = out.index("== second run (hot): run ")
    assert first < second
    # The detector finds at least three of the people standing by the bus,
    # the same in both runs.
    counts = [
        int(line.split(": ")[1])
        for line in out.splitlines()
        if line.startswith("people found: ")
    ]
    assert len(counts) == 2
    assert counts[0] == counts[1] >= 3
    assert out.count("Normal") >= 6
    assert "amount_microcredits = ceil(" in out
    assert f"{tmp_path / 'demo-token'}" in out


def test_demo_key_kept_across_restarts(alice, settings, tmp_path):
    from runner.management.commands.up import _demo_key
    from webapp.authentication import authenticate_key
    from webapp.models import ApiToken, hash_token

    settings.DATA_DIR = tmp_path
    first = _demo_key(alice)
    assert _demo_key(alice) == first
    # Checking the key on a restart is no use of it.
    token = ApiToken.objects.get(key_hash=hash_token(first))
    assert token.last_used_at is None
    assert authenticate_key(first) is not None
    assert (tmp_path / "demo-token").read_text().strip() == first


def test_demo_key_replaced_once_revoked(alice, settings, tmp_path):
    from runner.management.commands.up import _demo_key
    from webapp.authentication import authenticate_key

    settings.DATA_DIR = tmp_path
    first = _demo_key(alice)
    authenticate_key(first).revoke()
    second = _demo_key(alice)
    assert second != first
    assert authenticate_key(second) is not None
    assert (tmp_path / "demo-token").read_text().strip() == second


def test_demo_workflow_recreated_after_delete(alice):
    from runner.management.commands.up import _demo_workflow

    first = _demo_workflow(alice)
    assert first.slug == "people-count"
    assert _demo_workflow(alice) == first
    first.mark_deleted()
    # The deleted workflow keeps its slug, so the demo takes the next one.
    second = _demo_workflow(alice)
    assert second.slug == "people-count-2"
    assert second.latest_version() is not None
    assert _demo_workflow(alice) == second


def test_up_waits_for_its_own_runners(live_server):
    from runner.management.commands import up
    from tests.conftest import registered_runner

    command = up.Command()
    command.children = {}
    # Another machine's runner is live, and this up's own is not yet.
    with registered_runner("other-machine-runner-1"):
        with pytest.raises(CommandError, match="not up after"):
            command._wait_until_up(live_server.url, 1, timeout_s=0.5)
    with registered_runner(up.runner_name(1)):
        command._wait_until_up(live_server.url, 1, timeout_s=5)
