"""Runner heartbeats, the live fleet as seen from Redis, and reaping dead runners.

Each runner writes a JSON heartbeat under its own key with an expiry of
RUNNER_DEAD_AFTER_S; a key that expired means the runner is down.  Any live
runner reaps a dead one: its running runs end failed (not billed) and its
queued jobs move to the shared queue.
"""

import datetime
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings
from django.db import DatabaseError
from rq import Queue
from rq.job import Job

from runner import keys
from webapp.clock import clock
from webapp.redis import get_redis

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerState:
    name: str
    data: dict[str, Any]

    @property
    def loaded_models(self) -> set[str]:
        """Cache keys (see ModelSource.cache_key) of the models loaded."""
        return {model["cache_key"] for model in self.data.get("models", [])}

    @property
    def missing_files(self) -> set[str]:
        """File keys (see ModelSource.file_key) of the weights files it lacks."""
        return {str(key) for key in self.data.get("missing_files", [])}

    @property
    def queue_length(self) -> int:
        return int(self.data.get("queue_length", 0))

    @property
    def busy(self) -> bool:
        return bool(self.data.get("current_run"))

    @property
    def stopping(self) -> bool:
        """Whether the runner was asked to stop and takes no more jobs."""
        return bool(self.data.get("stopping"))


# A Lua function for scripts: whether the heartbeat ``beat`` (a string, or
# false when there is none) belongs to another instance than ``instance``.
OTHER_INSTANCE_LUA = """
local function other_instance(beat, instance)
    if not beat then
        return false
    end
    local ok, holder = pcall(cjson.decode, beat)
    return ok and type(holder) == 'table' and holder['instance'] ~= nil
        and holder['instance'] ~= instance
end
"""

# Sets the heartbeat unless a live heartbeat of another instance has the
# name, and then returns that heartbeat instead. Raises the fleet generation
# KEYS[3] when the runner joins or its models differ from the heartbeat it
# replaces. ARGV[5] (see _models_key) lists the cache keys of the models
# loaded and the files missing, sorted, one per line. Records the
# time in KEYS[4]. Sets the instance key KEYS[5] in either case, because the
# process is alive even when it lost its name.
_PUBLISH_HEARTBEAT = (
    OTHER_INSTANCE_LUA
    + """
redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[3])
local current = redis.call('GET', KEYS[1])
if other_instance(current, ARGV[2]) then
    return current
end
local function models_key(beat)
    local ok, state = pcall(cjson.decode, beat)
    if not ok or type(state) ~= 'table' or type(state['models']) ~= 'table' then
        return nil
    end
    local names = {}
    for _, model in ipairs(state['models']) do
        names[#names + 1] = tostring(model['cache_key'])
    end
    if type(state['missing_files']) == 'table' then
        for _, file in ipairs(state['missing_files']) do
            names[#names + 1] = 'missing:' .. tostring(file)
        end
    end
    table.sort(names)
    return table.concat(names, '\\n')
end
if not current or models_key(current) ~= ARGV[5] then
    redis.call('INCR', KEYS[3])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[4], now_ms, ARGV[4])
return false
"""
)


def publish_heartbeat(name: str, state: dict[str, Any]) -> dict[str, Any] | None:
    """Publish ``state`` as the runner's heartbeat.

    Returns None, or the heartbeat of another process that now runs under
    this name, which a process resumed after a long pause can find: the
    name's heartbeat expired, and a new runner started with it.
    """
    connection = get_redis()
    ttl_ms = int(settings.GLASSBOX["RUNNER_DEAD_AFTER_S"] * 1000)
    pipeline = connection.pipeline(transaction=False)
    pipeline.eval(
        _PUBLISH_HEARTBEAT,
        5,
        keys.heartbeat_key(name),
        keys.RUNNERS_SET,
        keys.FLEET_GENERATION,
        keys.RUNNERS_SEEN,
        keys.instance_key(state["instance"]),
        json.dumps(state),
        state["instance"],
        ttl_ms,
        name,
        _models_key(state),
    )
    # A runner's clock samples come with its heartbeats.
    pipeline.time()
    sent_ns = time.time_ns()
    holder, server_time = pipeline.execute()
    clock.observe(sent_ns, server_time, time.time_ns())
    return json.loads(holder) if holder else None


