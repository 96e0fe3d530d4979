"""Operations of Roboflow's query language that encode an image.

Names, keys and results follow roboflow_workflows 0.2.13 (the ``inference``
1.8.3 wheel, query_language/operations/images). Roboflow's HTTP server
writes bytes in a response as standard base64, and so does
``serialize_value`` in the executor, so ``ConvertImageToJPEG`` reaches a
client as the same text.
"""

import base64
from typing import Any

import cv2

from workflows.blocks.base import IMAGE
from workflows.blocks.property_definition.value_operations import (
    BYTES,
    STRING,
    ValueOperation,
    ValueOperationError,
    _key_of,
    _needs,
    _no_check,
)
from workflows.images import WorkflowImage

# Roboflow's default JPEG quality, for ConvertImageToJPEG and for the base64
# of an image that was not sent as a file (WorkflowImageData.base64_image).
DEFAULT_JPEG_QUALITY = 95


def _image(value: Any) -> WorkflowImage:
    if not isinstance(value, WorkflowImage):
        raise _needs("an image", value)
    return value


def _jpeg_bytes(image: WorkflowImage, quality: int) -> bytes:
    encoded, buffer = cv2.imencode(
        ".jpg", image.pixels, [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not encoded:
        raise ValueOperationError(
            f"failed to encode an image of {image.width}×{image.height} pixels as JPEG"
        )
    return buffer.tobytes()


def _to_jpeg(operation: dict, value: Any) -> bytes:
    quality = operation.get("compression_level", DEFAULT_JPEG_QUALITY)
    return _jpeg_bytes(_image(value), quality)


def _to_base64(operation: dict, value: Any) -> str:
    image = _image(value)
    # Roboflow returns an input image's base64 as the client sent it, and
    # encodes any other image, such as a crop, as JPEG. Here an input keeps
    # its file's bytes, which are encoded again in the standard alphabet, so
    # a data: URL prefix or URL-safe characters that a client sent are not
    # repeated.
    if image.data is not None:
        return base64.b64encode(image.data).decode("ascii")
    return base64.b64encode(_jpeg_bytes(image, DEFAULT_JPEG_QUALITY)).decode("ascii")


def _is_quality(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100


IMAGE_OPERATIONS: dict[str, ValueOperation] = {
    "ConvertImageToJPEG": ValueOperation(
        {"compression_level": DEFAULT_JPEG_QUALITY},
        (IMAGE,),
        BYTES,
        _key_of("compression_level", _is_quality, "an integer from 1 to 100"),
        _to_jpeg,
    ),
    "ConvertImageToBase64": ValueOperation({}, (IMAGE,), STRING, _no_check, _to_base64),
}
