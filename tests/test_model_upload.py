"""Uploaded weights: validated on upload, private to their owner, runnable."""

import builtins
import hashlib
import os
import pickle
import shutil
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import torch
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, transaction
from rest_framework.test import APIClient

from runner import views as runner_views
from runner import weights_check
from runner.model_cache import open_weights
from runner.models import ModelUpload, Run
from runner.registry import resolve_model
from tests.conftest import image_path, registered_runner, start_cli_run
from tests.definitions import detection
from tests.test_runs import create_workflow, run_workflow
from workflows.errors import ModelNotFoundError
from workflows.models import Workflow


def make_weights(path):
    from ultralytics import YOLO

    YOLO("yolov8n.yaml").save(str(path))
    return path


def weights_that_cannot_predict(path: Path) -> Path:
    """Save a detector whose first convolution takes one channel, not three:
    it loads, and fails at its first prediction."""
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    first = model.model.model[0].conv
    first.weight = torch.nn.Parameter(torch.zeros(first.out_channels, 1, 3, 3))
    model.save(str(path))
    return path


def weights_that_inflate(path: Path, scale: int) -> Path:
    """Save a detector whose first upsampling enlarges its input ``scale`` times.

    On the 160×160 blank image of the upload check, its 5×5×256 input
    becomes a (5 * scale)² × 256 tensor of float32.
    """
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    upsample = next(
        layer for layer in model.model.model if isinstance(layer, torch.nn.Upsample)
    )
    upsample.scale_factor = float(scale)
    model.save(str(path))
    return path


def weights_without_downsampling(path: Path) -> Path:
    """Save yolov8n with its stride-2 convolutions at stride 1 and its
    upsampling at scale 1.

    It still predicts, but every feature map keeps the input's size. So at
    640 px it needs more than 2.7 GiB, where yolov8n needs about 35 MiB.
    """
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    for layer in model.model.modules():
        if isinstance(layer, torch.nn.Conv2d) and layer.stride == (2, 2):
            layer.stride = (1, 1)
        if isinstance(layer, torch.nn.Upsample):
            layer.scale_factor = 1.0
    model.save(str(path))
    return path


def damaged_checkpoint(path: Path) -> Path:
    """Copy the demo detector to ``path`` with one member's header overwritten."""
    shutil.copy(resolve_model("people-detector").local_path(), path)
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    with path.open("r+b") as file:
        file.seek(member.header_offset)
        file.write(b"XXXX")
    return path


def run_then_delete(client, model_id: str, weights: Path):
    """Run a detection of ``model_id`` and return the response; delete ``weights``."""
    try:
        workflow_id = create_workflow(client, detection(model_id))
        return run_workflow(client, workflow_id)
    finally:
        weights.unlink()


def upload(client, model_id, path):
    with open(path, "rb") as handle:
        return client.post("/api/models/", {"model_id": model_id, "file": handle})


