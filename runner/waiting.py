"""Why a queued run has not started: its place in its queue and the runners' state.

Read for ``GET /api/runs/<id>`` from the keys routing and the fleet page read
already: queue lists, heartbeats, the runners' last-heartbeat times and
their current-run marks. Nothing here reads another run's row or contents,
so the result names runners and counts jobs, but no other user's workflows
or models.
"""

import json
import logging
from typing import Any

import redis
from django.conf import settings
from rq import Queue

from runner import keys
from runner.models import Run
from webapp.clock import clock
from webapp.redis import get_redis

logger = logging.getLogger(__name__)


def silent_after_s() -> float:
    """Return how long a runner may go without a heartbeat before it counts as stalled.

    A runner's heartbeat thread publishes every RUNNER_HEARTBEAT_S, also while
    it executes a run, so two missed heartbeats and a second of slack mean
    the process is stopped, starved or cut off from Redis.
    """
    return 2 * settings.GLASSBOX["RUNNER_HEARTBEAT_S"] + 1.0


def waiting_state(run: Run) -> dict[str, Any]:
    """Describe why queued ``run`` waits, in the form docs/api.md gives.

    Costs two Redis round trips. If Redis cannot be read, every field but
    ``queue`` and ``reason`` is None, and the reason states that.
    """
    try:
        return _read_waiting_state(run)
    except redis.RedisError as error:
        logger.warning("run %s: queue state could not be read: %s", run.pk, error)
        return {
            "queue": run.queue_name,
            "queued_ahead": None,
            "live_runners": None,
            "busy_runners": None,
            "runner": None,
            "silent_runners": None,
            "reason": "The queue cannot be read because Redis is unreachable.",
        }


def _read_waiting_state(run: Run) -> dict[str, Any]:
    connection = get_redis()
    run_id = str(run.pk)
    queue_key = f"{Queue.redis_queue_namespace_prefix}{run.queue_name}"
    pipeline = connection.pipeline(transaction=False)
    pipeline.smembers(keys.RUNNERS_SET)
    pipeline.zrange(keys.RUNNERS_SEEN, 0, -1, withscores=True)
    pipeline.lpos(queue_key, run_id)
    members, seen, position = pipeline.execute()
    names = sorted(name.decode(errors="replace") for name in members)
    routed = keys.runner_of_queue(run.queue_name)
    # Live runners reap only runners in RUNNERS_SET, moving their queued
    # jobs to the shared queue.
    routed_in_fleet = routed in names
    if routed and not routed_in_fleet:
        names.append(routed)

    economy = run.priority == Run.Priority.ECONOMY and routed is not None
    pipeline = connection.pipeline(transaction=False)
    for name in names:
        pipeline.exists(keys.heartbeat_key(name))
        pipeline.get(keys.current_run_key(name))
    if economy:
        pipeline.get(keys.heartbeat_key(routed))
    replies = pipeline.execute()
    now_ms = clock.now_ns() // 1_000_000
    last_seen = {name.decode(errors="replace"): score for name, score in seen}

    runners = {}
    for index, name in enumerate(names):
        current = replies[2 * index + 1]
        score = last_seen.get(name)
        runners[name] = {
            "name": name,
            "live": bool(replies[2 * index]),
            # Routing marks the runner with this run when it queues the run
            # on that runner's own queue, so only another run makes it busy.
            "busy": current is not None and current.decode(errors="replace") != run_id,
            "taking": current is not None
            and current.decode(errors="replace") == run_id,
            "last_heartbeat_s": (
                None if score is None else round(max(0, now_ms - score) / 1000, 1)
            ),
        }
    for state in runners.values():
        silence = state["last_heartbeat_s"]
        state["silent"] = not state["live"] or (
            silence is not None and silence > silent_after_s()
        )

    live = [state for state in runners.values() if state["live"]]
    routed_state = runners.get(routed) if routed else None
    reason = _reason(position, routed_state, routed_in_fleet, runners)
    # A runner without a heartbeat lists no models, and the reason states
    # that it is gone. A heartbeat that cannot be parsed does not show which
    # models the runner has loaded, so it adds no sentence.
    if economy and position is not None and routed_state and routed_state["live"]:
        beat = _heartbeat(replies[-1])
        held = None if beat is None else _held_models(run, beat)
        if beat is not None and beat.get("stopping"):
            reason = f"{_stopping_reason(routed_state['name'])} {reason}"
        elif held is not None:
            reason = f"{_economy_reason(routed_state['name'], held)} {reason}"
        else:
            logger.warning(
                "run %s: heartbeat of runner %s could not be parsed",
                run.pk,
                routed_state["name"],
            )
    return {
        "queue": run.queue_name,
        "queued_ahead": position,
        "live_runners": len(live),
        "busy_runners": sum(1 for state in live if state["busy"]),
        "runner": _public(routed_state) if routed_state else None,
        "silent_runners": [
            _public(state) for state in runners.values() if state["silent"]
        ],
        "reason": reason,
    }


def _heartbeat(heartbeat: bytes | None) -> dict[str, Any] | None:
    """Return the heartbeat as a dict, None when it is missing or unreadable."""
    if heartbeat is None:
        return None
    try:
        beat = json.loads(heartbeat)
    except ValueError:
        return None
    return beat if isinstance(beat, dict) else None


