"""Run priority: economy runs wait for a runner with their models loaded."""

import contextlib
import json
import time
from contextlib import ExitStack

import pytest
from django.core.management import CommandError, call_command
from rq import Queue

from billing.models import Bill
from runner import fleet, keys
from runner.dispatch import (
    choose_economy_queue,
    choose_queue,
    economy_holder,
    predict_hot,
    predict_route,
)
from runner.estimate import _place_run
from runner.models import Run
from runner.registry import resolve_model
from runner.waiting import waiting_state
from tests.conftest import image_path, registered_runner
from tests.definitions import detection, image_height
from tests.test_estimate import wait_until_loaded
from tests.test_queue_wait import read_run, wait_for_finish
from tests.test_runner_pool import fleet_of, start, wait_for_status
from tests.test_runs import create_workflow, run_workflow
from webapp.redis import get_redis

# No other test uses these input sizes, so no runner of the session has
# these models loaded before the tests here load them.
HELD_MODEL = "people-detector-128"
UNHELD_MODEL = "people-detector-864"
# An untrained architecture at a large input size: its cold load and
# inference keep a runner busy for seconds on CPU.
SLOW_MODEL = "yolov8x.yaml-1024"
# Loaded by the runner that test_economy_skips_stopping_holder stops, and
# then by the session runner. No other test uses this size.
STOPPING_HOLDER_MODEL = "people-detector-32"
# Loaded by the runner that test_moved_economy_run_counts_as_waited stops,
# and then by the session runner, which takes the moved run. No other test
# uses this size.
MOVED_HOLDER_MODEL = "people-detector-928"


def estimate(client, definition: dict, priority: str) -> dict:
    response = client.post(
        "/api/estimate",
        {"specification": definition, "priority": priority},
        format="json",
    )
    assert response.status_code == 200, response.json()
    return response.json()


def test_economy_waits_for_busy_holder(runner, extra_runners, alice, alice_client):
    # "holder" is the only runner with the model loaded, and is busy with a
    # slow run. The session runner is idle and has the model not loaded.
    holder = extra_runners("economy-holder")
    start(alice, HELD_MODEL, holder.name)
    wait_until_loaded(holder, HELD_MODEL)
    definition = detection(HELD_MODEL)
    workflow_id = create_workflow(alice_client, definition)
    busy = start(alice, SLOW_MODEL, holder.name, wait_s=0)
    wait_for_status(busy.run.id, Run.Status.RUNNING)

    economy_estimate = estimate(alice_client, definition, "economy")
    standard_estimate = estimate(alice_client, definition, "standard")
    economy_response = run_workflow(
        alice_client, workflow_id, priority="economy", **{"async": True}
    )
    standard_response = run_workflow(
        alice_client, workflow_id, priority="standard", **{"async": True}
    )
    assert economy_response.status_code == 202, economy_response.json()
    assert standard_response.status_code == 202, standard_response.json()
    economy_id = economy_response.json()["id"]
    standard_id = standard_response.json()["id"]
    queued = read_run(alice_client, economy_id)

    assert economy_estimate["priority"] == "economy"
    assert economy_estimate["runner"] == holder.name
    assert economy_estimate["hot"] is True
    assert economy_estimate["models"][0]["cold_load_us"] == 0
    assert economy_estimate["queued_ahead"] == 0
    assert economy_estimate["components"]["queue"] is None
    assert any(
        "this economy run waits for it" in reason and holder.name in reason
        for reason in economy_estimate["unknown"]
    )
    assert standard_estimate["priority"] == "standard"
    assert standard_estimate["runner"] == runner.name
    assert standard_estimate["hot"] is False

    assert queued["status"] == "queued"
    assert queued["priority"] == "economy"
    assert queued["queue"] == keys.runner_queue(holder.name)
    assert queued["models"][0]["predicted_hot"] is True
    reason = queued["waiting"]["reason"]
    assert reason.startswith(
        f"This economy run waits for runner {holder.name}, where its model "
        f"{HELD_MODEL} is loaded, rather than loading it cold on another runner."
    )
    # The holder keeps the busy mark of the run it executes.
    assert f"Runner {holder.name} is busy with another run" in reason

    economy = wait_for_finish(alice_client, economy_id)
    standard = wait_for_finish(alice_client, standard_id)
    assert standard["status"] == "succeeded", standard["error"]
    assert standard["priority"] == "standard"
    assert standard["runner"] == runner.name
    assert standard["timing"]["models"][0]["cold"] is True
    assert economy["status"] == "succeeded", economy["error"]
    assert economy["runner"] == holder.name
    assert economy["timing"]["models"][0]["cold"] is False
    assert economy["timing"]["components"]["cold_load"] == 0
    busy_run = Run.objects.get(pk=busy.run.id)
    assert Run.objects.get(pk=economy_id).started_at >= busy_run.finished_at
    # The same formula bills both, and each run has one bill.
    assert Bill.objects.filter(run_id__in=[economy_id, standard_id]).count() == 2


