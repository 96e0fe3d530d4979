"""Estimates before a run: hot or cold, latency and price, from real runs."""

import copy
import json
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from django.conf import settings

from billing.policy import evaluate_formula
from runner import estimate as estimate_module
from runner import fleet, keys
from runner.dispatch import predict_hot
from runner.models import Run
from runner.registry import resolve_model
from tests.conftest import ROOT, private_data_env, registered_runner, start_cli_run
from tests.definitions import detect_then_crops, detection, image_height
from tests.test_registry import record_upload
from tests.test_runner_pool import start
from tests.test_runs import create_workflow, run_workflow
from webapp.redis import get_redis
from workflows.timing import COMPONENTS, RUNNER_COMPONENTS


def estimate(client, workflow_id, body=None):
    response = client.post(
        f"/api/workflows/{workflow_id}/estimate", body or {}, format="json"
    )
    assert response.status_code == 200, response.json()
    return response.json()


def median(values):
    return round(statistics.median(values))


def wait_until_loaded(runner, model_id: str, timeout_s: float = 10) -> None:
    """Wait for the runner's heartbeat to list the model; it lags a run's end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = runner.state() or {}
        if model_id in {model["model_id"] for model in state.get("models", [])}:
            return
        time.sleep(0.05)
    raise AssertionError(f"{runner.name}'s heartbeat does not list {model_id}")


def test_estimate_without_history_is_unknown(runner, alice_client):
    # The size suffix gives a cache entry no runner of the session has loaded.
    workflow_id = create_workflow(alice_client, detection("people-detector-672"))
    body = estimate(alice_client, workflow_id)
    assert body["hot"] is False
    assert body["runner"] == runner.name
    model = body["models"][0]
    assert model["hot"] is False
    assert model["cold_load_us"] is None
    assert model["per_call_us"] is None
    # One call per model step, as a number like the medians of later runs.
    assert model["calls"] == 1.0
    assert isinstance(model["calls"], float)
    assert body["total"] is None
    assert body["price"] is None
    assert any("people-detector-672" in reason for reason in body["unknown"])
    assert Run.objects.count() == 0


def test_estimate_after_runs_uses_their_medians(runner, alice_client):
    workflow_id = create_workflow(alice_client, detection("people-detector-704"))
    for _ in range(3):
        assert run_workflow(alice_client, workflow_id).status_code == 200
    wait_until_loaded(runner, "people-detector-704")

    body = estimate(alice_client, workflow_id)
    assert body["hot"] is True
    assert body["runner"] == runner.name
    model = body["models"][0]
    assert model["loaded_on"] == [runner.name]
    assert model["cold_load_us"] == 0
    assert model["calls"] == 1
    # The first run loaded the model; call times come from the two hot runs.
    assert model["samples"] == 2
    assert body["unknown"] == []

    # Workflow components also come from the runs that loaded no model.
    breakdowns = [run.breakdown for run in Run.objects.filter(cold=False)]
    assert len(breakdowns) == 2
    hot = [b["models"][0] for b in breakdowns]
    inference = median([entry["inference"] for entry in hot])
    assert model["per_call_us"]["inference"] == inference
    components = body["components"]
    assert list(components) == list(COMPONENTS)
    assert components["inference"] == inference
    assert components["cold_load"] == 0
    for name in ("request", "queue", "compile", "blocks", "overhead"):
        assert components[name] == median([b["components"][name] for b in breakdowns])
    assert body["runner_total"] == sum(components[n] for n in RUNNER_COMPONENTS)
    assert body["total"] == sum(components.values())


def test_estimate_price_follows_policy(runner, alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    assert run_workflow(alice_client, workflow_id).status_code == 200

    body = estimate(alice_client, workflow_id)
    price = body["price"]
    # A run without a model takes a few milliseconds, under the 100 ms
    # minimum, which costs 200 µcr at the default 2,000 µcr per second.
    assert body["runner_total"] < 100_000
    assert price["billed_ms"] == 100
    assert price["amount_microcredits"] == 200
    assert evaluate_formula(price["formula"]) == price["amount_microcredits"]
    assert body["hot"] is True
    assert body["models"] == []


def test_estimate_ignores_other_users_runs(runner, alice_client, bob_client):
    bob_workflow = create_workflow(bob_client, detection("people-detector-736"))
    assert run_workflow(bob_client, bob_workflow).status_code == 200
    wait_until_loaded(runner, "people-detector-736")

    alice_workflow = create_workflow(alice_client, detection("people-detector-736"))
    body = estimate(alice_client, alice_workflow)
    model = body["models"][0]
    # The runner has the model, so the run would be hot.
    assert model["hot"] is True
    assert model["cold_load_us"] == 0
    # bob's run is neither used nor counted.
    assert model["samples"] == 0
    assert model["per_call_us"] is None
    assert body["basis"] == {"workflow_runs": 0, "history_runs": 0}
    assert body["total"] is None
    assert body["price"] is None


def test_estimate_evicted_model_is_cold(runner, extra_runners, alice, alice_client):
    # yolov5n (10.6 MB of weights) and yolov6n (18.0 MB) each fit a 20 MiB
    # budget alone, not together, and no other test loads them.
    extra_runners("estimate-small", budget_mb=20)
    first = start(alice, "yolov5n.yaml", "estimate-small").payload
    start(alice, "yolov6n.yaml", "estimate-small")
    cold_load = first["meta"]["breakdown"]["models"][0]["cold_load"]["total"]
    time.sleep(0.6)  # one heartbeat, so the eviction is visible

    workflow_id = create_workflow(alice_client, detection("yolov5n.yaml"))
    body = estimate(alice_client, workflow_id)
    model = body["models"][0]
    assert model["hot"] is False
    assert model["loaded_on"] == []
    assert model["cold_load_us"] == cold_load
    assert model["pretrained"] is False
    assert body["hot"] is False
    assert body["runner"] is None
    assert body["components"]["cold_load"] == cold_load
    assert body["total"] > cold_load


def test_estimate_inline_specification(runner, alice_client):
    response = alice_client.post(
        "/api/estimate", {"specification": image_height()}, format="json"
    )
    assert response.status_code == 200, response.json()
    assert response.json()["hot"] is True


def test_estimate_bad_requests(runner, alice_client, bob_client):
    workflow_id = create_workflow(alice_client, detection())

    other = bob_client.post(f"/api/workflows/{workflow_id}/estimate", {}, format="json")
    assert other.status_code == 404

    missing = alice_client.post("/api/estimate", {}, format="json")
    assert missing.status_code == 400
    assert missing.json()["field"] == "specification"

    unknown_model = alice_client.post(
        "/api/estimate",
        {"specification": detection("no-such-model")},
        format="json",
    )
    assert unknown_model.status_code == 400
    assert "no-such-model" in unknown_model.json()["message"]

    bad_inputs = alice_client.post(
        f"/api/workflows/{workflow_id}/estimate", {"inputs": [1]}, format="json"
    )
    assert bad_inputs.status_code == 400
    assert bad_inputs.json()["field"] == "inputs"

    empty_batch = alice_client.post(
        f"/api/workflows/{workflow_id}/estimate",
        {"inputs": {"image": []}},
        format="json",
    )
    assert empty_batch.status_code == 400
    assert "empty list" in empty_batch.json()["message"]

    # The image is not decoded, but a value a run would reject before
    # decoding gets the run's error.
    for value, message in [
        (5, """image input 'image' must be {"type": "base64", "value": ...}"""),
        (
            [{"type": "base64", "value": "a"}, {"type": "numpy", "value": "b"}],
            "image input 'image[1]' has type 'numpy'; only 'base64' is supported",
        ),
    ]:
        not_image = alice_client.post(
            f"/api/workflows/{workflow_id}/estimate",
            {"inputs": {"image": value}},
            format="json",
        )
        assert not_image.status_code == 400, value
        assert not_image.json()["code"] == "invalid_input", value
        assert not_image.json()["field"] == "image", value
        assert not_image.json()["message"] == message, value

    no_version = alice_client.post(
        f"/api/workflows/{workflow_id}/estimate", {"version": 9}, format="json"
    )
    assert no_version.status_code == 404
    assert Run.objects.count() == 0


def test_estimate_rejects_batch_over_image_limit(runner, alice_client, monkeypatch):
    # A run of this batch would be rejected, so its estimate is too, with the
    # run's message.
    monkeypatch.setitem(settings.GLASSBOX, "MAX_RUN_IMAGES", 2)
    workflow_id = create_workflow(alice_client, detection())
    routes = {
        "stored": (f"/api/workflows/{workflow_id}/estimate", {}),
        "inline": ("/api/estimate", {"specification": detection()}),
    }
    for name, (path, body) in routes.items():
        at_limit = alice_client.post(
            path, {**body, "inputs": {"image": ["a", "b"]}}, format="json"
        )
        assert at_limit.status_code == 200, name
        assert at_limit.json()["batch_size"] == 2, name

        over = alice_client.post(
            path, {**body, "inputs": {"image": ["a", "b", "c"]}}, format="json"
        )
        assert over.status_code == 400, name
        assert over.json()["code"] == "invalid_input", name
        assert over.json()["field"] == "image", name
        assert over.json()["message"] == (
            "image input 'image' has 3 images, over the limit of 2 per run "
            "(MAX_RUN_IMAGES)"
        ), name


def test_estimate_and_run_go_where_most_models_are(
    runner, extra_runners, alice, alice_client
):
    # "most-a" has one of the run's two models loaded and "most-b" neither, nor
    # does the session runner: no other test uses these two sizes.
    holder = extra_runners("most-a")
    extra_runners("most-b")
    start(alice, "people-detector-256", "most-a")
    wait_until_loaded(holder, "people-detector-256")
    definition = detection("people-detector-256")
    second = dict(definition["steps"][0], name="second", model_id="people-detector-192")
    definition["steps"].append(second)

    body = alice_client.post(
        "/api/estimate", {"specification": definition}, format="json"
    ).json()
    assert body["runner"] == "most-a"
    assert body["hot"] is False
    by_id = {model["model_id"]: model for model in body["models"]}
    assert by_id["people-detector-256"]["hot"] is True
    assert by_id["people-detector-256"]["cold_load_us"] == 0
    assert by_id["people-detector-192"]["hot"] is False

    outcome = start_cli_run(alice, definition, wait_s=120)
    breakdown = outcome.payload["meta"]["breakdown"]
    assert breakdown["runner"] == "most-a"
    cold = {model["model_id"]: model["cold"] for model in breakdown["models"]}
    assert cold == {"people-detector-256": False, "people-detector-192": True}
    predicted = {
        ref["model_id"]: ref["predicted_hot"] for ref in outcome.run.model_refs
    }
    assert predicted == {"people-detector-256": True, "people-detector-192": False}


SCRIPT_WITHOUT_RUNNER = """
import copy
import json
import django

