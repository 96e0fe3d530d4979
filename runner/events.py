"""Live run events: each phase of a run, published as it ends.

A runner appends every event to a Redis list (for subscribers that connect
late) and publishes it to the run's channels group, in one pipelined round
trip.  Publishing goes through the runner's synchronous Redis client, with
the message serialized and the group channel named by channels-redis's own
``RedisPubSubChannelLayer``, so browser websockets served by channels receive
it as an ordinary group message.
"""

import json
import logging
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

from runner import keys
from webapp.redis import get_redis

logger = logging.getLogger(__name__)

EVENTS_TTL_S = 3600


def group_name(run_id: str) -> str:
    return f"run.{run_id}"


def events_key(run_id: str) -> str:
    return f"{keys.PREFIX}:run:{run_id}:events"


class RunEvents:
    """Numbered events of one run; ``seq`` lets subscribers drop duplicates."""

    def __init__(self, run_id: str, first_seq: int = 0) -> None:
        self.run_id = run_id
        # Another process ending the run (a reaper) numbers its events from a
        # higher base, so they never collide with the runner's.
        self.seq = first_seq
        self._layer = get_channel_layer()
        # RedisPubSubChannelLayer (channels-redis 4) publishes a group's messages
        # on "<prefix>__group__<group>"; the consumer tests catch a change.
        prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]
        self._channel = f"{prefix}__group__{group_name(run_id)}"

    def emit(self, phase: str, **data: Any) -> None:
        self.seq += 1
        event = {"seq": self.seq, "run_id": self.run_id, "phase": phase, **data}
        try:
            pipeline = get_redis().pipeline(transaction=False)
            pipeline.rpush(events_key(self.run_id), json.dumps(event))
            pipeline.expire(events_key(self.run_id), EVENTS_TTL_S)
            pipeline.publish(
                self._channel,
                self._layer.serialize({"type": "run.event", "event": event}),
            )
            pipeline.execute()
        except Exception:
            # Events are for display; a lost one must not fail the run.
            logger.exception("run %s: could not publish event %s", self.run_id, phase)


def stored_events(run_id: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in get_redis().lrange(events_key(run_id), 0, -1)]
