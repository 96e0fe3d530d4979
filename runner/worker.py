"""The long-lived runner: takes RQ jobs and executes them in its own process.

RQ's default worker forks a child per job, which would throw away every
loaded model after each run; this loop runs each job in-process instead.
A background thread publishes the heartbeat and reaps dead runners.
"""

import logging
import signal
import threading
import time

import redis
from django.conf import settings
from django.db import close_old_connections
from rq import Queue
from rq.job import Job

from runner import fleet, keys, reaper, recovery
from runner.finish import clear_mark
from runner.runtime import RunnerRuntime, queued_model_keys
from webapp.clock import clock
from webapp.redis import restart_embedded_redis_if_down

logger = logging.getLogger(__name__)

# Seconds one blocking dequeue waits, so a stop request is seen this fast.
DEQUEUE_TIMEOUT_S = 1

# Takes the popped job ARGV[1] from queue KEYS[5], unless the runner must not:
#
# - another process now runs under the runner's name (heartbeat KEYS[4]
#   names another instance than ARGV[2]): the job goes back to the front
#   of its queue, and {'name_taken'} is returned;
# - the job came from the shared queue (ARGV[4] is '1') while routing has
#   marked this runner busy (KEYS[3]) for a run on its own queue: the job
#   goes back to the front of the shared queue, and {'reserved'} is
#   returned. A mark naming this runner's previous job (ARGV[5]), left when
#   delivering its result failed, is no reservation;
#
# otherwise reads the job hash KEYS[1] and the run's inputs KEYS[2],
# deletes the job hash (also when it cannot be read), marks the runner
# busy with the job for ARGV[3] seconds and returns {'taken', job fields,
# input fields}.
_TAKE_JOB = (
    fleet.OTHER_INSTANCE_LUA
    + """
if other_instance(redis.call('GET', KEYS[4]), ARGV[2]) then
    redis.call('LPUSH', KEYS[5], ARGV[1])
    return {'name_taken'}
end
if ARGV[4] == '1' then
    local marked = redis.call('GET', KEYS[3])
    if marked and marked ~= ARGV[1] and marked ~= ARGV[5] then
        redis.call('LPUSH', KEYS[5], ARGV[1])
        return {'reserved'}
    end
end
local job = redis.pcall('HGETALL', KEYS[1])
local inputs = redis.pcall('HGETALL', KEYS[2])
redis.call('DEL', KEYS[1])
if type(job) == 'table' and job['err'] then
    return {'unreadable', job['err']}
end
if type(inputs) == 'table' and inputs['err'] then
    return {'unreadable', inputs['err']}
end
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[3])
return {'taken', job, inputs}
"""
)

# How often (in heartbeats) a runner looks for queued runs whose job is gone,
# and for runs it claimed and no longer executes.
RECONCILE_EVERY_BEATS = 20


