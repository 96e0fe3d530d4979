"""Runs end to end: API request, real runner process, real model, bill."""

import base64
import io
import struct
import time
import uuid
import zlib

import pytest
from django.conf import settings

from billing.models import Bill
from billing.policy import evaluate_formula
from runner import keys
from runner.dispatch import wait_for_result
from runner.models import Run
from runner.responses import pending_response
from runner.service import RunOutcome, waiting_slot
from tests.conftest import image_b64, image_bytes, start_cli_run
from tests.definitions import (
    compare,
    detect_then_crops,
    detection,
    detection_property,
    image_height,
    keep_where,
    parameter,
    static,
)
from webapp.redis import get_redis
from workflows.images import WorkflowImage
from workflows.models import Workflow
from workflows.timing import RUNNER_COMPONENTS


def create_workflow(client, definition, name="wf") -> int:
    response = client.post(
        "/api/workflows/", {"name": name, "definition": definition}, format="json"
    )
    assert response.status_code == 201, response.json()
    return response.json()["id"]


def run_workflow(client, workflow_id, **extra):
    body = {"inputs": {"image": {"type": "base64", "value": image_b64()}}, **extra}
    return client.post(f"/api/workflows/{workflow_id}/runs", body, format="json")


def test_run_people_detector_finds_people(runner, alice_client):
    workflow_id = create_workflow(alice_client, detection())
    response = run_workflow(alice_client, workflow_id)
    assert response.status_code == 200, response.json()
    output = response.json()["outputs"][0]
    classes = [p["class"] for p in output["predictions"]["predictions"]]
    assert classes.count("Normal") >= 2
    assert output["count"] == len(classes)
    assert output["predictions"]["image"] == {"width": 810, "height": 1080}


def test_run_breakdown_sums_to_totals(runner, alice_client):
    workflow_id = create_workflow(alice_client, detection())
    timing = run_workflow(alice_client, workflow_id).json()["timing"]
    components = timing["components"]
    assert sum(components.values()) == timing["total"]
    assert sum(components[name] for name in RUNNER_COMPONENTS) == timing["runner_total"]
    assert components["overhead"] >= 0


def test_run_first_cold_then_hot(runner, alice_client):
    # A size suffix makes a cache entry of its own, so this model id is new
    # to the session's runner.
    workflow_id = create_workflow(alice_client, detection("people-detector-352"))
    first = run_workflow(alice_client, workflow_id)
    second = run_workflow(alice_client, workflow_id)
    assert first.headers["X-Model-Cold-Start"] == "true"
    assert second.headers["X-Model-Cold-Start"] == "false"
    cold_model = first.json()["timing"]["models"][0]
    assert cold_model["cold"] is True
    assert cold_model["cold_load"]["total"] > 0
    assert second.json()["timing"]["components"]["cold_load"] == 0


def test_run_cold_load_split_adds_up(runner, alice_client):
    workflow_id = create_workflow(alice_client, detection("people-detector-384"))
    model = run_workflow(alice_client, workflow_id).json()["timing"]["models"][0]
    load = model["cold_load"]
    assert load["read"] + load["to_device"] + load["warmup"] == load["total"]
    assert model["memory_bytes"] > 1_000_000


def test_run_headers_agree_with_breakdown(runner, alice_client):
    workflow_id = create_workflow(alice_client, detection("people-detector-416"))
    started = time.perf_counter()
    response = run_workflow(alice_client, workflow_id)
    wall_s = time.perf_counter() - started
    headers = response.headers
    timing = response.json()["timing"]
    assert float(headers["X-Processing-Time"]) <= wall_s
    assert float(headers["X-Processing-Time"]) * 1e6 >= timing["total"]
    load_details = __import__("json").loads(headers["X-Model-Load-Details"])
    load_total_us = sum(round(d["t"] * 1e6) for d in load_details)
    assert load_total_us == round(float(headers["X-Model-Load-Time"]) * 1e6)
    assert load_total_us == timing["components"]["cold_load"]
    remote_us = sum(
        timing["components"][k] for k in ("preprocess", "inference", "postprocess")
    )
    assert round(float(headers["X-Remote-Processing-Time"]) * 1e6) == remote_us


