"""Detection offset: grow each box by a margin, kept inside the image."""

import dataclasses
import uuid
from typing import Any

import numpy as np

from workflows.blocks.base import (
    DETECTIONS,
    VALUE,
    Block,
    Field,
    StepContext,
    integer_between,
    shown,
)
from workflows.detections import Detections

PIXELS = "Pixels"
PERCENT = "Percent (%)"
# No image side is this long (the pixel limit is far lower).
MAX_OFFSET = 1_000_000


def one_of_units(value: Any) -> str | None:
    if value not in (PIXELS, PERCENT):
        return f'must be "{PIXELS}" or "{PERCENT}", got {shown(value)}'
    return None


class DetectionOffsetBlock(Block):
    type = "roboflow_core/detection_offset@v1"
    aliases = ("DetectionOffset",)
    title = "Offset detections"
    description = (
        "Grows each box by a margin, half on each side, kept inside the image; "
        "each grown box gets a new detection_id."
    )
    fields = (
        Field("predictions", DETECTIONS, "Detections whose boxes grow."),
        Field(
            "offset_width",
            VALUE,
            "Added to each box's width: pixels, or percent of the box's width.",
            types=(int,),
            check=integer_between(1, MAX_OFFSET),
            aliases=("offset_x",),
        ),
        Field(
            "offset_height",
            VALUE,
            "Added to each box's height: pixels, or percent of the box's height.",
            types=(int,),
            check=integer_between(1, MAX_OFFSET),
            aliases=("offset_y",),
        ),
        Field(
            "units",
            VALUE,
            f'Unit of the offsets: "{PIXELS}" or "{PERCENT}".',
            required=False,
            default=PIXELS,
            types=(str,),
            check=one_of_units,
        ),
    )
    outputs = {"predictions": DETECTIONS}

    def run(
        self,
        context: StepContext,
        *,
        predictions: Detections,
        offset_width: int,
        offset_height: int,
        units: str,
    ) -> dict[str, Any]:
        return {
            "predictions": offset_boxes(
                predictions, offset_width, offset_height, units == PERCENT
            )
        }


def offset_boxes(
    predictions: Detections, offset_width: int, offset_height: int, percent: bool
) -> Detections:
    """Return ``predictions`` with each box grown by half an offset on each side.

    The arithmetic is Roboflow's (``detection_offset@v1``): half a pixel
    offset is ``offset // 2``, and half a percent offset is the whole number
    of pixels in ``box side * offset / 200``.
    """
    xyxy = predictions.xyxy.astype(np.float64)
    if percent:
        widths, heights = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
        half_x = np.trunc(widths * offset_width / 200)
        half_y = np.trunc(heights * offset_height / 200)
    else:
        half_x = np.full(len(predictions), offset_width // 2, dtype=np.float64)
        half_y = np.full(len(predictions), offset_height // 2, dtype=np.float64)
    image_width, image_height = predictions.image_size
    grown = np.stack(
        [
            np.maximum(0, xyxy[:, 0] - half_x),
            np.maximum(0, xyxy[:, 1] - half_y),
            np.minimum(image_width, xyxy[:, 2] + half_x),
            np.minimum(image_height, xyxy[:, 3] + half_y),
        ],
        axis=1,
    )
    return dataclasses.replace(
        predictions,
        xyxy=grown.astype(np.float32),
        detection_ids=[str(uuid.uuid4()) for _ in range(len(predictions))],
    )
