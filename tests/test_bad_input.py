"""Bad requests get a 4xx with a structured error body and store nothing.

Every check in start_run (compile, inputs, model ids) runs before the runner
pool is consulted, so none of these tests starts a runner.  A request that
passed every check would get a 503 "no_runner" instead of the 4xx asserted
here, and one that reached a runner would store a run.
"""

import base64
import gzip
import io
import json
import re
import struct
import tracemalloc
import urllib.parse
import zlib

import numpy as np
import pytest
from django.conf import settings
from django.test import Client, override_settings
from PIL import Image, PngImagePlugin

from billing.models import Bill
from runner.models import Run
from tests.conftest import image_bytes
from tests.definitions import detection, image_height
from webapp.models import ApiToken
from webapp.requests import MalformedRequest, parse_json
from workflows.images import ImageInfo, inspect_image
from workflows.models import Workflow, WorkflowVersion

ROUTES = ["api", "roboflow_inline", "roboflow_stored"]


def assert_nothing_stored() -> None:
    assert Run.objects.count() == 0
    assert Bill.objects.count() == 0


def assert_error_body(body: dict) -> None:
    assert isinstance(body.get("message"), str)
    assert body["message"]
    assert isinstance(body.get("code"), str)
    assert body["code"]
    assert "context" in body


def raw_json(text: str) -> str:
    """Mark ``text`` to be sent as it is, in place of the JSON string value."""
    return f"{RAW_MARK}{text}{RAW_MARK}"


RAW_MARK = "@raw@"


def post_json(client, url: str, body) -> object:
    encoded = re.sub(f'"{RAW_MARK}(.*?){RAW_MARK}"', lambda m: m[1], json.dumps(body))
    return client.post(url, encoded, content_type="application/json")


def base64_input(data: bytes) -> dict:
    return {"type": "base64", "value": base64.b64encode(data).decode()}


# The image-height workflow's inputs, encoded once.
IMAGE_INPUTS = {"image": base64_input(image_bytes())}