def test_economy_without_holder_routes_as_standard(runner, alice, alice_client):
    definition = detection(UNHELD_MODEL)
    cache_key = resolve_model(UNHELD_MODEL, owner_id=alice.id).cache_key
    loaded = {model["cache_key"] for model in (runner.state() or {}).get("models", [])}
    assert cache_key not in loaded
    workflow_id = create_workflow(alice_client, definition)

    predicted = estimate(alice_client, definition, "economy")
    response = run_workflow(alice_client, workflow_id, priority="economy")

    assert predicted["runner"] == runner.name
    assert predicted["hot"] is False
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["priority"] == "economy"
    assert body["queue"] == keys.SHARED_QUEUE
    assert body["timing"]["models"][0]["cold"] is True


def test_economy_with_one_runner_joins_shared_queue(runner, alice, alice_client):
    # The only runner holds the model. Its own queue would put the economy
    # run ahead of runs sent earlier to the shared queue.
    definition = detection("people-detector-160")
    workflow_id = create_workflow(alice_client, definition)
    assert run_workflow(alice_client, workflow_id).status_code == 200
    wait_until_loaded(runner, "people-detector-160")

    predicted = estimate(alice_client, definition, "economy")
    response = run_workflow(alice_client, workflow_id, priority="economy")

    assert predicted["runner"] == runner.name
    assert predicted["hot"] is True
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["queue"] == keys.SHARED_QUEUE
    assert body["timing"]["models"][0]["cold"] is False


def test_economy_routing_order(db):
    # Both "eco-both" runners hold both models and are busy: "eco-both-a"
    # runs a run and has two queued, "eco-both-b" runs one. The idle
    # "eco-one" holds one of the models.
    prefix = Queue.redis_queue_namespace_prefix
    backlog_key = f"{prefix}{keys.runner_queue('eco-both-a')}"
    with fleet_of(
        ("eco-one", ("k1",)),
        ("eco-both-a", ("k1", "k2")),
        ("eco-both-b", ("k1", "k2")),
    ):
        connection = get_redis()
        connection.set(keys.current_run_key("eco-both-a"), "another-run", ex=60)
        connection.set(keys.current_run_key("eco-both-b"), "another-run", ex=60)
        connection.rpush(backlog_key, "queued-1", "queued-2")

        try:
            both, _ = choose_economy_queue(["k1", "k2"], "run-1")
            one, _ = choose_economy_queue(["k1"], "run-2")
            none, _ = choose_economy_queue(["k3"], "run-3")

            marks = {
                name: connection.get(keys.current_run_key(name))
                for name in ("eco-one", "eco-both-b")
            }
        finally:
            connection.delete(backlog_key)

    assert both == keys.runner_queue("eco-both-b")
    assert one == keys.runner_queue("eco-one")
    assert none == keys.SHARED_QUEUE
    # An idle holder is marked busy for the run, and a busy one keeps the
    # mark of the run it executes.
    assert marks == {"eco-one": b"run-2", "eco-both-b": b"another-run"}


def test_economy_wait_names_evicted_models(db, alice):
    # The run waits on the queue of a runner with no process, whose
    # heartbeat first lists the run's model and then no longer does.
    run = Run.objects.create(
        owner=alice,
        source=Run.Source.API,
        priority=Run.Priority.ECONOMY,
        definition_digest="digest",
        queue_name=keys.runner_queue("evicting-holder"),
        model_refs=[{"model_id": "people-detector", "cache_key": "k1"}],
    )
    queue_key = f"{Queue.redis_queue_namespace_prefix}{run.queue_name}"
    get_redis().rpush(queue_key, str(run.pk))
    try:
        with registered_runner("evicting-holder", ("k1",)):
            holding = waiting_state(run)["reason"]
        with registered_runner("evicting-holder", ("k2",)):
            evicted = waiting_state(run)["reason"]
        with registered_runner("evicting-holder", ("k1",)):
            beat = {"name": "evicting-holder", "models": [], "stopping": True}
            get_redis().set(
                keys.heartbeat_key("evicting-holder"), json.dumps(beat), px=300_000
            )
            stopping = waiting_state(run)["reason"]
    finally:
        get_redis().delete(queue_key)

    assert holding.startswith(
        "This economy run waits for runner evicting-holder, where its model "
        "people-detector is loaded, rather than loading it cold"
    )
    assert evicted.startswith(
        "This economy run waits for runner evicting-holder, which had its "
        "models loaded when the run was queued but has evicted them since, so "
        "it loads them cold when it takes the run."
    )
    assert stopping.startswith(
        "This economy run waits on the queue of runner evicting-holder, which "
        "is stopping: it finishes its current run, then moves this run to the "
        "shared queue, where another runner takes it."
    )


