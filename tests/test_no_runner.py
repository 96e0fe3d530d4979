"""With no runner up, a synchronous run is refused before anything is stored."""

import json
import os
import signal
import subprocess
import sys
import time

import redis

from runner.dispatch import no_runner_error
from runner.models import Run
from tests.conftest import ROOT, image_bytes, private_data_env
from tests.definitions import image_height


def test_cli_run_without_runner_stores_nothing(transactional_db, tmp_path):
    definition = tmp_path / "height.json"
    definition.write_text(json.dumps(image_height()))
    image = tmp_path / "bus.jpg"
    image.write_bytes(image_bytes())
    env = private_data_env(tmp_path / "data")
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "runworkflow",
            str(definition),
            "--image",
            str(image),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    redis_pid = tmp_path / "data" / "redis.pid"
    left_running = redis_pid.exists() and pid_alive(int(redis_pid.read_text()))
    if left_running:
        os.kill(int(redis_pid.read_text()), signal.SIGTERM)

    assert result.returncode != 0
    assert '"code": "no_runner"' in result.stderr
    assert "python manage.py runner" in result.stderr
    # runworkflow has no asynchronous mode, so the hint offers it no queueing.
    assert "asynchronously" not in result.stderr
    assert "--wait-for-runner" in result.stderr
    assert Run.objects.count() == 0
    # The command started the embedded Redis to look for runners. With none
    # found, it stops the server again instead of leaving it behind.
    assert "stopped embedded Redis" in result.stderr
    assert not left_running


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_no_runner_hint_offers_async_on_own_routes():
    assert "asynchronously" in no_runner_error("api").hint


def test_no_runner_hint_roboflow_routes():
    hint = no_runner_error("roboflow").hint
    assert hint == "Start one with 'python manage.py runner'."


def test_no_runner_hint_on_command_line_offers_wait():
    hint = no_runner_error("cli").hint
    assert "asynchronously" not in hint
    assert "--wait-for-runner SECONDS" in hint


def command_files(tmp_path):
    """Write a definition and an image for runworkflow; return them with an
    environment whose data directory is ``tmp_path / "data"``."""
    definition = tmp_path / "height.json"
    definition.write_text(json.dumps(image_height()))
    image = tmp_path / "bus.jpg"
    image.write_bytes(image_bytes())
    return definition, image, private_data_env(tmp_path / "data")


def start_waiting_command(definition, image, env, wait_s: float):
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "runworkflow",
            str(definition),
            "--image",
            str(image),
            "--wait-for-runner",
            str(wait_s),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_connected(socket_path, pid: int, timeout_s: float = 60) -> None:
    """Wait until process ``pid`` has a connection open to the embedded Redis."""
    probe = redis.Redis(unix_socket_path=str(socket_path))
    deadline = time.monotonic() + timeout_s
    try:
        while not any(
            client["name"].endswith(f":{pid}") for client in probe.client_list()
        ):
            assert time.monotonic() < deadline, f"process {pid} never connected"
            time.sleep(0.05)
    finally:
        # An open connection would count as another client of the server.
        probe.close()


def test_overlapping_cli_runs_stop_redis(transactional_db, tmp_path):
    # The first command starts the embedded Redis and ends while the second,
    # which found it running, still waits. The second, ending last, stops it.
    definition, image, env = command_files(tmp_path)
    redis_pid = tmp_path / "data" / "redis.pid"

    # The first waits long enough for the second to start up and connect on
    # a loaded machine. The second waits as long, so it ends after the first.
    first = start_waiting_command(definition, image, env, 10)
    assert "started embedded Redis" in first.stderr.readline()
    second = start_waiting_command(definition, image, env, 10)
    wait_until_connected(tmp_path / "data" / "redis.sock", second.pid)
    second_connected_before_first_ended = first.poll() is None
    _, first_errors = first.communicate(timeout=120)
    second_alive_after_first = second.poll() is None
    _, second_errors = second.communicate(timeout=120)
    left_running = redis_pid.exists() and pid_alive(int(redis_pid.read_text()))
    if left_running:
        os.kill(int(redis_pid.read_text()), signal.SIGTERM)

    assert "no runner came up" in first_errors
    assert "no runner came up" in second_errors
    assert second_connected_before_first_ended, "the commands must overlap"
    assert second_alive_after_first, "the commands must overlap"
    assert "stopped embedded Redis" not in first_errors
    assert "stopped embedded Redis" in second_errors
    assert not left_running


def test_cli_runs_ending_together_stop_redis(transactional_db, tmp_path):
    # Three commands that start and end at about the same time: one starts
    # the server, and whichever ends last, with no other still connected,
    # stops it.
    definition, image, env = command_files(tmp_path)
    redis_pid = tmp_path / "data" / "redis.pid"

    commands = [start_waiting_command(definition, image, env, 3) for _ in range(3)]
    errors = [command.communicate(timeout=120)[1] for command in commands]
    left_running = redis_pid.exists() and pid_alive(int(redis_pid.read_text()))
    if left_running:
        os.kill(int(redis_pid.read_text()), signal.SIGTERM)

    for text in errors:
        assert "no runner came up" in text
    assert sum("started embedded Redis" in text for text in errors) == 1
    assert sum("stopped embedded Redis" in text for text in errors) == 1
    assert not left_running