def png_header_only(width: int, height: int) -> bytes:
    """Build a PNG with a valid IHDR and IEND but no pixel data (IDAT)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def with_parameter(definition: dict, name: str, **extra) -> dict:
    parameter = {"type": "WorkflowParameter", "name": name, **extra}
    return {**definition, "inputs": [*definition["inputs"], parameter]}


@pytest.fixture(params=ROUTES)
def send_run(request, alice, alice_client):
    """Send ``definition`` and ``inputs`` to one run route as alice."""

    def send(definition: dict, inputs) -> object:
        if request.param == "roboflow_inline":
            return post_json(
                alice_client,
                "/workflows/run",
                {"specification": definition, "inputs": inputs},
            )
        workflow = Workflow.create_with_version(alice, "bad input", definition)
        if request.param == "api":
            url = f"/api/workflows/{workflow.id}/runs"
        else:
            url = f"/alice/workflows/{workflow.slug}"
        return post_json(alice_client, url, {"inputs": inputs})

    return send


@pytest.fixture(params=ROUTES)
def run_url(request, alice):
    """URL of one run route; the stored routes point at a valid workflow."""
    workflow = Workflow.create_with_version(alice, "height", image_height())
    return {
        "api": f"/api/workflows/{workflow.id}/runs",
        "roboflow_inline": "/workflows/run",
        "roboflow_stored": f"/alice/workflows/{workflow.slug}",
    }[request.param]


# Request bodies


def test_run_request_malformed_json(alice_client, run_url):
    response = alice_client.post(
        run_url, '{"inputs": {"image": ', content_type="application/json"
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "malformed_request"
    assert "not valid JSON" in body["message"]
    assert_nothing_stored()


def test_run_request_body_not_object(alice_client, run_url):
    response = alice_client.post(run_url, "[1, 2]", content_type="application/json")
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "malformed_request"
    assert_nothing_stored()


def test_run_request_nan_literal(alice_client, run_url):
    body = json.dumps(
        {
            "specification": image_height(),
            "inputs": {"image": base64_input(image_bytes()), "x": 1},
        }
    )
    response = alice_client.post(
        run_url, body.replace('"x": 1', '"x": NaN'), content_type="application/json"
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert "NaN" in body["message"]
    assert_nothing_stored()


def test_run_request_duplicate_key(alice_client, run_url):
    # Python's parser keeps the last "inputs", other parsers the first.
    inputs = json.dumps({"image": base64_input(image_bytes())})
    raw = f'{{"inputs": {{}}, "specification": {json.dumps(image_height())}, '
    raw += f'"inputs": {inputs}}}'
    response = alice_client.post(run_url, raw, content_type="application/json")
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "malformed_request"
    assert body["field"] == "inputs"
    assert body["message"] == (
        'request body has the key "inputs" more than once in the top-level object'
    )
    assert "once per JSON object" in body["hint"]
    assert_nothing_stored()


@pytest.mark.parametrize(
    ("raw", "field", "where"),
    [
        (
            '{"definition": {"steps": [{"name": "a", "type": "b", "name": "c"}]}}',
            "definition.steps[0].name",
            "the object at definition.steps[0]",
        ),
        (
            '{"definition": {"my key": {"x": 1, "x": 2}}}',
            'definition["my key"].x',
            'the object at definition["my key"]',
        ),
    ],
    ids=["in-list", "quoted-key"],
)
def test_nested_duplicate_key_named_with_path(alice_client, raw, field, where):
    response = alice_client.post("/api/validate", raw, content_type="application/json")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "malformed_request"
    assert body["field"] == field
    assert body["message"].endswith(f"more than once in {where}")


def test_same_key_in_two_objects_accepted(alice_client):
    definition = image_height()
    # "name" appears in every input, step and output, once in each object.
    response = post_json(alice_client, "/api/validate", {"definition": definition})
    assert response.status_code == 200, response.json()


def test_duplicate_key_search_memory_bounded():
    # A repeated key after a long list deep in the body: naming its path
    # must not build a path string for each of the list's members.
    members = "[" * 200 + ",".join(["0"] * 200_000) + "]" * 200

    def peak_bytes(tail: str) -> int:
        raw = f'{{"a": {members}, "x": {tail}}}'.encode()
        tracemalloc.start()
        try:
            parse_json(raw)
        except MalformedRequest as error:
            assert error.field_name == "x.k"
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    without_repeat = peak_bytes('{"k": 1, "j": 2}')
    with_repeat = peak_bytes('{"k": 1, "k": 2}')
    assert with_repeat < 2 * without_repeat


def test_run_request_nested_too_deeply(alice_client, run_url):
    response = alice_client.post(
        run_url, "[" * 100_000 + "]" * 100_000, content_type="application/json"
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "malformed_request"
    assert_nothing_stored()


def test_run_request_inputs_not_object(send_run):
    response = send_run(image_height(), ["not", "an", "object"])
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "invalid_input"
    assert body["field"] == "inputs"
    assert_nothing_stored()


def test_inline_run_specification_missing(alice_client):
    response = post_json(
        alice_client,
        "/workflows/run",
        {"inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "specification"
    assert_nothing_stored()


# Invalid definitions, sent inline on the Roboflow route


def unknown_block_type() -> dict:
    definition = image_height()
    definition["steps"][0]["type"] = "roboflow_core/no_such_block@v1"
    return definition


def missing_required_field() -> dict:
    definition = detection()
    del definition["steps"][0]["model_id"]
    return definition


def wrong_kind_selector() -> dict:
    # The property step outputs a value; the detector's images field needs an image.
    definition = image_height()
    definition["steps"].append(
        {
            "type": "ObjectDetectionModel",
            "name": "people",
            "images": "$steps.h.output",
            "model_id": "people-detector",
        }
    )
    return definition


def selector_to_missing_input() -> dict:
    definition = image_height()
    definition["steps"][0]["data"] = "$inputs.picture"
    return definition


def selector_to_missing_step() -> dict:
    definition = detection()
    definition["steps"][1]["data"] = "$steps.nobody.predictions"
    return definition


def selector_to_missing_step_output() -> dict:
    definition = detection()
    definition["steps"][1]["data"] = "$steps.people.boxes"
    return definition


def duplicate_step_names() -> dict:
    definition = image_height()
    definition["steps"].append(dict(definition["steps"][0]))
    return definition


def cycle() -> dict:
    definition = image_height()
    definition["steps"] = [
        {
            "type": "PropertyDefinition",
            "name": "first",
            "data": "$steps.second.output",
            "operations": [{"type": "SequenceLength"}],
        },
        {
            "type": "PropertyDefinition",
            "name": "second",
            "data": "$steps.first.output",
            "operations": [{"type": "SequenceLength"}],
        },
    ]
    definition["outputs"] = [
        {"type": "JsonField", "name": "n", "selector": "$steps.second.output"}
    ]
    return definition


def self_reference() -> dict:
    definition = image_height()
    definition["steps"][0]["data"] = "$steps.h.output"
    return definition


def parameter_as_image() -> dict:
    definition = with_parameter(detection(), "threshold", default_value=0.5)
    definition["steps"][0]["images"] = "$inputs.threshold"
    return definition


def operation_not_object() -> dict:
    definition = image_height()
    definition["steps"][0]["operations"] = ["SequenceLength"]
    return definition


def static_crop(**fields) -> dict:
    definition = image_height()
    crop = {"x_center": 100, "y_center": 100, "width": 50, "height": 50, **fields}
    definition["steps"].append(
        {
            "type": "roboflow_core/absolute_static_crop@v1",
            "name": "crop",
            "images": "$inputs.image",
            **crop,
        }
    )
    return definition


def boxes_drawn(thickness: int) -> dict:
    definition = detection()
    definition["steps"].append(
        {
            "type": "roboflow_core/bounding_box_visualization@v1",
            "name": "drawn",
            "image": "$inputs.image",
            "predictions": "$steps.people.predictions",
            "thickness": thickness,
        }
    )
    return definition


def too_many_detections() -> dict:
    definition = detection()
    definition["steps"][0]["max_detections"] = 10**9
    return definition


# (build the definition, step named in the error, field named in the error,
# text the message contains)
INVALID_DEFINITIONS = {
    "unknown_block_type": (unknown_block_type, "h", "type", "no_such_block"),
    "missing_required_field": (missing_required_field, "people", "model_id", "missing"),
    "wrong_kind_selector": (wrong_kind_selector, "people", "images", "kind"),
    "selector_to_missing_input": (
        selector_to_missing_input,
        "h",
        "data",
        "$inputs.picture",
    ),
    "selector_to_missing_step": (
        selector_to_missing_step,
        "count",
        "data",
        "$steps.nobody",
    ),
    "selector_to_missing_step_output": (
        selector_to_missing_step_output,
        "count",
        "data",
        "boxes",
    ),
    "duplicate_step_names": (duplicate_step_names, "h", "name", "used twice"),
    "cycle": (cycle, "first", "data", "cycle"),
    "self_reference": (self_reference, "h", "data", "cycle"),
    "parameter_as_image": (parameter_as_image, "people", "images", "parameter input"),
    "operation_not_object": (operation_not_object, "h", "operations", "an object"),
    "crop_narrower_than_a_pixel": (
        lambda: static_crop(width=0.2),
        "crop",
        "width",
        "from 1 to",
    ),
    "crop_coordinate_overflow": (
        lambda: static_crop(x_center=10**400),
        "crop",
        "x_center",
        "from 0 to",
    ),
    "line_too_thick": (lambda: boxes_drawn(10**9), "drawn", "thickness", "32767"),
    "too_many_detections": (
        too_many_detections,
        "people",
        "max_detections",
        "from 1 to 30000",
    ),
}


@pytest.fixture(params=list(INVALID_DEFINITIONS))
def invalid_definition(request):
    build, step, field, text = INVALID_DEFINITIONS[request.param]
    return build(), step, field, text


def test_invalid_definition_inline_status(alice_client, invalid_definition):
    definition, _, _, _ = invalid_definition
    response = post_json(
        alice_client,
        "/workflows/run",
        {"specification": definition, "inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 400
    assert_nothing_stored()


def test_invalid_definition_inline_body(alice_client, invalid_definition):
    definition, step, field, text = invalid_definition
    body = post_json(
        alice_client,
        "/workflows/run",
        {"specification": definition, "inputs": {"image": base64_input(image_bytes())}},
    ).json()
    assert_error_body(body)
    assert body["code"] == "invalid_definition"
    assert body["step"] == step
    assert body["field"] == field
    assert text in body["message"]
    assert f"step '{step}'" in body["message"]
    assert f"field '{field}'" in body["message"]


def test_invalid_definition_blocks_errors(alice_client, invalid_definition):
    definition, step, field, _ = invalid_definition
    body = post_json(
        alice_client,
        "/workflows/run",
        {"specification": definition, "inputs": {"image": base64_input(image_bytes())}},
    ).json()
    first = body["blocks_errors"][0]
    assert first["block_id"] == step
    assert first["property_name"] == field
    assert first["property_details"]


def test_output_selector_missing_step(alice_client):
    definition = image_height()
    definition["outputs"][0]["selector"] = "$steps.nobody.output"
    response = post_json(
        alice_client,
        "/workflows/run",
        {"specification": definition, "inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "outputs.height.selector"
    assert "$steps.nobody" in body["message"]
    assert_nothing_stored()


def test_workflow_create_invalid_status(alice_client, invalid_definition):
    definition, _, _, _ = invalid_definition
    response = post_json(
        alice_client, "/api/workflows/", {"name": "broken", "definition": definition}
    )
    assert response.status_code == 400


def test_workflow_create_invalid_body(alice_client, invalid_definition):
    definition, step, field, _ = invalid_definition
    body = post_json(
        alice_client, "/api/workflows/", {"name": "broken", "definition": definition}
    ).json()
    assert_error_body(body)
    assert body["code"] == "invalid_definition"
    assert body["step"] == step
    assert body["field"] == field


def test_workflow_create_invalid_stores_nothing(alice_client, invalid_definition):
    definition, _, _, _ = invalid_definition
    post_json(
        alice_client, "/api/workflows/", {"name": "broken", "definition": definition}
    )
    assert Workflow.objects.count() == 0
    assert WorkflowVersion.objects.count() == 0


def test_workflow_create_malformed_json(alice_client):
    response = alice_client.post(
        "/api/workflows/", '{"name": ', content_type="application/json"
    )
    assert response.status_code == 400
    assert_error_body(response.json())
    assert Workflow.objects.count() == 0


@pytest.mark.parametrize("name", [5, 1.5, True, ["x"]])
def test_workflow_create_name_not_a_string(alice_client, name):
    response = post_json(
        alice_client, "/api/workflows/", {"name": name, "definition": image_height()}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_request"
    assert "name" in body["fields"]
    assert Workflow.objects.count() == 0


@pytest.mark.parametrize(
    "name", ["\u200b", "\u200b \u2060\ufeff", "\u00a0\u200d", "\u3164", "\u2800 "]
)
def test_workflow_name_without_visible_character_rejected(alice_client, name):
    created = post_json(
        alice_client, "/api/workflows/", {"name": name, "definition": image_height()}
    )
    assert created.status_code == 400
    assert created.json()["fields"]["name"] == [
        "has no visible character, only spaces and characters drawn as blank, "
        "such as U+200B; give it a name that can be read"
    ]
    assert Workflow.objects.count() == 0


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("two\nlines", "U+000A at position 3"),
        ("tab\there", "U+0009 at position 3"),
        ("bell\x07", "U+0007 at position 4"),
        ("del\x7f", "U+007F at position 3"),
        ("abc\u202egnp.exe", "U+202E at position 3"),
        ("para\u2029graph", "U+2029 at position 4"),
    ],
    ids=["newline", "tab", "bell", "delete", "rtl-override", "paragraph-separator"],
)
def test_workflow_name_with_control_characters_rejected(
    alice, alice_client, name, shown
):
    created = post_json(
        alice_client, "/api/workflows/", {"name": name, "definition": image_height()}
    )
    assert created.status_code == 400
    body = created.json()
    assert body["code"] == "invalid_request"
    assert body["fields"]["name"] == [f"may not contain control characters: {shown}"]
    assert Workflow.objects.count() == 0

    workflow = Workflow.create_with_version(alice, "plain", image_height())
    renamed = alice_client.put(
        f"/api/workflows/{workflow.id}", {"name": name}, format="json"
    )
    assert renamed.status_code == 400
    workflow.refresh_from_db()
    assert workflow.name == "plain"


@pytest.mark.parametrize(
    "name", ["日本語の名前", "Café 🚀", "family 👨\u200d👩\u200d👧", "  padded  "]
)
def test_workflow_name_with_other_unicode_accepted(alice_client, name):
    created = post_json(
        alice_client, "/api/workflows/", {"name": name, "definition": image_height()}
    )
    assert created.status_code == 201, created.json()
    assert created.json()["name"] == name.strip()


# Images


def test_image_not_an_image(send_run):
    response = send_run(
        image_height(), {"image": base64_input(b"just some text, no image here")}
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "invalid_input"
    assert body["field"] == "image"
    assert "not an image" in body["message"]
    # Pillow's own message names only its buffer object.
    assert "BytesIO" not in json.dumps(body)
    assert_nothing_stored()


def test_image_unsupported_format(send_run):
    from PIL import Image

    icon = io.BytesIO()
    Image.new("RGB", (16, 16)).save(icon, format="ICO")
    response = send_run(image_height(), {"image": base64_input(icon.getvalue())})
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith("Input 'image' is an image in ICO format;")
    assert_nothing_stored()


def test_image_truncated_jpeg(send_run):
    whole = image_bytes()
    half = whole[: len(whole) // 2]
    response = send_run(image_height(), {"image": base64_input(half)})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert "truncated JPEG" in body["message"]
    assert_nothing_stored()


@pytest.mark.parametrize("appended", [b"", b"x" * 1000], ids=["cut", "cut-then-data"])
def test_image_truncated_png(send_run, appended):
    # Data after the cut must not pass for a complete file: the IEND chunk is
    # looked for where the chunks lead, not only in the file's last bytes.
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes())).save(buffer, format="PNG")
    whole = buffer.getvalue()
    response = send_run(
        image_height(), {"image": base64_input(whole[: len(whole) // 2] + appended)}
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert "truncated PNG" in body["message"]
    assert_nothing_stored()


def png_with_metadata(*chunks: tuple[bytes, bytes]) -> bytes:
    """Build a small PNG with ``(type, data)`` chunks inserted after IHDR."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, format="PNG")
    plain = buffer.getvalue()
    # The signature and the IHDR chunk: length, type, 13 bytes of data, CRC.
    header_end = 8 + 12 + 13
    inserted = b"".join(
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
        for kind, payload in chunks
    )
    return plain[:header_end] + inserted + plain[header_end:]