@pytest.mark.parametrize(
    "heartbeat",
    [
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"name": "unreadable-holder", "models": [{"key": "k1"}]}),
        json.dumps({"name": "unreadable-holder", "models": 5}),
    ],
)
def test_economy_wait_unreadable_heartbeat(db, alice, heartbeat):
    # The run waits on the queue of a runner with no process, whose
    # heartbeat key contains text that is not a heartbeat.
    run = Run.objects.create(
        owner=alice,
        source=Run.Source.API,
        priority=Run.Priority.ECONOMY,
        definition_digest="digest",
        queue_name=keys.runner_queue("unreadable-holder"),
        model_refs=[{"model_id": "people-detector", "cache_key": "k1"}],
    )
    queue_key = f"{Queue.redis_queue_namespace_prefix}{run.queue_name}"
    get_redis().rpush(queue_key, str(run.pk))
    try:
        with registered_runner("unreadable-holder", ("k1",)):
            get_redis().set(
                keys.heartbeat_key("unreadable-holder"), heartbeat, px=300_000
            )
            waiting = waiting_state(run)
    finally:
        get_redis().delete(queue_key)

    assert waiting["runner"]["name"] == "unreadable-holder"
    assert waiting["runner"]["live"] is True
    assert waiting["reason"] == "Runner unreadable-holder is about to take the run."


@pytest.mark.parametrize("value", ["cheap", "Economy", 1, ["economy"], ""])
def test_invalid_priority_rejected(runner, alice_client, value):
    workflow_id = create_workflow(alice_client, image_height())
    responses = [
        run_workflow(alice_client, workflow_id, priority=value),
        alice_client.post(
            f"/api/workflows/{workflow_id}/estimate",
            {"priority": value},
            format="json",
        ),
        alice_client.post(
            "/api/estimate",
            {"specification": image_height(), "priority": value},
            format="json",
        ),
    ]
    for response in responses:
        assert response.status_code == 400
        body = response.json()
        assert body["code"] == "malformed_request"
        assert body["field"] == "priority"
        assert '"standard" or "economy"' in body["message"]
        assert "hint" in body
    assert Run.objects.count() == 0
    assert Bill.objects.count() == 0


def test_runworkflow_priority_option(runner, tmp_path):
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(image_height()))
    image = str(image_path())

    call_command("runworkflow", str(path), "--image", image, "--priority", "economy")
    with pytest.raises(CommandError, match="invalid choice: 'cheap'"):
        call_command("runworkflow", str(path), "--image", image, "--priority", "cheap")

    run = Run.objects.get()
    assert run.priority == Run.Priority.ECONOMY
    assert run.status == Run.Status.SUCCEEDED


@contextlib.contextmanager
def sized_fleet(
    *runners: tuple[str, tuple[str, ...]], budget_bytes: int, model_bytes: int
):
    """Register runners (name, cache keys) whose models are ``model_bytes`` each."""
    with ExitStack() as stack:
        for name, cache_keys in runners:
            stack.enter_context(registered_runner(name, cache_keys))
            models = [{"cache_key": k, "memory_bytes": model_bytes} for k in cache_keys]
            beat = {"name": name, "models": models, "budget_bytes": budget_bytes}
            get_redis().set(keys.heartbeat_key(name), json.dumps(beat), px=300_000)
        try:
            yield
        finally:
            for name, _ in runners:
                get_redis().delete(keys.current_run_key(name))


