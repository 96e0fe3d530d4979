"""State of the runner process: its name, device and model cache.

Set once by the ``runner`` command before the worker loop starts; the job
function reads it, which is why runners must not fork per job.
"""

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from rq import Queue
from rq.job import Job

from runner.eviction import DEFAULT_KEEP_ALIVE_S, POLICIES, policy_keep_alive_s
from runner.model_cache import ModelCache
from webapp.clock import clock

logger = logging.getLogger(__name__)


@dataclass
class RunnerRuntime:
    name: str
    device: str
    cache: ModelCache
    started_at: float = field(default_factory=time.time)
    current_run: str | None = None
    runs_done: int = 0
    # When this runner last finished a run or went live, on the Redis
    # server's clock.
    last_finished_ns: int = 0
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    # Tells this process's heartbeats from those of another process that
    # took the same name (see fleet.publish_heartbeat).
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Set when another process took this runner's name.
    name_taken: bool = False
    # The heartbeat thread's last wake-up, and the end and length of the
    # latest gap between wake-ups longer than RUNNER_DEAD_AFTER_S
    # (time.monotonic()): the process was stopped or starved that long, or
    # Redis did not reply to a heartbeat for most of it (stall_in_redis).
    heartbeat_woke_at: float = field(default_factory=time.monotonic)
    # When the heartbeat being sent now started (0.0 between heartbeats),
    # and how long the latest one took to send.
    beat_started_at: float = 0.0
    last_beat_s: float = 0.0
    stall_in_redis: bool = False
    # Monotonic time before which no dead runner is reaped: set when this
    # runner's heartbeats come back after failing, since the other runners'
    # heartbeats failed with them.
    reap_from: float = 0.0
    stall_ended_at: float = 0.0
    stall_s: float = 0.0
    # Set while heartbeats fail to connect to Redis. The fleet-check thread
    # then restarts an embedded server. A restart can take seconds, and in
    # the heartbeat's thread it would look like a stalled process.
    redis_unreachable: bool = False
    # Set while the last heartbeat failed, for any reason; the fleet checks
    # reap no runner meanwhile.
    beat_failing: bool = False
    # The start-up budget applies while the fleet settings set none.
    # pending_settings is the (budget, policy, keep-alive seconds) that the
    # fleet-check thread last read, which the job loop applies between jobs.
    startup_budget_bytes: int = 0
    pending_settings: tuple[int, str, float] | None = None
    # The unknown policy name last logged, so that it is logged once.
    unknown_policy: str | None = None

    def __post_init__(self) -> None:
        self.startup_budget_bytes = self.cache.budget_bytes

    def read_fleet_settings(self) -> None:
        """Read the fleet settings for the job loop to apply. Reads the database."""
        from runner.models import FleetSettings

        stored = FleetSettings.current()
        budget_bytes = (
            self.startup_budget_bytes
            if stored.memory_budget_mb is None
            else stored.memory_budget_mb * 1024 * 1024
        )
        policy = stored.eviction_policy
        if policy not in POLICIES:
            # Written outside the admin, or by a release with more policies.
            # The budget still applies, and the policy stays.
            if policy != self.unknown_policy:
                logger.warning(
                    "runner %s: the fleet settings name eviction policy %r, "
                    "which is not one of this runner's policies (%s); keeping %s",
                    self.name,
                    policy,
                    ", ".join(POLICIES),
                    self.cache.policy.name,
                )
                self.unknown_policy = policy
            policy = self.cache.policy.name
        else:
            self.unknown_policy = None
        # The admin rejects a keep-alive under 1 s. A row written outside it
        # gets the smallest valid one, since a policy rejects 0.
        if stored.keep_alive_s is None:
            keep_alive_s = DEFAULT_KEEP_ALIVE_S
        else:
            keep_alive_s = float(max(stored.keep_alive_s, 1))
        self.pending_settings = (budget_bytes, policy, keep_alive_s)

    def apply_fleet_settings(self, expire: bool = True) -> None:
        """Apply the settings last read, evicting down to a lowered budget,
        then, if ``expire``, unload the models idle past the policy's keep-alive.

        Called by the job loop between jobs, when no run uses a model. Reads
        neither Redis nor the database, except to publish a heartbeat when
        a model was unloaded.
        """
        pending = self.pending_settings
        if pending is not None:
            self.cache.configure(*pending)
        if expire:
            self.cache.expire_idle()

    def expire_idle_except_for(self, job_kwargs: dict) -> None:
        """Unload the models idle past their keep-alive, except those the job calls.

        ``job_kwargs`` are the popped job's keyword arguments, whose run
        snapshot lists the run's models (dispatch.job_snapshot). A job
        without a readable list keeps nothing loaded.
        """
        self.cache.expire_idle(keep=job_model_keys(job_kwargs))

    def stall_since(self, started: float, dead_after_s: float) -> float | None:
        """Return how long this process stalled since ``started``, or None.

        A stall that is still going on when this is called (the heartbeat
        thread has not woken since) counts too, because the main thread may
        resume first. Only the part of a stall after ``started`` counts: the
        heartbeat thread notes a stall after its next wait, and a run taken
        in that wait, once Redis or the process resumed, did not stall.
        """
        if self.stall_ended_at >= started:
            stall_started_at = self.stall_ended_at - self.stall_s
            stalled = self.stall_ended_at - max(stall_started_at, started)
            if stalled > dead_after_s:
                return stalled
        silent = time.monotonic() - max(self.heartbeat_woke_at, started)
        if silent <= dead_after_s:
            return None
        # The heartbeat thread has not woken since the stall: Redis's if a
        # heartbeat has waited for it that long, or the last one did.
        beat_started_at = self.beat_started_at
        if beat_started_at > 0:
            beat_s = time.monotonic() - beat_started_at
        else:
            beat_s = self.last_beat_s
        self.stall_in_redis = beat_s > dead_after_s
        return silent

    def state(self, queue_length: int, stopping: bool = False) -> dict:
        """Return the heartbeat; ``stopping`` is set once a stop was requested."""
        return {
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "instance": self.instance,
            "device": self.device,
            "budget_bytes": self.cache.budget_bytes,
            "used_bytes": self.cache.used_bytes(),
            "models": self.cache.snapshot(),
            "missing_files": self.cache.missing_files(),
            "eviction_policy": self.cache.policy.name,
            "keep_alive_s": policy_keep_alive_s(self.cache.policy),
            "torch_threads": self.cache.torch_threads,
            "omp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "evictions": self.cache.evictions,
            "queue_length": queue_length,
            "current_run": self.current_run,
            "stopping": stopping,
            "runs_done": self.runs_done,
            "started_at": self.started_at,
            "beat_at": clock.now_ns() / 1e9,
        }


