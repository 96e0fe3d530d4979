"""Websocket stream of one run's events, for its owner only.

On connect the consumer joins the run's group, then replays the events
stored so far; live events that arrive during the replay wait in a buffer,
so the client receives each event once, in ``seq`` order.

A runner publishes a run's last phases, and ``done``, just after it commits
the finished run. A run that the database shows finished, without a stored
``done``, therefore either is about to publish it, finished long ago
(events expire after an hour), or lost its last events with Redis. Until
``done`` arrives, the consumer reads the run from the database on connect
and every WATCH_INTERVAL_S. Once the run has finished, it waits up to
LATE_EVENTS_GRACE_S after the run's end for the events, then sends one
``done`` built from the database. Nothing follows ``done`` but the close
(code 1000): phases that arrive after a ``done`` built from the database
are dropped.

An event over MAX_EVENT_BYTES, the websocket server's message limit, is
sent with its largest fields set to null and named in ``truncated``
(events.encode_event), so that the stream still reaches ``done``.
"""

import asyncio
import contextlib
import logging

import redis
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from runner.events import encode_event, group_name, stored_events
from runner.models import Run
from runner.presenters import bill_to_dict
from webapp.clock import clock

# How long after a run's end its events may still be on their way. A runner
# publishes them within a Redis round trip of its commit.
LATE_EVENTS_GRACE_S = 1.0
# How often a subscriber still waiting for ``done`` reads the run from the
# database, in case the runner's events never come.
WATCH_INTERVAL_S = 5.0

logger = logging.getLogger(__name__)

# The stream has ended: ``done`` was its last event.
CLOSE_NORMAL = 1000
# Close codes in the application range (4000-4999).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_UNAVAILABLE = 4503


class RunEventsConsumer(AsyncJsonWebsocketConsumer):
    async def __call__(self, scope, receive, send):
        """Serve one websocket; close it with CLOSE_UNAVAILABLE if Redis fails.

        channels subscribes to the channel layer before ``connect`` runs, and
        events come through Redis, so an outage raises here at any point. The
        client may connect again: the next process that needs the embedded
        Redis server restarts it.
        """
        try:
            await super().__call__(scope, receive, send)
        except (redis.RedisError, OSError) as error:
            logger.warning(
                "run event websocket %s closed, Redis unreachable: %s",
                scope.get("path", ""),
                error,
            )
            # The connection may be closed already, and then there is no
            # one left to tell.
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": CLOSE_UNAVAILABLE})

    async def connect(self):
        user = self.scope.get("user")
        self.run_id = str(self.scope["url_route"]["kwargs"]["run_id"])
        self.group = group_name(self.run_id)
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        # Someone else's run looks exactly like a missing one.
        if not await self._owns_run(user):
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.seen: set[int] = set()
        self.done_sent = False
        self.watcher: asyncio.Task | None = None
        self.buffer: list[dict] = []
        self.replaying = True
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        for event in await database_sync_to_async(stored_events)(self.run_id):
            await self._forward(event)
        self.replaying = False
        for event in sorted(self.buffer, key=lambda e: e["seq"]):
            await self._forward(event)
        self.buffer.clear()
        if not self.done_sent:
            self.watcher = asyncio.create_task(self._watch_database())

    async def disconnect(self, code):
        if getattr(self, "watcher", None) is not None:
            self.watcher.cancel()
        if hasattr(self, "seen"):
            with contextlib.suppress(redis.RedisError, OSError):
                await self.channel_layer.group_discard(self.group, self.channel_name)

    async def run_event(self, message):
        """Called by channels for each group message published by a runner."""
        if self.replaying:
            self.buffer.append(message["event"])
        else:
            await self._forward(message["event"])

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # The stream is one-way, so frames from the client are ignored unread.
        # Decoding them as JSON would let a malformed one end the connection.
        pass

    async def _forward(self, event: dict) -> None:
        if event["seq"] in self.seen or self.done_sent:
            return
        self.seen.add(event["seq"])
        self.done_sent = event["phase"] == "done"
        await self.send(text_data=encode_event(event))
        if self.done_sent:
            await self.close(code=CLOSE_NORMAL)

    @database_sync_to_async
    def _owns_run(self, user) -> bool:
        return Run.objects.filter(pk=self.run_id, owner=user).exists()

    async def _watch_database(self) -> None:
        """Send ``done`` from the database unless the runner's events come first.

        Checks now and every WATCH_INTERVAL_S, and once the run has finished,
        waits out what is left of LATE_EVENTS_GRACE_S after its end.
        """
        while not self.done_sent:
            run = await self._load_run()
            if run is not None and run.is_finished:
                age_s = (clock.now() - run.finished_at).total_seconds()
                await asyncio.sleep(max(0.0, LATE_EVENTS_GRACE_S - age_s))
                await self._forward(self._final_event(run))
                return
            await asyncio.sleep(WATCH_INTERVAL_S)

    @database_sync_to_async
    def _load_run(self) -> Run | None:
        return Run.objects.select_related("bill").filter(pk=self.run_id).first()

    def _final_event(self, run: Run) -> dict:
        return {
            "seq": 0,
            "run_id": self.run_id,
            "phase": "done",
            "status": run.status,
            "breakdown": run.breakdown,
            "bill": bill_to_dict(getattr(run, "bill", None)),
            "error": run.error,
        }
