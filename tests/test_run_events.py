"""The run-event websocket: order, ownership, failures, against a real runner."""

import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from runner.events import RunEvents, events_key
from runner.service import start_run
from tests.conftest import image_bytes
from tests.definitions import detection, image_height
from webapp.asgi import application
from webapp.redis import get_redis


def submit(owner, definition):
    return start_run(
        owner_id=owner.id,
        source="cli",
        definition=definition,
        raw_inputs={},
        uploads={"image": image_bytes()},
        started_ns=time.perf_counter_ns(),
        wait_s=0,
    ).run


async def connect(run_id, user):
    communicator = WebsocketCommunicator(
        application, f"/ws/runs/{run_id}/", headers=[(b"origin", b"http://127.0.0.1")]
    )
    communicator.scope["user"] = user
    connected, code = await communicator.connect()
    return communicator, connected, code


async def receive_until_done(communicator, timeout_s=60) -> list[dict]:
    events = []
    while True:
        event = await communicator.receive_json_from(timeout=timeout_s)
        events.append(event)
        if event["phase"] == "done":
            return events


@pytest.mark.asyncio
async def test_events_arrive_in_order(runner, alice):
    run = await sync_to_async(submit)(alice, detection("people-detector-448"))
    communicator, connected, _ = await connect(run.id, alice)
    assert connected
    events = await receive_until_done(communicator)
    await communicator.disconnect()

    seqs = [event["seq"] for event in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    phases = [event["phase"] for event in events]
    assert phases[:3] == ["request", "queue", "compile"]
    assert phases.index("cold_load") < phases.index("model") < phases.index("done")
    assert phases[-2:] == ["serialization", "done"]
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["bill"]["amount_microcredits"] > 0


@pytest.mark.asyncio
async def test_events_refuse_other_users_run(runner, alice, bob):
    run = await sync_to_async(submit)(alice, image_height())
    communicator, connected, code = await connect(run.id, bob)
    assert connected is False
    assert code == 4404


@pytest.mark.asyncio
async def test_events_refuse_anonymous(runner, alice):
    from django.contrib.auth.models import AnonymousUser

    run = await sync_to_async(submit)(alice, image_height())
    communicator, connected, code = await connect(run.id, AnonymousUser())
    assert connected is False
    assert code == 4401


@pytest.mark.asyncio
async def test_events_end_with_error_when_step_fails(runner, alice):
    definition = image_height()
    definition["steps"].insert(
        0,
        {
            "type": "AbsoluteStaticCrop",
            "name": "corner",
            "images": "$inputs.image",
            "x_center": 50000,
            "y_center": 50000,
            "width": 10,
            "height": 10,
        },
    )
    run = await sync_to_async(submit)(alice, definition)
    communicator, connected, _ = await connect(run.id, alice)
    events = await receive_until_done(communicator)
    await communicator.disconnect()

    done = events[-1]
    assert done["status"] == "failed"
    assert done["error"]["step"] == "corner"
    assert "outside" in done["error"]["message"]


@pytest.mark.asyncio
async def test_events_replay_for_finished_run(runner, alice):
    run = await sync_to_async(submit)(alice, image_height())
    first, _, _ = await connect(run.id, alice)
    live = await receive_until_done(first)
    await first.disconnect()

    again, _, _ = await connect(run.id, alice)
    replayed = await receive_until_done(again)
    await again.disconnect()
    assert [e["seq"] for e in replayed] == [e["seq"] for e in live]


@pytest.mark.asyncio
async def test_nothing_follows_a_done_built_from_the_database(runner, alice):
    """Phases published after the run's commit are dropped after that done."""
    run = await sync_to_async(submit)(alice, image_height())
    first, _, _ = await connect(run.id, alice)
    live = await receive_until_done(first)
    await first.disconnect()
    # As if the subscriber came between the commit and the last batch.
    await sync_to_async(get_redis().delete)(events_key(str(run.id)))

    late, _, _ = await connect(run.id, alice)
    done = await late.receive_json_from(timeout=10)
    assert (done["phase"], done["seq"]) == ("done", 0)

    def publish_last_batch():
        events = RunEvents(str(run.id))
        events.emit("serialization", duration=live[-2]["duration"])
        events.emit("done", **{k: live[-1][k] for k in ("status", "breakdown")})
        events.send_with(get_redis().pipeline(transaction=False))

    await sync_to_async(publish_last_batch)()
    assert await late.receive_nothing(timeout=1)
    await late.disconnect()
