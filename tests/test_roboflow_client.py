"""Roboflow's own ``inference-sdk`` client against a live server and runner.

The live server runs in threads of the test process and the runner is a
separate process.  Both use the test database, so these tests are
transactional: the ``runner`` and ``live_server`` fixtures make them so.
"""

import json
import time
from pathlib import Path

import pytest
import requests
from inference_sdk import InferenceConfiguration, InferenceHTTPClient
from inference_sdk.http.errors import HTTPCallErrorError

from tests.conftest import image_b64
from tests.definitions import (
    compare,
    detect_then_crops,
    detection,
    detection_property,
    filtered_detection,
    image_height,
    keep_where,
    static,
)
from webapp.models import ApiToken
from workflows.models import Workflow

# A size suffix gives the model a cache entry of its own, so its first run in
# this file is a cold load on the session's runner.
COLD_MODEL_ID = "people-detector-608"


def bus_path() -> str:
    from ultralytics import ASSETS as assets_dir

    return str(Path(assets_dir) / "bus.jpg")


def detection_classes(output: dict) -> list[str]:
    return [prediction["class"] for prediction in output["predictions"]["predictions"]]


def server_timing(header: str) -> dict[str, float]:
    """Parse ``name;dur=1.234, ...`` into durations in milliseconds."""
    entries = {}
    for entry in header.split(","):
        name, _, duration = entry.strip().partition(";dur=")
        entries[name] = float(duration)
    return entries


@pytest.fixture
def client(live_server, alice_key) -> InferenceHTTPClient:
    return InferenceHTTPClient(api_url=live_server.url, api_key=alice_key)


@pytest.fixture
def height_workflow(alice) -> Workflow:
    return Workflow.create_with_version(alice, "bus height", image_height())


@pytest.fixture
def people_workflow(alice) -> Workflow:
    return Workflow.create_with_version(alice, "people", detection())


def post_inline(
    live_server, key: str, definition: dict
) -> tuple[requests.Response, float]:
    """POST an inline run of ``definition`` on bus.jpg; return it with its wall time."""
    body = {
        "specification": definition,
        "inputs": {"image": {"type": "base64", "value": image_b64()}},
    }
    started = time.perf_counter()
    response = requests.post(
        f"{live_server.url}/workflows/run",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )
    return response, time.perf_counter() - started


# Outputs through the client


def test_sdk_stored_height_workflow(runner, client, height_workflow):
    result = client.run_workflow(
        workspace_name="alice",
        workflow_id=height_workflow.slug,
        images={"image": bus_path()},
    )
    assert result == [{"height": 1080}]


def test_sdk_inline_height_workflow(runner, client):
    result = client.run_workflow(
        specification=image_height(), images={"image": bus_path()}
    )
    assert result == [{"height": 1080}]


def test_sdk_stored_people_workflow(runner, client, people_workflow):
    result = client.run_workflow(
        workspace_name="alice",
        workflow_id=people_workflow.slug,
        images={"image": bus_path()},
    )
    assert detection_classes(result[0]).count("Normal") >= 2


def test_sdk_inline_people_workflow(runner, client):
    result = client.run_workflow(
        specification=detection(), images={"image": bus_path()}
    )
    assert detection_classes(result[0]).count("Normal") >= 2


def test_sdk_people_prediction_shape(runner, client):
    output = client.run_workflow(
        specification=detection(), images={"image": bus_path()}
    )[0]
    assert output["predictions"]["image"] == {"width": 810, "height": 1080}
    first = output["predictions"]["predictions"][0]
    for key in (
        "x",
        "y",
        "width",
        "height",
        "confidence",
        "class",
        "class_id",
        "detection_id",
        "parent_id",
    ):
        assert key in first, key
    assert output["count"] == len(output["predictions"]["predictions"])