def test_upload_then_run_own_model(runner, alice_client, bob_client, tmp_path):
    weights = make_weights(tmp_path / "mine.pt")
    response = upload(alice_client, "my-detector", weights)
    assert response.status_code == 201, response.json()
    assert response.json()["task"] == "detect"
    # The digest of the bytes sent, to check against a local copy.
    assert response.json()["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # Saved from an untrained architecture: the checkpoint records no training.
    assert response.json()["pretrained"] is False
    listed = alice_client.get("/api/models/").json()["uploads"]
    assert [(m["model_id"], m["pretrained"]) for m in listed] == [
        ("my-detector", False)
    ]

    workflow_id = create_workflow(alice_client, detection("my-detector"))
    ran = run_workflow(alice_client, workflow_id)
    assert ran.status_code == 200
    assert ran.json()["timing"]["models"][0]["source"] == "upload"
    assert ran.json()["timing"]["models"][0]["pretrained"] is False
    assert ran["X-Model-Untrained"] == "my-detector"
    assert any("'my-detector' is an untrained" in w for w in ran.json()["warnings"])

    bob_workflow = bob_client.post(
        "/api/workflows/",
        {"name": "b", "definition": detection("my-detector")},
        format="json",
    )
    bob_run = run_workflow(bob_client, bob_workflow.json()["id"])
    assert bob_run.status_code == 400
    assert bob_run.json()["code"] == "model_not_found"


def test_upload_check_sees_no_secrets(alice_client, tmp_path, monkeypatch):
    # The check process unpickles an uploaded file, so it must not see the
    # web server's secrets. Its environment is read from /proc while it runs.
    secrets = {
        "SECRET_KEY": "django-secret-key-value",
        "DATABASE_URL": "postgres://glassbox:db-password@db.example/glassbox",
        "REDIS_URL": "redis://:redis-password@redis.example:6379/0",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("GOMP_SPINCOUNT", "2000")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    weights = make_weights(tmp_path / "mine.pt")
    seen: dict[str, str] = {}

    def watch_check_process():
        deadline = time.monotonic() + weights_check.CHILD_TIMEOUT_S
        while not seen and time.monotonic() < deadline:
            for child in psutil.Process().children():
                try:
                    if "runner.weights_check" in child.cmdline():
                        seen.update(child.environ())
                except psutil.Error:
                    continue
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_check_process)
    watcher.start()
    response = upload(alice_client, "environment-check", weights)
    watcher.join()

    assert response.status_code == 201, response.json()
    assert seen, "no running check process was found"
    for name, value in secrets.items():
        assert name not in seen
        assert not [key for key, text in seen.items() if value in text]
    assert seen["PATH"] == os.environ["PATH"]
    assert seen["GOMP_SPINCOUNT"] == "2000"
    # One thread, whatever the web server's setting.
    assert seen["OMP_NUM_THREADS"] == "1"
    assert seen["LC_ALL"] == "C.UTF-8"
    assert seen["ULTRALYTICS_SAFE_LOAD"] == "1"
    assert "DJANGO_SETTINGS_MODULE" not in seen


def test_check_environment_is_allow_list():
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/glassbox",
        "LC_CTYPE": "C.UTF-8",
        "GOMP_SPINCOUNT": "10000",
        "SECRET_KEY": "secret",
        "DATABASE_URL": "postgres://user:password@host/db",
        "REDIS_URL": "redis://:password@host/0",
        "ULTRALYTICS_SAFE_LOAD": "0",
    }

    environment = weights_check.child_environment(parent)

    assert environment == {
        "PATH": "/usr/bin",
        "HOME": "/home/glassbox",
        "LC_CTYPE": "C.UTF-8",
        "GOMP_SPINCOUNT": "10000",
        "ULTRALYTICS_SAFE_LOAD": "1",
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def test_upload_rejects_non_model(alice_client, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    response = upload(alice_client, "junk", junk)
    assert response.status_code == 400
    assert response.json()["field"] == "file"
    assert response.json()["message"] == (
        "'junk.pt' is not an ultralytics model: it is not a PyTorch checkpoint: "
        "it starts as neither a zip archive nor a pickle, which torch saves"
    )
    assert ModelUpload.objects.count() == 0


def test_upload_names_format_of_image(alice_client, tmp_path):
    photo = tmp_path / "photo.pt"
    shutil.copy(image_path("bus.jpg"), photo)
    response = upload(alice_client, "photo", photo)
    assert response.status_code == 400
    assert response.json()["field"] == "file"
    message = response.json()["message"]
    assert "it is not a PyTorch checkpoint: it contains JPEG image data" in message
    assert "truncated" not in message
    assert ModelUpload.objects.count() == 0


def test_upload_of_cut_archive_is_truncated(alice_client, tmp_path):
    whole = resolve_model("people-detector").local_path()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(Path(whole).read_bytes()[:4096])
    response = upload(alice_client, "cut", cut)
    assert response.status_code == 400
    assert "the file may be truncated" in response.json()["message"]
    assert ModelUpload.objects.count() == 0


def test_upload_of_taken_id_hints_at_delete(alice_client, tmp_path):
    weights = make_weights(tmp_path / "mine.pt")
    assert upload(alice_client, "mine", weights).status_code == 201
    again = upload(alice_client, "mine", weights)
    assert again.status_code == 400
    assert again.json()["message"] == "you already have a model 'mine'"
    assert again.json()["field"] == "model_id"
    assert "Choose another model_id" in again.json()["hint"]
    assert "DELETE /api/models/<model_id>" in again.json()["hint"]


def test_listing_names_workflows_of_upload(alice, bob, alice_client, tmp_path):
    weights = make_weights(tmp_path / "mine.pt")
    assert upload(alice_client, "mine", weights).status_code == 201
    inputs = detection("$inputs.model")
    inputs["inputs"].append(
        {"type": "WorkflowParameter", "name": "model", "default_value": "mine"}
    )
    by_input = Workflow.create_with_version(alice, "By input", inputs)
    sized = Workflow.create_with_version(alice, "Sized", detection("mine-320"))
    Workflow.create_with_version(alice, "Other", detection("people-detector"))
    Workflow.create_with_version(bob, "Bob's", detection("mine"))

    listed = alice_client.get("/api/models/").json()["uploads"]
    assert [entry["model_id"] for entry in listed] == ["mine"]
    assert listed[0]["workflows"] == [
        {"id": by_input.id, "name": "By input", "slug": "by-input"},
        {"id": sized.id, "name": "Sized", "slug": "sized"},
    ]


def test_upload_rejects_empty_file(alice_client, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    response = upload(alice_client, "empty", empty)
    assert response.status_code == 400
    assert response.json()["field"] == "file"
    message = response.json()["message"]
    assert (
        message == "'empty.pt' is not an ultralytics model: the file is empty (0 bytes)"
    )
    assert ModelUpload.objects.count() == 0


def test_upload_rejects_garbage_pickle(alice_client, tmp_path):
    # Starts like a protocol-2 pickle, so only the loader finds it is not one.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02}q\x00.")
    response = upload(alice_client, "junk", junk)
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith("'junk.pt' is not an ultralytics model: ")
    assert "it could not be read as a checkpoint (" in message
    assert str(tmp_path) not in message
    assert ModelUpload.objects.count() == 0


def test_upload_rejects_zip_that_is_no_checkpoint(alice_client, tmp_path):
    archive = tmp_path / "archive.pt"
    with zipfile.ZipFile(archive, "w") as file:
        file.writestr("notes.txt", "not weights")
    response = upload(alice_client, "archive", archive)
    assert response.status_code == 400
    assert response.json()["message"] == (
        "'archive.pt' is not an ultralytics model: it is a zip archive, but not "
        "one that torch saved"
    )
    assert ModelUpload.objects.count() == 0


def test_upload_rejects_state_dict(alice_client, tmp_path):
    # A bare state_dict loads safely, but contains no network to build.
    weights = tmp_path / "weights.pt"
    torch.save(
        {"conv.weight": torch.zeros(2, 3, 1, 1), "conv.bias": torch.zeros(2)}, weights
    )
    response = upload(alice_client, "weights", weights)
    assert response.status_code == 400
    assert response.json()["message"] == (
        "'weights.pt' is not an ultralytics model: it is a torch file, but not "
        "an ultralytics checkpoint: it contains a dict without a 'model' entry (its "
        "keys: conv.weight, conv.bias); upload the .pt file that ultralytics "
        "saved, not a state_dict"
    )
    assert ModelUpload.objects.count() == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (torch.zeros(3), "it contains a Tensor, not the dict that ultralytics saves"),
        ([1, 2], "it contains a list, not the dict that ultralytics saves"),
        ({"model": None}, "its 'model' entry is None, not a network"),
        ({"model": 5, "train_args": {}}, "its 'model' entry is an int, not a network"),
    ],
    ids=["tensor", "list", "model-none", "model-int"],
)
def test_upload_names_content_that_is_no_network(
    alice_client, tmp_path, content, expected
):
    # These load safely, so the message must not call them damaged or unsafe.
    weights = tmp_path / "weights.pt"
    torch.save(content, weights)
    response = upload(alice_client, "weights", weights)
    assert response.status_code == 400
    assert response.json()["message"] == (
        "'weights.pt' is not an ultralytics model: it is a torch file, but not "
        f"an ultralytics checkpoint: {expected}"
    )
    assert ModelUpload.objects.count() == 0


def test_upload_rejects_zip_without_torch_version(alice_client, tmp_path):
    # torch reports this archive with an internal assertion (hasRecord("version")).
    archive = tmp_path / "archive.pt"
    with zipfile.ZipFile(archive, "w") as file:
        file.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    response = upload(alice_client, "archive", archive)
    assert response.status_code == 400
    assert response.json()["message"] == (
        "'archive.pt' is not an ultralytics model: it is a zip archive, but not "
        "one that torch saved"
    )
    assert ModelUpload.objects.count() == 0


def test_upload_rejects_damaged_checkpoint(alice_client, tmp_path):
    # A real checkpoint with one member's header overwritten: a file damaged
    # in transfer, not one of another kind.
    damaged = damaged_checkpoint(tmp_path / "damaged.pt")
    response = upload(alice_client, "damaged", damaged)
    assert response.status_code == 400
    assert response.json()["message"].startswith(
        "'damaged.pt' is not an ultralytics model: it is damaged (empty, "
        "truncated or corrupted): PytorchStreamReader failed reading file data/0"
    )
    assert ModelUpload.objects.count() == 0


def test_upload_of_trained_weights_is_pretrained(runner, alice_client):
    trained = resolve_model("people-detector").local_path()
    response = upload(alice_client, "my-people", Path(trained))
    assert response.status_code == 201, response.json()
    assert response.json()["pretrained"] is True
    workflow_id = create_workflow(alice_client, detection("my-people"))
    ran = run_workflow(alice_client, workflow_id)
    assert ran.status_code == 200
    assert ran.json()["timing"]["models"][0]["pretrained"] is True
    assert "X-Model-Untrained" not in ran


class CreatesFile:
    """Object whose unpickling calls open(path, "w"), a stand-in for any code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


def code_running_weights(path: Path, marker: Path, archive: bool = True) -> Path:
    checkpoint = {"model": CreatesFile(marker), "train_args": {}}
    if archive:
        torch.save(checkpoint, path)
    else:
        path.write_bytes(pickle.dumps(checkpoint))
    return path


@pytest.mark.parametrize("archive", [True, False], ids=["torch-zip", "bare-pickle"])
def test_upload_rejects_code_running_weights(alice, alice_client, tmp_path, archive):
    marker = tmp_path / "ran"
    weights = code_running_weights(tmp_path / "payload.pt", marker, archive)
    upload_dir = Path(settings.GLASSBOX["UPLOAD_DIR"]) / str(alice.id)
    before = set(upload_dir.glob("*")) if upload_dir.exists() else set()

    response = upload(alice_client, "payload", weights)

    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["field"] == "file"
    # torch names the refused function when it can read the pickle's
    # protocol; a bare pickle of a newer protocol it cannot read at all.
    reason = (
        "it holds a Python object (io.open) that an ultralytics checkpoint does "
        "not, so it was not loaded; only weights saved by ultralytics load here"
        if archive
        else "its pickled data could not be read safely: it is damaged, or it "
        "holds objects that an ultralytics checkpoint does not"
    )
    assert body["message"] == f"'payload.pt' is not an ultralytics model: {reason}"
    assert not marker.exists()
    assert ModelUpload.objects.count() == 0
    assert set(upload_dir.glob("*")) == before


def test_runner_rejects_code_running_weights(runner, alice, alice_client, tmp_path):
    # Stored without the upload check, as a file copied into the upload
    # directory by hand would be: the runner checks again as it loads.
    marker = tmp_path / "ran"
    upload_dir = Path(settings.GLASSBOX["UPLOAD_DIR"]) / str(alice.id)
    upload_dir.mkdir(parents=True, exist_ok=True)
    weights = code_running_weights(upload_dir / "payload.pt", marker)
    ModelUpload.objects.create(
        owner=alice,
        model_id="payload",
        path=str(weights),
        size_bytes=weights.stat().st_size,
        sha256="0" * 64,
        task="detect",
    )
    response = run_then_delete(alice_client, "payload", weights)

    assert response.status_code == 500, response.json()
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "Model 'payload' could not be loaded" in error["message"]
    assert str(upload_dir) not in error["message"]
    assert not marker.exists()
    run = Run.objects.get()
    assert run.status == Run.Status.FAILED
    assert run.bill.amount_microcredits == 0


@pytest.mark.parametrize(
    "module, held",
    [(torch.nn.Linear(2, 2), "Linear"), (torch.nn.Sequential(), "Sequential")],
    ids=["linear", "sequential"],
)
def test_upload_rejects_module_that_is_no_detector(
    alice_client, tmp_path, module, held
):
    # ultralytics wraps any allowed module a checkpoint holds and guesses the
    # task "detect" for it, so only the check of the model's class finds that
    # such a file would fail in every run.
    weights = tmp_path / "layer.pt"
    torch.save({"model": module}, weights)

    response = upload(alice_client, "layer", weights)

    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["field"] == "file"
    assert body["message"] == (
        f"'layer.pt' is not an ultralytics model: it holds a {held}, not an "
        "ultralytics model; only weights saved by ultralytics load here"
    )
    assert ModelUpload.objects.count() == 0


def test_model_dir_non_detector_fails(runner, alice_client):
    weights = Path(settings.GLASSBOX["MODEL_DIR"]) / "bare-layer.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, weights)
    response = run_then_delete(alice_client, "bare-layer", weights)

    assert response.status_code == 500, response.json()
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "it holds a Linear, not an ultralytics model" in error["message"]
    run = Run.objects.get()
    assert run.status == Run.Status.FAILED
    assert run.bill.amount_microcredits == 0


def test_model_dir_tensor_fails_naming_it(runner, alice_client):
    weights = Path(settings.GLASSBOX["MODEL_DIR"]) / "bare-tensor.pt"
    torch.save(torch.zeros(3), weights)
    response = run_then_delete(alice_client, "bare-tensor", weights)

    assert response.status_code == 500, response.json()
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert error["message"] == (
        "Model 'bare-tensor' could not be loaded: it is a torch file, but not an "
        "ultralytics checkpoint: it contains a Tensor, not the dict that "
        "ultralytics saves"
    )
    run = Run.objects.get()
    assert run.status == Run.Status.FAILED
    assert run.bill.amount_microcredits == 0


def test_upload_rejects_ambiguous_or_malformed_ids(alice_client, tmp_path):
    weights = make_weights(tmp_path / "mine.pt")
    malformed = (
        "yolov8n.yaml",
        "custom.YML",
        "people-640",
        "a//b",
        "a/",
        "a/./b",
        "a/.",
    )
    for model_id in malformed:
        response = upload(alice_client, model_id, weights)
        assert response.status_code == 400, model_id
        assert response.json()["field"] == "model_id"
    dotted = upload(alice_client, "a/../b", weights).json()
    assert "no empty, '.' or '..' segment" in dotted["message"]
    assert "got 6 characters" not in dotted["message"]
    too_long = upload(alice_client, "m" * 201, weights).json()
    assert "1 to 200 characters" in too_long["message"]
    assert "got 201 characters" in too_long["message"]
    with open(weights, "rb") as handle:
        missing = alice_client.post("/api/models/", {"file": handle}).json()
    assert missing["message"].startswith("model_id is missing")
    assert ModelUpload.objects.count() == 0


def test_upload_rejects_archive_that_inflates(alice_client, tmp_path):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb/data.pkl", "w") as member:
            for _ in range(200):
                member.write(bytes(1024 * 1024))
    assert bomb.stat().st_size < 1024 * 1024

    response = upload(alice_client, "bomb", bomb)

    assert response.status_code == 400
    assert "inflates" in response.json()["message"]
    assert ModelUpload.objects.count() == 0


def test_upload_over_size_limit_is_413(alice_client, tmp_path, monkeypatch):
    monkeypatch.setitem(settings.GLASSBOX, "MAX_UPLOAD_BYTES", 4096)
    weights = make_weights(tmp_path / "mine.pt")

    response = upload(alice_client, "too-big", weights)

    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert ModelUpload.objects.count() == 0


def test_session_upload_over_limit_is_413_unparsed(alice_session_client, monkeypatch):
    # More fields than Django's DATA_UPLOAD_MAX_NUMBER_FIELDS: parsing the
    # body fails, so a 413 shows that the length was checked first.
    monkeypatch.setitem(settings.GLASSBOX, "MAX_UPLOAD_BYTES", 1)
    fields = [
        b'--xyz\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n%s\r\n'
        % (index, b"x" * 64)
        for index in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1)
    ]
    body = b"".join(fields) + b"--xyz--\r\n"
    assert len(body) > runner_views.MULTIPART_ALLOWANCE_BYTES + 1

    response = alice_session_client.post(
        "/api/models/", body, content_type="multipart/form-data; boundary=xyz"
    )

    assert response.status_code == 413, response.content
    assert response.json()["code"] == "payload_too_large"


def test_upload_limit_applies_to_the_file(alice_client, tmp_path, monkeypatch):
    # The multipart body is larger than the file it carries; a file of
    # exactly MAX_UPLOAD_BYTES is allowed.
    weights = make_weights(tmp_path / "mine.pt")
    size = weights.stat().st_size
    monkeypatch.setitem(settings.GLASSBOX, "MAX_UPLOAD_BYTES", size - 1)
    over = upload(alice_client, "over", weights)
    assert over.status_code == 413
    assert over.json()["message"] == (
        f"the file is {size} bytes, over the limit of {size - 1} bytes"
    )
    assert ModelUpload.objects.count() == 0

    monkeypatch.setitem(settings.GLASSBOX, "MAX_UPLOAD_BYTES", size)
    assert upload(alice_client, "exact", weights).status_code == 201


def test_upload_rejects_extra_or_repeated_parts(alice_client, tmp_path):
    weights = make_weights(tmp_path / "mine.pt")
    with open(weights, "rb") as first, open(weights, "rb") as second:
        repeated = alice_client.post(
            "/api/models/", {"model_id": "twice", "file": [first, second]}
        )
    assert repeated.status_code == 400
    assert repeated.json()["field"] == "file"
    assert repeated.json()["message"] == "'file' is sent more than once; send one"
    with open(weights, "rb") as handle:
        extra = alice_client.post(
            "/api/models/", {"model_id": "extra", "file": handle, "task": "detect"}
        )
    assert extra.status_code == 400
    assert extra.json()["field"] == "task"
    assert "unknown fields 'task'" in extra.json()["message"]
    assert ModelUpload.objects.count() == 0


def test_upload_rejects_parts_of_the_wrong_kind(alice_client, tmp_path):
    weights = tmp_path / "mine.pt"
    weights.write_bytes(b"not checked")
    id_as_file = SimpleUploadedFile("id.txt", b"my-detector")
    with open(weights, "rb") as handle:
        response = alice_client.post(
            "/api/models/", {"model_id": id_as_file, "file": handle}
        )
    assert response.status_code == 400
    assert response.json()["field"] == "model_id"
    assert "sent as a file part" in response.json()["message"]

    file_as_text = alice_client.post(
        "/api/models/", {"model_id": "my-detector", "file": "weights"}
    )
    assert file_as_text.status_code == 400
    assert file_as_text.json()["field"] == "file"
    assert "sent as a text form field" in file_as_text.json()["message"]
    assert ModelUpload.objects.count() == 0


@pytest.fixture
def alice_session_client(alice):
    """Alice signed in with a session, as the Models page sends uploads.

    CSRF is checked as for a browser, and the client sends the CSRF header.
    """
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(alice)
    client.get("/models/")
    client.credentials(HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)
    return client


@pytest.mark.parametrize("client_name", ["alice_client", "alice_session_client"])
def test_upload_cut_before_closing_boundary(request, client_name):
    # The file part starts, but the body ends before its boundary, as when a
    # client stops sending: Django's parser drops such a part silently. With
    # a session, the CSRF check parses the body before the view runs.
    client = request.getfixturevalue(client_name)
    body = (
        b"--xyz\r\n"
        b'Content-Disposition: form-data; name="model_id"\r\n\r\n'
        b"cut\r\n"
        b"--xyz\r\n"
        b'Content-Disposition: form-data; name="file"; filename="cut.pt"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
        b"PK\x03\x04 the first bytes of a checkpoint"
    )
    response = client.post(
        "/api/models/", body, content_type="multipart/form-data; boundary=xyz"
    )
    assert response.status_code == 400
    assert response.json()["field"] == "file"
    assert response.json()["message"] == (
        "the 'file' part has no end: the multipart body stops before the "
        "boundary that closes it, so the upload was cut short"
    )
    assert ModelUpload.objects.count() == 0


def test_upload_without_file_part_asks_for_it(alice_client):
    body = (
        b"--xyz\r\n"
        b'Content-Disposition: form-data; name="model_id"\r\n\r\n'
        b"nofile\r\n"
        b"--xyz--\r\n"
    )
    response = alice_client.post(
        "/api/models/", body, content_type="multipart/form-data; boundary=xyz"
    )
    assert response.status_code == 400
    assert response.json()["field"] == "file"
    assert response.json()["message"] == (
        "a weights file is required in the 'file' field"
    )


@pytest.mark.parametrize(
    "content_type, body",
    [
        (None, b""),
        ("application/json", b""),
        ("text/plain", b""),
        ("application/json", b'{"model_id": "x"}'),
    ],
)
def test_upload_not_multipart_is_415(alice_client, content_type, body):
    # DRF gives a body that it has no bytes to parse an empty dict, not a form.
    response = alice_client.generic(
        "POST", "/api/models/", body, content_type=content_type
    )
    assert response.status_code == 415
    error = response.json()
    assert error["code"] == "unsupported_media_type"
    assert "sent as multipart form data" in error["message"]
    assert repr(content_type or "none").strip("'") in error["message"]
    assert "-F file=@weights.pt" in error["hint"]
    assert ModelUpload.objects.count() == 0


def test_upload_route_with_nul_in_id_is_404(alice_client):
    # PostgreSQL rejects a query with a NUL character, so the id is checked
    # before any query, and the message shows the character escaped.
    for method in (alice_client.get, alice_client.delete):
        response = method("/api/models/a%00b")
        assert response.status_code == 404
        error = response.json()
        assert error["code"] == "not_found"
        assert error["message"] == "model upload 'a\\x00b' not found among yours"


def test_upload_with_long_filename_is_malformed(alice_client):
    # Django's multipart parser limits one part's headers to 1,024 bytes.
    # The body is written by hand because Django's test client cuts
    # filenames to 255 characters.
    filename = "w" * 1100 + ".pt"
    body = (
        "--b\r\n"
        'Content-Disposition: form-data; name="model_id"\r\n\r\n'
        "long-name\r\n"
        "--b\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "\r\n"
        "not checked\r\n"
        "--b--\r\n"
    )
    response = alice_client.generic(
        "POST", "/api/models/", body, content_type="multipart/form-data; boundary=b"
    )
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_request"
    assert "long filename" in response.json()["message"]
    assert response.json()["hint"] == "Send the file under a shorter filename."
    assert ModelUpload.objects.count() == 0


def test_upload_with_key_in_form_is_401(alice_key, db):
    from rest_framework.test import APIClient

    form = {
        "model_id": "keyed",
        "file": SimpleUploadedFile("w.pt", b"not checked"),
        "api_key": alice_key,
    }
    response = APIClient().post("/api/models/", form, format="multipart")
    assert response.status_code == 401
    assert "multipart form" in response.json()["hint"]
    assert ModelUpload.objects.count() == 0


def test_upload_while_another_is_checked_is_429(alice_client, tmp_path):
    weights = make_weights(tmp_path / "mine.pt")
    # Held here as an upload being checked in this process would hold it.
    with runner_views._weights_check_slot:
        response = upload(alice_client, "second", weights)
    assert response.status_code == 429
    assert response.json()["code"] == "too_many_requests"
    assert ModelUpload.objects.count() == 0

    assert upload(alice_client, "second", weights).status_code == 201


def test_upload_rejects_id_of_a_shared_model(alice_client, tmp_path):
    # Uploads resolve first, so the demo's detector would be replaced in
    # every workflow of the uploader.
    weights = make_weights(tmp_path / "mine.pt")
    response = upload(alice_client, "people-detector", weights)
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "model_id"
    assert (
        "already names a file in the server's model directory (MODEL_DIR)"
        in body["message"]
    )
    assert ModelUpload.objects.count() == 0


def test_untrained_file_in_model_dir_is_marked_untrained(runner, alice_client):
    # A file in the model directory counts as trained until its checkpoint,
    # read on the runner, shows no training run.
    weights = Path(settings.GLASSBOX["MODEL_DIR"]) / "copied-architecture.pt"
    make_weights(weights)
    try:
        workflow_id = create_workflow(alice_client, detection("copied-architecture"))
        ran = run_workflow(alice_client, workflow_id)
    finally:
        weights.unlink()
    assert ran.status_code == 200, ran.json()
    assert ran["X-Model-Untrained"] == "copied-architecture"
    body = ran.json()
    assert body["timing"]["models"][0]["pretrained"] is False
    assert any(
        "'copied-architecture' is untrained" in warning for warning in body["warnings"]
    )
    stored = Run.objects.get(pk=body["id"])
    assert stored.warnings == body["warnings"]


def test_class_filter_with_unknown_class_warns(runner, alice_client):
    definition = detection()
    definition["steps"][0]["class_filter"] = ["Normal", "Unicorn"]
    workflow_id = create_workflow(alice_client, definition)
    ran = run_workflow(alice_client, workflow_id)
    assert ran.status_code == 200, ran.json()
    [warning] = ran.json()["warnings"]
    assert "step 'people'" in warning
    assert "does not have: Unicorn" in warning
    assert "Normal" in warning.split("its classes are")[1]


def test_delete_upload_frees_its_id(
    alice, alice_client, bob_client, tmp_path, django_capture_on_commit_callbacks
):
    weights = make_weights(tmp_path / "mine.pt")
    assert upload(alice_client, "mine", weights).status_code == 201
    stored = Path(ModelUpload.objects.get(owner=alice, model_id="mine").path)
    detail = alice_client.get("/api/models/mine")
    assert detail.status_code == 200
    assert detail.json()["model_id"] == "mine"
    assert bob_client.delete("/api/models/mine").status_code == 404

    # A run waiting for a runner still needs the file.
    waiting = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.QUEUED,
        model_refs=[
            {
                "model_id": "mine",
                "cache_key": "x",
                "source": resolve_model("mine", alice.id).to_dict(),
            }
        ],
    )
    conflict = alice_client.delete("/api/models/mine")
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "model_in_use"
    assert str(waiting.pk) in conflict.json()["message"]
    assert stored.exists()

    Run.objects.filter(pk=waiting.pk).update(status=Run.Status.FAILED)
    # The file goes once the deletion commits.
    with django_capture_on_commit_callbacks(execute=True):
        assert alice_client.delete("/api/models/mine").status_code == 204
    assert not stored.exists()
    assert not ModelUpload.objects.filter(owner=alice).exists()
    assert alice_client.get("/api/models/mine").status_code == 404
    assert upload(alice_client, "mine", weights).status_code == 201


def test_runner_unloads_deleted_upload(
    runner, alice, alice_client, client, django_user_model, tmp_path
):
    weights = make_weights(tmp_path / "mine.pt")
    assert upload(alice_client, "unloaded", weights).status_code == 201
    workflow_id = create_workflow(alice_client, detection("unloaded"))
    assert run_workflow(alice_client, workflow_id).status_code == 200
    cache_key = resolve_model("unloaded", alice.id).cache_key
    assert cache_key in {model["cache_key"] for model in runner.state()["models"]}
    # Two users' uploads may share an id, so the fleet names the owner.
    staff = django_user_model.objects.create_user("fleet-staff", is_staff=True)
    client.force_login(staff)
    page = client.get("/admin/runner/run/fleet/").content.decode()
    assert "unloaded (upload of alice) (untrained)" in page

    evictions = runner.state()["evictions"]
    assert alice_client.delete("/api/models/unloaded").status_code == 204
    # An idle runner looks between dequeue timeouts (1 s).
    deadline = time.monotonic() + 10
    while cache_key in {model["cache_key"] for model in runner.state()["models"]}:
        assert time.monotonic() < deadline, "the deleted upload stayed loaded"
        time.sleep(0.1)
    # Unloading it is no eviction by the cache's policy.
    assert runner.state()["evictions"] == evictions


def test_deleting_user_removes_upload_files(
    alice, alice_client, tmp_path, django_capture_on_commit_callbacks
):
    weights = make_weights(tmp_path / "mine.pt")
    assert upload(alice_client, "mine", weights).status_code == 201
    stored = Path(ModelUpload.objects.get(owner=alice, model_id="mine").path)
    assert stored.exists()
    with django_capture_on_commit_callbacks(execute=True):
        alice.delete()
    assert not stored.exists()


def test_run_accepted_during_upload_delete_is_refused(
    transactional_db, alice, alice_client, tmp_path
):
    # The delete keeps its transaction open while a run that uses the upload
    # is being accepted: the run must wait for it and find the upload gone,
    # not be stored with weights no runner can read.
    assert upload(alice_client, "going", make_weights(tmp_path / "w.pt")).status_code
    outcome = {}

    def accept() -> None:
        try:
            outcome["result"] = start_cli_run(
                alice, detection("going"), wait_s=0.5, runner="upload-race"
            )
        except Exception as error:
            outcome["result"] = error
        finally:
            connection.close()

    with registered_runner("upload-race"):
        with transaction.atomic():
            ModelUpload.objects.select_for_update().get(model_id="going").delete()
            accepting = threading.Thread(target=accept)
            accepting.start()
            time.sleep(1.0)
            # It has read the upload and waits for the delete's lock.
            assert accepting.is_alive(), outcome
        accepting.join(timeout=30)

    error = outcome["result"]
    assert isinstance(error, ModelNotFoundError), error
    assert error.message == (
        "Model 'going' cannot be used: its upload was deleted while this run was "
        "being accepted"
    )
    assert Run.objects.count() == 0


def test_open_weights_needs_restricted_unpickler(tmp_path, monkeypatch):
    # ultralytics quietly loads with the full unpickler when its restricted
    # one is unsupported (torch older than 2.6), even with
    # ULTRALYTICS_SAFE_LOAD set.
    from ultralytics.nn import tasks

    marker = tmp_path / "ran"
    weights = code_running_weights(tmp_path / "payload.pt", marker)
    monkeypatch.setattr(tasks._SafeLoad, "SUPPORTED", False)

    with pytest.raises(RuntimeError, match="restricted unpickler"):
        open_weights(str(weights))

    assert not marker.exists()


def test_upload_rejects_weights_that_cannot_predict(alice_client, tmp_path):
    weights = weights_that_cannot_predict(tmp_path / "gray.pt")

    response = upload(alice_client, "gray", weights)

    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["field"] == "file"
    assert body["message"].startswith(
        "'gray.pt' is not an ultralytics model: it loads, but a prediction on "
        "a blank 160×160 image failed, so it cannot run (RuntimeError: "
    )
    assert ModelUpload.objects.count() == 0


def test_upload_check_memory_is_limited(alice_client, tmp_path, settings):
    # Upsampling 256 times allocates 1280² × 256 × 4 bytes, 1.6 GiB, on top
    # of the 1 GiB or so that importing torch and loading take.
    settings.GLASSBOX = {**settings.GLASSBOX, "WEIGHTS_CHECK_MEMORY_MB": 2048}
    weights = weights_that_inflate(tmp_path / "inflating.pt", scale=256)

    response = upload(alice_client, "inflating", weights)

    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["field"] == "file"
    assert body["message"] == (
        "'inflating.pt' is not an ultralytics model: a prediction on a blank "
        "160×160 image needed more than the 2048 MiB of memory that a weights "
        "check may use (WEIGHTS_CHECK_MEMORY_MB); a detector of ultralytics' "
        "sizes needs far less"
    )
    assert ModelUpload.objects.count() == 0
    # The limit leaves room for a model that predicts normally.
    response = upload(alice_client, "plain", make_weights(tmp_path / "plain.pt"))
    assert response.status_code == 201, response.json()


def test_upload_activation_memory_is_limited(alice, alice_client, tmp_path):
    weights = weights_without_downsampling(tmp_path / "full-size.pt")
    upload_dir = Path(settings.GLASSBOX["UPLOAD_DIR"]) / str(alice.id)
    before = set(upload_dir.glob("*")) if upload_dir.exists() else set()

    response = upload(alice_client, "full-size", weights)

    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["field"] == "file"
    assert body["message"] == (
        "'full-size.pt' needs too much memory to run: one prediction on a "
        "1920×1920 image, the largest input size that a run can ask for, needs "
        "more than 2048 MiB of memory beyond the loaded model, the limit set by "
        "MODEL_ACTIVATION_MEMORY_MB; ultralytics' detectors of the same size "
        "need far less"
    )
    assert "MODEL_ACTIVATION_MEMORY_MB" in body["hint"]
    assert ModelUpload.objects.count() == 0
    assert set(upload_dir.glob("*")) == before

    # Stock detectors stay far below the default limit at the same size.
    shutil.copy(resolve_model("people-detector").local_path(), tmp_path / "p.pt")
    from ultralytics import YOLO

    YOLO("yolo11n.yaml").save(str(tmp_path / "yolo11n.pt"))
    for model_id, name in [("people", "p.pt"), ("yolo11n-copy", "yolo11n.pt")]:
        response = upload(alice_client, model_id, tmp_path / name)
        assert response.status_code == 201, response.json()


def test_activation_limit_within_check_limit(alice_client, tmp_path, settings):
    # Importing torch and loading take about 1 GiB of the check's 2048 MiB,
    # so less than MODEL_ACTIVATION_MEMORY_MB is left for the prediction.
    settings.GLASSBOX = {**settings.GLASSBOX, "WEIGHTS_CHECK_MEMORY_MB": 2048}
    weights = weights_without_downsampling(tmp_path / "full-size.pt")

    response = upload(alice_client, "full-size", weights)

    assert response.status_code == 400, response.json()
    message = response.json()["message"]
    assert message.startswith("'full-size.pt' needs too much memory to run: ")
    assert (
        "the limit set by WEIGHTS_CHECK_MEMORY_MB, less the memory of the "
        "loaded model" in message
    )
    assert ModelUpload.objects.count() == 0


def test_unrunnable_model_dir_weights_fail(runner, alice_client):
    weights = weights_that_cannot_predict(
        Path(settings.GLASSBOX["MODEL_DIR"]) / "gray.pt"
    )
    response = run_then_delete(alice_client, "gray", weights)

    assert response.status_code == 500, response.json()
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert error["message"].startswith(
        "Model 'gray' could not be loaded: it loaded, but its warm-up prediction "
        "on a blank 640×640 image failed, so these weights cannot run: RuntimeError: "
    )
    run = Run.objects.get()
    assert run.status == Run.Status.FAILED
    assert run.bill.amount_microcredits == 0
    # The failed load's time is the model's cold load, not overhead.
    (model,) = run.breakdown["models"]
    assert model["cold"] is True
    assert model["loads"] == 0
    load = model["cold_load"]
    assert load["read"] > 0
    assert load["warmup"] > 0
    assert load["total"] == load["read"] + load["to_device"] + load["warmup"]
    components = run.breakdown["components"]
    assert components["cold_load"] == load["total"]
    assert components["overhead"] < components["cold_load"]
    runner_parts = sum(
        value for name, value in components.items() if name not in ("request", "queue")
    )
    assert runner_parts == run.breakdown["runner_total"]
