"""Uploaded weights: validated on upload, private to their owner, runnable."""

from runner.models import ModelUpload
from tests.definitions import detection
from tests.test_runs import create_workflow, run_workflow


def make_weights(path):
    from ultralytics import YOLO

    YOLO("yolov8n.yaml").save(str(path))
    return path


def upload(client, model_id, path):
    with open(path, "rb") as handle:
        return client.post("/api/models/", {"model_id": model_id, "file": handle})


def test_upload_then_run_own_model(runner, alice_client, bob_client, tmp_path):
    weights = make_weights(tmp_path / "mine.pt")
    response = upload(alice_client, "my-detector", weights)
    assert response.status_code == 201, response.json()
    assert response.json()["task"] == "detect"

    workflow_id = create_workflow(alice_client, detection("my-detector"))
    ran = run_workflow(alice_client, workflow_id)
    assert ran.status_code == 200
    assert ran.json()["timing"]["models"][0]["source"] == "upload"

    bob_workflow = bob_client.post(
        "/api/workflows/",
        {"name": "b", "definition": detection("my-detector")},
        format="json",
    )
    bob_run = run_workflow(bob_client, bob_workflow.json()["id"])
    assert bob_run.status_code == 400
    assert bob_run.json()["code"] == "model_not_found"


def test_upload_rejects_non_model(alice_client, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    response = upload(alice_client, "junk", junk)
    assert response.status_code == 400
    assert response.json()["field"] == "file"
    assert ModelUpload.objects.count() == 0
