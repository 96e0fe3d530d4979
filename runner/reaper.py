"""Reaping dead runners and moving their queued jobs to the shared queue.

Any live runner reaps a dead one: its running runs end failed (not billed)
and its queued jobs move to the shared queue, each in front of the shared
jobs queued after it.
"""

import logging
import time
import uuid

import redis
from django.conf import settings
from django.db import DatabaseError
from rq import Queue
from rq.job import Job

from runner import keys
from runner.ended import store_end
from runner.fleet import live_instances, read_heartbeats, read_last_seen, record_end
from runner.recovery import POPPED_AFTER_S, recover_lost_jobs, recover_marked_run
from webapp.clock import clock
from webapp.redis import get_redis

logger = logging.getLogger(__name__)


def fail_runs_of_dead_processes(
    name: str, reason: str, dead_instances: frozenset[str] = frozenset()
) -> int:
    """Fail, unbilled, the running runs under ``name`` whose process is gone.

    A run whose process is alive is left to it, also when another process
    has taken the name since. The instance keys are read after the runs,
    and every heartbeat sets the process's key, the first one before the
    process takes a job. A run claimed before instances were recorded has
    none, and counts as a dead process's run. The runs of ``dead_instances``,
    processes that the caller found dead by other means, fail even while
    their instance keys live on: a claim sets the key again, so it can
    outlast the process's last heartbeat by about a heartbeat interval.
    Returns how many runs failed.

    NOTE: a process paused past RUNNER_DEAD_AFTER_S in its claim resumes
    with its key expired and sets the key right after the claim. A check
    between the two fails that run, as a reap fails a run held during such
    a pause. So does a reap that read the process's instance as dead just
    before it resumed and claimed.
    """
    from runner.finish import fail_run
    from runner.models import Run

    running = list(
        Run.objects.filter(runner_name=name, status=Run.Status.RUNNING).values_list(
            "pk", "runner_instance"
        )
    )
    alive = live_instances({instance for _, instance in running})
    failed = 0
    for run_id, instance in running:
        if instance in alive and instance not in dead_instances:
            continue
        failed += fail_run(
            run_id,
            reason,
            expected_status=Run.Status.RUNNING,
            expected_runner=name,
            expected_instance=instance,
        )
    return failed


def reap_runner(name: str, reason: str) -> int:
    """Fail a dead runner's running runs and requeue its jobs; return runs failed."""
    connection = get_redis()
    # The lock keeps two live runners from reaping one runner at once. It
    # is released after the reap, so a runner that starts again under the
    # name and dies again soon is reaped as fast the second time.
    if not connection.set(keys.reap_lock_key(name), "1", nx=True, ex=30):
        return 0
    # Read together, before the slow part of the reap: a runner that starts
    # again under the name meanwhile replaces the last heartbeat's time and
    # instance with its own.
    with connection.pipeline() as pipeline:
        pipeline.exists(keys.heartbeat_key(name))
        pipeline.zscore(keys.RUNNERS_SEEN, name)
        pipeline.hget(keys.RUNNERS_INSTANCE, name)
        beating, last_seen, raw_instance = pipeline.execute()
    if beating:
        # It started again under the name since the caller looked.
        connection.delete(keys.reap_lock_key(name))
        return 0
    last_seen_ms = int(last_seen) if last_seen is not None else None
    instance = raw_instance.decode(errors="replace") if raw_instance else None
    try:
        # The process that sent the last heartbeat is dead now, even if a
        # claim renewed its instance key after that heartbeat. A process
        # that lost the name to another process, which then died too, may
        # still be finishing a run under it: that run is spared.
        failed = fail_runs_of_dead_processes(
            name, reason, frozenset({instance} if instance else ())
        )
        moved = move_queued_jobs(name)
        recover_marked_run(connection, name, moved)
        # The runner may also have popped a shared job, whose id no mark
        # names yet.
        recover_lost_jobs(POPPED_AFTER_S, popped_only=True)
        pipeline = connection.pipeline()
        pipeline.srem(keys.RUNNERS_SET, name)
        pipeline.incr(keys.FLEET_GENERATION)
        ended = record_end(pipeline, name, reason, last_seen_ms, instance)
        pipeline.execute()
        store_end(name, ended)
    finally:
        connection.delete(keys.reap_lock_key(name))
    # Logged even when the runner held nothing: the fleet keeps only the
    # latest end of each name, so the log is the record of every reap.
    logger.warning(
        "reaped runner %s: %d running runs failed, %d queued jobs "
        "moved to the shared queue (%s)",
        name,
        failed,
        len(moved),
        reason,
    )
    return failed