def test_run_server_timing_sums_to_total(runner, alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    header = run_workflow(alice_client, workflow_id).headers["Server-Timing"]
    durations = {}
    for entry in header.split(", "):
        name, _, value = entry.partition(";dur=")
        durations[name] = float(value)
    total = durations.pop("total")
    assert abs(sum(durations.values()) - total) <= 0.001 * (len(durations) + 1)


def test_run_gets_exactly_one_bill_that_recomputes(runner, alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    body = run_workflow(alice_client, workflow_id).json()
    run = Run.objects.get(pk=body["id"])
    bills = Bill.objects.filter(run=run)
    assert bills.count() == 1
    bill = bills.get()
    assert evaluate_formula(bill.formula) == bill.amount_microcredits
    assert bill.billable_us == run.runner_total_us
    assert body["bill"]["amount_microcredits"] == bill.amount_microcredits


def test_run_record_stores_breakdown(runner, alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    body = run_workflow(alice_client, workflow_id).json()
    stored = alice_client.get(f"/api/runs/{body['id']}").json()
    assert stored["status"] == "succeeded"
    assert stored["timing"] == body["timing"]
    assert stored["outputs"] == [{"height": 1080}]


def test_run_async_answers_202_then_finishes(runner, alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    response = run_workflow(alice_client, workflow_id, **{"async": True})
    assert response.status_code == 202
    url = response.json()["url"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = alice_client.get(url).json()
        if body["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert body["status"] == "succeeded"
    assert body["bill"]["amount_microcredits"] > 0


def test_run_points_at_version_it_ran(runner, alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    first = run_workflow(alice_client, workflow_id).json()
    edited = image_height()
    edited["steps"][0]["operations"][0]["property_name"] = "width"
    response = alice_client.put(
        f"/api/workflows/{workflow_id}", {"definition": edited}, format="json"
    )
    assert response.json()["version"] == 2
    second = run_workflow(alice_client, workflow_id).json()
    assert first["workflow"]["version"] == 1
    assert second["workflow"]["version"] == 2
    assert second["outputs"] == [{"height": 810}]


def test_run_untrained_model_is_labelled(runner, alice_client):
    workflow_id = create_workflow(alice_client, detection("yolov8n.yaml"))
    response = run_workflow(alice_client, workflow_id)
    body = response.json()
    assert response.headers["X-Model-Untrained"] == "yolov8n.yaml"
    assert body["timing"]["models"][0]["pretrained"] is False
    assert any("untrained" in warning for warning in body["warnings"])


def test_run_crops_run_model_per_crop(runner, alice_client):
    definition = detection()
    definition["steps"].append(
        {
            "type": "DynamicCrop",
            "name": "crops",
            "images": "$inputs.image",
            "predictions": "$steps.people.predictions",
        }
    )
    definition["steps"].append(
        {
            "type": "PropertyDefinition",
            "name": "crop_heights",
            "data": "$steps.crops.crops",
            "operations": [{"type": "ExtractImageProperty", "property_name": "height"}],
        }
    )
    definition["outputs"].append(
        {
            "type": "JsonField",
            "name": "crop_heights",
            "selector": "$steps.crop_heights.output",
        }
    )
    workflow_id = create_workflow(alice_client, definition)
    output = run_workflow(alice_client, workflow_id).json()["outputs"][0]
    assert len(output["crop_heights"]) == output["count"]
    assert all(height > 100 for height in output["crop_heights"])


def test_sync_wait_falls_back_to_database(runner, alice):
    """A run committed by its runner whose pushed result never arrived."""
    run = start_cli_run(alice, image_height(), wait_s=0).run
    pushed = wait_for_result(str(run.id), timeout_s=60)
    get_redis().delete(keys.done_key(str(run.id)))

    started = time.monotonic()
    stored = wait_for_result(str(run.id), timeout_s=30)
    assert time.monotonic() - started < 10
    assert stored["outputs"] == pushed["outputs"]
    for field in ("run_id", "status", "breakdown", "bill"):
        assert stored["meta"][field] == pushed["meta"][field]


def test_plan_cache_is_per_owner(runner, alice, bob):
    definition = image_height()
    definition["steps"][0]["name"] = "per_owner_cache"
    definition["outputs"][0]["selector"] = "$steps.per_owner_cache.output"

    def compile_cache_hit(owner) -> bool:
        payload = start_cli_run(owner, definition, wait_s=60).payload
        assert payload["meta"]["status"] == "succeeded", payload
        return payload["meta"]["breakdown"]["compile_cache_hit"]

    assert [compile_cache_hit(alice), compile_cache_hit(alice)] == [False, True]
    # Bob's first run of the same definition compiles it, whatever Alice ran.
    assert compile_cache_hit(bob) is False


def test_queued_runs_per_user_are_limited(alice, alice_client, bob_client):
    # No runner can read these runs: the test's transaction is never committed,
    # so they stay queued.
    settings.GLASSBOX["QUEUED_RUNS_PER_USER"], saved = (
        2,
        settings.GLASSBOX["QUEUED_RUNS_PER_USER"],
    )
    workflow_id = create_workflow(alice_client, image_height())
    try:
        accepted = [
            run_workflow(alice_client, workflow_id, **{"async": True}) for _ in range(2)
        ]
        rejected = run_workflow(alice_client, workflow_id, **{"async": True})
        bobs_workflow = create_workflow(bob_client, image_height())
        others = run_workflow(bob_client, bobs_workflow, **{"async": True})
    finally:
        settings.GLASSBOX["QUEUED_RUNS_PER_USER"] = saved

    assert [response.status_code for response in accepted] == [202, 202]
    assert rejected.status_code == 429
    assert rejected["Retry-After"] == "1"
    assert rejected.json()["code"] == "too_many_requests"
    assert rejected.json()["context"] == "request_limits"
    assert others.status_code == 202
    assert Run.objects.filter(owner=alice).count() == 2


def test_timed_out_wait_reports_running(runner, alice_client):
    quick = create_workflow(alice_client, image_height(), name="quick")
    # A size suffix gives the model a cache entry of its own, so the run
    # loads it cold, which takes seconds, even where another test has made
    # yolov8x.yaml hot on this runner (hot, it can finish within 0.5 s).
    slow = create_workflow(alice_client, detection("yolov8x.yaml-704"), name="slow")
    # A finished run first, so the runner is idle and claims the next at once.
    assert run_workflow(alice_client, quick).status_code == 200
    settings.GLASSBOX["SYNC_TIMEOUT_S"], saved = (
        0.5,
        settings.GLASSBOX["SYNC_TIMEOUT_S"],
    )
    try:
        response = run_workflow(alice_client, slow)
    finally:
        settings.GLASSBOX["SYNC_TIMEOUT_S"] = saved

    assert response.status_code == 202
    assert response.json()["status"] == "running"
    run_id = response.json()["id"]
    assert wait_for_result(run_id, timeout_s=120) is not None


def test_sync_wait_times_out_for_unfinished_run(runner, alice):
    # Its own size suffix keeps the run's load cold, as in the test above.
    run = start_cli_run(alice, detection("yolov8x.yaml-736"), wait_s=0).run
    assert wait_for_result(str(run.id), timeout_s=0.3) is None
    assert wait_for_result(str(run.id), timeout_s=120) is not None


def test_sync_waits_per_user_are_limited(runner, alice, alice_client, bob_client):
    settings.GLASSBOX["SYNC_WAITS_PER_USER"], saved = (
        1,
        settings.GLASSBOX["SYNC_WAITS_PER_USER"],
    )
    workflow_id = create_workflow(alice_client, image_height())
    inline = {
        "specification": image_height(),
        "inputs": {"image": {"type": "base64", "value": image_b64()}},
    }
    try:
        # Held here as a waiting request of Alice's would hold it.
        with waiting_slot(alice.id):
            mine = run_workflow(alice_client, workflow_id)
            roboflow = alice_client.post("/workflows/run", inline, format="json")
            asynchronous = run_workflow(alice_client, workflow_id, **{"async": True})
            others = bob_client.post("/workflows/run", inline, format="json")
            # An invalid request gets its own error, not the limit's 429.
            bad_definition = alice_client.post(
                "/workflows/run",
                {**inline, "specification": {"version": "1.0", "steps": "none"}},
                format="json",
            )
            unknown_model = alice_client.post(
                "/workflows/run",
                {**inline, "specification": detection("no-such-model")},
                format="json",
            )
            missing_image = alice_client.post(
                "/workflows/run", {**inline, "inputs": {}}, format="json"
            )
    finally:
        settings.GLASSBOX["SYNC_WAITS_PER_USER"] = saved

    assert mine.status_code == 429
    assert mine.json()["code"] == "too_many_requests"
    assert roboflow.status_code == 429
    assert roboflow["Retry-After"] == "1"
    assert asynchronous.status_code == 202
    assert others.status_code == 200
    assert Run.objects.filter(owner=alice).count() == 1
    assert bad_definition.status_code == 400, bad_definition.json()
    assert unknown_model.status_code != 429, unknown_model.json()
    assert unknown_model.json()["code"] == "model_not_found"
    assert missing_image.status_code == 400, missing_image.json()


def test_run_accepts_wrapped_unpadded_base64(runner, alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    # As `base64` and MIME encoders write it: 76-character lines, no padding.
    encoded = image_b64().rstrip("=")
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    body = {"inputs": {"image": {"type": "base64", "value": wrapped + "\n"}}}
    response = alice_client.post(
        f"/api/workflows/{workflow_id}/runs", body, format="json"
    )
    assert response.status_code == 200, response.json()
    assert response.json()["outputs"][0]["height"] == 1080


def run_detection_on(alice_client, image: bytes):
    """Post a run of a new detection workflow on ``image``, sent as base64."""
    workflow_id = create_workflow(alice_client, detection())
    body = {
        "inputs": {
            "image": {"type": "base64", "value": base64.b64encode(image).decode()}
        }
    }
    return alice_client.post(f"/api/workflows/{workflow_id}/runs", body, format="json")


def test_run_png_with_data_after_its_end(runner, alice_client):
    # Some tools append data after a PNG file's IEND chunk. OpenCV stops
    # reading at IEND, so the runner decodes the image as it is.
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes())).save(buffer, format="PNG")
    png = buffer.getvalue() + b"appended after IEND" * 16
    response = run_detection_on(alice_client, png)
    assert response.status_code == 200, response.json()
    predictions = response.json()["outputs"][0]["predictions"]
    assert predictions["image"] == {"width": 810, "height": 1080}
    classes = [p["class"] for p in predictions["predictions"]]
    assert classes.count("Normal") >= 2


def chunk(kind: bytes, payload: bytes) -> bytes:
    """Build a PNG chunk: length, type, data and CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def test_run_image_undecodable_on_runner_is_not_billed(runner, alice_client):
    # A valid header and end marker around pixel data that is not zlib.
    header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"not zlib data" * 8)
        + chunk(b"IEND", b"")
    )
    response = run_detection_on(alice_client, png)
    assert response.status_code == 400, response.json()
    run = Run.objects.get()
    assert run.status == Run.Status.FAILED
    assert run.error["code"] == "invalid_input"
    assert run.bill.billed is False
    assert run.bill.amount_microcredits == 0
    assert "passed the server's checks" in run.bill.formula


def test_run_malformed_apng_fails_without_crashing_runner(runner, alice_client):
    # The first frame (the fcTL before IDAT) is 32x24 on a 64x48 canvas,
    # which the APNG format forbids. OpenCV 4.12's APNG reader crashes the
    # process on such a file with two frames.
    def frame_control(sequence: int) -> bytes:
        return chunk(
            b"fcTL", struct.pack(">IIIIIHHBB", sequence, 32, 24, 0, 0, 0, 1, 0, 0)
        )

    rows = zlib.compress((b"\x00" + b"\x80" * 32 * 3) * 24)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0))
        + chunk(b"acTL", struct.pack(">II", 2, 0))
        + frame_control(0)
        + chunk(b"IDAT", rows)
        + frame_control(1)
        + chunk(b"fdAT", struct.pack(">I", 2) + rows)
        + chunk(b"IEND", b"")
    )
    response = run_detection_on(alice_client, png)
    assert response.status_code == 400, response.json()
    assert response.json()["code"] == "invalid_input"
    run = Run.objects.get()
    assert run.status == Run.Status.FAILED
    assert run.bill.billed is False
    assert runner.process.poll() is None


def test_apng_decodes_to_default_image():
    from PIL import Image

    buffer = io.BytesIO()
    first = Image.new("RGB", (16, 8), (255, 0, 0))
    second = Image.new("RGB", (16, 8), (0, 0, 255))
    first.save(buffer, "PNG", save_all=True, append_images=[second])
    pixels = WorkflowImage.from_bytes(buffer.getvalue(), "image").pixels
    assert pixels.shape == (8, 16, 3)
    # OpenCV's pixels are BGR.
    assert pixels[0, 0].tolist() == [0, 0, 255]


@pytest.mark.django_db
def test_202_body_does_not_call_a_finished_run_unfinished(alice):
    # An asynchronous run can finish before its 202 is built.
    run = Run.objects.create(owner=alice, source="api", status=Run.Status.QUEUED)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.SUCCEEDED)
    body = pending_response(RunOutcome(run, None)).data
    assert body["status"] == "succeeded"
    assert "has finished" in body["message"]
    assert "not finished" not in body["message"]
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING)
    body = pending_response(RunOutcome(run, None)).data
    assert "had not finished" in body["message"]


@pytest.mark.django_db
def test_run_list_pages_through_every_run(alice, alice_client):
    created = [
        Run.objects.create(owner=alice, source="api", status=Run.Status.QUEUED)
        for _ in range(5)
    ]
    seen, offset = [], 0
    while offset is not None:
        body = alice_client.get(f"/api/runs/?limit=2&offset={offset}").json()
        seen += [run["id"] for run in body["results"]]
        offset = body["next_offset"]
    assert sorted(seen) == sorted(str(run.pk) for run in created)
    assert len(seen) == 5
    bad = alice_client.get("/api/runs/?offset=-1")
    assert bad.status_code == 400
    assert bad.json()["field"] == "offset"
    huge = alice_client.get("/api/runs/?offset=" + "9" * 20)
    assert huge.status_code == 400
    assert huge.json()["message"] == "offset must have at most 18 digits, got 20"


@pytest.mark.django_db
def test_run_list_before_survives_new_runs(alice, bob, alice_client):
    created = [
        Run.objects.create(owner=alice, source="api", status=Run.Status.QUEUED)
        for _ in range(5)
    ]
    every = [run["id"] for run in alice_client.get("/api/runs/").json()["results"]]
    first = alice_client.get("/api/runs/?limit=2").json()
    # A run created between pages shifts offsets, not the cursor.
    Run.objects.create(owner=alice, source="api", status=Run.Status.QUEUED)
    seen = [run["id"] for run in first["results"]]
    before = first["next_before"]
    while before is not None:
        body = alice_client.get(f"/api/runs/?limit=2&before={before}").json()
        seen += [run["id"] for run in body["results"]]
        before = body["next_before"]
    assert seen == every
    assert sorted(every) == sorted(str(run.pk) for run in created)

    garbage = alice_client.get("/api/runs/?before=nope")
    assert garbage.status_code == 400
    assert garbage.json()["field"] == "before"
    others = Run.objects.create(owner=bob, source="api", status=Run.Status.QUEUED)
    assert alice_client.get(f"/api/runs/?before={others.pk}").status_code == 404


@pytest.mark.django_db
def test_run_list_workflow_filter_checks_owner(alice, bob, alice_client):
    mine = Workflow.create_with_version(alice, "height", image_height())
    theirs = Workflow.create_with_version(bob, "height", image_height())
    run = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.QUEUED,
        workflow_version=mine.versions.get(),
    )
    Run.objects.create(owner=alice, source="api", status=Run.Status.QUEUED)

    response = alice_client.get(f"/api/runs/?workflow={theirs.pk}")
    assert response.status_code == 404
    assert f"workflow {theirs.pk}" in response.json()["message"]
    missing = alice_client.get("/api/runs/?workflow=999999")
    assert missing.status_code == 404

    # A deleted workflow's runs stay listed under it.
    mine.mark_deleted()
    listed = alice_client.get(f"/api/runs/?workflow={mine.pk}")
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["results"]] == [str(run.pk)]


@pytest.mark.django_db
@pytest.mark.parametrize("query", ["status=failed&status=queued", "limit=1&limit=2"])
def test_run_list_refuses_a_repeated_query_parameter(alice, alice_client, query):
    Run.objects.create(owner=alice, source="api", status=Run.Status.QUEUED)
    response = alice_client.get(f"/api/runs/?{query}")
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == query.split("=")[0]
    assert "given 2 times; give it at most once" in body["message"]


def test_detections_in_crops_name_their_detection(runner, alice):
    definition = detect_then_crops("people-detector-320")
    definition["outputs"] += [
        {"type": "JsonField", "name": "inner", "selector": "$steps.inner.predictions"},
        {
            "type": "JsonField",
            "name": "inner_parent",
            "selector": "$steps.inner.predictions",
            "coordinates_system": "parent",
        },
        {
            "type": "JsonField",
            "name": "cropped",
            "selector": "$steps.crops.predictions",
        },
    ]
    outcome = start_cli_run(alice, definition, wait_s=120)
    assert outcome.payload["meta"]["status"] == "succeeded"
    [output] = outcome.payload["outputs"]
    outer_ids = [p["detection_id"] for p in output["predictions"]["predictions"]]
    assert len(outer_ids) >= 3
    assert len(output["inner"]) == len(outer_ids)
    for detection_id, crop in zip(outer_ids, output["inner"], strict=True):
        assert crop["predictions"], "each person's crop shows a person"
        for prediction in crop["predictions"]:
            assert prediction["parent_id"] == detection_id
    # In the input's coordinates, the input is the parent.
    for crop in output["inner_parent"]:
        assert {p["parent_id"] for p in crop["predictions"]} == {"image"}
    # The crop step's own detections: each crop's detection, in the crop.
    assert len(output["cropped"]) == len(outer_ids)
    for detection_id, crop in zip(outer_ids, output["cropped"], strict=True):
        [prediction] = crop["predictions"]
        assert prediction["detection_id"] == detection_id
        assert prediction["parent_id"] == detection_id
        # The crop's edges are the box's, rounded to whole pixels.
        assert abs(crop["image"]["width"] - prediction["width"]) <= 1
        assert abs(prediction["x"] - crop["image"]["width"] / 2) <= 1


def test_null_default_parameter_runs_when_sent(runner, alice_client):
    # Roboflow's definitions write a null default for a parameter without
    # one. Left out, it is null, which the confidence field rejects.
    definition = detection()
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "conf", "default_value": None}
    )
    definition["steps"][0]["confidence"] = "$inputs.conf"
    workflow_id = create_workflow(alice_client, definition)
    body = {"inputs": {"image": {"type": "base64", "value": image_b64()}, "conf": 0.5}}
    sent = alice_client.post(f"/api/workflows/{workflow_id}/runs", body, format="json")
    assert sent.status_code == 200, sent.json()
    missing = run_workflow(alice_client, workflow_id)
    assert missing.status_code == 400
    assert missing.json()["field"] == "conf"


def test_parameter_without_default_is_null_when_not_sent(runner, alice_client):
    # As in Roboflow's engine: an optional parameter needs no default.
    definition = image_height()
    definition["inputs"].append({"type": "WorkflowParameter", "name": "note"})
    definition["outputs"].append(
        {"type": "JsonField", "name": "note", "selector": "$inputs.note"}
    )
    workflow_id = create_workflow(alice_client, definition)

    response = run_workflow(alice_client, workflow_id)

    assert response.status_code == 200, response.json()
    assert response.json()["outputs"] == [{"height": 1080, "note": None}]


@pytest.mark.django_db
def test_missing_objects_named_in_404(alice, bob, alice_client):
    others = Workflow.create_with_version(bob, "theirs", image_height())
    missing_run = uuid.uuid4()
    cases = {
        f"/api/workflows/{others.id}": f"workflow {others.id} not found among yours",
        f"/api/workflows/{others.id}/versions": f"workflow {others.id} not found",
        f"/api/runs/{missing_run}": f"run {missing_run} not found among yours",
        "/api/models/nowhere": "model upload 'nowhere' not found among yours",
    }
    for url, message in cases.items():
        response = alice_client.get(url)
        assert response.status_code == 404, url
        assert response.json()["code"] == "not_found", url
        assert message in response.json()["message"], url


def test_to_string_writes_python_str(runner, alice_client):
    # Roboflow's ToString returns Python's str() of the value.
    expected = {
        "flag": (True, "True"),
        "nothing": (None, "None"),
        "mapping": ({"a": [1, 2.5]}, "{'a': [1, 2.5]}"),
        "names": (["a", "b"], "['a', 'b']"),
        "quoted": (["it's"], '["it\'s"]'),
        "number": (0.1, "0.1"),
        "large": (10**17, "100000000000000000"),
        "small": (1e-7, "1e-07"),
        "text": ("café", "café"),
    }
    values = {name: value for name, (value, _) in expected.items()}
    definition = image_height()
    for name in values:
        definition["inputs"].append({"type": "WorkflowParameter", "name": name})
        definition["steps"].append(
            {
                "type": "PropertyDefinition",
                "name": f"text_{name}",
                "data": f"$inputs.{name}",
                "operations": [{"type": "ToString"}],
            }
        )
        definition["outputs"].append(
            {
                "type": "JsonField",
                "name": name,
                "selector": f"$steps.text_{name}.output",
            }
        )
    workflow_id = create_workflow(alice_client, definition)
    response = run_workflow(
        alice_client,
        workflow_id,
        inputs={"image": {"type": "base64", "value": image_b64()}, **values},
    )
    assert response.status_code == 200, response.json()
    [output] = response.json()["outputs"]
    for name, (_, text) in expected.items():
        assert output[name] == text, name


def test_deleting_user_deletes_runs_and_bills(
    runner, alice, bob, alice_client, bob_client
):
    from django.db.models import RestrictedError

    from webapp.models import ApiToken
    from workflows.models import WorkflowVersion

    alice_workflow = create_workflow(alice_client, image_height())
    bob_workflow = create_workflow(bob_client, image_height())
    assert run_workflow(alice_client, alice_workflow).status_code == 200
    assert run_workflow(bob_client, bob_workflow).status_code == 200
    version = WorkflowVersion.objects.get(workflow_id=alice_workflow)
    # A version that runs point at cannot go on its own.
    with pytest.raises(RestrictedError):
        version.delete()

    alice.delete()

    assert not Run.objects.filter(owner_id=alice.id).exists()
    assert not Bill.objects.filter(owner_id=alice.id).exists()
    assert not Workflow.objects.filter(owner_id=alice.id).exists()
    assert not ApiToken.objects.filter(user_id=alice.id).exists()
    assert Run.objects.filter(owner=bob).count() == 1
    assert Bill.objects.filter(owner=bob).count() == 1
    assert Workflow.objects.filter(owner=bob).count() == 1


def test_crop_outside_one_image_is_null_for_it(runner, alice_client):
    # bus.jpg is 810x1080 and zidane.jpg 1280x720: this crop fits only the bus.
    definition = {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [
            {
                "type": "AbsoluteStaticCrop",
                "name": "crop",
                "image": "$inputs.image",
                "x_center": 400,
                "y_center": 1000,
                "width": 100,
                "height": 60,
            },
            {
                "type": "PropertyDefinition",
                "name": "width",
                "data": "$steps.crop.crops",
                "operations": [
                    {"type": "ExtractImageProperty", "property_name": "width"}
                ],
            },
        ],
        "outputs": [
            {"type": "JsonField", "name": "cw", "selector": "$steps.width.output"},
            {"type": "JsonField", "name": "crop", "selector": "$steps.crop.crops"},
        ],
    }

    images = [
        {"type": "base64", "value": base64.b64encode(image_bytes(name)).decode()}
        for name in ("bus.jpg", "zidane.jpg")
    ]
    response = alice_client.post(
        "/workflows/run",
        {"specification": definition, "inputs": {"image": images}},
        format="json",
    )

    assert response.status_code == 200, response.json()
    bus, zidane = response.json()["outputs"]
    assert bus["cw"] == 100
    assert bus["crop"]["type"] == "base64"
    # Where the crop was cut from, under Roboflow's keys.
    origin = {"offset_x": 350, "offset_y": 970, "width": 810, "height": 1080}
    assert bus["crop"]["parent_origin"] == origin
    assert bus["crop"]["root_parent_origin"] == origin
    assert bus["crop"]["root_parent_id"] == "image"
    # The crop is null, and the step reading it was skipped.
    assert zidane == {"cw": None, "crop": None}


def filter_step(name: str, predictions: str, operations: list, parameters) -> dict:
    return {
        "type": "roboflow_core/detections_filter@v1",
        "name": name,
        "predictions": predictions,
        "operations": operations,
        "operations_parameters": parameters,
    }


def class_names_of(name: str, data: str) -> dict:
    return {
        "type": "PropertyDefinition",
        "name": name,
        "data": data,
        "operations": [
            {"type": "DetectionsPropertyExtract", "property_name": "class_name"}
        ],
    }


def ids(predictions: list) -> list[str]:
    return [p["detection_id"] for p in predictions]


# Kept detections: confidence at least the parameter "threshold".
CONFIDENT = keep_where(
    compare(detection_property("confidence"), "(Number) >=", parameter("threshold"))
)
# Kept detections: a class listed in the parameter "classes", confidence at
# least 0.65.
LISTED_CONFIDENT = keep_where(
    compare(detection_property("class_name"), "in (Sequence)", parameter("classes")),
    compare(detection_property("confidence"), "(Number) >=", static(0.65)),
    operator="and",
)


def test_run_filter_operations_agree_with_unfiltered(runner, alice_client):
    definition = detection("people-detector-576", confidence=0.1)
    definition["inputs"] += [
        {"type": "WorkflowParameter", "name": "threshold"},
        {"type": "WorkflowParameter", "name": "classes"},
    ]
    people = "$steps.people.predictions"

    definition["steps"] += [
        filter_step("confident", people, CONFIDENT, {"threshold": "$inputs.threshold"}),
        filter_step("listed", people, LISTED_CONFIDENT, {"classes": "$inputs.classes"}),
        filter_step(
            "listed_literal", people, LISTED_CONFIDENT, {"classes": ["Normal"]}
        ),
        # Every detection of a class that the confident ones include.
        class_names_of("names", "$steps.confident.predictions"),
        filter_step(
            "seen",
            people,
            keep_where(
                compare(
                    detection_property("class_name"), "in (Sequence)", parameter("seen")
                )
            ),
            {"seen": "$steps.names.output"},
        ),
    ]
    for name in ("confident", "listed", "listed_literal", "seen"):
        definition["outputs"].append(
            {
                "type": "JsonField",
                "name": name,
                "selector": f"$steps.{name}.predictions",
            }
        )

    workflow_id = create_workflow(alice_client, definition)
    inputs = {
        "image": {"type": "base64", "value": image_b64()},
        "threshold": 0.5,
        "classes": ["Normal"],
    }
    response = run_workflow(alice_client, workflow_id, inputs=inputs)
    assert response.status_code == 200, response.json()

    [output] = response.json()["outputs"]
    unfiltered = output["predictions"]["predictions"]
    confidences = [p["confidence"] for p in unfiltered]
    # Outputs round confidence to 4 digits, so none may be that close to a
    # threshold for the expected lists below to be exact.
    assert all(abs(c - 0.5) > 1e-3 and abs(c - 0.65) > 1e-3 for c in confidences)

    confident = [p for p in unfiltered if p["confidence"] >= 0.5]
    assert 0 < len(confident) < len(unfiltered)
    assert ids(output["confident"]["predictions"]) == ids(confident)

    listed = [
        p for p in unfiltered if p["class"] == "Normal" and p["confidence"] >= 0.65
    ]
    assert listed
    assert ids(output["listed"]["predictions"]) == ids(listed)
    assert ids(output["listed_literal"]["predictions"]) == ids(listed)

    seen_classes = {p["class"] for p in confident}
    seen = [p for p in unfiltered if p["class"] in seen_classes]
    assert ids(output["seen"]["predictions"]) == ids(seen)


def test_run_filter_in_crops_reads_crop_parameters(runner, alice_client):
    definition = detect_then_crops("people-detector-576", "people-detector-576")
    definition["inputs"].append({"type": "WorkflowParameter", "name": "threshold"})
    inner = "$steps.inner.predictions"

    # Inside each crop: the detections of a class found in that crop, with
    # confidence at least the parameter "threshold".
    operations = keep_where(
        compare(detection_property("class_name"), "in (Sequence)", parameter("names")),
        compare(
            detection_property("confidence"), "(Number) >=", parameter("threshold")
        ),
        operator="and",
    )
    definition["steps"] += [
        class_names_of("inner_names", inner),
        filter_step(
            "inner_confident",
            inner,
            operations,
            {"names": "$steps.inner_names.output", "threshold": "$inputs.threshold"},
        ),
    ]
    definition["outputs"] += [
        {"type": "JsonField", "name": "inner", "selector": inner},
        {
            "type": "JsonField",
            "name": "inner_confident",
            "selector": "$steps.inner_confident.predictions",
        },
    ]

    workflow_id = create_workflow(alice_client, definition)
    inputs = {"image": {"type": "base64", "value": image_b64()}, "threshold": 0.5}
    response = run_workflow(alice_client, workflow_id, inputs=inputs)
    assert response.status_code == 200, response.json()

    [output] = response.json()["outputs"]
    assert len(output["inner"]) >= 3
    assert len(output["inner_confident"]) == len(output["inner"])
    for crop, filtered in zip(output["inner"], output["inner_confident"], strict=True):
        # As above: no confidence within rounding of the threshold.
        assert all(abs(p["confidence"] - 0.5) > 1e-3 for p in crop["predictions"])
        confident = [p for p in crop["predictions"] if p["confidence"] >= 0.5]
        assert ids(filtered["predictions"]) == ids(confident)