class RunnerWorker:
    """Takes run jobs from the runner's RQ queues and runs each in this process.

    The web server queues runs with RQ (``Queue.enqueue_call``); this loop
    reads RQ's queue lists and job hashes itself. RQ's SimpleWorker also runs
    jobs in-process, but its bookkeeping around each job (worker
    registration, job registries, execution records) cost about 4 ms per job
    on a 2-core machine. It took 5.0 ms per job, against 1.0 ms for dequeue,
    call and delete alone (300 trivial jobs, embedded Redis). The run row is the
    record of a run's state, so this loop keeps only what the pool needs.

    After the blocking pop, one round trip reads the job hash and the run's
    input images and deletes the job hash. A runner that dies before
    claiming the run leaves it queued with no job, which the lost-job check
    (``recovery.recover_lost_jobs``) queues again.

    SIGTERM or SIGINT finish the current run and then stop the loop, and a
    second signal stops it at once.
    """

    def __init__(
        self,
        queues: list[Queue],
        connection,
        name: str,
        instance: str = "",
        on_name_taken=None,
        between_jobs=None,
        before_job=None,
    ) -> None:
        # The runner's own queue first: BLPOP takes from the first non-empty.
        self.queue_keys = [queue.key for queue in queues]
        self.own_queue_key = self.queue_keys[0]
        self.connection = connection
        self.name = name
        self.instance = instance
        self.stopping = threading.Event()
        # Set while routing has marked this runner busy for a run on its
        # own queue that it has not popped yet; shared jobs wait meanwhile.
        self.reserved = False
        self.last_job_id = ""
        # The id of a job whose take raised redis.ConnectionError, until its
        # busy mark, which the take may have set, is cleared.
        self.unconfirmed_take = ""
        # Called without arguments when another process has taken the name.
        self.on_name_taken = on_name_taken
        # Called without arguments before each dequeue: after a job, and
        # after each DEQUEUE_TIMEOUT_S with none, but not after a shared job
        # put back for a routed run, or a timeout spent waiting for that run.
        self.between_jobs = between_jobs
        # Called with each job taken, before it runs.
        self.before_job = before_job

    def request_stop(self, signum, frame) -> None:
        if self.stopping.is_set():
            raise SystemExit(f"runner {self.name}: stopped by a second signal")
        logger.info("runner %s: finishing the current run, then stopping", self.name)
        self.stopping.set()

    def work(self, burst: bool = False) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # Set when a popped shared job went back because a routed run is on
        # its way, and after a dequeue timeout spent waiting for that run.
        # Idle models then do not expire before the routed run's job comes
        # and keeps its models loaded.
        reserved_job_returned = False
        outage = FailureLog(
            f"runner {self.name}: dequeue", DEQUEUE_TIMEOUT_S, traceback=False
        )
        while not self.stopping.is_set():
            if self.between_jobs is not None and not reserved_job_returned:
                try:
                    self.between_jobs()
                except Exception:
                    logger.exception("runner %s: work between jobs failed", self.name)
            reserved_job_returned = False
            queue_keys = [self.own_queue_key] if self.reserved else self.queue_keys
            try:
                self.clear_unconfirmed_take()
                popped = self.connection.blpop(queue_keys, timeout=DEQUEUE_TIMEOUT_S)
            except redis.ConnectionError as error:
                # Wait for Redis here: exiting would count against the
                # restart limit of manage.py up for every second it is away.
                outage.failed(f"Redis unreachable ({error})")
                restart_embedded_redis_if_down()
                self.stopping.wait(DEQUEUE_TIMEOUT_S)
                continue
            except redis.ResponseError as error:
                # One queue key of the wrong type fails every BLPOP.
                logger.error("runner %s: dequeue failed: %s", self.name, error)
                self.delete_unreadable_queues()
                self.stopping.wait(DEQUEUE_TIMEOUT_S)
                continue
            outage.succeeded()
            if popped is None:
                # A mark for a run that is never queued expires within
                # ROUTING_CLAIM_TTL_S; the next take finds out. Until then
                # the routed run may still come, so idle models stay.
                reserved_job_returned = self.reserved
                self.reserved = False
                if burst:
                    return
                continue
            self.reserved = False
            # Anyone who can write to Redis can push anything: nothing popped
            # may stop the loop.
            queue_key = popped[0].decode(errors="replace")
            job_id = popped[1].decode(errors="replace")
            try:
                job, inputs = self.take(job_id, queue_key)
            except JobReturned as returned:
                if returned.reason == "name_taken":
                    logger.error(
                        "runner %s: another process now runs under this name; "
                        "job %s returned to %s, stopping",
                        self.name,
                        job_id[:100],
                        queue_key,
                    )
                    self.stopping.set()
                    if self.on_name_taken is not None:
                        self.on_name_taken()
                else:
                    # Routing sent a run to this runner's own queue; take
                    # that one first, as routing predicted.
                    self.reserved = True
                    reserved_job_returned = True
                continue
            except redis.ConnectionError as error:
                # The job hash stays, in no queue, unless the take ran and
                # only its reply was lost. Either way the lost-run check
                # queues the run again, once no mark names it.
                self.unconfirmed_take = job_id
                logger.warning(
                    "runner %s: Redis unreachable while taking job %s (%s)",
                    self.name,
                    job_id[:100],
                    error,
                )
                continue
            except InvalidJob as error:
                # A take that read the job marked this runner busy with it. A
                # mark naming another run is routing's, for a job still queued.
                clear_mark(self.connection, self.name, job_id)
                logger.warning(
                    "runner %s: job %r from %s dropped: %s",
                    self.name,
                    job_id[:100],
                    queue_key,
                    error,
                )
                continue
            if self.before_job is not None:
                try:
                    self.before_job(job)
                except Exception:
                    logger.exception(
                        "runner %s: work before job %s failed", self.name, job_id
                    )
            queue_name = queue_key.removeprefix(Queue.redis_queue_namespace_prefix)
            try:
                kwargs = {**job.kwargs, "inputs": inputs, "queue": queue_name}
                job.func(*job.args, **kwargs)
            except Exception:
                # execute_run has already ended the run failed; keep serving.
                logger.exception(
                    "runner %s: job %s from %s raised", self.name, job_id, queue_key
                )

    def clear_unconfirmed_take(self) -> None:
        """Delete the busy mark that a take whose reply was lost may have left.

        Such a take deleted the job hash and marked this runner busy with
        the job. Left in place, the mark would make this runner put back
        every shared job for a run it never pops, and make the lost-run
        check take that run for one being taken, until the mark expires
        (keys.CURRENT_RUN_TTL_S). Raises redis.ConnectionError while Redis
        is unreachable, and is tried again before the next dequeue.
        """
        if not self.unconfirmed_take:
            return
        try:
            clear_mark(self.connection, self.name, self.unconfirmed_take)
        except redis.ResponseError as error:
            # Only a writer outside glassbox makes the mark another type than
            # a string. Left there, it would fail this call before every
            # dequeue, and the runner would never take a job again.
            logger.error(
                "runner %s: busy mark unreadable (%s); deleted", self.name, error
            )
            self.connection.delete(keys.current_run_key(self.name))
        self.unconfirmed_take = ""

    def delete_unreadable_queues(self) -> None:
        """Delete queue keys that are not lists, so dequeueing can go on.

        Only a writer outside glassbox can make one; what it held is not a
        job list, so nothing queued is lost.
        """
        for key in self.queue_keys:
            kind = self.connection.type(key).decode()
            if kind not in ("list", "none"):
                logger.error(
                    "runner %s: queue key %s is a %s, not a list; deleted",
                    self.name,
                    key,
                    kind,
                )
                self.connection.delete(key)

    def take(self, job_id: str, queue_key: str) -> tuple[Job, dict[bytes, bytes]]:
        """Take the job popped from ``queue_key``: read it and the run's inputs.

        One script (_TAKE_JOB) reads both, deletes the job hash and marks
        this runner busy (keys.current_run_key), or puts the job back and
        raises JobReturned when this runner must not take it.

        Raises InvalidJob when the hash is missing, unreadable, or names a
        function other than keys.RUN_JOB. Job data is JSON (keys.JOB_SERIALIZER),
        so reading it cannot run code.
        """
        reply = self.connection.eval(
            _TAKE_JOB,
            5,
            Job.key_for(job_id),
            keys.inputs_key(job_id),
            keys.current_run_key(self.name),
            keys.heartbeat_key(self.name),
            queue_key,
            job_id,
            self.instance,
            keys.CURRENT_RUN_TTL_S,
            "1" if queue_key != self.own_queue_key else "0",
            self.last_job_id,
        )
        outcome = reply[0].decode()
        if outcome in ("name_taken", "reserved"):
            raise JobReturned(outcome)
        if outcome == "unreadable":
            raise InvalidJob(f"unreadable ({reply[1].decode(errors='replace')})")
        self.last_job_id = job_id
        raw_job = _pairs(reply[1])
        inputs = _pairs(reply[2])
        if not raw_job:
            raise InvalidJob("not found (deleted or expired)")
        job = Job(job_id, connection=self.connection, serializer=keys.JOB_SERIALIZER)
        try:
            job.restore(raw_job)
            func_name = job.func_name
        except Exception as error:
            raise InvalidJob(f"unreadable ({type(error).__name__}: {error})") from None
        if func_name != keys.RUN_JOB:
            raise InvalidJob(
                f"invalid job function {func_name!r}: runners execute "
                f"{keys.RUN_JOB} only"
            )
        return job, inputs


