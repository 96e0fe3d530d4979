"""EXIF orientation: sizes and pixels upright, as Roboflow's server decodes them.

Roboflow's ``inference`` decodes with OpenCV's ``cv2.IMREAD_COLOR``, which
turns JPEG and PNG images by their EXIF Orientation tag. A phone stores a
portrait photo as landscape pixels with Orientation 6, so a server that
ignored the tag ran the detector on people lying on their side.
"""

import base64
import io
import struct

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import image_path
from workflows.images import WorkflowImage, inspect_image

# A 48x32 image whose four corners differ, so that each turn and mirror
# gives different pixels.
CORNERS = np.zeros((32, 48, 3), dtype=np.uint8)
CORNERS[:8, :8] = (255, 0, 0)
CORNERS[:8, -8:] = (0, 255, 0)
CORNERS[-8:, :8] = (0, 0, 255)


def encoded(pixels: np.ndarray, image_format: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, ::-1]).save(buffer, image_format, exif=exif.tobytes())
    return buffer.getvalue()


def with_exif_after_pixels(png: bytes) -> bytes:
    """Move a PNG's eXIf chunk from before its pixel data to just before IEND."""
    chunks = []
    offset = 8
    while offset < len(png):
        (length,) = struct.unpack_from(">I", png, offset)
        chunks.append(png[offset : offset + 12 + length])
        offset += 12 + length
    exif = [chunk for chunk in chunks if chunk[4:8] == b"eXIf"]
    others = [chunk for chunk in chunks if chunk[4:8] != b"eXIf"]
    assert len(exif) == 1
    return png[:8] + b"".join(others[:-1]) + exif[0] + others[-1]


def decoded(data: bytes) -> tuple[tuple[int, int], np.ndarray]:
    """Return the (width, height) inspect_image reports and the runner's pixels."""
    info = inspect_image(data, input_name="image", max_pixels=10**8)
    image = WorkflowImage(
        parent_id="image", width=info.width, height=info.height, data=data
    )
    return (info.width, info.height), image.pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_orientation_matches_opencv(orientation):
    data = encoded(CORNERS, "PNG", orientation)
    size, pixels = decoded(data)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert size == (expected.shape[1], expected.shape[0])
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_exif_after_pixels_matches_opencv(orientation):
    data = with_exif_after_pixels(encoded(CORNERS, "PNG", orientation))
    size, pixels = decoded(data)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert size == (expected.shape[1], expected.shape[0])
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_orientation_matches_opencv(orientation):
    data = encoded(CORNERS, "JPEG", orientation)
    size, pixels = decoded(data)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert size == (expected.shape[1], expected.shape[0])
    # Both come from one lossy decode, so only the turn could differ.
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("image_format", ["WEBP", "TIFF", "BMP"])
@pytest.mark.parametrize("orientation", [1, 5, 6, 8])
def test_size_matches_pixels_in_other_formats(image_format, orientation):
    data = encoded(CORNERS, image_format, orientation)
    (width, height), pixels = decoded(data)
    assert pixels.shape[:2] == (height, width)


@pytest.mark.parametrize("exif", [b"Exif\x00\x00garbage", b"Exif\x00\x00"])
def test_malformed_exif_counts_as_upright(exif):
    buffer = io.BytesIO()
    Image.fromarray(CORNERS).save(buffer, "JPEG", exif=exif)
    (width, height), pixels = decoded(buffer.getvalue())
    assert (width, height) == (48, 32)
    assert pixels.shape[:2] == (32, 48)


def test_png_chunk_past_end_counts_as_upright():
    png = encoded(CORNERS, "PNG", 1)
    # IEND replaced by a chunk whose length runs past the end of the file.
    cut = png[:-12] + struct.pack(">I", 2**31) + b"tEXt"
    info = inspect_image(cut, input_name="image", max_pixels=10**8, complete=False)
    assert (info.width, info.height) == (48, 32)


def test_detection_on_rotated_phone_photo(runner, live_server, alice_key):
    upright = Image.open(image_path())
    # Stored turned a quarter left, with the tag that turns it back.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(
        buffer, "JPEG", quality=95, exif=exif.tobytes()
    )

    results = {}
    for name, data in (
        ("upright", image_path().read_bytes()),
        ("tagged", buffer.getvalue()),
    ):
        response = requests.post(
            f"{live_server.url}/infer/object_detection",
            json={
                "model_id": "people-detector",
                "image": {"type": "base64", "value": base64.b64encode(data).decode()},
            },
            headers={"Authorization": f"Bearer {alice_key}"},
            timeout=300,
        )
        assert response.status_code == 200, response.text
        results[name] = response.json()

    assert results["tagged"]["image"] == {"width": 810, "height": 1080}
    upright_boxes = sorted(
        (round(p["x"], -1), round(p["y"], -1), p["class"])
        for p in results["upright"]["predictions"]
        if p["confidence"] >= 0.5
    )
    tagged_boxes = sorted(
        (round(p["x"], -1), round(p["y"], -1), p["class"])
        for p in results["tagged"]["predictions"]
        if p["confidence"] >= 0.5
    )

    # Boxes well above the default confidence of 0.4, so that the tagged
    # copy's JPEG re-encoding cannot move one across it.
    assert len(upright_boxes) >= 2
    assert len(tagged_boxes) == len(upright_boxes)
    for (x, y, label), (tx, ty, tlabel) in zip(
        upright_boxes, tagged_boxes, strict=True
    ):
        assert abs(x - tx) <= 20
        assert abs(y - ty) <= 20
        assert label == tlabel
