"""Bounding-box visualization of boxes far outside the image or not finite."""

import numpy as np

from workflows.blocks.base import StepContext
from workflows.blocks.bounding_box_visualization.v1 import (
    BoundingBoxVisualizationBlock,
)
from workflows.detections import Detections
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