def _models_key(state: dict[str, Any]) -> str:
    """Return what _PUBLISH_HEARTBEAT compares to find that the models changed.

    A file found missing, or a stop requested, changes routing as a model
    loaded does.
    """
    names = [str(model["cache_key"]) for model in state.get("models", [])]
    names += [f"missing:{file}" for file in state.get("missing_files", [])]
    if state.get("stopping"):
        names.append("stopping")
    return "\n".join(sorted(names))


def refresh_instance(name: str, instance: str) -> None:
    """Keep runner process ``instance`` alive without a heartbeat for ``name``.

    A process whose name another process took calls this while it finishes
    its run, so that no runner fails that run as one of a dead process.
    """
    ttl_ms = int(settings.GLASSBOX["RUNNER_DEAD_AFTER_S"] * 1000)
    get_redis().set(keys.instance_key(instance), name, px=ttl_ms)


def remove_instance(instance: str) -> None:
    get_redis().delete(keys.instance_key(instance))


def live_instances(instances: set[str]) -> set[str]:
    """Return those of ``instances`` whose runner process is alive."""
    candidates = sorted(instance for instance in instances if instance)
    if not candidates:
        return set()
    found = get_redis().mget([keys.instance_key(i) for i in candidates])
    return {
        instance
        for instance, value in zip(candidates, found, strict=True)
        if value is not None
    }