# Pillow's limits on one inflated metadata chunk (1 MiB in Pillow 12.3) and
# on a file's text metadata together (64 MiB).
METADATA_CHUNK_LIMIT = PngImagePlugin.MAX_TEXT_CHUNK
TEXT_METADATA_LIMIT = PngImagePlugin.MAX_TEXT_MEMORY


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [
        (b"zTXt", b"Comment\0\0"),
        (b"iCCP", b"profile\0\0"),
        (b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0"),
    ],
)
def test_image_png_metadata_chunk_too_large(send_run, kind, prefix):
    # A few kB that inflate past Pillow's limit: a decompression bomb.
    inflated = b"\0" * (METADATA_CHUNK_LIMIT + 1)
    data = png_with_metadata((kind, prefix + zlib.compress(inflated, 9)))
    response = send_run(image_height(), {"image": base64_input(data)})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "invalid_input"
    assert body["field"] == "image"
    assert body["message"] == (
        f"Input 'image' is a PNG file whose {kind.decode()} metadata chunk inflates "
        f"to more than {METADATA_CHUNK_LIMIT} bytes, the limit on one metadata chunk"
    )
    assert "ICC profile" in body["hint"]
    assert_nothing_stored()


def test_image_png_text_metadata_too_large(send_run):
    # Each chunk is within the limit on one, but together they pass the
    # limit on a file's text.
    compressed = zlib.compress(b"\0" * METADATA_CHUNK_LIMIT, 9)
    count = TEXT_METADATA_LIMIT // METADATA_CHUNK_LIMIT + 1
    chunks = [
        (b"zTXt", f"key{index}".encode() + b"\0\0" + compressed)
        for index in range(count)
    ]
    data = png_with_metadata(*chunks)
    response = send_run(image_height(), {"image": base64_input(data)})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert body["message"] == (
        "Input 'image' is a PNG file whose text metadata chunks inflate to more "
        f"than {TEXT_METADATA_LIMIT} bytes together, the limit on a file's "
        "text metadata"
    )
    assert_nothing_stored()


def test_image_png_metadata_at_limit_accepted():
    inflated = zlib.compress(b"\0" * METADATA_CHUNK_LIMIT, 9)
    data = png_with_metadata((b"zTXt", b"Comment\0\0" + inflated))
    info = inspect_image(data, input_name="image", max_pixels=10**6)
    assert info == ImageInfo(format="PNG", width=40, height=30)


def test_image_truncated_webp(send_run):
    # Pillow decodes a WebP file to open it, so a cut one must not be
    # reported as a format the server does not support.
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes())).save(buffer, format="WEBP")
    whole = buffer.getvalue()
    half = whole[: len(whole) // 2]
    response = send_run(image_height(), {"image": base64_input(half)})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert body["message"] == (
        f"Input 'image' is a truncated WEBP file ({len(half)} of the "
        f"{len(whole)} bytes that its RIFF header gives)"
    )
    assert_nothing_stored()


def test_image_damaged_webp(send_run):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes())).save(buffer, format="WEBP")
    # Overwrite the VP8 chunk's frame header, keeping the file's length.
    damaged = bytearray(buffer.getvalue())
    damaged[20:40] = bytes(20)
    response = send_run(image_height(), {"image": base64_input(bytes(damaged))})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert body["message"] == "Input 'image' could not be decoded as WEBP"
    assert_nothing_stored()


def test_image_invalid_base64(send_run):
    response = send_run(
        image_height(), {"image": {"type": "base64", "value": "not*base64*at*all"}}
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert "not valid base64" in body["message"]
    assert_nothing_stored()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("QUJD!REVG", "character '!' at offset 4 of the base64 data is not"),
        ("data:image/png;base64,QUJD\u00e9", "character 'é' at offset 4 of"),
        ("QU-D+REVG", "it mixes the URL-safe alphabet ('-' at offset 2 of"),
        ("QUJD=REVG", "padding '=' at offset 4 of the base64 data is followed"),
    ],
    ids=["foreign", "after-prefix", "mixed-alphabets", "inner-padding"],
)
def test_image_invalid_base64_names_the_problem(send_run, value, problem):
    # The decoder's own "Only base64 data is allowed" said neither what nor where.
    response = send_run(image_height(), {"image": {"type": "base64", "value": value}})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert body["message"].startswith("Input 'image' is not valid base64: ")
    assert problem in body["message"]
    assert "URL-safe" in body["hint"]
    assert_nothing_stored()


@pytest.mark.parametrize(
    "encode",
    [
        lambda data: base64.urlsafe_b64encode(data).decode(),
        lambda data: base64.urlsafe_b64encode(data).decode().rstrip("="),
        lambda data: "DATA:image/jpeg;base64," + base64.b64encode(data).decode(),
        lambda data: " \n data:image/jpeg;base64," + base64.b64encode(data).decode(),
    ],
    ids=["url-safe", "url-safe-unpadded", "upper-case-scheme", "leading-space"],
)
def test_image_base64_variants_decode(encode):
    from workflows.images import decode_base64

    # Bytes whose URL-safe encoding has both '-' and '_'.
    data = bytes(range(256)) * 4
    assert decode_base64(encode(data), input_name="image") == data


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        # Base64 characters after a prefix without ';base64', which RFC 2397
        # reads as percent-encoded text, not base64.
        (
            "data:image/jpeg," + base64.b64encode(image_bytes()).decode(),
            "has no ';base64' before its ','",
        ),
        (
            "data:image/jpeg," + urllib.parse.quote_from_bytes(image_bytes()),
            "has no ';base64' before its ','",
        ),
        ("data:image/jpeg;base64", "has no ',' before its data"),
    ],
    ids=["base64-data", "percent-encoded", "no-comma"],
)
def test_image_data_url_without_base64(send_run, value, problem):
    response = send_run(image_height(), {"image": {"type": "base64", "value": value}})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "invalid_input"
    assert body["field"] == "image"
    assert body["message"].startswith("Input 'image' is a data URL that ")
    assert problem in body["message"]
    assert "data:image/jpeg;base64," in body["hint"]
    assert_nothing_stored()


def test_image_empty(send_run):
    response = send_run(image_height(), {"image": {"type": "base64", "value": ""}})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert "empty" in body["message"]
    assert_nothing_stored()


@pytest.mark.parametrize(
    "image",
    [
        {"type": "url", "value": "http://127.0.0.1:9/bus.jpg"},
        "https://127.0.0.1:9/a",
        {"type": "base64", "value": "HTTP://127.0.0.1:9/b.jpg"},
    ],
    ids=["typed", "bare", "typed-base64"],
)
def test_image_url_not_downloaded(send_run, image):
    response = send_run(image_height(), {"image": image})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert "URL" in body["message"]
    assert_nothing_stored()


def test_image_over_configured_pixel_limit(send_run):
    limits = {**settings.GLASSBOX, "MAX_IMAGE_PIXELS": 100_000}
    with override_settings(GLASSBOX=limits):
        response = send_run(image_height(), {"image": base64_input(image_bytes())})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert "810x1080" in body["message"]
    assert "100000" in body["message"]
    assert_nothing_stored()


@pytest.mark.parametrize("side", [7_000, 12_000, 20_000])
def test_image_over_pixel_limit_from_header(send_run, side):
    # The PNG has no pixel data at all, so only a check of the header can
    # report its size: a decoder would fail on the missing data instead.
    # The sides cover the default limit (40M pixels) and both of Pillow's
    # decompression-bomb thresholds (about 89M to warn, 179M to raise).
    assert side * side > settings.GLASSBOX["MAX_IMAGE_PIXELS"]
    image = png_header_only(side, side)
    response = send_run(image_height(), {"image": base64_input(image)})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert f"{side}x{side}" in body["message"]
    assert "over the limit" in body["message"]
    assert_nothing_stored()


def test_image_input_missing(send_run):
    response = send_run(image_height(), {})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert "missing" in body["message"]
    assert_nothing_stored()


