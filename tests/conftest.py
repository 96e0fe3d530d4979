"""Shared fixtures: named users, real runner processes, sample images.

Runner processes are real ``manage.py runner`` processes on the test
database and the test run's embedded Redis.  Tests that need them use the
``runner`` fixture (and so ``transactional_db``: the runners are other
processes and must see committed rows).
"""

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, connections

from runner import fleet
from webapp import login_throttle
from webapp.models import ApiToken
from webapp.redis import get_redis

ROOT = Path(__file__).resolve().parent.parent


def image_path(name: str = "bus.jpg") -> Path:
    from ultralytics import ASSETS as assets_dir

    return Path(assets_dir) / name


def image_bytes(name: str = "bus.jpg") -> bytes:
    return image_path(name).read_bytes()


def image_b64(name: str = "bus.jpg") -> str:
    return base64.b64encode(image_bytes(name)).decode()


def start_cli_run(owner, definition: dict, *, wait_s: float, runner: str | None = None):
    """Start a run of ``definition`` on bus.jpg as the command line does.

    ``runner`` pins it to that runner's own queue instead of routing it.
    """
    from runner.service import start_run

    return start_run(
        owner_id=owner.id,
        source="cli",
        definition=definition,
        raw_inputs={},
        uploads={"image": image_bytes()},
        started_ns=time.perf_counter_ns(),
        wait_s=wait_s,
        runner=runner,
    )


def wait_until_serving(url: str, process: subprocess.Popen, failure: str) -> None:
    """Wait until ``url``/info answers; raise RuntimeError(failure) if it never does."""
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/info", timeout=1)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(failure) from None
            time.sleep(0.2)


