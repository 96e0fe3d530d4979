"""The run-event websocket: order, ownership, failures, against a real runner."""

import asyncio
import base64
import io
import json
import time

import aiohttp
import numpy as np
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone
from PIL import Image

from runner import consumers
from runner.dispatch import wait_for_result
from runner.events import MAX_EVENT_BYTES, RunEvents, events_key, stored_events
from runner.models import Run
from runner.service import start_run
from tests.conftest import image_bytes, registered_runner, start_cli_run
from tests.definitions import detect_then_crops, detection, image_height
from tests.test_redis_outage import start_redis
from webapp.asgi import application
from webapp.channel_layer import channel_layer_host
from webapp.redis import get_redis


def submit(owner, definition):
    return start_cli_run(owner, definition, wait_s=0).run


def untouched_run(owner) -> Run:
    """Create a finished run that no runner touches.

    For tests that only connect: a runner still writing a run when the
    test's tables are flushed could deadlock with the flush on PostgreSQL.
    """
    return Run.objects.create(
        owner=owner,
        source="api",
        status=Run.Status.SUCCEEDED,
        finished_at=timezone.now(),
    )


# The websocket server's own address, as daphne puts it in the scope.
SERVER = ("127.0.0.1", 8001)


async def connect(run_id, user, origin=b"http://127.0.0.1:8001"):
    headers = [(b"origin", origin)] if origin is not None else []
    communicator = WebsocketCommunicator(
        application, f"/ws/runs/{run_id}/", headers=headers
    )
    communicator.scope["user"] = user
    communicator.scope["server"] = SERVER
    connected, code = await communicator.connect()
    return communicator, connected, code


async def receive_until_done(communicator, timeout_s=60) -> list[dict]:
    """Return the events up to ``done``, checking that the server then closes."""
    events = []
    while True:
        event = await communicator.receive_json_from(timeout=timeout_s)
        events.append(event)
        if event["phase"] == "done":
            await expect_normal_close(communicator)
            return events


async def expect_normal_close(communicator) -> None:
    message = await communicator.receive_output(timeout=10)
    assert message == {"type": "websocket.close", "code": 1000}


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
async def test_events_refuse_other_users_run(transactional_db, alice, bob):
    run = await sync_to_async(untouched_run)(alice)
    communicator, connected, code = await connect(run.id, bob)
    assert connected is False
    assert code == 4404


@pytest.mark.asyncio
async def test_events_accept_uppercase_run_id(transactional_db, alice):
    run = await sync_to_async(untouched_run)(alice)
    communicator, connected, _ = await connect(str(run.id).upper(), alice)
    assert connected
    events = await receive_until_done(communicator)
    assert events[-1]["run_id"] == str(run.id)


@pytest.mark.asyncio
async def test_events_refuse_path_without_run_id(alice):
    communicator, connected, code = await connect("not-a-run-id", alice)
    assert connected is False
    assert code == 4404


@pytest.mark.asyncio
async def test_events_close_when_redis_unreachable(
    transactional_db, alice, tmp_path, settings
):
    run = await sync_to_async(untouched_run)(alice)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [f"unix://{tmp_path}/no-redis.sock"]},
        }
    }
    communicator, connected, code = await connect(run.id, alice)
    assert connected is False
    assert code == consumers.CLOSE_UNAVAILABLE