def fail_runs_of_dead_processes(name: str, reason: str) -> int:
    """Fail, unbilled, the running runs under ``name`` whose process is gone.

    A run whose process is alive is left to it, also when another process
    has taken the name since. The instance keys are read after the runs,
    and every heartbeat sets the process's key, the first one before the
    process takes a job. A run claimed before instances were recorded has
    none, and counts as a dead process's run. Returns how many runs failed.

    NOTE: a process paused past RUNNER_DEAD_AFTER_S in its claim resumes
    with its key expired and sets the key right after the claim. A check
    between the two fails that run, as a reap fails a run held during such
    a pause.
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
        if instance in alive:
            continue
        failed += fail_run(
            run_id,
            reason,
            expected_status=Run.Status.RUNNING,
            expected_runner=name,
            expected_instance=instance,
        )
    return failed


def remove_heartbeat(name: str, reason: str = "stopped") -> None:
    """Take ``name`` out of the fleet, recording ``reason`` as its end."""
    last_seen_ms = _last_seen([name])[name]
    pipeline = get_redis().pipeline()
    pipeline.delete(keys.heartbeat_key(name))
    pipeline.srem(keys.RUNNERS_SET, name)
    pipeline.incr(keys.FLEET_GENERATION)
    _record_end(pipeline, name, reason, last_seen_ms)
    pipeline.execute()


# How long the fleet page lists a runner that stopped or was reaped.
ENDED_SHOWN_S = 24 * 3600


def _record_end(pipeline, name: str, reason: str, last_seen_ms: int | None) -> None:
    # The end keeps the ended process's last heartbeat, because a runner
    # started again under the name moves the name's score in RUNNERS_SEEN.
    ended = {
        "reason": reason,
        "at_ms": clock.now_ns() // 1_000_000,
        "last_seen_ms": last_seen_ms,
    }
    pipeline.hset(keys.RUNNERS_ENDED, name, json.dumps(ended))


def ended_runners() -> list[dict[str, Any]]:
    """Return the runners that stopped or were reaped in the last ENDED_SHOWN_S.

    Each has ``name``, ``reason``, ``ended_at`` and ``last_heartbeat_at``
    (datetimes, the second None if unknown) and ``live_again``, newest end
    first; a name has its latest end only. A runner started again under the
    name is listed too, with ``live_again`` true while its heartbeat key
    exists, so the reason of its last end stays visible. Older entries are
    deleted.
    """
    connection = get_redis()
    now_ms = clock.now_ns() // 1_000_000
    entries, old = [], []
    for raw_name, raw in connection.hgetall(keys.RUNNERS_ENDED).items():
        name = raw_name.decode(errors="replace")
        try:
            ended = json.loads(raw)
            at_ms = int(ended["at_ms"])
        except (ValueError, KeyError, TypeError):
            old.append(raw_name)
            continue
        if now_ms - at_ms > ENDED_SHOWN_S * 1000:
            old.append(raw_name)
            continue
        entries.append((name, str(ended.get("reason", "")), at_ms, ended))
    if old:
        connection.hdel(keys.RUNNERS_ENDED, *old)
        connection.zrem(keys.RUNNERS_SEEN, *old)
    entries.sort(key=lambda entry: -entry[2])
    # An end recorded without its last heartbeat falls back to the name's
    # latest one.
    legacy = [name for name, _, _, ended in entries if "last_seen_ms" not in ended]
    seen = _last_seen(legacy)
    beating = _beating([name for name, _, _, _ in entries])
    result = []
    for name, reason, at_ms, ended in entries:
        last_seen_ms = ended.get("last_seen_ms", seen.get(name))
        result.append(
            {
                "name": name,
                "reason": reason,
                "ended_at": _datetime(at_ms),
                "last_heartbeat_at": _datetime(last_seen_ms) if last_seen_ms else None,
                "live_again": name in beating,
            }
        )
    return result


def _beating(names: list[str]) -> set[str]:
    """Return those of ``names`` whose heartbeat key exists now."""
    if not names:
        return set()
    pipeline = get_redis().pipeline(transaction=False)
    for name in names:
        pipeline.exists(keys.heartbeat_key(name))
    found = pipeline.execute()
    return {name for name, exists in zip(names, found, strict=True) if exists}


def _last_seen(names: list[str]) -> dict[str, int | None]:
    """Return when each runner last published a heartbeat, in ms, or None."""
    pipeline = get_redis().pipeline(transaction=False)
    for name in names:
        pipeline.zscore(keys.RUNNERS_SEEN, name)
    scores = pipeline.execute() if names else []
    return {
        name: int(score) if score is not None else None
        for name, score in zip(names, scores, strict=True)
    }


def _datetime(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)


@dataclass(frozen=True)
class FleetSnapshot:
    """The live runners, and the fleet generation they were read at."""

    runners: list[RunnerState]
    generation: bytes


_recent: tuple[float, FleetSnapshot] = (0.0, FleetSnapshot([], b""))


def fleet_snapshot(max_age_s: float = 0.0) -> FleetSnapshot:
    """Return the runners whose heartbeat has not expired, with the generation.

    ``max_age_s`` lets a caller on the request path reuse this process's
    last result for that long instead of two Redis round trips. Routing
    then checks the generation in the round trip it makes anyway, and reads
    again when a runner has joined, left, or loaded or evicted a model.
    """
    global _recent
    read_at, view = _recent
    if max_age_s and time.monotonic() - read_at < max_age_s:
        return view
    generation, beats = _heartbeats()
    runners = [RunnerState(name, json.loads(beat)) for name, beat in beats if beat]
    view = FleetSnapshot(runners, generation)
    _recent = (time.monotonic(), view)
    return view


def live_runners(max_age_s: float = 0.0) -> list[RunnerState]:
    """Return the runners whose heartbeat has not expired (see fleet_snapshot)."""
    return fleet_snapshot(max_age_s).runners


def dead_runner_names() -> list[str]:
    return [name for name, beat in _heartbeats()[1] if beat is None]


def _heartbeats() -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """Return the fleet generation, and every runner ever seen with its
    heartbeat, or None once it expired."""
    pipeline = get_redis().pipeline(transaction=False)
    pipeline.get(keys.FLEET_GENERATION)
    pipeline.smembers(keys.RUNNERS_SET)
    generation, members = pipeline.execute()
    names = sorted(n.decode() for n in members)
    if not names:
        return generation or b"", []
    beats = get_redis().mget([keys.heartbeat_key(name) for name in names])
    return generation or b"", list(zip(names, beats, strict=True))


def reap_runner(name: str, reason: str) -> int:
    """Fail a dead runner's running runs and requeue its jobs; return runs failed."""
    connection = get_redis()
    # The lock keeps two live runners from reaping one runner at once. It
    # is released after the reap, so a runner that starts again under the
    # name and dies again soon is reaped as fast the second time.
    if not connection.set(keys.reap_lock_key(name), "1", nx=True, ex=30):
        return 0
    if connection.exists(keys.heartbeat_key(name)):
        # It started again under the name since the caller looked.
        connection.delete(keys.reap_lock_key(name))
        return 0
    # Read before the slow part of the reap: a runner that starts again
    # under the name meanwhile moves its score to its own heartbeat.
    last_seen = connection.zscore(keys.RUNNERS_SEEN, name)
    last_seen_ms = int(last_seen) if last_seen is not None else None
    try:
        # A process that lost the name to another process, which then died
        # too, may still be finishing a run under it: that run is spared.
        failed = fail_runs_of_dead_processes(name, reason)
        moved = move_queued_jobs(name)
        _recover_marked_run(connection, name, moved)
        # The runner may also have popped a shared job, whose id no mark
        # names yet.
        recover_lost_jobs(POPPED_AFTER_S, popped_only=True)
        pipeline = connection.pipeline()
        pipeline.srem(keys.RUNNERS_SET, name)
        pipeline.incr(keys.FLEET_GENERATION)
        _record_end(pipeline, name, reason, last_seen_ms)
        pipeline.execute()
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
    beats = _heartbeats()[1]
    silent = [name for name, beat in beats if beat is None and name != own_name]
    seen = _last_seen(silent)
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