def private_data_env(data_dir: Path) -> dict[str, str]:
    """Return the environment of a subprocess with a data directory of its own.

    The subprocess uses the test database and starts a fresh embedded Redis
    that no runner uses.
    """
    env = os.environ.copy()
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["GLASSBOX_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    env["GLASSBOX_DATA_DIR"] = str(data_dir)
    env.pop("REDIS_URL", None)
    return env


# Runs manage.py with time.time and time.time_ns moved by the offset in its
# first argument, as on a machine whose clock is that many seconds ahead.
OFFSET_CLOCK_MAIN = """
import runpy, sys, time
offset_ns = int(float(sys.argv.pop(1)) * 1e9)
local_time_ns = time.time_ns
time.time_ns = lambda: local_time_ns() + offset_ns
time.time = lambda: time.time_ns() / 1e9
sys.argv[0] = "manage.py"
runpy.run_path("manage.py", run_name="__main__")
"""


class RunnerProcess:
    def __init__(
        self,
        name: str,
        budget_mb: int = 4096,
        clock_offset_s: float = 0.0,
        env_overrides: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        env = {**os.environ, **(env_overrides or {})}
        env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        env["GLASSBOX_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
        self.log_path = Path(settings.DATA_DIR) / f"{name}.log"
        self.log = open(self.log_path, "ab")
        main = ["-c", OFFSET_CLOCK_MAIN, str(clock_offset_s)]
        self.process = subprocess.Popen(
            [
                sys.executable,
                *(main if clock_offset_s else ["manage.py"]),
                "runner",
                "--name",
                name,
                "--memory-budget-mb",
                str(budget_mb),
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_until_live()

    def wait_until_live(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(state.name == self.name for state in fleet.live_runners()):
                return
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"runner {self.name} exited: {self.log_path.read_text()[-3000:]}"
                )
            time.sleep(0.1)
        raise RuntimeError(f"runner {self.name} sent no heartbeat in {timeout_s} s")

    def state(self) -> dict | None:
        for state in fleet.live_runners():
            if state.name == self.name:
                return state.data
        return None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture(scope="session")
def runner_factory(django_db_setup, django_db_blocker):
    started: list[RunnerProcess] = []

    def start(
        name: str,
        budget_mb: int = 4096,
        clock_offset_s: float = 0.0,
        env_overrides: dict[str, str] | None = None,
    ) -> RunnerProcess:
        with django_db_blocker.unblock():
            process = RunnerProcess(name, budget_mb, clock_offset_s, env_overrides)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's test database, with every other session ended before the drop.

    DROP DATABASE fails while another session uses the database. The
    fixtures that start runners and servers stop them first, because they
    depend on this one.
    """
    yield
    with django_db_blocker.unblock():
        close_shared_sync_thread_connections()
        wait_for_other_sessions_to_close()


def close_shared_sync_thread_connections() -> None:
    """Close the database connections of asgiref's shared sync_to_async thread.

    Async tests call the ORM through ``sync_to_async``, which runs it in one
    thread kept for the whole process. Django closes a connection at the end
    of a request (or in ``database_sync_to_async``), and neither happens
    there, so the thread's connection stays open until the process exits.
    """
    asyncio.run(sync_to_async(connections.close_all)())


def wait_for_other_sessions_to_close(timeout_s: float = 10) -> None:
    """Wait until PostgreSQL has ended the sessions of stopped processes.

    The server ends a session shortly after its process exits, and dropping
    the test database while one remains fails. Warn with the sessions still
    open after ``timeout_s``.
    """
    if connection.vendor != "postgresql":
        return
    deadline = time.monotonic() + timeout_s
    with connection.cursor() as cursor:
        while True:
            cursor.execute(
                "SELECT pid, application_name, client_port, state, query "
                "FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            sessions = cursor.fetchall()
            if not sessions:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    listed = "\n".join(
        f"backend {pid}, application {name!r}, client port {port}, {state}: "
        f"{query[:200]}"
        for pid, name, port, state, query in sessions
    )
    warnings.warn(
        f"{len(sessions)} other sessions still use the test database after "
        f"{timeout_s} s, so it cannot be dropped:\n{listed}",
        stacklevel=2,
    )


@pytest.fixture(scope="session")
def session_runner(runner_factory):
    return runner_factory("test-runner")


@pytest.fixture
def extra_runners(runner_factory):
    """Start more runners for one test; they stop when it ends.

    Left running, they would take shared-queue jobs of later tests and make
    those tests' cold/hot expectations depend on which runner answered.
    """
    started: list[RunnerProcess] = []

    def start(
        name: str,
        budget_mb: int = 4096,
        clock_offset_s: float = 0.0,
        env_overrides: dict[str, str] | None = None,
    ) -> RunnerProcess:
        process = runner_factory(name, budget_mb, clock_offset_s, env_overrides)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def runner(session_runner, transactional_db):
    """A live runner process shared by the whole test session."""
    return session_runner


@pytest.fixture(autouse=True, scope="session")
def clean_redis():
    """Start from empty queues; stop the session's embedded Redis at the end."""
    redis_connection = get_redis()
    for pattern in ("glassbox:*", "rq:*"):
        for key in redis_connection.scan_iter(pattern):
            redis_connection.delete(key)
    yield
    if not settings.REDIS_URL:
        import shutil

        import redis

        try:
            redis_connection.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it stops
        shutil.rmtree(settings.DATA_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def clear_login_failures(clean_redis):
    """Start each test with no failed sign-ins counted.

    Every test client signs in from 127.0.0.1, so the failures of earlier
    tests would otherwise add up to a lockout of that address.
    """
    redis_connection = get_redis()
    for key in redis_connection.scan_iter(f"{login_throttle.KEY_PREFIX}*"):
        redis_connection.delete(key)


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-password")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-password")


@pytest.fixture
def alice_key(alice) -> str:
    _, key = ApiToken.issue(alice, "tests")
    return key


@pytest.fixture
def alice_client(alice_key):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {alice_key}")
    return client


@pytest.fixture
def bob_client(bob):
    from rest_framework.test import APIClient

    _, key = ApiToken.issue(bob, "tests")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture(scope="module")
def wsgi_server(django_db_setup, django_db_blocker):
    """gunicorn with the options ``manage.py up`` uses, on the test database."""
    from runner.management.commands.up import gunicorn_command

    port = free_port()
    env = os.environ.copy()
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    with django_db_blocker.unblock():
        env["GLASSBOX_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    log_path = Path(settings.DATA_DIR) / "gunicorn.log"
    log = open(log_path, "ab")
    process = subprocess.Popen(
        gunicorn_command("webapp.wsgi:application", f"127.0.0.1:{port}", 1),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process, f"gunicorn did not start; see {log_path}")

    yield url
    process.terminate()
    process.wait(timeout=20)
    log.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def daphne_server(env_overrides: dict[str, str] | None = None, log_name="daphne.log"):
    """Serve the whole site (HTTP and websockets) with daphne on the test database.

    Yields the base URL. daphne runs as ``manage.py up`` runs it.
    """
    port = free_port()
    env = os.environ.copy()
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["GLASSBOX_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    env.update(env_overrides or {})
    log = open(Path(settings.DATA_DIR) / log_name, "ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "webapp.websocket_server",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "webapp.asgi:application",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, f"daphne did not start; see {log_name}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


@pytest.fixture(scope="session")
def asgi_server(django_db_setup):
    """daphne serving the whole site (HTTP and websockets) on the test database."""
    # django_db_setup has named the test database by now, and reading that
    # name opens no connection.
    with daphne_server() as url:
        yield url


ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright; tests skip where it is missing.

    Module-scoped: Playwright's event loop runs in the main thread while the
    browser is open, and pytest-asyncio tests in later modules need it gone.
    """
    import shutil

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.skip("chromium is not installed (scripts/install.sh installs it)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread, which
    # makes Django refuse ORM calls from the test body without this.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=executable,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-background-networking",
                "--disable-gpu",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        yield instance
        instance.close()
    del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


@contextlib.contextmanager
def registered_runner(name: str, cache_keys: tuple[str, ...] = ()):
    """Make runner ``name`` look alive in the main Redis, with no process behind it.

    Its heartbeat lists models with ``cache_keys`` as loaded. No process
    takes its jobs, and live runners neither reap it nor move its queue,
    until the block ends.
    """
    from runner import keys

    models = [{"cache_key": key} for key in cache_keys]
    beat = json.dumps({"name": name, "models": models})
    get_redis().set(keys.heartbeat_key(name), beat, px=300_000)
    get_redis().sadd(keys.RUNNERS_SET, name)
    try:
        yield name
    finally:
        get_redis().delete(keys.heartbeat_key(name))
        get_redis().srem(keys.RUNNERS_SET, name)