def test_crop_predictions_name_their_crop(runner, live_server, alice_key):
    definition = detect_then_crops("people-detector")
    definition["outputs"] += [
        {"type": "JsonField", "name": "crops", "selector": "$steps.crops.crops"},
        {"type": "JsonField", "name": "inner", "selector": "$steps.inner.predictions"},
    ]
    # Raw HTTP, because the client replaces each image output by its base64
    # text and drops the crop's origins.
    response, _ = post_inline(live_server, alice_key, definition)
    assert response.status_code == 200, response.json()
    [output] = response.json()["outputs"]

    # Boxes found in the input carry no crop origins.
    for prediction in output["predictions"]["predictions"]:
        assert "parent_origin" not in prediction
        assert "root_parent_id" not in prediction
    found = [
        (crop, prediction)
        for crop, inner in zip(output["crops"], output["inner"], strict=True)
        for prediction in inner["predictions"]
    ]
    assert found, "no person was found inside a crop of bus.jpg"
    for crop, prediction in found:
        assert prediction["parent_id"] == crop["parent_id"]
        assert prediction["parent_origin"] == crop["parent_origin"]
        assert prediction["root_parent_id"] == crop["root_parent_id"]
        assert prediction["root_parent_origin"] == crop["root_parent_origin"]
    first_origin = found[0][1]["root_parent_origin"]
    assert (first_origin["width"], first_origin["height"]) == (810, 1080)


def test_sdk_detection_offset(runner, client):
    definition = detection()
    definition["steps"].append(
        {
            "type": "roboflow_core/detection_offset@v1",
            "name": "offset",
            "predictions": "$steps.people.predictions",
            "offset_width": 20,
            "offset_height": 10,
        }
    )
    definition["outputs"].append(
        {"type": "JsonField", "name": "grown", "selector": "$steps.offset.predictions"}
    )
    [output] = client.run_workflow(
        specification=definition, images={"image": bus_path()}
    )

    boxes = output["predictions"]["predictions"]
    grown = output["grown"]["predictions"]
    assert output["grown"]["image"] == {"width": 810, "height": 1080}
    assert len(grown) == len(boxes) >= 2
    for box, bigger in zip(boxes, grown, strict=True):
        # 10 pixels more on the left and right, 5 above and below, inside
        # the 810x1080 image. Both sides are rounded to 0.01 pixels.
        x1 = max(0, box["x"] - box["width"] / 2 - 10)
        x2 = min(810, box["x"] + box["width"] / 2 + 10)
        y1 = max(0, box["y"] - box["height"] / 2 - 5)
        y2 = min(1080, box["y"] + box["height"] / 2 + 5)
        assert bigger["width"] == pytest.approx(x2 - x1, abs=0.02)
        assert bigger["height"] == pytest.approx(y2 - y1, abs=0.02)
        assert bigger["x"] == pytest.approx((x1 + x2) / 2, abs=0.02)
        assert bigger["y"] == pytest.approx((y1 + y2) / 2, abs=0.02)
        assert bigger["class"] == box["class"]
        assert bigger["confidence"] == box["confidence"]
        assert bigger["parent_id"] == "image"
        assert bigger["detection_id"] != box["detection_id"]


def test_sdk_detections_transformation(runner, client):
    definition = detection()
    definition["steps"].append(
        {
            "type": "roboflow_core/detections_transformation@v1",
            "name": "transform",
            "predictions": "$steps.people.predictions",
            "operations": [
                {"type": "SortDetections", "mode": "x_min", "ascending": False},
                {"type": "DetectionsOffset", "offset_x": 20, "offset_y": 10},
            ],
        }
    )
    definition["outputs"].append(
        {"type": "JsonField", "name": "moved", "selector": "$steps.transform.*"}
    )
    [output] = client.run_workflow(
        specification=definition, images={"image": bus_path()}
    )

    boxes = sorted(
        output["predictions"]["predictions"],
        key=lambda box: box["x"] - box["width"] / 2,
        reverse=True,
    )
    moved = output["moved"]["predictions"]["predictions"]
    assert [box["detection_id"] for box in moved] == [
        box["detection_id"] for box in boxes
    ]
    for box, bigger in zip(boxes, moved, strict=True):
        # Unlike the detection offset block, the operation does not keep
        # boxes inside the image: the right-most one ends past x = 810.
        assert bigger["width"] == pytest.approx(box["width"] + 20, abs=0.02)
        assert bigger["height"] == pytest.approx(box["height"] + 10, abs=0.02)
        assert bigger["x"] == box["x"]
        assert bigger["y"] == box["y"]
    assert moved[0]["x"] + moved[0]["width"] / 2 > 810