def _held_models(run: Run, beat: dict[str, Any]) -> list[str] | None:
    """Return the ids of the run's models that the heartbeat lists as loaded.

    Returns None when the heartbeat's model list is unreadable.
    """
    try:
        loaded = {model["cache_key"] for model in beat.get("models", [])}
    except (KeyError, TypeError):
        return None
    return sorted(
        {ref["model_id"] for ref in run.model_refs if ref["cache_key"] in loaded}
    )


def _stopping_reason(name: str) -> str:
    """Return the sentence for an economy run queued on a runner that is stopping."""
    return (
        f"This economy run waits on the queue of runner {name}, which is "
        "stopping: it finishes its current run, then moves this run to the "
        "shared queue, where another runner takes it."
    )


def _economy_reason(name: str, held: list[str]) -> str:
    """Return the sentence saying why an economy run waits for runner ``name``."""
    if not held:
        return (
            f"This economy run waits for runner {name}, which had its models "
            "loaded when the run was queued but has evicted them since, so it "
            "loads them cold when it takes the run."
        )
    if len(held) == 1:
        loaded = f"its model {held[0]} is loaded"
        pronoun = "it"
    else:
        loaded = f"its models {', '.join(held)} are loaded"
        pronoun = "them"
    return (
        f"This economy run waits for runner {name}, where {loaded}, rather "
        f"than loading {pronoun} cold on another runner."
    )


def _public(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": state["name"],
        "live": state["live"],
        "busy": state["busy"],
        "last_heartbeat_s": state["last_heartbeat_s"],
    }


def _silence(state: dict[str, Any]) -> str:
    """Return "has sent no heartbeat for N s", or "has sent no heartbeat"."""
    if state["last_heartbeat_s"] is None:
        return "has sent no heartbeat"
    return f"has sent no heartbeat for {state['last_heartbeat_s']:.0f} s"


def _silence_order(state: dict[str, Any]) -> float:
    """Sort key: the runner silent for the shortest time first, unknown last."""
    silence = state["last_heartbeat_s"]
    return float("inf") if silence is None else silence


def _ahead(position: int) -> str:
    if position == 1:
        return "1 run is queued ahead of this one"
    return f"{position} runs are queued ahead of this one"


def _reason(
    position: int | None,
    routed: dict[str, Any] | None,
    routed_in_fleet: bool,
    runners: dict[str, dict[str, Any]],
) -> str:
    """Return one sentence on why the run has not started."""
    if position is None:
        taker = next((s for s in runners.values() if s["taking"]), None)
        if routed is None and taker is not None:
            if taker["silent"]:
                return (
                    f"Runner {taker['name']} took the run from the queue, but "
                    f"it {_silence(taker)}."
                )
            return f"Runner {taker['name']} took the run and is starting it."
        silent = [s for s in runners.values() if s["silent"]]
        if silent:
            # A runner blocked in BLPOP gets the job from Redis even while
            # its process is stopped, and marks the run only once it resumes.
            suspect = min(silent, key=_silence_order)
            responding = any(not s["silent"] for s in runners.values())
            then = (
                f"a live runner queues it again once {suspect['name']}'s "
                "heartbeat expires"
                if responding
                else f"it starts when {suspect['name']} resumes, or when another "
                "runner starts and queues it again"
            )
            return (
                "The run has left its queue, probably taken by runner "
                f"{suspect['name']}, which {_silence(suspect)}, and {then}."
            )
        return (
            "The run is not in its queue: a runner is taking it now, or its "
            "job was lost and a live runner queues it again within seconds."
        )
    if routed is not None:
        name = routed["name"]
        if routed["silent"]:
            others = [
                s for s in runners.values() if s["name"] != name and not s["silent"]
            ]
            if not routed_in_fleet:
                then = f"the run starts when a runner named {name} starts"
            elif others:
                then = (
                    "a live runner moves the run to the shared queue once "
                    f"{name}'s heartbeat expires"
                )
            else:
                then = (
                    f"the run starts when {name} resumes, or when another "
                    "runner starts and moves it to the shared queue"
                )
            return (
                f"This run waits in the queue of runner {name}, which "
                f"{_silence(routed)}, and {then}."
            )
        if routed["busy"]:
            ahead = f", and {_ahead(position)}" if position else ""
            return f"Runner {name} is busy with another run{ahead}."
        if position:
            plural = "run" if position == 1 else "runs"
            return f"Runner {name} has {position} {plural} to take before this one."
        return f"Runner {name} is about to take the run."
    responding = [s for s in runners.values() if not s["silent"]]
    if not responding:
        silent = [s for s in runners.values() if s["last_heartbeat_s"] is not None]
        if silent:
            latest = min(silent, key=_silence_order)
            return (
                f"No runner is responding: runner {latest['name']} "
                f"{_silence(latest)}. The run starts "
                "when a runner resumes or starts."
            )
        return (
            "No runner is up. The run starts when one starts "
            "('python manage.py runner')."
        )
    if all(s["busy"] for s in responding):
        count = len(responding)
        every = (
            "The one responding runner is"
            if count == 1
            else f"All {count} responding runners are"
        )
        ahead = f", and {_ahead(position)}" if position else ""
        return f"{every} busy with other runs{ahead}."
    if position:
        return f"{_ahead(position)[0].upper()}{_ahead(position)[1:]}."
    return "A runner is about to take the run."