@pytest.mark.asyncio
async def test_events_connect_after_redis_restart(
    transactional_db, alice, tmp_path, settings
):
    # The layer's pub/sub connection goes stale when Redis restarts while no
    # websocket is subscribed. The next websocket must still connect.
    socket_path = tmp_path / "layer.sock"
    server = start_redis(socket_path)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [channel_layer_host(f"unix://{socket_path}")],
                "prefix": "glassbox",
            },
        }
    }
    run = await sync_to_async(untouched_run)(alice)
    try:
        communicator, connected, _ = await connect(run.id, alice)
        assert connected
        assert (await receive_until_done(communicator))[-1]["phase"] == "done"
        await communicator.disconnect()
        # Long enough for the layer to finish unsubscribing.
        await asyncio.sleep(1.5)
        server.kill()
        server.wait(timeout=10)
        server = start_redis(socket_path)

        communicator, connected, code = await connect(run.id, alice)
        assert connected, code
        assert (await receive_until_done(communicator))[-1]["phase"] == "done"
        await communicator.disconnect()
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        (b"http://127.0.0.1:8001", True),  # a page of the websocket server
        (b"http://localhost:8001", True),
        (b"http://127.0.0.1:8000", True),  # a page of WEB_SERVER_PORT
        (b"https://127.0.0.1:8000", True),
        (b"http://127.0.0.1:9999", False),  # another service on the host
        (b"http://127.0.0.1", False),
        (b"http://evil.example:8000", False),
        (b"http://user@127.0.0.1:8000", False),
        (b"http://127.0.0.1:http", False),
        (b"null", False),
        (None, False),
    ],
)
async def test_events_accept_only_site_origins(
    transactional_db, alice, settings, origin, accepted
):
    settings.GLASSBOX = {**settings.GLASSBOX, "WEB_SERVER_PORT": 8000}
    run = await sync_to_async(untouched_run)(alice)
    communicator, connected, _ = await connect(run.id, alice, origin)
    assert connected is accepted
    if accepted:
        await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("origin", "trusted", "accepted"),
    [
        (b"http://site.example:8000", [], True),
        (b"http://SITE.example:8001", [], True),
        (b"http://evil.example:8000", [], False),
        (b"http://evil.site.example:8000", [], False),
        (b"https://pages.example", ["https://pages.example"], True),
        (b"https://a.pages.example", ["https://*.pages.example"], True),
        (b"http://pages.example", ["https://pages.example"], False),
    ],
)
async def test_events_origin_must_match_host_header(
    transactional_db, alice, settings, origin, trusted, accepted
):
    # With a wildcard ALLOWED_HOSTS every host is allowed, so only the
    # handshake's own Host header, or CSRF_TRUSTED_ORIGINS, distinguishes
    # this site's pages from others.
    settings.ALLOWED_HOSTS = ["*"]
    settings.CSRF_TRUSTED_ORIGINS = trusted
    settings.GLASSBOX = {**settings.GLASSBOX, "WEB_SERVER_PORT": 8000}
    run = await sync_to_async(untouched_run)(alice)
    communicator = WebsocketCommunicator(
        application,
        f"/ws/runs/{run.id}/",
        headers=[(b"origin", origin), (b"host", b"site.example:8001")],
    )
    communicator.scope["user"] = alice
    communicator.scope["server"] = SERVER
    connected, _ = await communicator.connect()
    assert connected is accepted
    if accepted:
        await communicator.disconnect()


@pytest.mark.asyncio
async def test_events_refuse_anonymous(transactional_db, alice):
    from django.contrib.auth.models import AnonymousUser

    run = await sync_to_async(untouched_run)(alice)
    communicator, connected, code = await connect(run.id, AnonymousUser())
    assert connected is False
    assert code == 4401