def test_sdk_flow_control_and_consensus(runner, client):
    """Run ContinueIf, DetectionsConsensus and Expression on bus.jpg and zidane.jpg.

    At the default confidence of 0.4, the people detector finds 3 people in
    bus.jpg, 2 of them above 0.6, and 1 in zidane.jpg, also above 0.6.
    """
    from ultralytics import ASSETS as assets_dir

    definition = detection()
    count_people = {
        "type": "DynamicOperand",
        "operand_name": "people",
        "operations": [{"type": "SequenceLength"}],
    }
    definition["steps"] += [
        {
            "type": "ObjectDetectionModel",
            "name": "strict",
            "images": "$inputs.image",
            "model_id": "people-detector",
            "confidence": 0.6,
        },
        {
            "type": "ContinueIf",
            "name": "crowded",
            "condition_statement": {
                "type": "StatementGroup",
                "statements": [compare(count_people, "(Number) >=", static(3))],
            },
            "evaluation_parameters": {"people": "$steps.people.predictions"},
            "next_steps": ["$steps.crops"],
        },
        {
            "type": "roboflow_core/dynamic_crop@v1",
            "name": "crops",
            "images": "$inputs.image",
            "predictions": "$steps.people.predictions",
        },
        {
            "type": "DetectionsConsensus",
            "name": "vote",
            "predictions_batches": [
                "$steps.people.predictions",
                "$steps.strict.predictions",
            ],
            "required_votes": 2,
            "required_objects": 2,
        },
        {
            "type": "Expression",
            "name": "verdict",
            "data": {"present": "$steps.vote.object_present"},
            "switch": {
                "type": "CasesDefinition",
                "cases": [
                    {
                        "type": "CaseDefinition",
                        "condition": {
                            "type": "StatementGroup",
                            "statements": [
                                {
                                    "type": "UnaryStatement",
                                    "operand": {
                                        "type": "DynamicOperand",
                                        "operand_name": "present",
                                    },
                                    "operator": {"type": "(Boolean) is True"},
                                }
                            ],
                        },
                        "result": {"type": "StaticCaseResult", "value": "agreed"},
                    }
                ],
                "default": {"type": "StaticCaseResult", "value": "disputed"},
            },
        },
    ]
    definition["outputs"] += [
        {"type": "JsonField", "name": "crops", "selector": "$steps.crops.crops"},
        {"type": "JsonField", "name": "vote", "selector": "$steps.vote.*"},
        {"type": "JsonField", "name": "verdict", "selector": "$steps.verdict.output"},
    ]
    photos = [bus_path(), str(Path(assets_dir) / "zidane.jpg")]
    bus, zidane = client.run_workflow(
        specification=definition, images={"image": photos}
    )

    assert bus["count"] == 3
    assert len(bus["crops"]) == 3
    # The client replaces each image by its base64 text.
    assert all(isinstance(crop, str) and crop for crop in bus["crops"])
    assert zidane["count"] == 1
    assert zidane["crops"] is None

    agreed = bus["vote"]["predictions"]["predictions"]
    assert len(agreed) == 2
    assert bus["vote"]["object_present"] is True
    assert set(bus["vote"]["presence_confidence"]) == {"Normal"}
    assert bus["verdict"] == "agreed"
    # Both models agree on the one person, fewer than required_objects.
    assert len(zidane["vote"]["predictions"]["predictions"]) == 1
    assert zidane["vote"]["object_present"] is False
    assert zidane["vote"]["presence_confidence"] == {}
    assert zidane["verdict"] == "disputed"


def test_sdk_excluded_fields(runner, client):
    result = client.run_workflow(
        specification=detection(),
        images={"image": bus_path()},
        excluded_fields=["predictions"],
    )
    assert list(result[0]) == ["count"]


@pytest.mark.parametrize(
    ("profiling", "traced"),
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        (1, True),
        (1.0, True),
        (0.0, False),
        ("false", False),
    ],
)
def test_enable_profiling_as_pydantic_bool(
    runner, live_server, alice_key, height_workflow, profiling, traced
):
    body = {
        "enable_profiling": profiling,
        "inputs": {"image": {"type": "base64", "value": image_b64()}},
    }
    headers = {"Authorization": f"Bearer {alice_key}"}
    inline = requests.post(
        f"{live_server.url}/workflows/run",
        json={**body, "specification": image_height()},
        headers=headers,
        timeout=300,
    )
    stored = requests.post(
        f"{live_server.url}/alice/workflows/{height_workflow.slug}",
        json=body,
        headers=headers,
        timeout=300,
    )
    for response in (inline, stored):
        assert response.status_code == 200, response.text
        assert response.json()["outputs"] == [{"height": 1080}]
        assert ("profiler_trace" in response.json()) is traced