_runtime: RunnerRuntime | None = None


def set_runtime(runtime: RunnerRuntime) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> RunnerRuntime:
    if _runtime is None:
        raise RuntimeError(
            "no runner runtime in this process; jobs run only inside "
            "'python manage.py runner'"
        )
    return _runtime


def job_model_keys(job_kwargs: dict) -> set[str]:
    """Return the cache keys of the models a run job calls.

    ``job_kwargs`` are the job's keyword arguments, whose run snapshot
    lists the run's models (dispatch.job_snapshot). A job without a
    readable list gives an empty set.
    """
    snapshot = job_kwargs.get("snapshot")
    refs = snapshot.get("model_refs") if isinstance(snapshot, dict) else None
    keys = set()
    for ref in refs if isinstance(refs, list) else []:
        if isinstance(ref, dict) and isinstance(ref.get("cache_key"), str):
            keys.add(ref["cache_key"])
    return keys


# How many jobs of a runner's own queue ``queued_model_keys`` reads. Routing
# sends a run there only while the runner has its models loaded, so the
# queue is short. A longer one is read from its front.
QUEUED_JOBS_READ = 100


def queued_model_keys(queue: Queue) -> set[str]:
    """Return the cache keys of the models that the jobs on ``queue`` call.

    For a runner's own queue these are the models that routing found loaded
    when it sent each run there. A job that cannot be read counts for none.
    """
    job_ids = queue.get_job_ids(0, QUEUED_JOBS_READ)
    keys = set()
    for job in Job.fetch_many(job_ids, queue.connection, serializer=queue.serializer):
        if job is None:
            continue
        try:
            kwargs = job.kwargs
        except Exception:
            continue
        if isinstance(kwargs, dict):
            keys |= job_model_keys(kwargs)
    return keys
