"""Bounding-box visualization: draw detections on a copy of the image."""

from typing import Any

import cv2
import numpy as np

from workflows.blocks.base import (
    DETECTIONS,
    IMAGE,
    VALUE,
    Block,
    Field,
    StepContext,
    integer_between,
)
from workflows.deadline import current_call_deadline
from workflows.detections import Detections
from workflows.images import WorkflowImage

# BGR colours, one per class id modulo the palette length.
PALETTE = [
    (56, 56, 255),
    (151, 157, 255),
    (31, 112, 255),
    (29, 178, 255),
    (49, 210, 207),
    (10, 249, 72),
    (23, 204, 146),
    (134, 219, 61),
    (52, 147, 26),
    (187, 212, 0),
]


# The largest coordinate passed to OpenCV: past any image side (65,536 at
# most) plus the thickest line (32,767), and within a 32-bit integer.
MAX_COORDINATE = 2**20


class BoundingBoxVisualizationBlock(Block):
    type = "roboflow_core/bounding_box_visualization@v1"
    aliases = ("BoundingBoxVisualization",)
    title = "Draw boxes"
    description = "Draws each detection's box and label on a copy of the image."
    fields = (
        Field("image", IMAGE, "Image to draw on.", aliases=("images",)),
        Field("predictions", DETECTIONS, "Detections to draw."),
        Field(
            "thickness",
            VALUE,
            "Line thickness in pixels.",
            required=False,
            default=2,
            types=(int,),
            # OpenCV 4.12 rejects thicker lines (its MAX_THICKNESS).
            check=integer_between(1, 32767),
        ),
    )
    outputs = {"image": IMAGE}

    def run(
        self,
        context: StepContext,
        *,
        image: WorkflowImage,
        predictions: Detections,
        thickness: int,
    ) -> dict[str, Any]:
        canvas = image.pixels.copy()
        # A box with a thick line on a large image takes tens of
        # milliseconds, and max_detections allows thousands of boxes, so
        # the run's time limit is checked before each one.
        deadline = current_call_deadline()
        for i in range(len(predictions)):
            if deadline is not None and deadline.passed():
                deadline.stop(f"box {i} of {len(predictions)}")
            corners = predictions.xyxy[i]
            if not np.isfinite(corners).all():
                continue
            # OpenCV takes 32-bit coordinates. Boxes that the detection
            # offset or transformation moved far outside the image draw the
            # same when clipped to a margin around it.
            x1, y1, x2, y2 = (
                int(round(v)) for v in np.clip(corners, -MAX_COORDINATE, MAX_COORDINATE)
            )
            colour = PALETTE[int(predictions.class_id[i]) % len(PALETTE)]
            cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
            label = f"{predictions.class_names[i]} {predictions.confidence[i]:.2f}"
            cv2.putText(
                canvas,
                label,
                (x1, max(y1 - 4, 10)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.5,
                colour,
                1,
                cv2.LINE_AA,
            )
        return {
            "image": WorkflowImage.from_pixels(
                canvas,
                parent_id=image.parent_id,
                origin=image.origin,
                root_size=image.root_size,
                root_id=image.root_id,
                parent_origin=image.parent_origin,
            )
        }