def test_economy_skips_holder_that_evicts(db):
    # A run calls k1, then k2, and one runner holds only one of the two
    # models. "eco-late" holds k2 and is idle, but loading k1 first evicts
    # k2, so the run would load both models cold there. "eco-early" holds
    # k1 and is busy: the run starts hot there, so that is where it waits.
    call_order = ["k1", "k2"]
    with sized_fleet(
        ("eco-late", ("k2",)),
        ("eco-early", ("k1",)),
        budget_bytes=100,
        model_bytes=80,
    ):
        get_redis().set(keys.current_run_key("eco-early"), "another-run", ex=60)
        runners = [r for r in fleet.live_runners() if r.name.startswith("eco-")]
        predicted = predict_route(call_order, runners, Run.Priority.ECONOMY)
        queue, _ = choose_economy_queue(call_order, "run-1")
        # Called again after k2, k1 loads twice, but "eco-early" saves the
        # first of those loads.
        again, _ = choose_economy_queue(["k1", "k2", "k1"], "run-2")
        # With room for both, k2 stays loaded on "eco-late", which is idle.
        roomy = {r.name: r for r in runners}
        roomy["eco-late"].data["budget_bytes"] = 1000
        roomy_route = predict_route(call_order, runners, Run.Priority.ECONOMY)

    assert queue == keys.runner_queue("eco-early")
    assert again == keys.runner_queue("eco-early")
    assert predicted.queue == queue
    assert predicted.waits_for_holder is True
    assert roomy_route.queue == keys.runner_queue("eco-late")


def test_standard_skips_holder_saving_no_load(db):
    # A run calls k1, then k2, which do not fit a runner's budget together.
    # The idle "std-late" holds only k2: loading k1 first evicts it, so the
    # run would load both models there, as on a runner holding neither.
    # Routing leaves such a runner free for runs it would help.
    call_order = ["k1", "k2"]
    with sized_fleet(
        ("std-late", ("k2",)),
        ("std-early", ("k1",)),
        ("std-empty", ()),
        budget_bytes=100,
        model_bytes=80,
    ):
        get_redis().set(keys.current_run_key("std-early"), "another-run", ex=60)
        snapshot = fleet.fleet_snapshot()
        runners = [r for r in snapshot.runners if r.name.startswith("std-")]
        view = fleet.FleetSnapshot(runners, snapshot.generation)
        predicted = predict_route(call_order, runners)
        queue, _ = choose_queue(call_order, view, "run-1")
        late_mark = get_redis().get(keys.current_run_key("std-late"))
        # Once idle, "std-early" saves the run the load of k1.
        get_redis().delete(keys.current_run_key("std-early"))
        early_predicted = predict_route(call_order, runners)
        early_queue, _ = choose_queue(call_order, view, "run-2")

    assert queue == keys.SHARED_QUEUE
    assert late_mark is None
    assert predicted.queue == keys.SHARED_QUEUE
    assert {r.name for r in predicted.takers} == {"std-late", "std-empty"}
    assert early_queue == keys.runner_queue("std-early")
    assert early_predicted.queue == early_queue


def test_economy_skips_stopping_holder(
    runner, extra_runners, alice, alice_client, admin_client
):
    # The holder finishes its slow run after SIGTERM and then stops, moving
    # its queued jobs to the shared queue, so an economy run sent meanwhile
    # would wait for a run it gains nothing from.
    holder = extra_runners("economy-stopping")
    start(alice, STOPPING_HOLDER_MODEL, holder.name)
    wait_until_loaded(holder, STOPPING_HOLDER_MODEL)
    workflow_id = create_workflow(alice_client, detection(STOPPING_HOLDER_MODEL))
    busy = start(alice, SLOW_MODEL, holder.name, wait_s=0)
    wait_for_status(busy.run.id, Run.Status.RUNNING)
    holder.process.terminate()
    deadline = time.monotonic() + 10
    while not (holder.state() or {}).get("stopping"):
        assert time.monotonic() < deadline, "the heartbeat never showed the stop"
        time.sleep(0.05)
    fleet_page = admin_client.get("/admin/runner/run/fleet/").content.decode()

    response = run_workflow(
        alice_client, workflow_id, priority="economy", **{"async": True}
    )

    assert response.status_code == 202, response.json()
    queued = read_run(alice_client, response.json()["id"])
    assert queued["queue"] != keys.runner_queue(holder.name)
    economy = wait_for_finish(alice_client, response.json()["id"])
    assert economy["status"] == "succeeded", economy["error"]
    assert economy["runner"] == runner.name
    assert "(stopping: takes no more runs)" in fleet_page