# A queued run whose job is missing for this long is treated as lost; the
# delay covers the moment between the row's commit and the job's push.
LOST_AFTER_S = 30
# At a reap, a run queued at least this long ago whose job id is in no
# queue, with its job hash still in Redis, counts as popped by the dead
# runner. A live runner takes a job within milliseconds of popping it.
POPPED_AFTER_S = 2


def fail_abandoned_runs(runtime) -> int:
    """Fail the runs under this runner's name that no live process executes.

    ``runtime`` is this process's RunnerRuntime. A runner fails a run itself
    when finishing it fails. When the database rejects that write too, the
    run stays "running" under a live runner, which the reaper never checks.
    A run that an earlier process under this name claimed is failed once
    that process is gone. One that it still executes (it was paused past
    RUNNER_DEAD_AFTER_S, and this process took the name meanwhile) is left
    to it. The runner's current run is read after the runs, and a job names
    its run as current before claiming it, so a run claimed meanwhile is
    never failed. Returns how many runs failed.
    """
    from runner.finish import fail_run
    from runner.models import Run

    running = Run.objects.filter(status=Run.Status.RUNNING, runner_name=runtime.name)
    runs = [
        (str(run_id), instance)
        for run_id, instance in running.values_list("pk", "runner_instance")[:100]
    ]
    current_run = runtime.current_run
    others = {instance for _, instance in runs if instance != runtime.instance}
    alive = live_instances(others)
    failed = 0
    for run_id, instance in runs:
        if instance == runtime.instance:
            if run_id == current_run:
                continue
            reason = (
                f"runner {runtime.name} could not finish the run (a database or "
                "Redis write failed; its log has the error); send the request again"
            )
        elif instance in alive:
            continue
        else:
            reason = f"runner {runtime.name} restarted while running this run"
        failed += fail_run(
            run_id,
            reason,
            expected_status=Run.Status.RUNNING,
            expected_runner=runtime.name,
            expected_instance=instance,
        )
    return failed


def recover_lost_jobs(
    lost_after_s: float = LOST_AFTER_S, popped_only: bool = False
) -> int:
    """Queue again, or fail, queued runs whose RQ job Redis no longer has.

    Redis can lose jobs it had not yet written to disk when it crashes.  A
    lost run whose input images survived is queued again on the shared
    queue; one whose inputs are gone too fails, unbilled.  Returns how many
    runs were found.

    ``popped_only`` looks only for jobs whose id is in no queue while their
    job hash is still there: a runner popped them and stopped before taking
    them. A reap looks for those at once, with a short ``lost_after_s``.
    A job without a hash may be a run whose push is still on its way, so
    only the full LOST_AFTER_S separates the two.
    """
    from runner.models import Run

    connection = get_redis()
    # The periodic check keeps its lock until it expires, so the runners
    # check in turn, not each every few seconds. A reap's check releases
    # its own lock when done.
    lock = f"{keys.PREFIX}:reconcile" + (":popped" if popped_only else "")
    if not connection.set(lock, "1", nx=True, ex=10):
        return 0  # another runner is checking right now
    # queued_at_ns and clock are both on the Redis server's clock. The web
    # server's created_at is not: a runner whose clock ran ahead of it would
    # find runs lost in the moment between their commit and their push.
    cutoff_ns = clock.now_ns() - int(lost_after_s * 1_000_000_000)
    stale = Run.objects.filter(status=Run.Status.QUEUED, queued_at_ns__lt=cutoff_ns)
    taking = _runs_being_taken(connection)
    found = 0
    try:
        for run in stale.order_by("queued_at_ns")[:100]:
            found += _recover_if_lost(connection, run, taking, popped_only)
    finally:
        if popped_only:
            connection.delete(lock)
    return found