class InvalidJob(Exception):
    """A popped job id whose job cannot or must not be executed."""


class JobReturned(Exception):
    """A popped job that this runner put back on its queue, for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """Turn HGETALL's reply inside a script, a flat list, into a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Heartbeat(threading.Thread):
    def __init__(
        self,
        runtime: RunnerRuntime,
        own_queue: Queue,
        on_name_taken=None,
        stopping: threading.Event | None = None,
    ) -> None:
        super().__init__(name=f"heartbeat-{runtime.name}", daemon=True)
        self.runtime = runtime
        self.own_queue = own_queue
        self.stopped = threading.Event()
        # Called once, without arguments, if another process takes the name.
        self.on_name_taken = on_name_taken
        # The job loop's stop request, published so that routing sends no
        # more runs to this runner's own queue.
        self.stopping = stopping

    def run(self) -> None:
        interval = settings.GLASSBOX["RUNNER_HEARTBEAT_S"]
        dead_after = settings.GLASSBOX["RUNNER_DEAD_AFTER_S"]
        failures = FailureLog(f"runner {self.runtime.name}: heartbeat", interval)
        while not self.stopped.is_set():
            self.note_wake_up(dead_after)
            self.runtime.beat_started_at = time.monotonic()
            try:
                self.beat()
                if failures.succeeded():
                    # The other runners lost Redis too, and their heartbeats
                    # expired meanwhile: give them time to beat again before
                    # taking them for dead. Set before beat_failing clears,
                    # which the fleet checks wait for.
                    self.runtime.reap_from = time.monotonic() + dead_after
                self.runtime.beat_failing = False
                self.runtime.redis_unreachable = False
            except redis.ConnectionError:
                failures.failed()
                self.runtime.beat_failing = True
                self.runtime.redis_unreachable = True
            except Exception:
                # A timeout, or a server that replies with errors (loading,
                # read-only), fails the beat too.
                failures.failed()
                self.runtime.beat_failing = True
            self.runtime.last_beat_s = time.monotonic() - self.runtime.beat_started_at
            self.runtime.beat_started_at = 0.0
            self.stopped.wait(interval)

    def note_wake_up(self, dead_after: float) -> None:
        """Record a gap since the last wake-up longer than ``dead_after``.

        When the heartbeat before the gap itself took longer than
        ``dead_after``, Redis did not reply to it, so the stall was Redis's,
        not this process's.
        """
        now = time.monotonic()
        gap = now - self.runtime.heartbeat_woke_at
        self.runtime.heartbeat_woke_at = now
        if gap > dead_after:
            in_redis = self.runtime.last_beat_s > dead_after
            self.runtime.stall_ended_at, self.runtime.stall_s = now, gap
            self.runtime.stall_in_redis = in_redis
            logger.warning(
                "runner %s: no heartbeat for %.1f s (%s)",
                self.runtime.name,
                gap,
                "Redis did not answer" if in_redis else "process stopped or starved",
            )

    def beat(self) -> None:
        if self.runtime.name_taken:
            # The process lives until its current run ends, and no runner
            # may fail that run as one of a dead process meanwhile.
            fleet.refresh_instance(self.runtime.name, self.runtime.instance)
            return
        state = self.runtime.state(
            queue_length=self.own_queue.count,
            stopping=self.stopping is not None and self.stopping.is_set(),
        )
        holder = fleet.publish_heartbeat(self.runtime.name, state)
        if holder is None:
            return
        # This process was paused for longer than the dead time, and a new
        # runner started under its name meanwhile. The name, its queue and
        # its heartbeat now belong to that runner, so this one finishes the
        # run it holds, if any, and stops. Its heartbeats go on keeping only
        # its instance alive until then.
        logger.error(
            "runner %s: another process (pid %s on %s) now runs under this "
            "name; stopping without taking more jobs",
            self.runtime.name,
            holder.get("pid"),
            holder.get("host"),
        )
        self.runtime.name_taken = True
        if self.on_name_taken is not None:
            self.on_name_taken()

    def stop(self) -> None:
        self.stopped.set()