def test_sdk_image_as_numpy_array(runner, client):
    import cv2

    result = client.run_workflow(
        specification=image_height(), images={"image": cv2.imread(bus_path())}
    )
    assert result == [{"height": 1080}]


def test_sdk_batch_of_images(runner, client):
    result = client.run_workflow(
        specification=image_height(), images={"image": [bus_path(), bus_path()]}
    )
    assert result == [{"height": 1080}, {"height": 1080}]


def test_sdk_workflow_version_id(runner, client, height_workflow):
    renamed = image_height()
    renamed["outputs"][0]["name"] = "image_height"
    height_workflow.add_version(renamed)
    result = client.run_workflow(
        workspace_name="alice",
        workflow_id=height_workflow.slug,
        images={"image": bus_path()},
        workflow_version_id="1",
    )
    assert result == [{"height": 1080}]


def test_sdk_key_in_header(runner, client, height_workflow):
    client.configure(InferenceConfiguration(api_key_transport="header"))
    result = client.run_workflow(
        workspace_name="alice",
        workflow_id=height_workflow.slug,
        images={"image": bus_path()},
    )
    assert result == [{"height": 1080}]


def test_sdk_legacy_stored_route(runner, client, height_workflow):
    result = client.infer_from_workflow(
        workspace_name="alice",
        workflow_name=height_workflow.slug,
        images={"image": bus_path()},
    )
    assert result == [{"height": 1080}]


def test_sdk_legacy_inline_route(runner, client):
    result = client.infer_from_workflow(
        specification=image_height(), images={"image": bus_path()}
    )
    assert result == [{"height": 1080}]


# Errors through the client


def bad_definition() -> dict:
    definition = image_height()
    definition["steps"][0]["type"] = "roboflow_core/no_such_block@v1"
    return definition


def test_sdk_bad_definition_raises(live_server, client):
    with pytest.raises(HTTPCallErrorError) as raised:
        client.run_workflow(
            specification=bad_definition(), images={"image": bus_path()}
        )
    assert raised.value.status_code == 400


def test_sdk_bad_definition_message(live_server, client, alice_key):
    with pytest.raises(HTTPCallErrorError) as raised:
        client.run_workflow(
            specification=bad_definition(), images={"image": bus_path()}
        )
    expected = requests.post(
        f"{live_server.url}/workflows/run",
        json={"api_key": alice_key, "specification": bad_definition()},
        timeout=60,
    ).json()["message"]
    assert "Invalid workflow definition at step 'h', field 'type'" in expected
    assert expected in raised.value.api_message


def test_sdk_step_error_names_step_once(runner, client):
    # Every detection's confidence is compared with a string, which fails.
    definition = filtered_detection(
        keep_where(
            compare(detection_property("confidence"), "(Number) >", static("high"))
        )
    )
    with pytest.raises(HTTPCallErrorError) as raised:
        client.run_workflow(specification=definition, images={"image": bus_path()})

    message = raised.value.api_message
    assert raised.value.status_code == 400
    assert message.startswith(
        "step 'filter': operations[0].filter_operation.statements[0]: "
        "(Number) > failed on detection 0"
    )
    # The client appends a body's inner_error_message, so one that repeats
    # the message would show the failure twice.
    assert message.count("(Number) > failed") == 1


def test_sdk_unknown_workflow_raises(live_server, client):
    with pytest.raises(HTTPCallErrorError) as raised:
        client.run_workflow(
            workspace_name="alice",
            workflow_id="no-such-workflow",
            images={"image": bus_path()},
        )
    assert raised.value.status_code == 404
    assert "no-such-workflow" in raised.value.api_message


def test_sdk_wrong_key_raises(live_server, alice):
    client = InferenceHTTPClient(api_url=live_server.url, api_key="gbx_wrong")
    with pytest.raises(HTTPCallErrorError) as raised:
        client.run_workflow(specification=image_height(), images={"image": bus_path()})
    assert raised.value.status_code == 401


# Timing headers


def test_timing_processing_time_within_wall_time(runner, live_server, alice_key):
    response, wall_s = post_inline(live_server, alice_key, detection())
    assert response.status_code == 200
    assert float(response.headers["X-Processing-Time"]) <= wall_s
    # An inline specification is no stored workflow.
    assert "X-Workflow-Id" not in response.headers


