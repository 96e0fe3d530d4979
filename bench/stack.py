"""``manage.py up`` in a data directory of its own, for the benchmarks.

``up`` starts the web server and the runners, and the first Redis call
starts an embedded Redis server under the data directory. ``Stack.stop``
stops ``up``, which stops its children, and then that Redis server, which
outlives ``up``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


@dataclass
class Stack:
    """``manage.py up`` listening on ``HOST``, started from the tree at ``root``.

    The stack keeps its database and an embedded Redis in ``data_dir``, so
    ``REDIS_URL`` and ``DATABASE_URL`` are removed from its environment.
    ``environment`` sets variables of the stack's processes, and a None
    value removes the variable. ``web_workers`` None leaves ``up``'s default.
    """

    data_dir: Path
    port: int
    runners: int = 1
    web_workers: int | None = None
    environment: dict[str, str | None] = field(default_factory=dict)
    root: Path = ROOT
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir / "up.log"

    def process_environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("REDIS_URL", None)
        env.pop("DATABASE_URL", None)
        env["GLASSBOX_DATA_DIR"] = str(self.data_dir)
        env.setdefault("MODEL_DIR", str(self.root / "var" / "models"))
        for name, value in self.environment.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def command(self) -> list[str]:
        command = [sys.executable, "manage.py", "up", "--runners", str(self.runners)]
        if self.web_workers is not None:
            command += ["--web-workers", str(self.web_workers)]
        return command + ["--host", HOST, "--port", str(self.port)]

    def start(self) -> None:
        """Start ``up`` and wait until it prints that it is up."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=self.process_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info(
            "started manage.py up, pid %d, port %d, data %s",
            self.process.pid,
            self.port,
            self.data_dir,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"manage.py up exited with code "
                    f"{self.process.returncode}\n{self.log_tail()}"
                )
            if b"Up. Press Ctrl-C" in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"manage.py up was not up within "
            f"{STARTUP_TIMEOUT_S:.0f} s\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in [self.log_path, *sorted((self.data_dir / "logs").glob("*.log"))]:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop ``up`` (which stops its children), then the embedded Redis."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "manage.py up ignored SIGTERM for %.0f s; killing it",
                    STOP_TIMEOUT_S,
                )
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            logger.info("stopped manage.py up, pid %d", self.process.pid)
        self._stop_embedded_redis()

    def _stop_embedded_redis(self) -> None:
        # The embedded Redis server is a daemon that outlives ``up``. Stop it
        # only if its command line names this stack's socket.
        pid_file = self.data_dir / "redis.pid"
        try:
            pid = int(pid_file.read_text().strip())
            process = psutil.Process(pid)
            command = " ".join(process.cmdline())
        except (OSError, ValueError, psutil.Error):
            return
        if str(self.data_dir / "redis.sock") not in command:
            logger.warning(
                "pid %d in %s is not this stack's Redis (%s); left alone",
                pid,
                pid_file,
                command,
            )
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except psutil.TimeoutExpired:
            process.kill()
        logger.info("stopped embedded Redis, pid %d", pid)
