"""python manage.py runner: start one long-lived runner process."""

from runner.openmp import apply_spin_default

# Before the imports below load torch, and with it libgomp.
apply_spin_default()

import argparse  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402

import redis  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management.base import BaseCommand, CommandError  # noqa: E402
from django.db import OperationalError  # noqa: E402

from runner import fleet, keys, reaper  # noqa: E402
from runner.model_cache import ModelCache, pick_device  # noqa: E402
from runner.models import FleetSettings  # noqa: E402
from runner.runtime import RunnerRuntime, set_runtime  # noqa: E402
from runner.worker import run_worker  # noqa: E402
from webapp.database import database_place  # noqa: E402
from webapp.management.arguments import (  # noqa: E402
    MAX_RUNNER_NAME_CHARS,
    positive_int,
    runner_name_problem,
)
from webapp.redis import get_redis, redis_place, unreachable_message  # noqa: E402

logger = logging.getLogger(__name__)


def memory_budget_mb(text: str) -> int:
    """Return a budget in MiB within the range the fleet settings accept."""
    value = positive_int(text)
    if value > FleetSettings.MAX_MEMORY_BUDGET_MB:
        raise argparse.ArgumentTypeError(
            f"{text!r} MiB is over the maximum of "
            f"{FleetSettings.MAX_MEMORY_BUDGET_MB} MiB (16 TiB)"
        )
    return value


class Command(BaseCommand):
    help = "Start a runner that executes workflow runs and keeps models loaded."

    def add_arguments(self, parser):
        parser.add_argument(
            "--name",
            default=None,
            help="Runner name, unique in the pool (default: host-pid).",
        )
        parser.add_argument(
            "--device",
            default=None,
            help="torch device, e.g. cpu or cuda:0 (default: cuda:0 "
            "when available, else cpu).",
        )
        parser.add_argument(
            "--memory-budget-mb",
            type=memory_budget_mb,
            default=settings.GLASSBOX["RUNNER_MEMORY_BUDGET_MB"],
            help="Memory for loaded models, in MiB; models are evicted above "
            "it, by the fleet settings' policy (least recently used unless set). "
            "A budget set in the fleet settings replaces this one.",
        )
        parser.add_argument(
            "--burst", action="store_true", help="Exit when the queues are empty."
        )

    def handle(self, *args, **options):
        if options["device"] == "":
            raise CommandError(
                "--device is empty; give a torch device such as cpu or cuda:0, "
                "or leave the option out to pick one"
            )
        if options["name"] == "":
            raise CommandError(
                "--name is empty; give a runner name, or leave the option out "
                "for the default host-pid name"
            )
        name = options["name"] or f"{socket.gethostname()}-{os.getpid()}"
        problem = runner_name_problem(name)
        if problem:
            raise CommandError(problem)
        if len(name) > MAX_RUNNER_NAME_CHARS:
            raise CommandError(
                f"runner name is {len(name)} characters long; the limit is "
                f"{MAX_RUNNER_NAME_CHARS}, so that its queue name fits a run's record"
            )
        try:
            device = pick_device(options["device"])
        except ValueError as error:
            raise CommandError(str(error)) from None
        _check_database_ready()
        logger.info(
            "runner %s: Redis %s, database %s", name, redis_place(), database_place()
        )
        _check_redis_reachable()
        # Checked again after the warm-up, which takes seconds, in case
        # another process took the name meanwhile.
        _check_name_free(name)
        threads = settings.GLASSBOX["TORCH_THREADS"] or os.cpu_count() or 1
        cache = ModelCache(
            budget_bytes=options["memory_budget_mb"] * 1024 * 1024,
            device=device,
            warmup_size=settings.GLASSBOX["WARMUP_IMAGE_SIZE"],
            torch_threads=threads,
        )
        runtime = RunnerRuntime(name=name, device=cache.device, cache=cache)
        set_runtime(runtime)
        seconds = cache.warm_up_process()
        logger.info("runner %s: process warmed up in %.2f s", name, seconds)
        # Everything alive now (modules, Django, torch) lives as long as the
        # process. Frozen, it is left out of every later garbage collection,
        # so the one after an eviction scans only what runs created: it took
        # about 190 ms here with these objects and well under 1 ms without.
        gc.collect()
        gc.freeze()
        connection = get_redis()
        self._fail_own_stale_runs(name)
        run_worker(runtime, connection, burst=options["burst"])
        if runtime.name_taken:
            raise CommandError(
                f"another process took the runner name {name!r} while this one "
                "was paused; this one stopped"
            )

    def _fail_own_stale_runs(self, name: str) -> None:
        """Runs this runner name held when it last stopped without finishing them."""
        replaced = []
        dead_instances = set()
        for state in fleet.live_runners():
            if state.name != name:
                continue
            if not _predecessor_died(state.data):
                raise _name_in_use(name, state.data)
            # A runner restarted at once (by manage.py up) finds the heartbeat
            # of the process it replaces, which lives on for a few seconds.
            replaced.append(state.data.get("pid"))
            if isinstance(state.data.get("instance"), str):
                dead_instances.add(state.data["instance"])
        # A run this name held when its process died no longer runs. One
        # whose process is alive, paused past RUNNER_DEAD_AFTER_S, is left to
        # it: that process finishes the run, then finds the name taken. The
        # runs fail before the old heartbeat goes, because no reap takes a
        # name with a heartbeat, so they end with this reason, not a reap's.
        get_redis().delete(keys.current_run_key(name))
        # The replaced process's instance key can outlive it by a heartbeat
        # interval, and its process id shows that it has exited.
        reaper.fail_runs_of_dead_processes(
            name,
            f"runner {name} restarted while running this run",
            frozenset(dead_instances),
        )
        for pid in replaced:
            logger.info(
                "runner %s: process %s, which had this name, is gone; replacing it",
                name,
                pid,
            )
            fleet.remove_heartbeat(
                name,
                reason=f"runner {name} (process {pid}) exited without stopping "
                "and was replaced by a new process",
            )