class FailureLog:
    """Log a task failing every interval: one message, then a line a minute.

    While Redis or the database is away, a message every second would
    bury everything else in the log, and silence would hide that the
    failure goes on. The end of the failure is logged too. The first
    message carries the traceback unless ``traceback`` is false.
    """

    def __init__(self, task: str, interval_s: float, traceback: bool = True) -> None:
        self.task = task
        self.every = max(1, int(60 / interval_s))
        self.count = 0
        self.traceback = traceback

    def failed(self, reason: str = "") -> None:
        """Log the failure being handled, if it is the first or a minute on."""
        self.count += 1
        if self.count == 1:
            if self.traceback:
                logger.exception("%s failed", self.task)
            else:
                logger.warning("%s failed: %s", self.task, reason)
        elif self.count % self.every == 0:
            logger.warning("%s still failing (%d times)", self.task, self.count)

    def succeeded(self) -> int:
        """Return how many failures just ended, logging their end if any."""
        ended, self.count = self.count, 0
        if ended:
            logger.info("%s back after %d failures", self.task, ended)
        return ended


class FleetChecks(threading.Thread):
    """Read the fleet settings, reap dead runners, recover lost jobs and fail
    abandoned runs, in a thread of their own.

    All four read the database. In the heartbeat's thread, a database that
    stalls for a few seconds would stop every runner's heartbeats, and the
    fleet would look down with all its runners healthy.
    """

    def __init__(self, runtime: RunnerRuntime) -> None:
        super().__init__(name=f"fleet-checks-{runtime.name}", daemon=True)
        self.runtime = runtime
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = settings.GLASSBOX["RUNNER_HEARTBEAT_S"]
        dead_after = settings.GLASSBOX["RUNNER_DEAD_AFTER_S"]
        checks = 0
        failures = FailureLog(f"runner {self.runtime.name}: fleet checks", interval)
        woke_at = time.monotonic()
        while not self.stopped.is_set():
            if self.runtime.redis_unreachable:
                # The job loop restarts a stopped embedded server when its
                # dequeue fails, but not while it executes a run, which can
                # take minutes. Until then no runner could publish a result.
                restart_embedded_redis_if_down()
            now = time.monotonic()
            if now - woke_at > dead_after:
                # This process was stopped or starved, and other runners on
                # the same machine may have been too: give them the time to
                # beat again before taking them for dead.
                self.runtime.reap_from = max(self.runtime.reap_from, now + dead_after)
            woke_at = now
            if self.runtime.name_taken:
                # Another process runs under this name and checks the fleet;
                # this one only finishes its run.
                return
            try:
                self.runtime.read_fleet_settings()
                # Until the heartbeat reaches Redis again after an outage,
                # the time the other runners get to beat again is not set.
                # The heartbeat sets reap_from before it clears the flag, so
                # the flag is read first.
                beating = not self.runtime.beat_failing
                may_reap = beating and now >= self.runtime.reap_from
                if checks % 3 == 0 and may_reap:
                    reaper.reap_dead_runners(own_name=self.runtime.name)
                if checks % RECONCILE_EVERY_BEATS == 0:
                    recovery.recover_lost_jobs()
                    recovery.fail_abandoned_runs(self.runtime)
                failures.succeeded()
            except Exception:
                failures.failed()
                # A connection broken by the failure is opened again next time.
                close_old_connections()
            checks += 1
            self.stopped.wait(interval)

    def stop(self) -> None:
        self.stopped.set()


