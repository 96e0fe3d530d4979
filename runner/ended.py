"""The runners that stopped or were reaped recently, as the fleet page lists them.

runner.fleet records each end in RUNNERS_ENDED, and store_end keeps a copy
in the database, so the list survives a Redis server that restarts without
its data. This module reads both and deletes the ends older than
ENDED_SHOWN_S.
"""

import datetime
import json
import logging
from typing import Any

from django.db import DatabaseError

from runner import keys
from runner.fleet import read_last_seen
from webapp.clock import clock
from webapp.redis import get_redis

logger = logging.getLogger(__name__)

# How long the fleet page lists a runner that stopped or was reaped.
ENDED_SHOWN_S = 24 * 3600


def store_end(name: str, ended: dict[str, Any]) -> None:
    """Store ``ended``, a record from runner.fleet.record_end, in the database.

    A failed write is logged, and the end stays listed from Redis alone.
    """
    from runner.models import RunnerEnd

    try:
        RunnerEnd.objects.update_or_create(
            name=name,
            defaults={
                "reason": ended["reason"],
                "ended_at_ms": ended["at_ms"],
                "last_heartbeat_ms": ended["last_seen_ms"],
                "instance": ended["instance"] or "",
            },
        )
    except DatabaseError:
        logger.exception(
            "storing the end of runner %s in the database failed; it is kept "
            "in Redis only (%s)",
            name,
            ended["reason"],
        )


def ended_runners() -> list[dict[str, Any]]:
    """Return the runners that stopped or were reaped in the last ENDED_SHOWN_S.

    Each has ``name``, ``reason``, ``ended_at`` and ``last_heartbeat_at``
    (datetimes, the second None if unknown), ``live_again`` and
    ``resumed``, newest end first; a name has its latest end only. A runner
    started again under the name is listed too, with ``live_again`` true
    while the new process's heartbeat key exists, so the reason of its last
    end stays visible. A process that was reaped while paused and then
    resumed is listed with ``resumed`` true while it beats, and
    ``live_again`` false: no other process ran under the name. An end
    recorded without its instance counts any heartbeat under the name as
    another process's. Older entries are deleted.
    """
    connection = get_redis()
    now_ms = clock.now_ns() // 1_000_000
    latest, old = {}, []
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
        latest[name] = (name, str(ended.get("reason", "")), at_ms, ended)
    if old:
        connection.hdel(keys.RUNNERS_ENDED, *old)
        connection.zrem(keys.RUNNERS_SEEN, *old)
        connection.hdel(keys.RUNNERS_INSTANCE, *old)
    # The database has the ends that a Redis server lost, and Redis the ends
    # whose database write failed. Of two ends of a name, the later counts.
    for entry in _stored_ends(now_ms - ENDED_SHOWN_S * 1000):
        if entry[0] not in latest or latest[entry[0]][2] < entry[2]:
            latest[entry[0]] = entry
    entries = sorted(latest.values(), key=lambda entry: -entry[2])
    # An end recorded without its last heartbeat falls back to the name's
    # latest one.
    legacy = [name for name, _, _, ended in entries if "last_seen_ms" not in ended]
    seen = read_last_seen(legacy)
    beating = _beating_instances([name for name, _, _, _ in entries])
    result = []
    for name, reason, at_ms, ended in entries:
        last_seen_ms = ended.get("last_seen_ms", seen.get(name))
        ended_instance = ended.get("instance")
        resumed = name in beating and ended_instance is not None
        resumed = resumed and beating[name] == ended_instance
        result.append(
            {
                "name": name,
                "reason": reason,
                "ended_at": _datetime(at_ms),
                "last_heartbeat_at": _datetime(last_seen_ms) if last_seen_ms else None,
                "live_again": name in beating and not resumed,
                "resumed": resumed,
            }
        )
    return result


def _stored_ends(since_ms: int) -> list[tuple[str, str, int, dict[str, Any]]]:
    """Return the database's ends from ``since_ms`` on, deleting older ones."""
    from runner.models import RunnerEnd

    RunnerEnd.objects.filter(ended_at_ms__lt=since_ms).delete()
    rows = RunnerEnd.objects.filter(ended_at_ms__gte=since_ms)
    return [
        (
            row.name,
            row.reason,
            row.ended_at_ms,
            {
                "last_seen_ms": row.last_heartbeat_ms,
                "instance": row.instance or None,
            },
        )
        for row in rows
    ]


def _beating_instances(names: list[str]) -> dict[str, str | None]:
    """Map those of ``names`` whose heartbeat key exists now to its instance.

    The instance is None in a heartbeat that names none or cannot be parsed.
    """
    if not names:
        return {}
    beats = get_redis().mget([keys.heartbeat_key(name) for name in names])
    found: dict[str, str | None] = {}
    for name, beat in zip(names, beats, strict=True):
        if beat is None:
            continue
        try:
            state = json.loads(beat)
        except ValueError:
            state = None
        instance = state.get("instance") if isinstance(state, dict) else None
        found[name] = instance if isinstance(instance, str) else None
    return found


def _datetime(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