def _check_name_free(name: str) -> None:
    """Raise CommandError if a live runner of another process has ``name``.

    A heartbeat left by a process of this host that has exited does not
    count: the runner replaces it after its warm-up.
    """
    for state in fleet.live_runners():
        if state.name == name and not _predecessor_died(state.data):
            raise _name_in_use(name, state.data)


def _name_in_use(name: str, heartbeat: dict) -> CommandError:
    return CommandError(
        f"a runner named {name!r} is already running: process "
        f"{heartbeat.get('pid', 'unknown')} on host "
        f"{heartbeat.get('host', 'unknown')}. Stop that runner, or start this "
        "one with another --name"
    )


def _check_database_ready() -> None:
    """Raise CommandError if the database lacks tables this code needs.

    Without this, a runner pointed at a new database (a forgotten
    DATABASE_URL falls back to a new SQLite file) failed at its first query
    with "no such table".
    """
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except OperationalError as error:
        raise CommandError(
            f"cannot connect to database {database_place()}: {error}. Check "
            "DATABASE_URL and that the database server is up."
        ) from None
    if pending:
        raise CommandError(
            f"database {database_place()} has {len(pending)} unapplied "
            "migrations; run 'python manage.py migrate' with the same "
            "DATABASE_URL first. Runners on other machines need DATABASE_URL "
            "and REDIS_URL set to the shared servers."
        )


def _check_redis_reachable() -> None:
    """Raise CommandError if the server at REDIS_URL does not reply to PING.

    Otherwise the runner warmed up for seconds and then stopped with a
    traceback at its first command. The embedded server needs no check,
    because get_redis starts it.
    """
    if not settings.REDIS_URL:
        return
    try:
        get_redis().ping()
    except redis.RedisError as error:
        raise CommandError(unreachable_message(error)) from None


def _predecessor_died(heartbeat: dict) -> bool:
    """Return True if the heartbeat is from a process of this host that has exited."""
    if heartbeat.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(heartbeat["pid"]), 0)
    except ProcessLookupError:
        return True
    except (KeyError, TypeError, ValueError, PermissionError):
        return False
    return False