def test_timing_server_timing_sums_to_total(runner, live_server, alice_key):
    response, _ = post_inline(live_server, alice_key, detection())
    entries = server_timing(response.headers["Server-Timing"])
    total = entries.pop("total")
    # Each entry is rounded to 0.001 ms on its own.
    assert abs(sum(entries.values()) - total) <= 0.001 * len(entries) + 1e-9


def test_timing_server_timing_total_matches_processing_time(
    runner, live_server, alice_key
):
    response, _ = post_inline(live_server, alice_key, detection())
    total_ms = server_timing(response.headers["Server-Timing"])["total"]
    processing_ms = float(response.headers["X-Processing-Time"]) * 1000
    assert abs(total_ms - processing_ms) <= 0.001


def test_timing_model_load_details_sum(runner, live_server, alice_key):
    response, _ = post_inline(live_server, alice_key, detection(COLD_MODEL_ID))
    assert response.headers["X-Model-Cold-Start"] == "true"
    details = json.loads(response.headers["X-Model-Load-Details"])
    assert [entry["m"] for entry in details] == [COLD_MODEL_ID]
    load_time = float(response.headers["X-Model-Load-Time"])
    assert round(sum(entry["t"] for entry in details), 6) == load_time
    assert load_time > 0


def test_timing_hot_run_has_no_load(runner, live_server, alice_key):
    post_inline(live_server, alice_key, detection())
    response, _ = post_inline(live_server, alice_key, detection())
    assert response.headers["X-Model-Cold-Start"] == "false"
    assert response.headers["X-Model-Load-Details"] == "[]"
    assert float(response.headers["X-Model-Load-Time"]) == 0


@pytest.mark.parametrize("username", ["api", "admin", "carol"])
def test_roboflow_url_reaches_the_workflow(
    runner, live_server, django_user_model, username
):
    # A user named like one of the site's own prefixes cannot use the short
    # route, so the API gives the /infer/ form, which reaches the same view.
    user = django_user_model.objects.create_user(username, password="pw-" + username)
    _, key = ApiToken.issue(user, "tests")
    headers = {"Authorization": f"Bearer {key}"}
    created = requests.post(
        f"{live_server.url}/api/workflows/",
        json={"name": "heights", "definition": image_height()},
        headers=headers,
        timeout=30,
    )
    url = created.json()["roboflow_url"]
    if username == "carol":
        assert url == "/carol/workflows/heights"
    else:
        assert url == f"/infer/workflows/{username}/heights"
    ran = requests.post(
        f"{live_server.url}{url}",
        json={
            "api_key": key,
            "inputs": {"image": {"type": "base64", "value": image_b64()}},
        },
        timeout=60,
    )
    assert ran.status_code == 200, ran.text
    assert ran.json()["outputs"][0]["height"] == 1080
    assert ran.headers["X-Workflow-Id"] == "heights"


def test_sdk_run_past_wait_raises_with_run_id(runner, client, settings):
    from runner.dispatch import wait_for_result
    from runner.models import Run

    # A model new to the runner loads cold, which takes far longer than the
    # wait, so the run is still going when the wait ends. No other test uses
    # this input size.
    settings.GLASSBOX = {**settings.GLASSBOX, "ROBOFLOW_SYNC_TIMEOUT_S": 0.05}
    with pytest.raises(HTTPCallErrorError) as raised:
        client.run_workflow(
            specification=detection("people-detector-96"),
            images={"image": bus_path()},
        )
    assert raised.value.status_code == 500
    [run] = Run.objects.all()
    assert f"run {run.id} had not finished after 0.05 s" in raised.value.api_message
    assert f"GET /api/runs/{run.id}" in raised.value.api_message
    # The run goes on, and ends with its outputs and bill.
    assert wait_for_result(str(run.id), timeout_s=120) is not None
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    assert run.bill.billed


@pytest.mark.django_db
def test_run_finished_after_wait_is_not_called_unfinished(alice):
    from django.utils import timezone

    from runner.models import Run
    from runner.service import RunOutcome
    from webapp.roboflow import not_finished_response

    # The run ended between the end of the wait and the response.
    run = Run.objects.create(
        owner=alice, source="roboflow", status="succeeded", finished_at=timezone.now()
    )
    body = not_finished_response(RunOutcome(run=run, payload=None)).data
    assert body["message"].startswith(f"run {run.id} finished just after the wait")
    assert "goes on" not in body["message"]