def test_routing_rereads_fleet_after_stop_request(db):
    # A view read before "stop-holder" was asked to stop must not send a
    # standard run to its queue: the stop changes the fleet's generation.
    with fleet_of(("stop-holder", ("k1",)), ("stop-other", ())):
        view = fleet.fleet_snapshot()
        beat = {"name": "stop-holder", "instance": "stop-holder-1"}
        fleet.publish_heartbeat(
            "stop-holder",
            {**beat, "models": [{"cache_key": "k1"}], "stopping": True},
        )
        queue, _ = choose_queue(["k1"], view, "run-1")

    assert queue == keys.SHARED_QUEUE


def test_estimate_skips_stopping_runner(db, alice):
    # Both runners are idle and hold no model of the run, and "est-stopping"
    # was asked to stop. Routing would leave it the shared queue's runs to
    # "est-open" alone, and so must the estimate and the hot prediction.
    with fleet_of(("est-stopping", ()), ("est-open", ("k1",))) as snapshot:
        snapshot.runners[0].data["stopping"] = True
        route = predict_route(["k2"], snapshot.runners)
        models = [{"cache_key": "k1"}]
        predict_hot(models, ["k1"], snapshot.runners, keys.SHARED_QUEUE, alice.id)
        for name in ("est-stopping", "est-open"):
            get_redis().set(keys.current_run_key(name), "another-run", ex=60)
        busy_route = predict_route(["k2"], snapshot.runners)

    assert route.queue == keys.SHARED_QUEUE
    assert [r.name for r in route.takers] == ["est-open"]
    assert models[0]["predicted_hot"] is True
    assert busy_route.all_busy is True
    assert [r.name for r in busy_route.takers] == ["est-open"]


def test_estimate_with_every_runner_stopping(db):
    # Both runners were asked to stop, one of them while in a run. Neither
    # takes the run, so the estimate must report them stopping, not busy.
    with fleet_of(("all-stop-a", ("k1",)), ("all-stop-b", ())) as snapshot:
        for state in snapshot.runners:
            state.data["stopping"] = True
        get_redis().set(keys.current_run_key("all-stop-a"), "another-run", ex=60)
        route = predict_route(["k1"], snapshot.runners)
        unknown: list[str] = []
        placement = _place_run(
            ["k1"], snapshot.runners, Run.Priority.STANDARD, {"k1"}, unknown, []
        )

    assert route.takers == []
    assert route.all_stopping is True
    assert route.all_busy is False
    assert placement.queue_known is False
    assert len(unknown) == 1
    assert unknown[0].startswith("every runner is stopping")
    assert "busy" not in unknown[0]


def test_economy_beside_stopping_runner_joins_shared_queue(db):
    # "eco-stopping" was asked to stop, so "eco-holder" is the only runner
    # that takes runs. As with a single runner, an economy run waits on the
    # shared queue, behind the runs sent before it.
    with fleet_of(("eco-stopping", ()), ("eco-holder", ("k1",))) as snapshot:
        snapshot.runners[0].data["stopping"] = True
        holder = economy_holder(["k1"], snapshot.runners, {})
        route = predict_route(["k1"], snapshot.runners, Run.Priority.ECONOMY)

    assert holder is None
    assert route.queue == keys.runner_queue("eco-holder")
    assert route.waits_for_holder is False


def test_moved_economy_run_counts_as_waited(runner, extra_runners, alice, alice_client):
    # The economy run waits on the busy holder's own queue. The holder is
    # then stopped, moves the run to the shared queue, and the idle session
    # runner takes it. The run waited for a runner all the same, so the
    # estimate must not predict queue time from it.
    holder = extra_runners("economy-moved")
    start(alice, MOVED_HOLDER_MODEL, holder.name)
    wait_until_loaded(holder, MOVED_HOLDER_MODEL)
    workflow_id = create_workflow(alice_client, detection(MOVED_HOLDER_MODEL))
    busy = start(alice, SLOW_MODEL, holder.name, wait_s=0)
    wait_for_status(busy.run.id, Run.Status.RUNNING)
    response = run_workflow(
        alice_client, workflow_id, priority="economy", **{"async": True}
    )
    assert response.status_code == 202, response.json()
    run_id = response.json()["id"]
    queued = read_run(alice_client, run_id)

    holder.process.terminate()
    economy = wait_for_finish(alice_client, run_id)

    assert queued["queue"] == keys.runner_queue(holder.name)
    assert economy["status"] == "succeeded", economy["error"]
    assert economy["runner"] == runner.name
    assert economy["queue"] == keys.SHARED_QUEUE
    assert economy["timing"]["waited_for_runner"] is True