@pytest.mark.asyncio
async def test_events_end_with_error_when_step_fails(runner, alice):
    # The compiler cannot know that a parameter has no length; the runner
    # finds out when the step runs.
    definition = image_height()
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "things", "default_value": 5}
    )
    definition["steps"].insert(
        0,
        {
            "type": "PropertyDefinition",
            "name": "corner",
            "data": "$inputs.things",
            "operations": [{"type": "SequenceLength"}],
        },
    )
    run = await sync_to_async(submit)(alice, definition)
    communicator, connected, _ = await connect(run.id, alice)
    events = await receive_until_done(communicator)
    await communicator.disconnect()

    done = events[-1]
    assert done["status"] == "failed"
    assert done["error"]["step"] == "corner"
    assert done["error"]["code"] == "step_rejected_input"
    # The failed step's time is counted as a block, not left in overhead.
    steps = {step["name"]: step for step in done["breakdown"]["steps"]}
    assert steps["corner"]["duration"] > 0
    assert done["breakdown"]["components"]["blocks"] >= steps["corner"]["duration"]


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
async def test_frames_from_client_are_ignored(runner, alice):
    run = await sync_to_async(submit)(alice, image_height())
    communicator, connected, _ = await connect(run.id, alice)
    assert connected
    await communicator.send_to(text_data="not json {")
    await communicator.send_to(bytes_data=b"\x00\xff")
    events = await receive_until_done(communicator)
    await communicator.disconnect()
    assert events[-1]["status"] == "succeeded"


def finished_run_without_stored_events(owner) -> tuple[Run, list[dict]]:
    """Run a workflow to the end, then drop its stored events, as if unpublished.

    Nothing here subscribes to the run's group: channels could still be
    delivering the runner's messages when the test's subscriber joins.
    """
    run = submit(owner, image_height())
    assert wait_for_result(str(run.id), timeout_s=60) is not None
    live = events_through_done(str(run.id))
    get_redis().delete(events_key(str(run.id)))
    return run, live


def events_through_done(run_id: str) -> list[dict]:
    """Return a finished run's stored events once its done event is stored.

    The result goes out in the same pipeline as the events, just before
    them, so a waiter can have the result while the events are on their way.
    """
    deadline = time.monotonic() + 10
    events = stored_events(run_id)
    while not events or events[-1]["phase"] != "done":
        assert time.monotonic() < deadline, f"events of run {run_id} incomplete"
        time.sleep(0.01)
        events = stored_events(run_id)
    return events


def publish(run_id, live: list[dict]) -> None:
    """Publish ``live`` again as the runner's last batch."""
    events = RunEvents(str(run_id))
    for event in live:
        data = {k: v for k, v in event.items() if k not in ("seq", "run_id", "phase")}
        events.emit(event["phase"], **data)
    events.send_with(get_redis().pipeline(transaction=False))


@pytest.mark.asyncio
async def test_just_finished_run_waits_for_its_events(runner, alice, monkeypatch):
    """A subscriber between the runner's commit and its publish gets the events."""
    # Long enough that the publish below comes first on a slow machine.
    monkeypatch.setattr(consumers, "LATE_EVENTS_GRACE_S", 30.0)
    run, live = await sync_to_async(finished_run_without_stored_events)(alice)
    late, _, _ = await connect(run.id, alice)
    assert await late.receive_nothing(timeout=0.1)

    await sync_to_async(publish)(run.id, live)
    received = await receive_until_done(late, timeout_s=10)
    await late.disconnect()
    assert [e["phase"] for e in received] == [e["phase"] for e in live]
    assert [e["seq"] for e in received] == [e["seq"] for e in live]


@pytest.mark.asyncio
async def test_nothing_follows_a_done_built_from_the_database(
    runner, alice, monkeypatch
):
    """Events that arrive after the wait for them are dropped after that done."""
    monkeypatch.setattr(consumers, "LATE_EVENTS_GRACE_S", 0.2)
    run, live = await sync_to_async(finished_run_without_stored_events)(alice)
    late, _, _ = await connect(run.id, alice)
    done = await late.receive_json_from(timeout=10)
    assert (done["phase"], done["seq"]) == ("done", 0)
    assert done["breakdown"] == live[-1]["breakdown"]

    await sync_to_async(publish)(run.id, live[-2:])
    await expect_normal_close(late)
    assert await late.receive_nothing(timeout=1)
    await late.disconnect()


