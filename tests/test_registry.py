"""Model ids: where they resolve, what is rejected, what shares a cache entry."""

import os

import pytest
from django.conf import settings

from runner.models import ModelUpload
from runner.registry import (
    ModelSource,
    check_model_path,
    largest_image_size,
    resolve_model,
)
from workflows.errors import ModelNotFoundError


def test_resolve_model_dir_weights(db):
    source = resolve_model("people-detector")
    assert source.kind == "model_dir"
    assert source.pretrained is True


def test_resolve_size_suffix(db):
    source = resolve_model("people-detector-480")
    assert source.image_size == 480
    assert source.path == resolve_model("people-detector").path


def test_resolve_architecture_is_untrained(db):
    source = resolve_model("yolov8n.yaml")
    assert source.kind == "architecture"
    assert source.pretrained is False
    assert "untrained" in source.label


def test_resolve_two_digit_size_suffix(db):
    assert resolve_model("yolov8n.yaml-96").image_size == 96
    assert resolve_model("people-detector-64").image_size == 64
    # Below the smallest size, two digits are part of the name.
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("people-detector-10")
    assert "size suffix" not in caught.value.message
    assert "people-detector-10.pt" in caught.value.message


def test_resolve_architecture_with_size_suffix(db):
    source = resolve_model("yolo11n.yaml-320")
    assert source.kind == "architecture"
    assert source.path == "yolo11n.yaml"
    assert source.image_size == 320
    assert source.pretrained is False
    assert source.cache_key != resolve_model("yolo11n.yaml").cache_key


@pytest.mark.parametrize("model_id", ["yolov8n-cls.yaml", "yolov8n-seg.yaml"])
def test_resolve_rejects_non_detection_architecture(db, model_id):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(model_id)
    assert "Detect" in caught.value.message


@pytest.mark.parametrize("model_id", ["people-detector-9999", "people-detector-0010"])
def test_resolve_rejects_size_out_of_range(db, model_id):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(model_id)
    assert "size suffix" in caught.value.message


@pytest.mark.parametrize(
    "model_id", ["../secret", "/etc/passwd", "nl\n", "x" * 201, ""]
)
def test_resolve_rejects_unsafe_ids(db, model_id):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(model_id)
    # Rejected for its form, before any place is searched.
    assert "is invalid" in caught.value.message
    assert caught.value.invalid_id is True
    assert caught.value.searched == []


def test_resolve_exact_id_before_size_check(db, settings, tmp_path):
    # "-2024" is outside the sizes a model runs at, so it is part of the name.
    (tmp_path / "detector-2024.pt").write_bytes(b"weights")
    settings.GLASSBOX = {**settings.GLASSBOX, "MODEL_DIR": tmp_path}
    source = resolve_model("detector-2024")
    assert source.kind == "model_dir"
    assert source.path.endswith("detector-2024.pt")
    assert source.image_size == settings.GLASSBOX["WARMUP_IMAGE_SIZE"]


@pytest.mark.parametrize(
    ("warmup_size", "largest"), [(640, 1920), (1920, 1920), (2000, 2016)]
)
def test_largest_image_size(settings, warmup_size, largest):
    # The largest size suffix, unless ids without one run at a larger size,
    # rounded up to a multiple of 32 as ultralytics rounds it.
    settings.GLASSBOX = {**settings.GLASSBOX, "WARMUP_IMAGE_SIZE": warmup_size}
    assert largest_image_size() == largest


def test_resolve_names_dot_dot_segment(db):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("a/../../h1-evil")
    assert "'..' segment" in caught.value.message


@pytest.mark.parametrize("model_id", ["yolov8n.yml", "yolov8n.yml-320"])
def test_resolve_names_yml_extension(db, model_id):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(model_id)
    assert "try yolov8n.yaml" in caught.value.message


def test_resolve_names_architecture_directory(db):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("v8/yolov8n.yaml")
    assert "without a directory" in caught.value.message


def test_unknown_model_lists_places_searched(db):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("no-such-model")
    assert "no-such-model.pt" in caught.value.message


def record_upload(owner, model_id, tmp_path) -> str:
    """Record an upload of ``model_id``; resolution never reads the file."""
    weights = tmp_path / f"{owner.username}.pt"
    weights.write_bytes(b"not used by resolution")
    ModelUpload.objects.create(
        owner=owner,
        model_id=model_id,
        path=str(weights),
        size_bytes=1,
        sha256="0",
        task="detect",
    )
    return str(weights)


def test_uploads_are_per_user(db, alice, bob, tmp_path):
    record_upload(alice, "people-detector", tmp_path)
    for_alice = resolve_model("people-detector", alice.id)
    for_bob = resolve_model("people-detector", bob.id)
    assert for_alice.kind == "upload"
    assert for_bob.kind == "model_dir"
    assert for_alice.cache_key != for_bob.cache_key


