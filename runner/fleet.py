"""Runner heartbeats and the live fleet as seen from Redis.

Each runner writes a JSON heartbeat under its own key with an expiry of
RUNNER_DEAD_AFTER_S; a key that expired means the runner is down, and
runner.reaper reaps it. Taking a runner out of the fleet records its end,
which runner.ended also stores in the database and lists.
"""

import json
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from runner import keys
from webapp.clock import clock
from webapp.redis import get_redis


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
# time in KEYS[4], and the instance as the name's latest in KEYS[6]. Sets the
# instance key KEYS[5] in either case, because the process is alive even when
# it lost its name.
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
redis.call('HSET', KEYS[6], ARGV[4], ARGV[2])
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
        6,
        keys.heartbeat_key(name),
        keys.RUNNERS_SET,
        keys.FLEET_GENERATION,
        keys.RUNNERS_SEEN,
        keys.instance_key(state["instance"]),
        keys.RUNNERS_INSTANCE,
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


def remove_heartbeat(name: str, reason: str = "stopped") -> None:
    """Take ``name`` out of the fleet, recording ``reason`` as its end."""
    from runner.ended import store_end

    last_seen_ms, instance = read_last_process(name)
    pipeline = get_redis().pipeline()
    pipeline.delete(keys.heartbeat_key(name))
    pipeline.srem(keys.RUNNERS_SET, name)
    pipeline.incr(keys.FLEET_GENERATION)
    ended = record_end(pipeline, name, reason, last_seen_ms, instance)
    pipeline.execute()
    store_end(name, ended)


def read_last_process(name: str) -> tuple[int | None, str | None]:
    """Return when ``name`` last published a heartbeat (ms) and its instance.

    Either is None when Redis has no record of it.
    """
    pipeline = get_redis().pipeline(transaction=False)
    pipeline.zscore(keys.RUNNERS_SEEN, name)
    pipeline.hget(keys.RUNNERS_INSTANCE, name)
    score, instance = pipeline.execute()
    return (
        int(score) if score is not None else None,
        instance.decode(errors="replace") if instance is not None else None,
    )


def record_end(
    pipeline,
    name: str,
    reason: str,
    last_seen_ms: int | None,
    instance: str | None,
) -> dict[str, Any]:
    """Add the write of ``name``'s end to ``pipeline``; return the end record.

    The caller passes the record to runner.ended.store_end once the
    pipeline has run.
    """
    # The end keeps the ended process's last heartbeat and instance, because
    # a runner started again under the name replaces both. The instance
    # distinguishes a new process under the name from the ended one
    # resumed after a pause past RUNNER_DEAD_AFTER_S.
    ended = {
        "reason": reason,
        "at_ms": clock.now_ns() // 1_000_000,
        "last_seen_ms": last_seen_ms,
        "instance": instance,
    }
    pipeline.hset(keys.RUNNERS_ENDED, name, json.dumps(ended))
    return ended


def read_last_seen(names: list[str]) -> dict[str, int | None]:
    """Return when each runner last published a heartbeat, in ms, or None."""
    pipeline = get_redis().pipeline(transaction=False)
    for name in names:
        pipeline.zscore(keys.RUNNERS_SEEN, name)
    scores = pipeline.execute() if names else []
    return {
        name: int(score) if score is not None else None
        for name, score in zip(names, scores, strict=True)
    }


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
    generation, beats = read_heartbeats()
    runners = [RunnerState(name, json.loads(beat)) for name, beat in beats if beat]
    view = FleetSnapshot(runners, generation)
    _recent = (time.monotonic(), view)
    return view


def live_runners(max_age_s: float = 0.0) -> list[RunnerState]:
    """Return the runners whose heartbeat has not expired (see fleet_snapshot)."""
    return fleet_snapshot(max_age_s).runners


def dead_runner_names() -> list[str]:
    return [name for name, beat in read_heartbeats()[1] if beat is None]


def read_heartbeats() -> tuple[bytes, list[tuple[str, bytes | None]]]:
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


def wait_for_runner(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if live_runners():
            return True
        time.sleep(0.1)
    return False