def run_worker(runtime: RunnerRuntime, connection, *, burst: bool = False) -> None:
    own_queue = Queue(
        keys.runner_queue(runtime.name),
        connection=connection,
        serializer=keys.JOB_SERIALIZER,
    )
    shared_queue = Queue(
        keys.SHARED_QUEUE, connection=connection, serializer=keys.JOB_SERIALIZER
    )

    def name_taken() -> None:
        runtime.name_taken = True

    # Routing sent these jobs here because this runner had their models
    # loaded, so making room for another model unloads those last.
    runtime.cache.awaited_keys = lambda: queued_model_keys(own_queue)

    # Whether a job ran since the last call of between_jobs.
    ran_job = False

    def between_jobs() -> None:
        nonlocal ran_job
        runtime.cache.drop_deleted_uploads()
        # Right after a job, the next one may be queued already and call a
        # model that is idle past its keep-alive, so idle models are left
        # for before_job, which receives that job. After a dequeue
        # timeout with no job, they expire here.
        runtime.apply_fleet_settings(expire=not ran_job)
        ran_job = False

    def before_job(job) -> None:
        nonlocal ran_job
        ran_job = True
        runtime.expire_idle_except_for(job.kwargs)

    worker = RunnerWorker(
        [own_queue, shared_queue],
        connection,
        runtime.name,
        runtime.instance,
        on_name_taken=name_taken,
        between_jobs=between_jobs,
        before_job=before_job,
    )
    heartbeat = Heartbeat(
        runtime,
        own_queue,
        on_name_taken=worker.stopping.set,
        stopping=worker.stopping,
    )
    try:
        # Applied before the first job; the fleet-check thread reads them
        # again every heartbeat interval.
        runtime.read_fleet_settings()
        runtime.apply_fleet_settings()
    except Exception:
        logger.exception(
            "runner %s: reading the fleet settings failed; retried every "
            "heartbeat interval",
            runtime.name,
        )
    heartbeat.beat()
    # A run queued before this runner went live found no runner free, like
    # one queued behind another run. Its queue time includes the wait.
    runtime.last_finished_ns = clock.now_ns()
    # The process warm-up before this took seconds without a heartbeat, and
    # no run was waiting on this runner then: that is not a stall.
    runtime.heartbeat_woke_at = time.monotonic()
    heartbeat.start()
    checks = FleetChecks(runtime)
    checks.start()
    runtime.cache.on_change = heartbeat.beat
    logger.info(
        "runner %s started on %s (budget %d bytes), queues %s and %s",
        runtime.name,
        runtime.device,
        runtime.cache.budget_bytes,
        own_queue.name,
        shared_queue.name,
    )
    try:
        worker.work(burst=burst)
    finally:
        checks.stop()
        heartbeat.stop()
        heartbeat.join(timeout=5)
        fleet.remove_instance(runtime.instance)
        if not runtime.name_taken:
            fleet.remove_heartbeat(runtime.name)
            moved = reaper.move_queued_jobs(runtime.name)
            logger.info(
                "runner %s stopped; %d queued jobs moved to the shared queue",
                runtime.name,
                len(moved),
            )
