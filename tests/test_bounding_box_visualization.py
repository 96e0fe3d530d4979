"""Bounding-box visualization: boxes far outside the image or not finite, and
the run's time limit."""

import numpy as np
import pytest

from workflows.blocks.base import StepContext
from workflows.blocks.bounding_box_visualization.v1 import (
    BoundingBoxVisualizationBlock,
)
from workflows.deadline import Deadline
from workflows.detections import Detections
from workflows.errors import StepExecutionError
from workflows.images import WorkflowImage


def drawn(xyxy: list[list[float]]) -> np.ndarray:
    """Return the pixels of a black 100x80 image with boxes ``xyxy`` drawn."""
    image = WorkflowImage.from_pixels(
        np.zeros((80, 100, 3), dtype=np.uint8), parent_id="image"
    )
    count = len(xyxy)
    predictions = Detections(
        xyxy=np.array(xyxy, dtype=np.float32).reshape(-1, 4),
        confidence=np.full(count, 0.5, dtype=np.float32),
        class_id=np.zeros(count, dtype=np.int64),
        class_names=["person"] * count,
        image_size=(100, 80),
        parent_id="image",
    )
    result = BoundingBoxVisualizationBlock().run(
        StepContext(step_name="viz", models=None, timer=None),
        image=image,
        predictions=predictions,
        thickness=2,
    )
    return result["image"].pixels


def test_box_beyond_32_bit_coordinates_drawn():
    # A detection offset of a box inverted by a negative transformation
    # offset reaches coordinates in the billions.
    pixels = drawn([[-5e9, 10, 5e9, 50]])
    # The top and bottom edges cross the whole image.
    assert pixels[10, :, :].any(axis=1).all()
    assert pixels[50, :, :].any(axis=1).all()


def test_box_with_infinite_coordinates_skipped():
    pixels = drawn([[-np.inf, 10, np.inf, 50], [np.nan, 0, 10, 10]])
    assert not pixels.any()


def test_drawing_stops_at_expired_time_limit():
    # The run's time limit passed before the block call, so the drawing
    # stops at the first box, as it would between any two boxes.
    with Deadline(limit_s=0.0).during_call("viz", 4):
        with pytest.raises(StepExecutionError) as caught:
            drawn([[10, 10, 50, 50], [20, 20, 60, 60]])
    assert caught.value.step == "viz"
    assert caught.value.user_error is True
    message = caught.value.message
    assert "took longer than RUN_TIME_LIMIT_S (0 s)" in message
    assert "stopped during call 4 of step 'viz', at box 0 of 2" in message

    # Within the limit, every box is drawn.
    with Deadline(limit_s=600).during_call("viz", 4):
        assert drawn([[10, 10, 50, 50], [20, 20, 60, 60]])[10, 30].any()