def finished_run_with_events_cut(owner, keep: int) -> tuple[Run, list[dict]]:
    """Run a workflow to the end, then keep only its first ``keep`` stored events."""
    run, live = finished_run_without_stored_events(owner)
    connection = get_redis()
    for event in live[:keep]:
        connection.rpush(events_key(str(run.id)), json.dumps(event))
    return run, live


@pytest.mark.asyncio
async def test_stream_without_done_ends_with_database_done(runner, alice, monkeypatch):
    """Events lost with Redis after the commit: the stored phases, then done."""
    monkeypatch.setattr(consumers, "LATE_EVENTS_GRACE_S", 0.2)
    run, live = await sync_to_async(finished_run_with_events_cut)(alice, keep=3)
    late, _, _ = await connect(run.id, alice)
    received = await receive_until_done(late, timeout_s=10)
    await late.disconnect()
    assert [e["seq"] for e in received] == [e["seq"] for e in live[:3]] + [0]
    assert received[-1]["breakdown"] == live[-1]["breakdown"]


@pytest.fixture
def parked_runner():
    """A runner that looks alive but is no process, so none takes its jobs."""
    with registered_runner("parked-events") as name:
        yield name


def parked_run(owner, runner_name: str) -> Run:
    """A run queued for ``runner_name`` (see parked_runner)."""
    return start_cli_run(owner, image_height(), wait_s=0, runner=runner_name).run


def finish_without_events(run_id) -> None:
    """End the run in the database only, as when every push of its result failed."""
    Run.objects.filter(pk=run_id).update(
        status=Run.Status.FAILED,
        finished_at=timezone.now(),
        error={"message": "test: finished without events"},
    )


@pytest.mark.asyncio
async def test_connected_subscriber_gets_database_done(
    runner, alice, parked_runner, monkeypatch
):
    monkeypatch.setattr(consumers, "WATCH_INTERVAL_S", 0.2)
    monkeypatch.setattr(consumers, "LATE_EVENTS_GRACE_S", 0.2)
    run = await sync_to_async(parked_run)(alice, parked_runner)
    subscriber, connected, _ = await connect(run.id, alice)
    assert connected
    assert await subscriber.receive_nothing(timeout=0.5)

    await sync_to_async(finish_without_events)(run.id)
    done = await subscriber.receive_json_from(timeout=10)
    await expect_normal_close(subscriber)
    await subscriber.disconnect()
    assert (done["phase"], done["seq"]) == ("done", 0)
    assert done["status"] == "failed"


def test_events_add_up_to_the_breakdown_for_batches(runner, alice):
    # Three images, and a model run on each crop of each: the same steps and
    # model calls run many times, and each event's microseconds must add up
    # to the stored components exactly, not lose a fraction per call.
    definition = detect_then_crops("people-detector-320")
    image = {"type": "base64", "value": base64.b64encode(image_bytes()).decode()}
    outcome = start_run(
        owner_id=alice.id,
        source="cli",
        definition=definition,
        raw_inputs={"image": [image, image, image]},
        started_ns=time.perf_counter_ns(),
        wait_s=120,
    )
    assert outcome.payload["meta"]["status"] == "succeeded"
    breakdown = outcome.payload["meta"]["breakdown"]
    components = breakdown["components"]
    events = events_through_done(str(outcome.run.id))

    calls = [event for event in events if event["phase"] == "model"]
    assert len(calls) > 3
    for stage in ("preprocess", "inference", "postprocess"):
        assert sum(call[stage] for call in calls) == components[stage], stage
    blocks = [
        event
        for event in events
        if event["phase"] == "step" and not event["model_step"]
    ]
    # One event per step: a batch runs each step on all its images at once.
    assert sorted(step["step"] for step in blocks) == ["count", "crops"]
    assert sum(step["duration"] for step in blocks) == components["blocks"]
    by_step = {step["name"]: step["duration"] for step in breakdown["steps"]}
    for name in by_step:
        runs = [
            e["duration"]
            for e in events
            if e.get("step") == name and e["phase"] == "step"
        ]
        assert sum(runs) == by_step[name], name


