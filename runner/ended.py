"""The runners that stopped or were reaped recently, as the fleet page lists them.

runner.fleet records each end in RUNNERS_ENDED. This module reads those
records and deletes the ones older than ENDED_SHOWN_S.
"""

import datetime
import json
from typing import Any

from runner import keys
from runner.fleet import read_last_seen
from webapp.clock import clock
from webapp.redis import get_redis

# How long the fleet page lists a runner that stopped or was reaped.
ENDED_SHOWN_S = 24 * 3600


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
        connection.hdel(keys.RUNNERS_INSTANCE, *old)
    entries.sort(key=lambda entry: -entry[2])
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