def test_size_suffix_finds_upload_before_model_dir(db, alice, tmp_path):
    weights = record_upload(alice, "people-detector", tmp_path)
    source = resolve_model("people-detector-320", alice.id)
    assert source.kind == "upload"
    assert source.path == weights
    assert source.image_size == 320


def test_unknown_architecture_message_has_no_path(db):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("nonexistent.yaml")
    message = caught.value.message
    assert "cfg/models/**/nonexistent.yaml" in message
    assert "site-packages" not in message


def test_unknown_model_message_names_settings_not_paths(db, alice):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("no-such-model-640", alice.id)
    message = caught.value.message
    assert "your uploaded models (no-such-model-640)" in message
    assert "your uploaded models (no-such-model)" in message
    assert "the server's model directory (MODEL_DIR/no-such-model.pt)" in message
    assert str(settings.GLASSBOX["MODEL_DIR"]) not in message


def test_aliases_of_one_file_share_cache_key(db):
    assert (
        resolve_model("people-detector").cache_key
        == resolve_model("people-detector.pt").cache_key
    )


def test_check_model_path_accepts_resolved_sources(db):
    check_model_path(resolve_model("people-detector"))
    check_model_path(resolve_model("yolov8n.yaml"))


@pytest.mark.parametrize(
    "kind, path",
    [
        ("model_dir", "/etc/passwd"),
        # Paths are relative to the model directory, and may not leave it.
        ("model_dir", "../manage.py"),
        ("model_dir", "sub/../../manage.py"),
        ("upload", "../models/people-detector.pt"),
        ("upload", "/tmp/evil.pt"),
        ("architecture", "x/yolov8n.yaml"),
        ("architecture", "/tmp/evil.pt"),
        ("somewhere", "/tmp/evil.pt"),
    ],
)
def test_check_model_path_rejects_other_places(kind, path):
    source = ModelSource("m", kind, path, pretrained=True)
    with pytest.raises(ValueError):
        check_model_path(source)


def test_model_paths_are_relative_to_their_directory(db, settings, tmp_path):
    # A runner on another machine finds the file under its own directory,
    # and routing compares the same cache key on every machine.
    source = resolve_model("people-detector")
    assert source.path == "people-detector.pt"
    assert source.cache_key == "model_dir:people-detector.pt:640"
    elsewhere = tmp_path / "models"
    elsewhere.mkdir()
    (elsewhere / "people-detector.pt").write_bytes(b"copy")
    settings.GLASSBOX = {**settings.GLASSBOX, "MODEL_DIR": elsewhere}
    assert source.local_path() == str(elsewhere / "people-detector.pt")
    check_model_path(source)


def test_size_suffix_at_the_default_size_names_the_same_model(db, settings):
    # Otherwise the same weights were loaded, and billed, twice.
    settings.GLASSBOX = {**settings.GLASSBOX, "WARMUP_IMAGE_SIZE": 640}
    plain = resolve_model("people-detector")
    assert plain.image_size == 640
    assert resolve_model("people-detector-640").cache_key == plain.cache_key
    assert resolve_model("people-detector-320").cache_key != plain.cache_key
    assert resolve_model("yolov8n.yaml").image_size == 640


def test_size_suffix_rounds_up_to_stride(db):
    # ultralytics runs 641 as 672, so both ids name one loaded model.
    rounded = resolve_model("people-detector-641")
    assert rounded.image_size == 672
    assert rounded.cache_key == resolve_model("people-detector-672").cache_key
    assert resolve_model("people-detector-0641").cache_key == rounded.cache_key
    assert resolve_model("people-detector-640").image_size == 640


@pytest.mark.parametrize(
    "model_id", ["people-detector-9999", "yolov8n-seg.yaml", "../secret"]
)
def test_unusable_id_hint_not_about_missing_file(db, model_id):
    # The id was found unusable, not missing: advice to add the file misleads.
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(model_id)
    assert "Put <model_id>.pt" not in caught.value.to_dict().get("hint", "")


def test_check_model_path_rejects_dotdot_through_symlink(settings, tmp_path):
    # The kernel resolves "shelf/.." to the parent of the symlink's target,
    # not to the model directory, so a ".." there leaves the directory.
    models = tmp_path / "models"
    models.mkdir()
    outside = tmp_path / "outside"
    (outside / "shelf").mkdir(parents=True)
    (outside / "evil.pt").write_bytes(b"not weights")
    (models / "shelf").symlink_to(outside / "shelf")
    settings.GLASSBOX = {**settings.GLASSBOX, "MODEL_DIR": models}

    source = ModelSource("m", "model_dir", "shelf/../evil.pt", pretrained=True)
    opened = os.path.realpath(source.local_path())
    assert opened == str(outside / "evil.pt")
    with pytest.raises(ValueError):
        check_model_path(source)