def test_bad_image_in_batch_names_index(send_run):
    image = base64_input(image_bytes())
    half = base64_input(image_bytes()[: len(image_bytes()) // 2])
    cases = [
        ([image, base64_input(b"no image")], "Input 'image[1]' is not an image"),
        ([image, image, half], "Input 'image[2]' is a truncated JPEG"),
        ([{"type": "base64", "value": "*"}], "Input 'image[0]' is not valid base64"),
        ([image, "https://example.com/a.jpg"], "image input 'image[1]' is a URL"),
        ([image, {"type": "numpy", "value": "x"}], "image input 'image[1]' has type"),
        ([image, {"value": 5}], "image input 'image[1]' has an integer as its value"),
        ([image, image, 5], "image input 'image[2]' must be"),
    ]
    for batch, message in cases:
        response = send_run(image_height(), {"image": batch})
        assert response.status_code == 400
        body = response.json()
        assert_error_body(body)
        assert body["message"].startswith(message)
        # The field is the declared input, whichever of its images failed.
        assert body["field"] == "image"
    assert_nothing_stored()


def test_image_batch_sizes_differ(send_run):
    definition = image_height()
    definition["inputs"].append({"type": "WorkflowImage", "name": "other"})
    image = base64_input(image_bytes())
    response = send_run(definition, {"image": [image, image], "other": [image] * 3})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert "different sizes" in body["message"]
    assert_nothing_stored()


# Parameters and models


def confidence_from_parameter() -> dict:
    definition = with_parameter(detection(), "conf")
    definition["steps"][0]["confidence"] = "$inputs.conf"
    return definition


def test_parameter_missing_without_default(send_run):
    # A missing parameter without a default is null, which the confidence
    # field it feeds rejects.
    response = send_run(
        confidence_from_parameter(), {"image": base64_input(image_bytes())}
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["step"] == "people"
    assert body["field"] == "conf"
    assert "missing and has no default, so it is null" in body["message"]
    assert "must be a number, got null" in body["message"]
    assert_nothing_stored()


def test_parameter_wrong_type(send_run):
    response = send_run(
        confidence_from_parameter(),
        {"image": base64_input(image_bytes()), "conf": "high"},
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "invalid_input"
    assert body["step"] == "people"
    assert body["field"] == "conf"
    # The value as the client wrote it, in JSON.
    assert 'must be a number, got "high"' in body["message"]
    assert_nothing_stored()


def test_parameter_out_of_range(send_run):
    response = send_run(
        confidence_from_parameter(), {"image": base64_input(image_bytes()), "conf": 5}
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "conf"
    assert "from 0 to 1" in body["message"]
    assert_nothing_stored()


def test_parameter_default_wrong_type(send_run):
    # The definition itself is invalid: every run without the parameter
    # would fail.
    definition = with_parameter(detection(), "conf", default_value=[0.5])
    definition["steps"][0]["confidence"] = "$inputs.conf"
    response = send_run(definition, {"image": base64_input(image_bytes())})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "invalid_definition"
    assert body["step"] == "people"
    assert body["field"] == "confidence"
    assert "default_value of '$inputs.conf'" in body["message"]
    assert_nothing_stored()


def test_model_id_unknown(send_run):
    response = send_run(
        detection("no-such-model"), {"image": base64_input(image_bytes())}
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "model_not_found"
    assert body["step"] == "people"
    assert body["field"] == "model_id"
    assert "'no-such-model'" in body["message"]
    assert "MODEL_DIR/no-such-model.pt" in body["message"]
    assert str(settings.GLASSBOX["MODEL_DIR"]) not in body["message"]
    assert "uploaded models" in body["message"]
    assert_nothing_stored()


@pytest.mark.parametrize("model_id", ["", "  "])
def test_model_id_empty(alice_client, send_run, model_id):
    # In the definition, the compiler rejects it, so /api/validate does too.
    validated = post_json(
        alice_client, "/api/validate", {"definition": detection(model_id)}
    )
    assert validated.status_code == 400
    assert "must be a non-empty string" in validated.json()["message"]
    # From a parameter, the run request is checked the same way.
    definition = detection("$inputs.model")
    definition["inputs"].append({"type": "WorkflowParameter", "name": "model"})
    response = send_run(
        definition, {"image": base64_input(image_bytes()), "model": model_id}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_input"
    assert "must be a non-empty string" in body["message"]
    assert "''''" not in body["message"]
    assert_nothing_stored()


def test_model_id_unknown_from_parameter(send_run):
    definition = with_parameter(detection(), "model")
    definition["steps"][0]["model_id"] = "$inputs.model"
    response = send_run(
        definition, {"image": base64_input(image_bytes()), "model": "missing-weights"}
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["step"] == "people"
    assert "'missing-weights'" in body["message"]
    assert_nothing_stored()


# Unknown and foreign resources


def test_api_run_unknown_workflow(alice_client):
    response = post_json(
        alice_client,
        "/api/workflows/999999/runs",
        {"inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 404
    assert_error_body(response.json())
    assert_nothing_stored()


def test_api_get_unknown_workflow(alice_client):
    response = alice_client.get("/api/workflows/999999")
    assert response.status_code == 404
    assert_error_body(response.json())


def test_roboflow_run_unknown_workflow(alice, alice_client):
    response = post_json(
        alice_client,
        "/alice/workflows/no-such-workflow",
        {"inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 404
    body = response.json()
    assert_error_body(body)
    assert "no-such-workflow" in body["message"]
    assert_nothing_stored()


def test_api_run_unknown_version(alice, alice_client):
    workflow = Workflow.create_with_version(alice, "height", image_height())
    response = post_json(
        alice_client,
        f"/api/workflows/{workflow.id}/runs",
        {"version": 7, "inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 404
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "not_found"
    assert "no version 7" in body["message"]
    assert_nothing_stored()


def test_api_run_version_with_thousands_of_digits(alice, alice_client):
    # Python refuses to convert over 4,300 digits to an int.
    workflow = Workflow.create_with_version(alice, "height", image_height())
    inputs = {"image": base64_input(image_bytes())}
    for url in (
        f"/api/workflows/{workflow.id}/runs",
        f"/api/workflows/{workflow.id}/estimate",
    ):
        response = post_json(
            alice_client, url, {"version": "9" * 5000, "inputs": inputs}
        )
        assert response.status_code == 400, url
        assert response.json()["field"] == "version"
        assert "at most 18 digits" in response.json()["message"]
    # Leading zeros do not count: this is version 1.
    padded = post_json(
        alice_client,
        f"/api/workflows/{workflow.id}/estimate",
        {"version": "0" * 5000 + "1", "inputs": inputs},
    )
    assert padded.status_code == 200, padded.json()
    assert_nothing_stored()


def test_unsaved_workflow_names_missing_version(alice, alice_client):
    # A workflow made in the admin can have no version at all.
    workflow = Workflow.objects.create(owner=alice, name="Empty", slug="empty")
    inputs = {"image": base64_input(image_bytes())}
    for url in (
        f"/api/workflows/{workflow.id}/runs",
        f"/api/workflows/{workflow.id}/estimate",
        "/alice/workflows/empty",
    ):
        response = post_json(alice_client, url, {"inputs": inputs})
        assert response.status_code == 404, url
        body = response.json()
        assert_error_body(body)
        assert "has no saved version yet" in body["message"], url
        assert "None" not in body["message"], url
    assert_nothing_stored()


@pytest.mark.parametrize("version", ["latest", 1.5, True, -1, [1]])
def test_api_run_version_not_integer(alice, alice_client, version):
    workflow = Workflow.create_with_version(alice, "height", image_height())
    response = post_json(
        alice_client,
        f"/api/workflows/{workflow.id}/runs",
        {"version": version, "inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "version"
    assert_nothing_stored()


def test_api_version_message_writes_json(alice, alice_client):
    workflow = Workflow.create_with_version(alice, "height", image_height())
    response = post_json(
        alice_client, f"/api/workflows/{workflow.id}/runs", {"version": True}
    )
    assert response.status_code == 400
    assert response.json()["message"].endswith("got true")


@pytest.mark.parametrize(
    ("route", "body", "unknown"),
    [
        ("runs", {"inputs": IMAGE_INPUTS, "verison": 1}, "verison"),
        ("runs", {"inputs": IMAGE_INPUTS, "asyncc": True}, "asyncc"),
        ("estimate", {"inputs": {}, "verison": 1}, "verison"),
        ("/api/estimate", {"specification": image_height(), "input": {}}, "input"),
        ("/api/validate", {"definition": image_height(), "inputs": {}}, "inputs"),
    ],
)
def test_api_unknown_fields_rejected(alice, alice_client, route, body, unknown):
    # A misspelled field must not fall back to a default silently: the
    # latest version, or a synchronous run.
    workflow = Workflow.create_with_version(alice, "height", image_height())
    url = route if route.startswith("/") else f"/api/workflows/{workflow.id}/{route}"
    response = post_json(alice_client, url, body)
    assert response.status_code == 400, url
    error = response.json()
    assert_error_body(error)
    assert error["field"] == unknown
    assert f"unknown fields '{unknown}'" in error["message"]
    assert "this request takes" in error["message"]
    assert_nothing_stored()


@pytest.mark.parametrize(
    ("route", "field"),
    [("/api/validate", "definition"), ("/api/estimate", "specification")],
)
def test_api_missing_definition_named(alice_client, route, field):
    response = post_json(alice_client, route, {})
    assert response.status_code == 400
    error = response.json()
    assert_error_body(error)
    assert error["message"] == f"'{field}' is required"
    assert error["field"] == field
    assert error["hint"] == f"Send the workflow definition as '{field}'."


@pytest.mark.parametrize(
    ("route", "field"),
    [
        ("/api/validate", "definition"),
        ("/api/estimate", "specification"),
        ("/workflows/run", "specification"),
    ],
)
def test_invalid_definition_names_body_field(alice_client, route, field):
    # A problem outside any step is located at the field that was sent.
    body = {field: {"steps": 5}}
    if route != "/api/validate":
        body["inputs"] = {}
    response = post_json(alice_client, route, body)
    assert response.status_code == 400
    error = response.json()
    assert_error_body(error)
    assert error["code"] == "invalid_definition"
    assert error["message"].startswith(
        f"Invalid workflow definition at {field}, field 'inputs': 'inputs' is missing"
    )
    assert error["field"] == "inputs"
    assert [problem["property_name"] for problem in error["blocks_errors"]] == [
        "inputs",
        "steps",
        "outputs",
    ]
    assert_nothing_stored()


@pytest.mark.parametrize("route", ["runs", "estimate", "/api/estimate"])
def test_api_undeclared_input_rejected(alice, alice_client, route):
    # A misspelled parameter would run with its default value instead.
    workflow = Workflow.create_with_version(alice, "height", image_height())
    body = {"inputs": {**IMAGE_INPUTS, "Confidence": 0.9}}
    if route.startswith("/"):
        url, body["specification"] = route, image_height()
    else:
        url = f"/api/workflows/{workflow.id}/{route}"
    response = post_json(alice_client, url, body)
    assert response.status_code == 400, url
    error = response.json()
    assert_error_body(error)
    assert error["code"] == "invalid_input"
    assert error["field"] == "Confidence"
    assert "declares no input 'Confidence'; its inputs are image" in error["message"]
    assert_nothing_stored()


def test_missing_image_names_undeclared_inputs(send_run):
    # Roboflow's routes ignore undeclared inputs, so an image sent under
    # another name was reported only as missing.
    response = send_run(image_height(), {"img": IMAGE_INPUTS["image"]})
    assert response.status_code == 400
    error = response.json()
    assert error["code"] == "invalid_input"
    assert error["field"] in ("image", "img")
    assert "'img'" in error["message"]
    assert_nothing_stored()


def test_roboflow_run_accepts_undeclared_input(runner, alice_client):
    response = post_json(
        alice_client,
        "/workflows/run",
        {
            "specification": image_height(),
            "inputs": {**IMAGE_INPUTS, "Confidence": 0.9},
        },
    )
    assert response.status_code == 200, response.json()


@pytest.mark.parametrize("source", ["cli", "bogus", 5])
def test_api_run_source_other_than_ui(alice, alice_client, source):
    workflow = Workflow.create_with_version(alice, "height", image_height())
    response = post_json(
        alice_client,
        f"/api/workflows/{workflow.id}/runs",
        {"inputs": IMAGE_INPUTS, "source": source},
    )
    assert response.status_code == 400
    error = response.json()
    assert error["field"] == "source"
    assert "'source' must be \"ui\" or left out" in error["message"]
    assert_nothing_stored()


def test_roboflow_run_version_not_integer(alice, alice_client):
    workflow = Workflow.create_with_version(alice, "height", image_height())
    response = post_json(
        alice_client,
        f"/alice/workflows/{workflow.slug}",
        {
            "workflow_version_id": "abc",
            "inputs": {"image": base64_input(image_bytes())},
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "workflow_version_id"
    assert_nothing_stored()


def test_roboflow_run_unknown_version(alice, alice_client):
    workflow = Workflow.create_with_version(alice, "height", image_height())
    response = post_json(
        alice_client,
        f"/alice/workflows/{workflow.slug}",
        {"workflow_version_id": "7", "inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 404
    assert_error_body(response.json())
    assert_nothing_stored()


@pytest.mark.parametrize("excluded", ["height", 5, [1]])
def test_excluded_fields_not_list(alice_client, excluded):
    response = post_json(
        alice_client,
        "/workflows/run",
        {
            "specification": image_height(),
            "excluded_fields": excluded,
            "inputs": {"image": base64_input(image_bytes())},
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "excluded_fields"
    assert_nothing_stored()


@pytest.mark.parametrize(
    "profiling", ["maybe", " true", "", 2, 0.5, 2.0, "1.0", [True]]
)
def test_enable_profiling_not_boolean(alice_client, profiling):
    response = post_json(
        alice_client,
        "/workflows/run",
        {
            "specification": image_height(),
            "enable_profiling": profiling,
            "inputs": {"image": base64_input(image_bytes())},
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "enable_profiling"
    assert_nothing_stored()


@pytest.mark.parametrize(
    "query", ["limit=abc", "limit=-1", "limit=0", "workflow=abc", "stauts=failed"]
)
def test_run_list_bad_query(alice_client, query):
    response = alice_client.get(f"/api/runs/?{query}")
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == query.partition("=")[0]


def test_run_list_unknown_parameter_names_the_accepted_ones(alice_client, alice_key):
    response = alice_client.get("/api/runs/?stauts=failed&pge=2")
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith("unknown query parameters 'pge', 'stauts'; ")
    assert (
        "this route takes api_key, before, limit, offset, status, workflow" in message
    )
    # The key may travel in the query.
    allowed = alice_client.get(f"/api/runs/?status=failed&api_key={alice_key}")
    assert allowed.status_code == 200


def test_workflow_update_invalid_definition(alice, alice_client):
    workflow = Workflow.create_with_version(alice, "height", image_height())
    response = alice_client.put(
        f"/api/workflows/{workflow.id}",
        json.dumps({"definition": unknown_block_type()}),
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_definition"
    assert workflow.versions.count() == 1


@pytest.fixture
def bob_workflow(bob) -> Workflow:
    return Workflow.create_with_version(bob, "bobs height", image_height())


def test_foreign_workflow_get(alice_client, bob_workflow):
    response = alice_client.get(f"/api/workflows/{bob_workflow.id}")
    assert response.status_code == 404
    assert_error_body(response.json())


def test_foreign_workflow_get_same_as_unknown(alice_client, bob_workflow):
    foreign = alice_client.get(f"/api/workflows/{bob_workflow.id}").json()
    unknown = alice_client.get("/api/workflows/999999").json()
    # The bodies differ only in the id they name.
    assert foreign["message"] == f"workflow {bob_workflow.id} not found among yours"
    assert unknown["message"] == "workflow 999999 not found among yours"
    del foreign["message"], unknown["message"]
    assert foreign == unknown


def test_foreign_workflow_versions(alice_client, bob_workflow):
    response = alice_client.get(f"/api/workflows/{bob_workflow.id}/versions")
    assert response.status_code == 404
    assert_error_body(response.json())


def test_foreign_workflow_update(alice_client, bob_workflow):
    response = alice_client.put(
        f"/api/workflows/{bob_workflow.id}",
        json.dumps({"name": "taken"}),
        content_type="application/json",
    )
    assert response.status_code == 404
    bob_workflow.refresh_from_db()
    assert bob_workflow.name == "bobs height"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "nothing to update: send name, description or definition"),
        ({"slug": "other", "id": 1}, "unknown fields 'id', 'slug'"),
        ({"description": "d" * 10_001}, "no more than 10000 characters"),
    ],
    ids=["empty", "unknown-fields", "long-description"],
)
def test_workflow_update_rejected(alice, alice_client, body, message):
    workflow = Workflow.create_with_version(alice, "kept", image_height())
    before = workflow.updated_at
    response = alice_client.put(
        f"/api/workflows/{workflow.id}",
        json.dumps(body),
        content_type="application/json",
    )
    assert response.status_code == 400
    assert message in response.json()["message"]
    workflow.refresh_from_db()
    assert workflow.updated_at == before
    assert workflow.description == ""


def test_workflow_update_of_same_values_changes_nothing(alice, alice_client):
    workflow = Workflow.create_with_version(alice, "kept", image_height())
    before = workflow.updated_at
    response = alice_client.put(
        f"/api/workflows/{workflow.id}",
        {"name": "kept", "description": "", "definition": image_height()},
        format="json",
    )
    assert response.status_code == 200
    assert response.json()["version"] == 1
    workflow.refresh_from_db()
    assert workflow.updated_at == before


def test_workflow_create_rejects_unknown_fields(alice_client):
    body = {"name": "n", "definition": image_height(), "slug": "chosen"}
    response = alice_client.post("/api/workflows/", body, format="json")
    assert response.status_code == 400
    assert "unknown fields 'slug'" in response.json()["message"]
    assert Workflow.objects.count() == 0


def test_foreign_workflow_run(alice_client, bob_workflow):
    response = post_json(
        alice_client,
        f"/api/workflows/{bob_workflow.id}/runs",
        {"inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 404
    assert_error_body(response.json())
    assert_nothing_stored()


def test_foreign_workflow_roboflow_run(alice_client, bob_workflow):
    response = post_json(
        alice_client,
        f"/bob/workflows/{bob_workflow.slug}",
        {"inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 404
    assert_error_body(response.json())
    assert_nothing_stored()


def test_foreign_slug_in_own_workspace(alice_client, bob_workflow):
    response = post_json(
        alice_client,
        f"/alice/workflows/{bob_workflow.slug}",
        {"inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 404
    assert_error_body(response.json())
    assert_nothing_stored()


def test_foreign_run_get(alice_client, bob, bob_workflow):
    run = Run.objects.create(
        owner=bob,
        source=Run.Source.API,
        workflow_version=bob_workflow.latest_version(),
        definition_digest=bob_workflow.latest_version().digest,
    )
    response = alice_client.get(f"/api/runs/{run.id}")
    assert response.status_code == 404
    assert_error_body(response.json())


def test_run_get_uppercase_id(alice_client, alice):
    workflow = Workflow.create_with_version(alice, "alices height", image_height())
    run = Run.objects.create(
        owner=alice,
        source=Run.Source.API,
        workflow_version=workflow.latest_version(),
        definition_digest=workflow.latest_version().digest,
    )
    response = alice_client.get(f"/api/runs/{str(run.id).upper()}")
    assert response.status_code == 200
    assert response.json()["id"] == str(run.id)


def test_foreign_run_not_listed(alice_client, bob, bob_workflow):
    Run.objects.create(
        owner=bob,
        source=Run.Source.API,
        workflow_version=bob_workflow.latest_version(),
        definition_digest=bob_workflow.latest_version().digest,
    )
    response = alice_client.get("/api/runs/")
    assert response.status_code == 200
    assert response.json()["results"] == []


# Authentication


def test_run_without_token(run_url):
    from rest_framework.test import APIClient

    response = post_json(
        APIClient(),
        run_url,
        {
            "specification": image_height(),
            "inputs": {"image": base64_input(image_bytes())},
        },
    )
    assert response.status_code == 401
    assert_error_body(response.json())
    assert_nothing_stored()


def test_run_with_revoked_token(alice, alice_client, run_url):
    ApiToken.objects.get(user=alice).revoke()
    response = post_json(
        alice_client,
        run_url,
        {
            "specification": image_height(),
            "inputs": {"image": base64_input(image_bytes())},
        },
    )
    assert response.status_code == 401
    assert_error_body(response.json())
    assert_nothing_stored()


def test_run_with_revoked_key_in_body(alice, alice_key, run_url):
    from rest_framework.test import APIClient

    ApiToken.objects.get(user=alice).revoke()
    response = post_json(
        APIClient(),
        run_url,
        {
            "api_key": alice_key,
            "specification": image_height(),
            "inputs": {"image": base64_input(image_bytes())},
        },
    )
    assert response.status_code == 401
    assert_error_body(response.json())
    assert_nothing_stored()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "raw", ['{"api_key": "gbx_x", "inputs": ', '{"api_key": "gbx_x", "n": NaN}']
)
def test_unparsable_body_with_key_is_400(client, raw):
    # The key may be in the body, so the body's problem is the one reported.
    response = client.post("/workflows/run", raw, content_type="application/json")
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "malformed_request"
    assert_nothing_stored()


@pytest.mark.django_db
@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream"])
def test_key_in_body_of_any_content_type(client, alice_key, content_type):
    valid = {"api_key": alice_key, "definition": image_height()}
    response = client.post(
        "/api/validate", json.dumps(valid), content_type=content_type
    )
    assert response.status_code == 200
    assert response.json()["valid"] is True
    # The run route reads the same body, and rejects its definition only
    # once the key is accepted.
    broken = {"api_key": alice_key, "specification": {"steps": []}, "inputs": {}}
    response = client.post(
        "/workflows/run", json.dumps(broken), content_type=content_type
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_definition"


@pytest.mark.django_db
def test_key_in_body_after_byte_order_mark(client, alice_key):
    body = json.dumps({"api_key": alice_key, "definition": image_height()})
    response = client.post(
        "/api/validate", b"\xef\xbb\xbf" + body.encode(), content_type="text/plain"
    )
    assert response.status_code == 200
    assert response.json()["valid"] is True


@pytest.mark.parametrize("order", ["valid-last", "valid-first"])
def test_repeated_api_key_in_query_is_400(client, alice, alice_key, order):
    # The last one won, so a bad key followed by a good one authenticated.
    keys = ["gbx_wrong", alice_key] if order == "valid-last" else [alice_key, ""]
    query = "&".join(f"api_key={key}" for key in keys)
    for url in (f"/api/workflows/?{query}", f"/billing/summary.json?{query}"):
        response = client.get(url)
        assert response.status_code == 400, url
        body = response.json()
        assert body["code"] == "malformed_request"
        assert body["field"] == "api_key"
        assert "given 2 times" in body["message"]
        assert alice_key not in response.content.decode()


@pytest.mark.parametrize("other", ["bob", "revoked"])
def test_header_key_wins_over_query_and_body(client, alice, bob, alice_key, other):
    # The header's key authenticates, and the query's and the body's keys
    # are not checked.
    token, other_key = ApiToken.issue(bob if other == "bob" else alice, "other")
    if other == "revoked":
        token.revoke()
    created = client.post(
        f"/api/workflows/?api_key={other_key}",
        json.dumps(
            {"api_key": other_key, "name": "Alice's", "definition": image_height()}
        ),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {alice_key}",
    )
    assert created.status_code == 201
    assert Workflow.objects.get().owner == alice
    listed = client.get(
        f"/api/workflows/?api_key={other_key}",
        HTTP_AUTHORIZATION=f"Bearer {alice_key}",
    )
    assert listed.status_code == 200
    assert [w["slug"] for w in listed.json()["results"]] == ["alices"]


@pytest.mark.parametrize("key", [123, ["gbx_x"], {"key": "gbx_x"}])
def test_key_in_body_not_a_string(run_url, key):
    from rest_framework.test import APIClient

    response = post_json(APIClient(), run_url, {"api_key": key, "inputs": {}})
    assert response.status_code == 401
    assert response.json()["message"] == "Invalid or revoked API key."
    assert_nothing_stored()


def test_run_with_unknown_key(run_url):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer gbx_not-a-real-key")
    response = post_json(
        client,
        run_url,
        {
            "specification": image_height(),
            "inputs": {"image": base64_input(image_bytes())},
        },
    )
    assert response.status_code == 401
    assert_error_body(response.json())
    assert response.json()["error_type"] == "AuthenticationFailed"
    # The message cannot tell a mistyped key from a revoked one, so the
    # hint says where to check and where to get a new one.
    assert "/tokens/" in response.json()["hint"]
    assert_nothing_stored()


def test_workflow_list_without_token():
    from rest_framework.test import APIClient

    response = APIClient().get("/api/workflows/")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


# Definitions over the size limits, and names the pattern must reject whole


def long_chain(steps: int) -> dict:
    definition = image_height()
    definition["steps"] += [
        {
            "type": "PropertyDefinition",
            "name": f"s{index}",
            "data": "$inputs.image",
            "operations": [{"type": "ExtractImageProperty", "property_name": "width"}],
        }
        for index in range(steps)
    ]
    return definition


def test_definition_with_too_many_steps(alice_client):
    response = post_json(alice_client, "/api/validate", {"definition": long_chain(250)})
    body = response.json()
    assert response.status_code == 400
    assert body["code"] == "invalid_definition"
    assert body["field"] == "steps"
    assert "at most 250" in body["message"]


def test_definition_over_byte_limit(alice_client):
    definition = image_height()
    definition["steps"][0]["operations"] = [
        {"type": "ExtractImageProperty", "property_name": "width"}
    ] * 10_000
    response = post_json(
        alice_client,
        "/workflows/run",
        {"specification": definition, "inputs": {"image": base64_input(image_bytes())}},
    )
    assert response.status_code == 400
    assert "bytes of JSON" in response.json()["message"]
    assert_nothing_stored()


def test_step_name_with_newline_rejected(alice_client):
    definition = image_height()
    definition["steps"][0]["name"] = "h\n"
    definition["outputs"][0]["selector"] = "$steps.h.output"
    response = post_json(alice_client, "/api/validate", {"definition": definition})
    assert response.status_code == 400
    assert "step name 'h\\n'" in response.json()["message"]


@pytest.mark.parametrize("model_id", ["x/y/yolov8n.yaml", "yolov8n.yml"])
def test_architecture_id_outside_config_names(alice_client, model_id):
    response = post_json(
        alice_client,
        "/workflows/run",
        {
            "specification": detection(model_id),
            "inputs": {"image": base64_input(image_bytes())},
        },
    )
    body = response.json()
    assert response.status_code == 400
    assert body["code"] == "model_not_found"
    assert "yolov8n.yaml" in body["message"]
    assert_nothing_stored()


def test_image_value_not_string(send_run):
    response = send_run(image_height(), {"image": {"type": "base64", "value": 5}})
    assert response.status_code == 400
    assert "has an integer as its value" in response.json()["message"]
    assert_nothing_stored()


def test_sequence_length_of_number_is_billed_user_error(runner, alice_client):
    # Fed by a parameter, the step's input is known only when the run
    # reaches it, so the mismatch fails the run, which the user caused.
    definition = image_height()
    definition["inputs"].append({"type": "WorkflowParameter", "name": "things"})
    definition["steps"][0]["data"] = "$inputs.things"
    definition["steps"][0]["operations"] = [{"type": "SequenceLength"}]
    response = post_json(
        alice_client,
        "/workflows/run",
        {
            "specification": definition,
            "inputs": {"image": base64_input(image_bytes()), "things": 5},
        },
    )
    body = response.json()
    assert response.status_code == 400
    assert body["code"] == "step_rejected_input"
    assert (
        "SequenceLength needs detections, a list, a string, an object or "
        "bytes, got an integer" in body["message"]
    )
    bill = Bill.objects.get()
    assert bill.billed is True
    assert bill.amount_microcredits > 0


def test_sequence_length_of_image_rejected_before_run(alice_client):
    definition = image_height()
    definition["steps"][0]["operations"] = [{"type": "SequenceLength"}]
    response = post_json(
        alice_client,
        "/workflows/run",
        {"specification": definition, "inputs": {"image": base64_input(image_bytes())}},
    )
    body = response.json()
    assert response.status_code == 400
    assert body["code"] == "invalid_definition"
    assert (
        "needs detections, a list, a string, an object or bytes, but gets an image"
        in body["message"]
    )
    assert_nothing_stored()


def test_failed_run_body_has_error_fields_on_top(runner, alice, alice_client):
    definition = image_height()
    definition["inputs"].append({"type": "WorkflowParameter", "name": "things"})
    definition["steps"][0]["data"] = "$inputs.things"
    definition["steps"][0]["operations"] = [{"type": "SequenceLength"}]
    workflow = Workflow.create_with_version(alice, "length", definition)
    response = post_json(
        alice_client,
        f"/api/workflows/{workflow.id}/runs",
        {"inputs": {"image": base64_input(image_bytes()), "things": 5}},
    )
    body = response.json()
    assert response.status_code == 400
    assert_error_body(body)
    assert body["code"] == "step_rejected_input"
    assert body["status"] == "failed"
    assert body["error"]["code"] == "step_rejected_input"
    assert body["bill"]["amount_microcredits"] > 0

    # The same failure on a Roboflow route: the error's fields alone.
    roboflow = post_json(
        alice_client,
        f"/alice/workflows/{workflow.slug}",
        {"inputs": {"image": base64_input(image_bytes()), "things": 5}},
    )
    assert roboflow.status_code == 400
    assert roboflow.json() == {
        name: value for name, value in body["error"].items() if name != "status"
    }


def test_images_over_total_pixel_limit(send_run, monkeypatch):
    # bus.jpg is 810x1080 = 874,800 pixels.
    monkeypatch.setitem(settings.GLASSBOX, "MAX_RUN_PIXELS", 1_000_000)
    image = base64_input(image_bytes())
    response = send_run(image_height(), {"image": [image, image]})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert "1749600 pixels together" in body["message"]
    assert_nothing_stored()


def test_batch_over_image_limit(send_run, monkeypatch):
    monkeypatch.setitem(settings.GLASSBOX, "MAX_RUN_IMAGES", 2)
    image = base64_input(image_bytes())
    # Counted before any image is decoded: the third is not even base64.
    garbage = {"type": "base64", "value": "*"}
    response = send_run(image_height(), {"image": [image, image, garbage]})
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "image"
    assert body["message"] == (
        "image input 'image' has 3 images, over the limit of 2 per run (MAX_RUN_IMAGES)"
    )
    assert_nothing_stored()


def test_parameter_nested_too_deeply(send_run):
    definition = with_parameter(image_height(), "note")
    definition["outputs"].append(
        {"type": "JsonField", "name": "note", "selector": "$inputs.note"}
    )
    deep = []
    for _ in range(40):
        deep = [deep]
    response = send_run(
        definition, {"image": base64_input(image_bytes()), "note": deep}
    )
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["field"] == "note"
    assert "more than 32 levels deep" in body["message"]
    assert_nothing_stored()


def test_validate_warns_about_unresolved_model(alice_client):
    response = post_json(
        alice_client, "/api/validate", {"definition": detection("nosuch-model")}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is True
    assert any(
        "step 'people'" in warning and "'nosuch-model' not found" in warning
        for warning in body["warnings"]
    )
    resolved = post_json(alice_client, "/api/validate", {"definition": detection()})
    assert resolved.json()["warnings"] == []


@pytest.mark.parametrize(
    ("model_id", "reason"),
    [
        ("../../etc/passwd", "ids are 1 to 200 letters, digits, '.', '_', '-' and '/'"),
        ("people detector", "starting with a letter or digit"),
        ("a/../b", "an id may not contain a '..' segment"),
    ],
)
def test_validate_rejects_invalid_model_id(alice_client, send_run, model_id, reason):
    # No upload or file can have such an id, so every run would fail.
    validated = post_json(
        alice_client, "/api/validate", {"definition": detection(model_id)}
    )
    assert validated.status_code == 400
    error = validated.json()
    assert_error_body(error)
    assert error["message"].startswith(f"Model id '{model_id}' is invalid: ")
    assert reason in error["message"]
    assert "until it resolves" not in error["message"]
    assert error["code"] == "model_not_found"
    assert error["step"] == "people"
    assert error["field"] == "model_id"
    assert error["blocks_errors"] == [
        {
            "block_id": "people",
            "block_type": "roboflow_core/roboflow_object_detection_model@v1",
            "property_name": "model_id",
            "property_details": error["message"],
        }
    ]
    # A run of the definition fails with the same error.
    response = send_run(detection(model_id), {"image": base64_input(image_bytes())})
    assert response.status_code == 400
    run_error = response.json()
    assert run_error["code"] == error["code"]
    assert run_error["message"] == error["message"]
    assert run_error["step"] == "people"
    assert_nothing_stored()


def test_save_rejects_invalid_model_id(alice, alice_client):
    # Saving checks models as validate does, so no stored version names an
    # id that every run would fail on.
    created = post_json(
        alice_client,
        "/api/workflows/",
        {"name": "traversal", "definition": detection("../../etc/passwd")},
    )
    assert created.status_code == 400
    error = created.json()
    assert error["code"] == "model_not_found"
    assert error["message"].startswith("Model id '../../etc/passwd' is invalid: ")
    assert error["blocks_errors"][0]["block_id"] == "people"
    assert not Workflow.objects.exists()

    workflow = Workflow.create_with_version(alice, "people", detection("yolov8n.yaml"))
    updated = alice_client.put(
        f"/api/workflows/{workflow.id}",
        {"definition": detection("a/../b")},
        content_type="application/json",
    )
    assert updated.status_code == 400
    assert updated.json()["code"] == "model_not_found"
    assert workflow.versions.count() == 1


def test_save_warns_missing_and_untrained_models(alice_client):
    definition = detection("yolov8n.yaml")
    definition["steps"].append(
        {**definition["steps"][0], "name": "other", "model_id": "not-uploaded-yet"}
    )
    created = post_json(
        alice_client, "/api/workflows/", {"name": "two", "definition": definition}
    )
    assert created.status_code == 201
    warnings = created.json()["warnings"]
    assert len(warnings) == 2
    assert "'yolov8n.yaml' is an untrained architecture" in warnings[0]
    assert warnings[0].startswith("step 'people': ")
    assert warnings[1].startswith("step 'other': ")
    assert warnings[1].endswith("Runs fail until it resolves.")


def test_validate_warns_invalid_default_model_id(alice_client):
    # A run may send a valid id for the parameter, so this is a warning.
    definition = detection("$inputs.model")
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "model", "default_value": "../x"}
    )
    response = post_json(alice_client, "/api/validate", {"definition": definition})
    assert response.status_code == 200
    warnings = response.json()["warnings"]
    assert len(warnings) == 1
    assert warnings[0].startswith("step 'people': Model id '../x' is invalid: ")
    assert "runs fail unless they send a valid model id" in warnings[0]


def test_unknown_top_level_keys_warned(alice_client):
    # Roboflow's engine ignores keys such as "metadata", so they are kept and
    # accepted, with a warning naming each.
    definition = {**image_height(), "metadata": {"author": "a"}, "notes": "x"}
    expected = (
        "top-level keys not in the definition format were ignored: metadata, notes"
    )
    validated = post_json(alice_client, "/api/validate", {"definition": definition})
    created = post_json(
        alice_client, "/api/workflows/", {"name": "extra", "definition": definition}
    )
    changed = {**definition, "notes": "y"}
    updated = alice_client.put(
        f"/api/workflows/{created.json()['id']}",
        {"definition": changed},
        format="json",
    )

    assert validated.status_code == 200, validated.json()
    assert validated.json()["warnings"] == [expected]
    assert created.status_code == 201, created.json()
    assert created.json()["warnings"] == [expected]
    assert created.json()["definition"]["metadata"] == {"author": "a"}
    assert updated.status_code == 200, updated.json()
    assert updated.json()["warnings"] == [expected]
    plain = post_json(alice_client, "/api/validate", {"definition": image_height()})
    assert plain.json()["warnings"] == []


def test_validate_warns_about_unresolved_default_model(alice_client):
    definition = detection()
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "model", "default_value": "nosuch-model"}
    )
    definition["steps"][0]["model_id"] = "$inputs.model"
    response = post_json(alice_client, "/api/validate", {"definition": definition})
    assert response.status_code == 200
    assert any(
        "'nosuch-model' not found" in warning for warning in response.json()["warnings"]
    )


def test_nesting_limit_counts_empty_containers(alice_client):
    def nested(levels: int) -> list:
        value: list = []
        for _ in range(levels - 1):
            value = [value]
        return value

    for levels, status in ((32, 201), (33, 400)):
        definition = with_parameter(
            image_height(), "note", default_value=nested(levels)
        )
        response = post_json(
            alice_client,
            "/api/workflows/",
            {"name": f"deep {levels}", "definition": definition},
        )
        assert response.status_code == status, levels
    assert Workflow.objects.count() == 1


def test_parameter_default_nested_too_deeply(alice_client):
    deep = []
    for _ in range(40):
        deep = [deep]
    definition = with_parameter(image_height(), "note", default_value=deep)
    response = post_json(
        alice_client, "/api/workflows/", {"name": "deep", "definition": definition}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_definition"
    assert "more than 32 levels deep" in body["message"]
    assert Workflow.objects.count() == 0


def test_parameter_with_lone_surrogate(send_run):
    definition = with_parameter(image_height(), "note")
    definition["outputs"].append(
        {"type": "JsonField", "name": "note", "selector": "$inputs.note"}
    )
    for value in ("\ud800", {"\udfff": 1}):
        response = send_run(
            definition, {"image": base64_input(image_bytes()), "note": value}
        )
        assert response.status_code == 400
        body = response.json()
        assert body["code"] == "malformed_request"
        assert "unpaired UTF-16 surrogate" in body["message"]
    assert_nothing_stored()


def test_definition_with_lone_surrogate(alice_client):
    definition = {**image_height(), "x": "\ud800"}
    for url, key in (
        ("/api/validate", "definition"),
        ("/api/workflows/", "definition"),
    ):
        response = post_json(alice_client, url, {"name": "s", key: definition})
        assert response.status_code == 400, url
        assert "unpaired UTF-16 surrogate" in response.json()["message"]
    assert Workflow.objects.count() == 0


def test_strings_with_nul_rejected(alice_client, send_run):
    # PostgreSQL cannot store U+0000, so these failed there when written.
    definition = {**image_height(), "description": "a\x00b"}
    for url, key in (
        ("/api/validate", "definition"),
        ("/api/workflows/", "definition"),
    ):
        response = post_json(alice_client, url, {"name": "s", key: definition})
        assert response.status_code == 400, url
        assert "NUL character" in response.json()["message"]
    assert Workflow.objects.count() == 0
    with_note = with_parameter(image_height(), "note")
    response = send_run(
        with_note, {"image": base64_input(image_bytes()), "note": "\x00"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_request"
    assert_nothing_stored()


def test_api_key_with_lone_surrogate(client, alice_client):
    body = {"api_key": "\ud800", "definition": image_height()}
    # With or without other credentials, the body is what is wrong.
    for sender in (client, alice_client):
        response = post_json(sender, "/api/validate", body)
        assert response.status_code == 400
        assert response.json()["code"] == "malformed_request"


def test_body_not_in_utf8_rejected(client, alice, alice_client):
    # Python's parser would take these, and their strings then failed when
    # a finished run was read back, or when a definition was hashed.
    definition = with_parameter(image_height(), "note")
    definition["outputs"].append(
        {"type": "JsonField", "name": "note", "selector": "$inputs.note"}
    )
    workflow = Workflow.create_with_version(alice, "encodings", definition)
    body = {"inputs": {"image": base64_input(image_bytes()), "note": "@note@"}}
    text = json.dumps(body)
    bodies = {
        # A surrogate encoded as UTF-8 bytes, which strict UTF-8 forbids.
        "encoded surrogate": text.replace("@note@", "a").encode()[:-4]
        + b'a\xed\xa0\x80"}}',
        "UTF-16": text.replace("@note@", "a\\u0000b").encode("utf-16"),
        "UTF-32": text.replace("@note@", "b").encode("utf-32"),
    }
    for label, raw in bodies.items():
        for url in (f"/api/workflows/{workflow.id}/runs", "/api/validate"):
            response = alice_client.post(url, raw, content_type="application/json")
            assert response.status_code == 400, (label, url)
            assert response.json()["code"] == "malformed_request"
            assert "not UTF-8" in response.json()["message"]
    # A key that cannot be decoded is a malformed body, not a server error.
    raw_key = b'{"api_key": "gbx_\xed\xa0\x80abc", "definition": {}}'
    anonymous = client.post("/api/validate", raw_key, content_type="application/json")
    assert anonymous.status_code == 400
    assert "not UTF-8" in anonymous.json()["message"]
    # A byte order mark before UTF-8 is dropped.
    with_bom = b"\xef\xbb\xbf" + json.dumps({"definition": image_height()}).encode()
    valid = alice_client.post(
        "/api/validate", with_bom, content_type="application/json"
    )
    assert valid.status_code == 200
    assert_nothing_stored()


def test_number_beyond_float_range(send_run):
    definition = with_parameter(image_height(), "note")
    for literal in ("1e400", "-1e400"):
        inputs = {"image": base64_input(image_bytes()), "note": raw_json(literal)}
        response = send_run(definition, inputs)
        assert response.status_code == 400
        assert "out of range" in response.json()["message"]
    assert_nothing_stored()


def test_integer_over_digit_limit(send_run):
    definition = with_parameter(image_height(), "note")
    inputs = {"image": base64_input(image_bytes()), "note": raw_json("9" * 5000)}
    response = send_run(definition, inputs)
    assert response.status_code == 400
    message = response.json()["message"]
    assert "an integer has 5000 digits, over the limit of 4300" in message
    assert "set_int_max_str_digits" not in message
    assert_nothing_stored()


def test_session_requests_get_the_same_errors_as_key_requests(alice, alice_client):
    # The CSRF check of a session request makes DRF parse the body itself.
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    secret = "a" * 32
    browser.cookies["csrftoken"] = secret
    bodies = {
        "[" * 5000 + "]" * 5000: "nested too deeply",
        "{": "not valid JSON",
        '{"x": NaN}': "NaN is not a valid JSON value",
    }
    for raw, message in bodies.items():
        for client, headers in ((browser, {"X-CSRFToken": secret}), (alice_client, {})):
            response = client.post(
                "/api/validate", raw, content_type="application/json", headers=headers
            )
            assert response.status_code == 400, (raw[:10], client)
            body = response.json()
            assert body["code"] == "malformed_request"
            assert message in body["message"]
    # The check itself still works.
    refused = browser.post("/api/validate", "{}", content_type="application/json")
    assert refused.status_code == 403


@pytest.mark.parametrize(
    "url", ["/api/validate", "/api/workflows/", "/workflows/run", "/model/add"]
)
def test_multipart_body_to_a_json_route_is_415(alice, alice_client, url):
    # A session request's CSRF check streams a multipart body into
    # request.POST, after which the body could not be read: a 500.
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    secret = "a" * 32
    browser.cookies["csrftoken"] = secret
    form = {"definition": "{}", "file": io.BytesIO(b"not json")}
    for client, headers in ((browser, {"X-CSRFToken": secret}), (alice_client, {})):
        form["file"].seek(0)
        response = client.post(url, form, headers=headers)
        assert response.status_code == 415, (url, client)
        body = response.json()
        assert body["code"] == "unsupported_media_type"
        assert "multipart form data" in body["message"]
    assert Workflow.objects.count() == 0
    assert_nothing_stored()


def test_nul_in_query_is_400(alice, alice_client):
    # PostgreSQL rejects a text value with a NUL character, so an admin list
    # filter that passed one to a query returned 500 there.
    response = alice_client.get("/api/runs/?status=%00")
    assert response.status_code == 400
    body = response.json()
    assert_error_body(body)
    assert body["code"] == "malformed_request"
    assert "NUL character (%00)" in body["message"]
    alice.is_staff = alice.is_superuser = True
    alice.save()
    browser = Client()
    browser.force_login(alice)
    page = browser.get("/admin/runner/run/?status__exact=%00", HTTP_ACCEPT="text/html")
    assert page.status_code == 400
    assert page["Content-Type"].startswith("text/html")


def test_too_many_query_fields_says_so(alice_client, settings):
    # Django refuses them before any view; the 400 only pointed at the log.
    query = "&".join(
        f"f{i}=1" for i in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1)
    )
    for url in ("/api/runs/", "/billing/summary.json"):
        response = alice_client.get(f"{url}?{query}")
        assert response.status_code == 400, url
        body = response.json()
        assert body["code"] == "bad_request"
        assert body["message"] == (
            f"the request has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} "
            "query or form fields, the maximum this server reads"
        )
        assert "JSON body" in body["hint"]


def test_unknown_api_routes_are_not_found(alice_client):
    # With CSRF checks on, as in a real server, the catch-all must not
    # return the CSRF failure page to an unsafe method.
    alice_client.enforce_csrf_checks = True
    for method in ("get", "post", "put", "patch", "delete"):
        for url in (
            "/api/workflows/abc",
            "/api/nothing/here",
            "/api/runs/not-a-uuid",
            "/api/workflows",
        ):
            response = getattr(alice_client, method)(url)
            assert response.status_code == 404, (method, url)
            assert response.json()["code"] == "not_found"


@pytest.mark.parametrize(
    "accept", ["text/html,application/xhtml+xml,*/*;q=0.8", "text/html"]
)
def test_api_answers_json_to_a_browser_accept(client, alice, alice_key, accept):
    # DRF's browsable API answered these with HTML pages, errors included,
    # and repeated a key sent as api_key in the page's links.
    cases = [
        ("get", f"/api/workflows/?api_key={alice_key}", 200, None),
        ("get", f"/api/workflows/999?api_key={alice_key}", 404, "not_found"),
        ("get", "/api/workflows/", 401, "not_authenticated"),
        ("post", f"/api/validate?api_key={alice_key}", 400, "malformed_request"),
        ("get", f"/workflows/run?api_key={alice_key}", 405, "method_not_allowed"),
    ]
    for method, url, status, code in cases:
        response = getattr(client, method)(
            url, content_type="application/json", HTTP_ACCEPT=accept
        )
        assert response.status_code == status, url
        assert response["Content-Type"] == "application/json", url
        assert alice_key not in response.content.decode(), url
        if code:
            assert response.json()["code"] == code, url


@pytest.mark.parametrize(
    ("method", "path", "query", "body"),
    [
        ("get", "/api/workflows/{id}", "version=1", None),
        ("get", "/api/workflows/{id}/versions", "limit=1", None),
        ("put", "/api/workflows/{id}", "base_version=1", {"name": "Renamed"}),
        ("post", "/api/workflows/{id}/runs", "async=true", {"inputs": IMAGE_INPUTS}),
        ("post", "/api/workflows/{id}/estimate", "version=1", {}),
        ("post", "/api/validate", "strict=1", {"definition": image_height()}),
        ("get", "/api/blocks", "type=crop", None),
        ("get", "/api/models/", "api_key={key}&kind=upload", None),
    ],
    ids=[
        "detail",
        "versions",
        "update",
        "run",
        "estimate",
        "validate",
        "blocks",
        "models",
    ],
)
def test_unknown_query_parameter_is_400(alice, alice_key, method, path, query, body):
    # These routes read no query parameter but api_key, so a field sent in
    # the query was ignored: ?version=1 returned the latest version.
    from rest_framework.test import APIClient

    workflow = Workflow.create_with_version(alice, "height", image_height())
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {alice_key}")
    url = path.format(id=workflow.id) + "?" + query.format(key=alice_key)
    response = getattr(client, method)(url, body, format="json")
    assert response.status_code == 400, response.json()
    error = response.json()
    assert_error_body(error)
    assert error["code"] == "malformed_request"
    unknown = query.split("&")[-1].split("=")[0]
    assert error["field"] == unknown
    assert f"unknown query parameters '{unknown}'" in error["message"]
    assert alice_key not in response.content.decode()
    assert ("hint" in error) == (method in ("put", "post"))
    workflow.refresh_from_db()
    assert workflow.name == "height"
    assert_nothing_stored()


def test_tiff_with_16_bit_samples_accepted(send_run):
    # The check reads the samples' width from the file, not Pillow's mode.
    buffer = io.BytesIO()
    pixels = np.arange(64 * 64, dtype=np.uint16).tobytes()
    Image.frombytes("I;16", (64, 64), pixels).save(buffer, "TIFF")
    response = send_run(image_height(), {"image": base64_input(buffer.getvalue())})
    assert "32-bit" not in json.dumps(response.json())
    assert response.status_code != 400, response.json()


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_tiff_with_32_bit_samples_rejected(send_run, dtype):
    # Pillow decodes it at the request, so it passed; the runner's OpenCV
    # cannot, and the run failed with a message that blamed a corrupt file.
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=dtype).reshape(64, 64)).save(
        buffer, "TIFF"
    )
    response = send_run(image_height(), {"image": base64_input(buffer.getvalue())})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_input"
    assert "32-bit samples" in body["message"]
    assert_nothing_stored()


def test_compressed_body_rejected(alice_client):
    # Neither gunicorn nor Django decompresses a body.
    raw = gzip.compress(json.dumps({"definition": image_height()}).encode())
    response = alice_client.post(
        "/api/validate",
        raw,
        content_type="application/json",
        headers={"Content-Encoding": "gzip"},
    )
    assert response.status_code == 415
    body = response.json()
    assert body["code"] == "unsupported_media_type"
    assert "'gzip'" in body["message"]
    assert "uncompressed" in body["hint"]
    identity = alice_client.post(
        "/api/validate",
        json.dumps({"definition": image_height()}),
        content_type="application/json",
        headers={"Content-Encoding": "identity"},
    )
    assert identity.status_code == 200
    assert_nothing_stored()
