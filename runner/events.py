"""Live run events: each phase of a run, published as it ends.

A runner appends every event to a Redis list (for subscribers that connect
late) and publishes it to the run's channels group.  Events go out in
batches: a background thread sends what is pending BATCH_WINDOW_S after the
first event of a batch, and the runner sends whatever is left, with
``done``, in the same round trip that delivers the run's result.  A run
shorter than the window therefore costs no Redis write for its events.

Publishing goes through the runner's synchronous Redis client, with the
message serialized and the group channel named by channels-redis's own
``RedisPubSubChannelLayer``, so browser websockets served by channels receive
it as an ordinary group message.
"""

import json
import logging
import threading
import time
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

from runner import keys
from webapp.redis import get_redis

logger = logging.getLogger(__name__)

EVENTS_TTL_S = 3600
# Short enough for the run page to show each phase as it ends, and long
# enough that a hot run of a small model ends before the first batch.
BATCH_WINDOW_S = 0.05


def group_name(run_id: str) -> str:
    return f"run.{run_id}"


def events_key(run_id: str) -> str:
    return f"{keys.PREFIX}:run:{run_id}:events"


# First event number of a process other than the run's runner (a reaper)
# that ends the run. A runner emits a few events per step
# and per model call, so even a batch of thousands of crops stays below it,
# and subscribers do not drop the reaper's events as seen.
REAPER_FIRST_SEQ = 10**12

# Largest websocket message, in bytes of UTF-8 JSON, that a subscriber is
# sent. daphne 4.2 gives autobahn a limit of 1 MiB by default
# (``websocket_max_message_size``), and ``manage.py up`` keeps it. autobahn
# 26.11 applies the limit to the messages it sends too, so a longer one
# raises PayloadExceededError and the connection closes with code 1011.
MAX_EVENT_BYTES = 1024 * 1024
# Fields that every event keeps however large the others are.
KEPT_FIELDS = ("seq", "run_id", "phase", "status")


class RunEvents:
    """Numbered events of one run; ``seq`` lets subscribers drop duplicates."""

    def __init__(self, run_id: str, first_seq: int = 0) -> None:
        self.run_id = run_id
        self.seq = first_seq
        self._layer = get_channel_layer()
        # RedisPubSubChannelLayer (channels-redis 4) publishes a group's messages
        # on "<prefix>__group__<group>"; the consumer tests catch a change.
        prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]
        self._channel = f"{prefix}__group__{group_name(run_id)}"

    def emit(self, phase: str, **data: Any) -> None:
        self.seq += 1
        event = {"seq": self.seq, "run_id": self.run_id, "phase": phase, **data}
        message = self._layer.serialize({"type": "run.event", "event": event})
        _publisher().submit((self.run_id, self._channel, json.dumps(event), message))

    def send_with(self, pipeline) -> list:
        """Add every pending event to ``pipeline``, execute it, and return its replies.

        Unlike the background sends, a failure here raises: the pipeline
        carries the caller's own commands too.
        """
        return _publisher().send_pending(pipeline)


class _Publisher(threading.Thread):
    """Sends queued events in order, batching those that arrive close together."""

    def __init__(self) -> None:
        super().__init__(name="run-events", daemon=True)
        self._pending: list[tuple[str, str, str, bytes]] = []
        self._ready = threading.Condition()
        # Held while taking and sending a batch, so batches leave in order.
        self._sending = threading.Lock()

    def submit(self, item: tuple[str, str, str, bytes]) -> None:
        with self._ready:
            self._pending.append(item)
            self._ready.notify()

    def run(self) -> None:
        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
            time.sleep(BATCH_WINDOW_S)
            try:
                self.send_pending()
            except Exception:
                # Events are for display; a lost batch must not fail a run.
                logger.exception("could not publish run events")

    def send_pending(self, pipeline=None) -> list:
        with self._sending:
            with self._ready:
                batch, self._pending = self._pending, []
            if not batch and pipeline is None:
                return []
            if pipeline is None:
                pipeline = get_redis().pipeline(transaction=False)
            for run_id, channel, stored, message in batch:
                pipeline.rpush(events_key(run_id), stored)
                pipeline.expire(events_key(run_id), EVENTS_TTL_S)
                pipeline.publish(channel, message)
            return pipeline.execute()


_publisher_lock = threading.Lock()
_publisher_thread: _Publisher | None = None


def _publisher() -> _Publisher:
    global _publisher_thread
    with _publisher_lock:
        if _publisher_thread is None or not _publisher_thread.is_alive():
            _publisher_thread = _Publisher()
            _publisher_thread.start()
        return _publisher_thread


def encode_event(event: dict[str, Any], limit: int = MAX_EVENT_BYTES) -> str:
    """Encode ``event`` as JSON of at most ``limit`` bytes, dropping fields if needed.

    Over the limit, the largest fields other than KEPT_FIELDS become null,
    one at a time, until the event fits. Their names go in ``truncated`` and
    ``url`` names the run's API route, which returns the whole run.
    """
    text = json.dumps(event)
    if len(text.encode()) <= limit:
        return text
    sizes = {
        name: len(json.dumps(value).encode())
        for name, value in event.items()
        if name not in KEPT_FIELDS
    }
    reduced = {**event, "truncated": [], "url": f"/api/runs/{event['run_id']}"}
    for name in sorted(sizes, key=sizes.get, reverse=True):
        reduced[name] = None
        reduced["truncated"].append(name)
        text = json.dumps(reduced)
        if len(text.encode()) <= limit:
            break
    logger.warning(
        "run %s: event %s (%s) is over %s bytes; sent without %s",
        event["run_id"],
        event["seq"],
        event["phase"],
        limit,
        ", ".join(reduced["truncated"]),
    )
    return text


def stored_events(run_id: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in get_redis().lrange(events_key(run_id), 0, -1)]