# Moves job ARGV[1], just pushed to the back of queue KEYS[1], in front of
# the first of ARGV[2..] (jobs queued after it, in queue order) still in
# the queue. With none left, a runner has taken them and every job ahead of
# them, so the job goes to the front.
_PLACE_MOVED_JOB = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then
    return 0
end
for i = 2, #ARGV do
    if redis.call('LINSERT', KEYS[1], 'BEFORE', ARGV[i], ARGV[1]) > 0 then
        return i - 1
    end
end
if #ARGV > 1 then
    return redis.call('LPUSH', KEYS[1], ARGV[1])
end
return redis.call('RPUSH', KEYS[1], ARGV[1])
"""

# How many later jobs a moved job is offered as places to go in front of.
MAX_PLACES = 100


def move_queued_jobs(name: str) -> list[str]:
    """Move runner ``name``'s queued jobs to the shared queue; return their ids.

    Each queued run's row names the shared queue before its job gets there,
    and a run that a runner claimed already keeps its queue. A job goes in
    ahead of the shared jobs queued after it (by Run.queued_at_ns),
    so it does not wait behind runs accepted while it sat on the runner's
    queue.
    """
    from runner.models import Run

    connection = get_redis()
    source = Queue(
        keys.runner_queue(name), connection=connection, serializer=keys.JOB_SERIALIZER
    )
    target = Queue(
        keys.SHARED_QUEUE, connection=connection, serializer=keys.JOB_SERIALIZER
    )
    shared_order = _SharedQueueOrder(connection, target.key)
    moved: list[str] = []
    while True:
        job_id = connection.lpop(source.key)
        if job_id is None:
            return moved
        try:
            job = Job.fetch(
                job_id.decode(errors="replace"),
                connection=connection,
                serializer=keys.JOB_SERIALIZER,
            )
            run_id = uuid.UUID(job.id)
            # A run that a runner claimed can still have a copy of its job
            # queued here, and keeps the queue it was taken from. The copy
            # still moves, and the runner that takes it cannot claim the
            # run, so it drops the copy.
            Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).update(
                queue_name=keys.SHARED_QUEUE
            )
            queued_at_ns = (
                Run.objects.filter(pk=run_id)
                .values_list("queued_at_ns", flat=True)
                .first()
            )
            later = []
            if queued_at_ns is not None:
                later = shared_order.queued_after(queued_at_ns)
            with connection.pipeline() as pipeline:
                target.enqueue_job(job, pipeline=pipeline)
                pipeline.eval(_PLACE_MOVED_JOB, 1, target.key, job.id, *later)
                pipeline.execute()
            if queued_at_ns is not None:
                shared_order.note_placed(job.id, queued_at_ns)
        except DatabaseError:
            # The job is sound: put it back for the next reap, which finds
            # the runner still dead, rather than drop it.
            connection.lpush(source.key, job_id)
            raise
        except Exception as error:
            # The job hash expired or is corrupt; a run it belonged to is
            # found by recover_lost_jobs.
            logger.warning(
                "job %r of runner %s could not be moved (%s); dropped",
                job_id[:100],
                name,
                error,
            )
            continue
        moved.append(job.id)


class _SharedQueueOrder:
    """The shared queue's job ids with their runs' queue times, in queue order.

    Read once per move, on the first job moved, in one LRANGE and one query,
    and kept up to date with the jobs the move places. Jobs that runners pop
    meanwhile stay listed, which _PLACE_MOVED_JOB allows for, and jobs
    queued meanwhile are missing, so a moved job goes in front of those
    only when the list names no later job.
    """

    def __init__(self, connection, queue_key: str) -> None:
        self.connection = connection
        self.queue_key = queue_key
        self.entries: list[tuple[str, int]] | None = None

    def _read(self) -> list[tuple[str, int]]:
        from runner.models import Run

        run_ids = []
        for raw in self.connection.lrange(self.queue_key, 0, -1):
            try:
                run_ids.append(uuid.UUID(raw.decode(errors="replace")))
            except ValueError:
                continue
        queued_at = dict(
            Run.objects.filter(pk__in=run_ids).values_list("pk", "queued_at_ns")
        )
        # Job ids that name no run are left out.
        return [(str(pk), queued_at[pk]) for pk in run_ids if pk in queued_at]

    def queued_after(self, queued_at_ns: int) -> list[str]:
        """Return the first MAX_PLACES job ids of runs queued after ``queued_at_ns``."""
        if self.entries is None:
            self.entries = self._read()
        later = [job_id for job_id, at in self.entries if at > queued_at_ns]
        return later[:MAX_PLACES]

    def note_placed(self, job_id: str, queued_at_ns: int) -> None:
        """Record that ``job_id`` went in front of the first job queued after it."""
        if self.entries is None:
            self.entries = self._read()
        place = next(
            (i for i, (_, at) in enumerate(self.entries) if at > queued_at_ns),
            len(self.entries),
        )
        self.entries.insert(place, (job_id, queued_at_ns))


def reap_dead_runners(own_name: str | None = None) -> bool:
    """Reap runners without a heartbeat, and move jobs off queues no runner reads.

    A runner calling this passes its own name, which is never reaped: the
    process is alive, and after a pause its heartbeat may have expired
    before its heartbeat thread beats again.

    Returns False, having reaped and moved nothing, when reading the fleet
    took longer than RUNNER_HEARTBEAT_S. Redis or this process stalled
    during the read then, and the other runners' heartbeats waited behind
    the same stall, so their silence is no sign that they died.

    Three kinds of runner are found here. A runner in RUNNERS_SET whose
    heartbeat expired is dead. A runner that the database shows running a
    run, but that Redis does not know, was forgotten by a Redis server that
    restarted empty. It is reaped once it has stayed without a heartbeat for
    RUNNER_DEAD_AFTER_S, the time a live runner takes to beat again. A
    runner that stopped cleanly has no heartbeat, but its queue can still
    receive a job routed from a heartbeat read just before the stop. Such
    jobs move to the shared queue.
    """
    dead_after = settings.GLASSBOX["RUNNER_DEAD_AFTER_S"]
    read_started = time.monotonic()
    beats = read_heartbeats()[1]
    silent = [name for name, beat in beats if beat is None and name != own_name]
    seen = read_last_seen(silent)
    read_s = time.monotonic() - read_started
    # NOTE: a read that starts within milliseconds after a stall ends is fast
    # and can still come before the other runners' delayed heartbeats.
    if read_s > settings.GLASSBOX["RUNNER_HEARTBEAT_S"]:
        if silent:
            logger.warning(
                "reading the fleet took %.1f s, so the silent runners (%s) were "
                "not reaped: their heartbeats may have waited behind the same "
                "stall",
                read_s,
                ", ".join(silent),
            )
        return False
    now_ms = clock.now_ns() // 1_000_000
    for name in silent:
        # The heartbeat key can vanish before its expiry (a Redis server
        # evicting keys under memory pressure, an operator deleting it).
        # Only a runner silent for the dead time is dead.
        silence_s = (now_ms - seen[name]) / 1000 if seen[name] else dead_after
        if silence_s < dead_after:
            continue
        reap_runner(
            name,
            f"runner {name} stopped sending heartbeats (none for {silence_s:.1f} s)",
        )
    live = {name for name, beat in beats if beat is not None}
    known = {name for name, _ in beats}
    if own_name is not None:
        live.add(own_name)
        known.add(own_name)
    _reap_forgotten_runners(known, dead_after)
    _move_orphaned_queues(live)
    return True


# Runners that hold running runs but that Redis does not know, by name: when
# this process first found each one missing (time.monotonic()).
_forgotten_since: dict[str, float] = {}


def _reap_forgotten_runners(known: set[str], dead_after: float) -> None:
    from runner.models import Run

    holders = set(
        Run.objects.filter(status=Run.Status.RUNNING)
        .values_list("runner_name", flat=True)
        .distinct()
    )
    forgotten = holders - known
    now = time.monotonic()
    for name in list(_forgotten_since):
        if name not in forgotten:
            del _forgotten_since[name]
    for name in forgotten:
        first_missing = _forgotten_since.setdefault(name, now)
        if now - first_missing >= dead_after:
            reap_runner(
                name,
                f"runner {name} sent no heartbeat for {dead_after:g} s after "
                "Redis lost its registration",
            )
            del _forgotten_since[name]


def _move_orphaned_queues(live: set[str]) -> None:
    connection = get_redis()
    prefix = Queue.redis_queue_namespace_prefix + keys.runner_queue("")
    for raw_key in connection.smembers(Queue.redis_queues_keys):
        queue_key = raw_key.decode(errors="replace")
        if not queue_key.startswith(prefix):
            continue
        name = queue_key[len(prefix) :]
        if name in live:
            continue
        try:
            if not connection.llen(queue_key):
                continue
        except redis.ResponseError:
            continue  # not a list: the runner's own dequeue deletes such keys
        moved = move_queued_jobs(name)
        if moved:
            logger.warning(
                "moved %d jobs from the queue of runner %s, which has no "
                "heartbeat, to the shared queue",
                len(moved),
                name,
            )