def run_with_oversized_event(owner) -> Run:
    """Store a finished run whose stored events include one over MAX_EVENT_BYTES."""
    run = untouched_run(owner)
    events = RunEvents(str(run.id))
    events.emit("request", duration=1)
    # A step name as long as this is not valid in a definition, but an event
    # of any phase over the limit must not end the stream.
    oversized = "x" * (MAX_EVENT_BYTES + 1)
    events.emit("step", step=oversized, type="t", model_step=False, duration=2)
    events.emit("done", status="succeeded", breakdown=None, bill=None, error=None)
    events.send_with(get_redis().pipeline(transaction=False))
    return run


def session_cookie(user) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return {name: client.cookies[name].value}


async def read_stream(base_url: str, run_id, user) -> tuple[list[str], int | None]:
    """Return the text messages of a run's websocket, and its close code.

    daphne at ``base_url``, not the in-process communicator, enforces the message
    limit, so the client connects to a real server, signed in as ``user``.
    """
    cookies = await sync_to_async(session_cookie)(user)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookies=cookies, cookie_jar=jar) as session:
        url = base_url.replace("http://", "ws://") + f"/ws/runs/{run_id}/"
        async with session.ws_connect(url, origin=base_url, max_msg_size=0) as ws:
            texts = [message.data async for message in ws]
            return texts, ws.close_code


@pytest.mark.asyncio
async def test_oversized_event_keeps_stream_open(transactional_db, asgi_server, alice):
    run = await sync_to_async(run_with_oversized_event)(alice)
    texts, close_code = await read_stream(asgi_server, run.id, alice)

    assert all(len(text.encode()) <= MAX_EVENT_BYTES for text in texts)
    events = [json.loads(text) for text in texts]
    assert [event["phase"] for event in events] == ["request", "step", "done"]
    step = events[1]
    assert step["step"] is None
    assert step["truncated"] == ["step"]
    assert step["url"] == f"/api/runs/{run.id}"
    assert step["duration"] == 2
    assert events[2]["status"] == "succeeded"
    assert "truncated" not in events[2]
    assert close_code == consumers.CLOSE_NORMAL


def noise_jpeg_b64(width: int, height: int) -> str:
    """Return a JPEG of random pixels, which compresses poorly, as base64."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, "JPEG", quality=95)
    return base64.b64encode(encoded.getvalue()).decode()


@pytest.mark.asyncio
async def test_large_outputs_stay_off_stream(runner, asgi_server, alice):
    # A drawing of a 3000x2000 noise image is several MiB of base64, which
    # the events must not carry. The client reads it from the API.
    definition = detection("people-detector-320")
    definition["steps"].append(
        {
            "type": "roboflow_core/bounding_box_visualization@v1",
            "name": "drawing",
            "image": "$inputs.image",
            "predictions": "$steps.people.predictions",
        }
    )
    definition["outputs"].append(
        {"type": "JsonField", "name": "drawing", "selector": "$steps.drawing.image"}
    )
    image = {"type": "base64", "value": noise_jpeg_b64(3000, 2000)}
    outcome = await sync_to_async(start_run)(
        owner_id=alice.id,
        source="cli",
        definition=definition,
        raw_inputs={"image": image},
        started_ns=time.perf_counter_ns(),
        wait_s=0,
    )
    texts, close_code = await read_stream(asgi_server, outcome.run.id, alice)

    assert close_code == consumers.CLOSE_NORMAL
    assert all(len(text.encode()) < 64 * 1024 for text in texts)
    events = [json.loads(text) for text in texts]
    assert events[-1]["phase"] == "done"
    assert events[-1]["status"] == "succeeded"
    assert not any("truncated" in event for event in events)
    stored = await sync_to_async(Run.objects.get)(pk=outcome.run.id)
    assert len(json.dumps(stored.outputs)) > MAX_EVENT_BYTES