def _recover_if_lost(connection, run, taking: set[str], popped_only: bool) -> int:
    """Queue ``run`` again if no runner will take its job; return 1 if it did.

    ``taking`` contains the runs live runners are taking now.
    """
    if Job.exists(str(run.id), connection=connection):
        if _is_queued(connection, run) or str(run.id) in taking:
            return 0
        # A runner popped the id and died (or lost Redis) before it read
        # and deleted the job hash, so nothing will ever take this job.
        connection.delete(Job.key_for(str(run.id)))
    elif popped_only or str(run.id) in taking:
        # A live runner has deleted the job hash and is about to claim the
        # run, so the job is not lost.
        return 0
    _queue_again(connection, run)
    return 1


def _queue_again(connection, run) -> None:
    """Queue again, on the shared queue, a run whose job no runner will take.

    The run fails, unbilled, instead when its input images are gone too.
    """
    from runner.dispatch import enqueue
    from runner.finish import fail_run
    from runner.models import Run

    if not run.image_info or connection.exists(keys.inputs_key(str(run.id))):
        logger.warning("run %s lost its queued job; queued again", run.id)
        run.queue_name = keys.SHARED_QUEUE
        Run.objects.filter(pk=run.pk).update(queue_name=run.queue_name)
        enqueue(run)
    else:
        fail_run(
            run.id,
            "the queued job and its input images were lost (Redis restarted); "
            "send the request again",
            expected_status=Run.Status.QUEUED,
        )


def _recover_marked_run(connection, name: str, moved: list[str]) -> None:
    """Clear a dead runner's busy mark, and queue its run again if it never started.

    The mark names the run routing reserved the runner for, or the run it
    was taking. If that run's job id is in no queue, the runner popped it
    from its own queue and stopped, so without this the run would wait for
    the lost-run check. A runner that comes back finds the job taken and
    drops it. Ids just ``moved`` to the shared queue, and runs a live runner
    is taking, are left alone.
    """
    from runner.models import Run

    mark_key = keys.current_run_key(name)
    mark = connection.get(mark_key)
    connection.delete(mark_key)
    if mark is None:
        return
    try:
        run_id = uuid.UUID(mark.decode(errors="replace"))
    except ValueError:
        return
    if str(run_id) in moved:
        return
    run = Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).first()
    if run is not None:
        taking = _runs_being_taken(connection)
        _recover_if_lost(connection, run, taking, popped_only=False)


def _runs_being_taken(connection) -> set[str]:
    """Return the run ids that live runners hold as their current run.

    A runner names the run in the same round trip that deletes its job hash,
    before it claims the run in the database.
    """
    names = [runner.name for runner in live_runners()]
    if not names:
        return set()
    held = connection.mget([keys.current_run_key(name) for name in names])
    return {value.decode(errors="replace") for value in held if value is not None}


def _is_queued(connection, run) -> bool:
    """Return whether the run's job id is in its queue or the shared queue.

    A queue key that cannot be read (of the wrong type) counts as containing
    it, so an unreadable queue makes no job be queued twice.
    """
    names = {run.queue_name or keys.SHARED_QUEUE, keys.SHARED_QUEUE}
    pipeline = connection.pipeline(transaction=False)
    for name in names:
        pipeline.lpos(f"{Queue.redis_queue_namespace_prefix}{name}", str(run.id))
    replies = pipeline.execute(raise_on_error=False)
    return any(reply is not None for reply in replies)


def wait_for_runner(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if live_runners():
            return True
        time.sleep(0.1)
    return False
