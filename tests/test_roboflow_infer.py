"""``InferenceHTTPClient.infer`` and Roboflow's single-model routes, end to end.

The client reads ``/model/registry``, adds the model through ``/model/add``
when the registry does not list it, and posts the image to
``/infer/object_detection``. Each inference is a stored run on the session's
runner, with a breakdown and a bill.
"""

import pytest
import requests
from inference_sdk import InferenceConfiguration, InferenceHTTPClient
from inference_sdk.http.errors import HTTPCallErrorError

from billing.models import Bill
from runner.models import ModelUpload, Run
from tests.conftest import image_b64
from tests.test_roboflow_client import bus_path
from webapp.roboflow_models import DETECTION_WORKFLOW


@pytest.fixture
def client(live_server, alice_key) -> InferenceHTTPClient:
    return InferenceHTTPClient(api_url=live_server.url, api_key=alice_key)


def post_detection(live_server, key: str, **fields) -> requests.Response:
    body = {
        "model_id": "people-detector",
        "image": {"type": "base64", "value": image_b64()},
    }
    body.update(fields)
    return requests.post(
        f"{live_server.url}/infer/object_detection",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )


# Through the client


def test_infer_finds_people(runner, client):
    result = client.infer(bus_path(), model_id="people-detector")
    classes = [prediction["class"] for prediction in result["predictions"]]
    assert classes.count("Normal") >= 2


def test_infer_response_shape(runner, client):
    result = client.infer(bus_path(), model_id="people-detector")
    assert set(result) == {"inference_id", "time", "image", "predictions"}
    assert result["time"] > 0
    first = result["predictions"][0]
    for key in ("x", "y", "width", "height", "confidence", "class", "class_id"):
        assert key in first, key


def test_infer_boxes_in_client_image_coordinates(runner, client):
    # The client sends the image shrunk to the model's 640-pixel input and
    # scales the predictions back to the image it was given (810x1080).
    result = client.infer(bus_path(), model_id="people-detector")
    assert result["image"] == {"width": 810, "height": 1080}
    assert max(p["x"] + p["width"] / 2 for p in result["predictions"]) > 640


def test_infer_key_in_header(runner, client):
    client.configure(InferenceConfiguration(api_key_transport="header"))
    result = client.infer(bus_path(), model_id="people-detector")
    assert result["predictions"]


def test_infer_architecture_added_on_demand(runner, client):
    result = client.infer(bus_path(), model_id="yolov8n.yaml")
    assert set(result) == {"inference_id", "time", "image", "predictions"}


def test_infer_list_of_images(runner, client):
    results = client.infer([bus_path(), bus_path()], model_id="people-detector")
    assert len(results) == 2
    assert results[0]["image"] == results[1]["image"]


def test_infer_unknown_model_raises(live_server, client):
    with pytest.raises(HTTPCallErrorError) as raised:
        client.infer(bus_path(), model_id="no-such-model")
    assert raised.value.status_code == 400
    assert "no-such-model" in raised.value.api_message


def test_infer_without_key_raises(live_server, alice):
    client = InferenceHTTPClient(api_url=live_server.url, api_key="gbx_wrong")
    with pytest.raises(HTTPCallErrorError) as raised:
        client.infer(bus_path(), model_id="people-detector")
    assert raised.value.status_code == 401


# The routes themselves


def test_detection_stores_run_and_bill(runner, live_server, alice, alice_key):
    response = post_detection(live_server, alice_key)
    assert response.status_code == 200
    run = Run.objects.get(pk=response.headers["X-Run-Id"])
    assert run.owner == alice
    assert run.source == "roboflow"
    assert run.status == Run.Status.SUCCEEDED
    assert run.inline_definition == DETECTION_WORKFLOW
    assert Bill.objects.filter(run=run).count() == 1


def test_detection_timing_headers(runner, live_server, alice_key):
    response = post_detection(live_server, alice_key)
    assert response.headers["X-Model-Id"] == "people-detector"
    assert float(response.headers["X-Remote-Processing-Time"]) == pytest.approx(
        response.json()["time"]
    )
    assert "X-Billed-Time" in response.headers


def test_detection_options_reach_model(runner, live_server, alice_key):
    everything = post_detection(live_server, alice_key, confidence=0.05).json()
    fewer = post_detection(
        live_server, alice_key, confidence=0.05, max_detections=1
    ).json()
    assert len(everything["predictions"]) > 1
    assert len(fewer["predictions"]) == 1


def test_detection_ignores_other_roboflow_options(runner, live_server, alice_key):
    response = post_detection(
        live_server,
        alice_key,
        visualize_predictions=False,
        disable_preproc_auto_orient=False,
        class_filter=None,
    )
    assert response.status_code == 200


def test_detection_bad_option_names_field(live_server, alice_key):
    before = Run.objects.count()
    response = post_detection(live_server, alice_key, confidence="high")
    assert response.status_code == 400
    assert "parameter 'confidence' is invalid" in response.json()["message"]
    assert Run.objects.count() == before


def test_detection_missing_image(live_server, alice_key):
    response = requests.post(
        f"{live_server.url}/infer/object_detection",
        json={"model_id": "people-detector"},
        headers={"Authorization": f"Bearer {alice_key}"},
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["message"] == "'image' is missing"
    assert "inputs" not in response.json()["hint"]


def test_detection_missing_model_id(live_server, alice_key):
    response = requests.post(
        f"{live_server.url}/infer/object_detection",
        json={"image": {"type": "base64", "value": image_b64()}},
        headers={"Authorization": f"Bearer {alice_key}"},
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["message"] == "'model_id' is missing"


def test_registry_lists_model_directory(live_server, alice_key):
    response = requests.get(
        f"{live_server.url}/model/registry", params={"api_key": alice_key}, timeout=60
    )
    models = {model["model_id"]: model for model in response.json()["models"]}
    assert models["people-detector"]["task_type"] == "object-detection"
    assert models["people-detector"]["input_height"] == 640


def test_registry_lists_only_own_uploads(live_server, alice_key, bob):
    ModelUpload.objects.create(
        owner=bob, model_id="bobs-detector", path="bob/bobs-detector.pt", size_bytes=1
    )
    response = requests.get(
        f"{live_server.url}/model/registry", params={"api_key": alice_key}, timeout=60
    )
    listed = [model["model_id"] for model in response.json()["models"]]
    assert "bobs-detector" not in listed


def test_registry_requires_key(live_server):
    response = requests.get(f"{live_server.url}/model/registry", timeout=60)
    assert response.status_code == 401


def test_add_size_suffix_sets_input_size(live_server, alice_key):
    response = requests.post(
        f"{live_server.url}/model/add",
        json={"model_id": "yolov8n.yaml-320", "api_key": alice_key},
        timeout=60,
    )
    models = {model["model_id"]: model for model in response.json()["models"]}
    assert models["yolov8n.yaml-320"]["input_width"] == 320


def test_add_unknown_model_400(live_server, alice_key):
    response = requests.post(
        f"{live_server.url}/model/add",
        json={"model_id": "no-such-model", "api_key": alice_key},
        timeout=60,
    )
    assert response.status_code == 400
    assert "no-such-model" in response.json()["message"]