django.setup()
from runner.estimate import estimate_run
from tests.definitions import image_height
from webapp.redis import stop_embedded_redis
from workflows.compiler import plan_cache

plan = plan_cache.compile(image_height()).plan
try:
    print(json.dumps(estimate_run(plan, {}, owner_id=1)))
finally:
    stop_embedded_redis()
"""


def test_estimate_without_runner(transactional_db, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT_WITHOUT_RUNNER],
        cwd=ROOT,
        env=private_data_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout.strip().splitlines()[-1])
    assert body["runners_up"] == 0
    assert body["components"]["queue"] is None
    assert body["total"] is None
    assert any("no runner is up" in reason for reason in body["unknown"])


def test_estimate_scales_model_calls_with_batch(runner, alice_client, monkeypatch):
    workflow_id = create_workflow(alice_client, detection("people-detector-768"))
    for _ in range(2):
        assert run_workflow(alice_client, workflow_id).status_code == 200
    wait_until_loaded(runner, "people-detector-768")

    # Image values are only counted for an estimate, not decoded.
    body = estimate(alice_client, workflow_id, {"inputs": {"image": ["a", "b", "c"]}})
    model = body["models"][0]
    assert body["batch_size"] == 3
    assert model["calls"] == 3
    per_call = model["per_call_us"]["inference"]
    assert body["components"]["inference"] == round(3 * per_call)
    assert not any("RUN_TIME_LIMIT_S" in note for note in body["notes"])
    assert "come from runs of 1 image per input, not 3" in " ".join(body["notes"])

    # An estimate of a batch whose predicted time passes the run time limit
    # notes it.
    images = ["a"] * (1 + int(600 * 1e6 / per_call))
    monkeypatch.setitem(settings.GLASSBOX, "MAX_RUN_IMAGES", len(images))
    body = estimate(alice_client, workflow_id, {"inputs": {"image": images}})
    assert body["runner_total"] > 600 * 1e6
    assert any("over RUN_TIME_LIMIT_S (600 s)" in note for note in body["notes"])


def test_estimate_time_limit_without_history(runner, alice_client, monkeypatch):
    # A workflow whose runs all timed out has no succeeded run, so its
    # runner total is unknown. Its model calls alone still pass the limit.
    measured = create_workflow(alice_client, detection("people-detector-800"))
    assert run_workflow(alice_client, measured).status_code == 200
    unrun = create_workflow(alice_client, detection("people-detector-800", 0.3))

    body = estimate(alice_client, unrun)
    assert body["runner_total"] is None
    assert not any("RUN_TIME_LIMIT_S" in note for note in body["notes"])

    per_call = sum(body["models"][0]["per_call_us"].values())
    images = ["a"] * (1 + int(600 * 1e6 / per_call))
    monkeypatch.setitem(settings.GLASSBOX, "MAX_RUN_IMAGES", len(images))
    body = estimate(alice_client, unrun, {"inputs": {"image": images}})
    assert body["runner_total"] is None
    assert body["components"]["inference"] is not None
    assert any("over RUN_TIME_LIMIT_S (600 s)" in note for note in body["notes"])


def test_estimate_uncalled_model_is_not_loaded(runner, alice, alice_client):
    # No "Fall" in bus.jpg, so the crops are empty and yolov8m never runs.
    definition = detect_then_crops("yolov8m.yaml")
    definition["steps"][0]["class_filter"] = ["Fall"]
    workflow_id = create_workflow(alice_client, definition)
    assert run_workflow(alice_client, workflow_id).status_code == 200
    wait_until_loaded(runner, "people-detector")

    body = estimate(alice_client, workflow_id)
    inner = {model["model_id"]: model for model in body["models"]}["yolov8m.yaml"]
    assert inner["calls"] == 0
    assert inner["hot"] is True
    assert inner["cold_load_us"] == 0
    assert body["hot"] is True
    assert body["total"] is not None

    # "tight" holds only the uncalled model, and both models together pass
    # its budget. With the session runner busy, the run would go to
    # "tight", which needs room for the detector alone.
    inner_key = resolve_model("yolov8m.yaml", owner_id=alice.id).cache_key
    beat = {
        "name": "tight",
        "budget_bytes": 60_000_000,
        "models": [{"cache_key": inner_key, "memory_bytes": 59_000_000}],
    }
    with registered_runner("tight"), marked_busy(runner.name):
        get_redis().set(keys.heartbeat_key("tight"), json.dumps(beat), px=60_000)
        body = estimate(alice_client, workflow_id)
    assert body["runner"] == "tight"
    assert body["hot"] is False
    assert not any("memory budget" in note for note in body["notes"])
    outer = {model["model_id"]: model for model in body["models"]}["people-detector"]
    assert outer["loads"] == 1


def test_estimate_times_crop_calls_from_crop_runs(runner, alice, alice_client):
    # yolov8n.yaml runs on the whole image in one workflow and on each crop
    # in another. A crop is resized to fewer pixels, so its calls are timed
    # from the crop workflow's own runs, not from the whole-image ones.
    for _ in range(3):
        start_cli_run(alice, detection("yolov8n.yaml"), wait_s=120)
    workflow_id = create_workflow(alice_client, detect_then_crops("yolov8n.yaml"))
    assert run_workflow(alice_client, workflow_id).status_code == 200
    crop_run = Run.objects.get(workflow_version__workflow_id=workflow_id)
    [crop_entry] = [
        entry
        for entry in crop_run.breakdown["models"]
        if entry["model_id"] == "yolov8n.yaml"
    ]
    assert crop_entry["steps"] == ["inner"]
    assert crop_entry["calls"] > 1

    body = estimate(alice_client, workflow_id)
    inner = {model["model_id"]: model for model in body["models"]}["yolov8n.yaml"]
    assert inner["calls"] == crop_entry["calls"]
    assert inner["samples"] == 1
    for stage in ("preprocess", "inference", "postprocess"):
        per_call = round(crop_entry[stage] / crop_entry["calls"])
        assert inner["per_call_us"][stage] == per_call, stage

    # A definition without runs of its own still takes call times from the
    # other definition's runs.
    other = detect_then_crops("yolov8n.yaml", outer_model="people-detector-608")
    unrun = create_workflow(alice_client, other)
    body = estimate(alice_client, unrun)
    inner = {model["model_id"]: model for model in body["models"]}["yolov8n.yaml"]
    assert inner["samples"] >= 3


def test_estimate_names_definition_without_history():
    # The history is per definition, so a workflow run many times before an
    # edit has none for its new version. The reason must not deny those runs.
    unknown = []
    estimate_module._workflow_components([], 1, unknown, [])
    assert len(unknown) == 1
    assert unknown[0].startswith("this definition has no succeeded run yet")
    assert "the workflow's earlier versions, do not count" in unknown[0]


def test_cold_load_counted_once_per_weights_file():
    forecasts = [
        {"cache_key": "model_dir:/m/people.pt:0", "cold_load_us": 400},
        {"cache_key": "model_dir:/m/people.pt:0", "cold_load_us": 400},
        {"cache_key": "architecture:yolov8n.yaml:0", "cold_load_us": 100},
    ]
    assert estimate_module._cold_load(forecasts) == 500


def test_cold_load_with_uncalled_sharing_id():
    # people-detector and people-detector-640 share one loaded model. Only
    # the first is called (the second runs on crops that were empty), so
    # only its forecast carries the load.
    forecasts = [
        {"cache_key": "model_dir:/m/people.pt:640", "cold_load_us": 400},
        {"cache_key": "model_dir:/m/people.pt:640", "cold_load_us": 0},
    ]
    assert estimate_module._cold_load(forecasts) == 400


def test_models_over_every_budget_count_as_cold():
    def runner(name, budget, models):
        loaded = [{"cache_key": key, "memory_bytes": size} for key, size in models]
        return fleet.RunnerState(name, {"budget_bytes": budget, "models": loaded})

    keys = {"a", "b"}
    small = [runner("r1", 60, [("a", 45)]), runner("r2", 60, [("b", 45)])]
    assert estimate_module._exceeds_budgets(keys, small, []) is True
    # One runner could hold both, and may take the run.
    mixed = [*small, runner("r3", 100, [])]
    assert estimate_module._exceeds_budgets(keys, mixed, []) is False
    # Sizes of models no runner has come from the owner's runs.
    history = [
        {
            "model_refs": [{"model_id": "m", "cache_key": "b"}],
            "models": [{"model_id": "m", "memory_bytes": 45}],
        }
    ]
    alone = [runner("r1", 60, [("a", 45)])]
    assert estimate_module._exceeds_budgets(keys, alone, history) is True
    assert estimate_module._exceeds_budgets(keys, alone, []) is False


@pytest.mark.django_db
def test_run_prediction_counts_evictions_as_cold(alice):
    def runner(name, budget, models):
        loaded = [{"cache_key": key, "memory_bytes": size} for key, size in models]
        return fleet.RunnerState(name, {"budget_bytes": budget, "models": loaded})

    # Both runners hold "b". Alice's last run measured "a", and the two
    # together exceed both budgets, so the runner that takes the run evicts
    # "b" to load "a".
    Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.SUCCEEDED,
        model_refs=[{"model_id": "m", "cache_key": "a"}],
        breakdown={"components": {}, "models": [{"model_id": "m", "memory_bytes": 45}]},
    )
    small = [runner("r1", 60, [("b", 45)]), runner("r2", 60, [("b", 45)])]
    models = [{"cache_key": "a"}, {"cache_key": "b"}]
    predict_hot(models, ["a", "b"], small, keys.SHARED_QUEUE, alice.id)
    assert [m["predicted_hot"] for m in models] == [False, False]

    # Called first, the model both runners hold is hot until the other loads.
    predict_hot(models, ["b", "a"], small, keys.SHARED_QUEUE, alice.id)
    assert [m["predicted_hot"] for m in models] == [False, True]

    roomy = [runner("r1", 100, [("a", 45), ("b", 45)])]
    predict_hot(models, ["a", "b"], roomy, keys.SHARED_QUEUE, alice.id)
    assert [m["predicted_hot"] for m in models] == [True, True]


@pytest.mark.parametrize(
    ("call_order", "held", "evicting", "expected"),
    [
        (["a", "b"], {"a", "b"}, False, {"a": 0, "b": 0}),
        (["a", "a", "b"], set(), False, {"a": 1, "b": 1}),
        (["a", "b", "a"], set(), False, {"a": 1, "b": 1}),
        (["a", "b"], {"b"}, True, {"a": 1, "b": 1}),
        (["b", "a"], {"b"}, True, {"b": 0, "a": 1}),
        (["a", "b", "a"], set(), True, {"a": 2, "b": 1}),
        (["a", "b", "a"], {"a"}, True, {"a": 1, "b": 1}),
        (["a", "a", "b", "b"], set(), True, {"a": 1, "b": 1}),
    ],
)
def test_predicted_loads(call_order, held, evicting, expected):
    loads = estimate_module.predicted_loads(call_order, held, evicting)
    assert loads == expected


def test_forecast_cold_load_is_per_load():
    entry = {"model_id": "m", "cold": True, "calls": 1, "device": "cpu"}
    entry.update(preprocess=1, inference=10, postprocess=1)
    history = [
        {
            "model_refs": [{"model_id": "m", "cache_key": "k"}],
            "models": [{**entry, "loads": 2, "cold_load": {"total": 400}}],
        },
        {
            "model_refs": [{"model_id": "m", "cache_key": "k"}],
            "models": [{**entry, "loads": 1, "cold_load": {"total": 200}}],
        },
    ]
    model = {"model_id": "m", "cache_key": "k", "source": {"pretrained": True}}
    once = estimate_module._forecast_model(model, [], history, 1.0, "cpu", 1, [])
    twice = estimate_module._forecast_model(model, [], history, 1.0, "cpu", 2, [])
    assert once["cold_load_us"] == 200
    assert twice["cold_load_us"] == 400
    assert twice["loads"] == 2


def test_estimate_after_new_weights_counts_calls_by_id(
    runner, alice, alice_client, tmp_path
):
    workflow_id = create_workflow(alice_client, detection("people-detector"))
    assert run_workflow(alice_client, workflow_id).status_code == 200
    # The id now resolves to other weights for Alice: an upload recorded as
    # the upload view would, had the model directory's file come later.
    record_upload(alice, "people-detector", tmp_path)

    body = estimate(alice_client, workflow_id)
    model = body["models"][0]
    assert model["calls"] == 1
    assert model["hot"] is False
    assert model["cold_load_us"] is None
    assert model["per_call_us"] is None
    assert body["total"] is None
    assert body["price"] is None


def test_estimate_counts_calls_of_a_model_chosen_by_parameter(runner, alice_client):
    definition = detection("$inputs.model")
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "model", "default_value": "yolov8n.yaml"}
    )
    workflow_id = create_workflow(alice_client, definition)
    for _ in range(2):
        response = run_workflow(alice_client, workflow_id)
        assert response.status_code == 200, response.json()

    # Earlier runs of this workflow called its step with another model id.
    # The step is still called once per image, so the new model would load.
    never_loaded = "yolo12n.yaml"
    body = estimate(alice_client, workflow_id, {"inputs": {"model": never_loaded}})
    model = body["models"][0]
    assert model["model_id"] == never_loaded
    assert model["calls"] == 1
    assert model["hot"] is False
    assert model["cold_load_us"] is None
    assert body["hot"] is False
    assert body["price"] is None


def forecast_calls(workflow_runs, steps, batch_size=2):
    return estimate_module._predicted_calls(workflow_runs, steps, batch_size)


def workflow_run(batch_size, request, queue=100, overhead=50, waited=False):
    components = dict.fromkeys(("compile", "blocks", "serialization"), 0)
    components.update(request=request, queue=queue, overhead=overhead)
    return {
        "cold": False,
        "batch_size": batch_size,
        "waited": waited,
        "components": components,
    }


def test_estimate_request_follows_batch_size():
    runs = [workflow_run(1, 1000), workflow_run(1, 1200), workflow_run(4, 2800)]

    # Runs of the batch size asked for give their median.
    notes = []
    components = estimate_module._workflow_components(runs, 1, [], notes)
    assert components["request"] == 1100
    assert notes == []

    # Other sizes give a line through each size's median: 1100 at 1 image
    # and 2800 at 4 make 1100 + 566.7 per added image.
    notes = []
    components = estimate_module._workflow_components(runs, 7, [], notes)
    assert components["request"] == 4500
    assert components["queue"] == 100
    assert notes == [
        "request, queue and overhead times for 7 images per input are "
        "extrapolated along a line through the medians of runs of 1 and 4 images"
    ]

    # A size between those run is read off the same line.
    notes = []
    components = estimate_module._workflow_components(runs, 2, [], notes)
    assert components["request"] == 1667
    assert notes == [
        "request, queue and overhead times for 2 images per input are "
        "interpolated along a line through the medians of runs of 1 and 4 images"
    ]

    # One other size is used as it is, with a note.
    notes = []
    components = estimate_module._workflow_components(runs[:2], 3, [], notes)
    assert components["request"] == 1100
    assert notes == [
        "request, queue and overhead times come from runs of 1 image per "
        "input, not 3, and they grow with the images sent"
    ]


def test_estimate_queue_of_batch_from_free_runs():
    # The run of 2 images waited for a runner, so the queue time for 2
    # images comes from the free run of 1 image, while the request time
    # comes from the run of 2.
    runs = [workflow_run(1, 1000, queue=200), workflow_run(2, 1500, 9000, waited=True)]
    notes = []
    components = estimate_module._workflow_components(runs, 2, [], notes)
    assert components["request"] == 1500
    assert components["queue"] == 200
    assert notes == [
        "queue times come from runs of 1 image per input, not 2, and they grow "
        "with the images sent"
    ]


def test_estimate_calls_when_steps_split_between_models():
    # Steps a and b both took their model id from a parameter. This run
    # gave them the same model, so its one entry counts the calls of both.
    shared = {
        "batch_size": 2,
        "models": [{"model_id": "people-detector", "steps": ["a", "b"], "calls": 4}],
    }
    # This run gave them different models: one call per image each.
    split = {
        "batch_size": 2,
        "models": [
            {"model_id": "people-detector", "steps": ["a"], "calls": 2},
            {"model_id": "yolo11n.yaml", "steps": ["b"], "calls": 2},
        ],
    }
    # Now a calls people-detector and b another model, so people-detector
    # is called once per image, whatever the shared run counted.
    assert forecast_calls([shared, split], {"a"}) == 2
    # With no run to split by step, each step counts one call per image.
    assert forecast_calls([shared], {"a"}) == 2
    # Both steps on people-detector again: the shared run counts as it ran.
    assert forecast_calls([shared], {"a", "b"}) == 4


@contextmanager
def marked_busy(*names: str):
    """Mark runners busy with a run in progress, as routing and runners do."""
    marks = [keys.current_run_key(name) for name in names]
    for mark in marks:
        get_redis().set(mark, "a-run-in-progress", px=60_000)
    try:
        yield
    finally:
        get_redis().delete(*marks)


def test_estimate_skips_a_busy_holder_as_routing_does(runner, alice, alice_client):
    # "busy-holder" has the model loaded but is in the middle of a run, so
    # routing sends the run to the shared queue, where the idle session
    # runner takes it and loads the model. No other test uses this size.
    definition = detection("people-detector-288")
    cache_key = resolve_model("people-detector-288", owner_id=alice.id).cache_key
    with registered_runner("busy-holder", (cache_key,)), marked_busy("busy-holder"):
        body = alice_client.post(
            "/api/estimate", {"specification": definition}, format="json"
        ).json()
        outcome = start_cli_run(alice, definition, wait_s=120)
    assert body["runner"] == runner.name
    assert body["hot"] is False
    assert body["models"][0]["loaded_on"] == ["busy-holder"]
    assert body["queued_ahead"] == 0
    breakdown = outcome.payload["meta"]["breakdown"]
    assert breakdown["runner"] == runner.name
    assert [model["cold"] for model in breakdown["models"]] == [True]
    assert outcome.run.model_refs[0]["predicted_hot"] is False


def test_estimate_with_every_runner_busy_has_unknown_queue(runner, alice, alice_client):
    # Both runners have the model loaded. The registered one has three jobs
    # queued on its own queue, and the session runner is in a run.
    cache_key = resolve_model("people-detector-416", owner_id=alice.id).cache_key
    start(alice, "people-detector-416", runner.name)
    wait_until_loaded(runner, "people-detector-416")
    own = f"rq:queue:{keys.runner_queue('backlog')}"
    with registered_runner("backlog", (cache_key,)), marked_busy(runner.name):
        get_redis().rpush(own, "ahead-1", "ahead-2", "ahead-3")
        try:
            body = alice_client.post(
                "/api/estimate",
                {"specification": detection("people-detector-416")},
                format="json",
            ).json()
        finally:
            get_redis().delete(own)
    assert body["runner"] is None
    assert body["hot"] is True
    assert body["queued_ahead"] == 3
    assert body["components"]["queue"] is None
    assert body["total"] is None
    assert any(
        "every runner is busy with a run, and 3 runs are queued" in reason
        for reason in body["unknown"]
    )


def test_estimate_counts_models_busy_runners_load(runner, alice, alice_client):
    # The session runner has the model loaded. "loading" does not yet, but
    # the run it executes uses the model, so it has the model loaded by the
    # time it is free to take a shared-queue job. No other test uses this
    # size.
    model_id = "people-detector-448"
    cache_key = resolve_model(model_id, owner_id=alice.id).cache_key
    start(alice, model_id, runner.name)
    wait_until_loaded(runner, model_id)
    executing = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.RUNNING,
        model_refs=[{"model_id": model_id, "cache_key": cache_key}],
    )
    other = Run.objects.create(
        owner=alice, source="api", status=Run.Status.RUNNING, model_refs=[]
    )
    models = [{"cache_key": cache_key}]

    with registered_runner("loading"), marked_busy(runner.name, "loading"):
        get_redis().set(keys.current_run_key("loading"), str(executing.pk))
        body = alice_client.post(
            "/api/estimate", {"specification": detection(model_id)}, format="json"
        ).json()
        predict_hot(
            models, [cache_key], fleet.live_runners(), keys.SHARED_QUEUE, alice.id
        )
        hot_while_loading = models[0]["predicted_hot"]

        # Executing a run of other models, "loading" would take the run cold.
        get_redis().set(keys.current_run_key("loading"), str(other.pk))
        other_body = alice_client.post(
            "/api/estimate", {"specification": detection(model_id)}, format="json"
        ).json()
        predict_hot(
            models, [cache_key], fleet.live_runners(), keys.SHARED_QUEUE, alice.id
        )
        hot_while_other = models[0]["predicted_hot"]

    assert body["runner"] is None
    assert body["hot"] is True
    assert body["models"][0]["loaded_on"] == [runner.name]
    assert not any("free first" in note for note in body["notes"])
    assert hot_while_loading is True

    assert other_body["hot"] is False
    assert (
        "whether a model is hot depends on which runner is free first: 1 of 2 "
        "runners would have every model of the run loaded"
    ) in other_body["notes"]
    assert hot_while_other is False


def test_queue_estimate_skips_runs_that_waited(runner, alice, alice_client):
    # Three earlier runs: two found a runner free, one waited behind others.
    workflow_id = create_workflow(alice_client, image_height())
    assert run_workflow(alice_client, workflow_id).status_code == 200
    stored = Run.objects.get()
    for queue_us, waited in ((2_000, False), (4_000, False), (9_000_000, True)):
        breakdown = copy.deepcopy(stored.breakdown)
        breakdown["components"]["queue"] = queue_us
        breakdown["waited_for_runner"] = waited
        Run.objects.create(
            owner=alice,
            workflow_version=stored.workflow_version,
            definition_digest=stored.definition_digest,
            source="api",
            status=Run.Status.SUCCEEDED,
            breakdown=breakdown,
            model_refs=[],
        )
    stored.delete()

    body = estimate(alice_client, workflow_id)
    assert body["components"]["queue"] == 3_000


def test_run_queued_before_runner_started_waited(
    transactional_db, extra_runners, alice
):
    # The name's heartbeat comes from an exited process of this host, so
    # no live runner moves the pinned job off the name's queue, and the
    # runner started below takes the name over.
    name = "starts-late"
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    beat = {
        "name": name,
        "models": [],
        "host": socket.gethostname(),
        "pid": int(exited.stdout),
    }
    get_redis().set(keys.heartbeat_key(name), json.dumps(beat), px=300_000)
    get_redis().sadd(keys.RUNNERS_SET, name)
    queued = start_cli_run(alice, image_height(), wait_s=0, runner=name)
    extra_runners(name)

    deadline = time.monotonic() + 120
    run = Run.objects.get(pk=queued.run.pk)
    while run.status not in (Run.Status.SUCCEEDED, Run.Status.FAILED):
        assert time.monotonic() < deadline, "the run never finished"
        time.sleep(0.2)
        run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    assert run.runner_name == name
    assert run.breakdown["waited_for_runner"] is True


def test_run_queued_behind_another_waited_for_runner(runner, extra_runners, alice):
    extra_runners("only-one")
    # A cold load of a large architecture keeps the runner busy, so the next
    # run is queued before the runner is free again.
    first = start(alice, "yolov8m.yaml", "only-one", wait_s=0)
    second = start_cli_run(alice, image_height(), wait_s=120, runner="only-one")
    third = start_cli_run(alice, image_height(), wait_s=120, runner="only-one")
    assert second.payload["meta"]["breakdown"]["waited_for_runner"] is True
    assert third.payload["meta"]["breakdown"]["waited_for_runner"] is False
    done = Run.objects.get(pk=first.run.pk)
    assert done.breakdown["waited_for_runner"] is False


def test_fleet_page_shows_each_models_memory(runner, alice, client, django_user_model):
    import re

    from runner.fleet import live_runners

    start_cli_run(alice, detection("people-detector-160"), wait_s=120)
    wait_until_loaded(runner, "people-detector-160")
    [state] = [r for r in live_runners() if r.name == runner.name]
    [model] = [
        m for m in state.data["models"] if m["model_id"] == "people-detector-160"
    ]
    expected_mib = round(model["memory_bytes"] / 1048576)
    assert expected_mib > 0

    staff = django_user_model.objects.create_user(
        "fleet-viewer", password="viewer-password", is_staff=True
    )
    client.force_login(staff)
    page = client.get("/admin/runner/run/fleet/").content.decode()
    memory = re.search(r"people-detector-160 \((\d+) MiB\)", page)
    assert memory is not None
    assert int(memory[1]) == expected_mib
