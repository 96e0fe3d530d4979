"""Property definition values for the detection properties of Roboflow's language."""

import numpy as np
import pytest

from workflows.blocks.base import StepContext
from workflows.blocks.property_definition.v1 import PropertyDefinitionBlock
from workflows.detections import Detections


def two_boxes() -> Detections:
    return Detections(
        xyxy=np.array([[10, 20, 50, 80], [100.5, 0, 121.5, 9]], dtype=np.float32),
        confidence=np.array([0.9, 0.5], dtype=np.float32),
        class_id=np.array([0, 1]),
        class_names=["person", "bus"],
        image_size=(640, 480),
        parent_id="image",
        detection_ids=["d1", "d2"],
    )


def extract(detections: Detections, property_name: str, *then: dict):
    operations = [
        {"type": "DetectionsPropertyExtract", "property_name": property_name},
        *then,
    ]
    context = StepContext(step_name="property", models=None, timer=None)
    return PropertyDefinitionBlock().run(
        context, data=detections, operations=operations
    )["output"]


@pytest.mark.parametrize(
    ("property_name", "expected"),
    [
        ("x_min", [10.0, 100.5]),
        ("y_min", [20.0, 0.0]),
        ("x_max", [50.0, 121.5]),
        ("y_max", [80.0, 9.0]),
        ("size", [2400.0, 189.0]),
        # Anchors are whole pixels, rounded half to even: y 4.5 rounds to 4.
        ("center", [[30, 50], [111, 4]]),
        ("top_left", [[10, 20], [100, 0]]),
        ("top_right", [[50, 20], [122, 0]]),
        ("bottom_left", [[10, 80], [100, 9]]),
        ("bottom_right", [[50, 80], [122, 9]]),
        ("class_name", ["person", "bus"]),
        ("class_id", [0, 1]),
        ("x", [30.0, 111.0]),
        ("width", [40.0, 21.0]),
        ("detection_id", ["d1", "d2"]),
    ],
)
def test_detections_property_extract_values(property_name, expected):
    assert extract(two_boxes(), property_name) == expected


@pytest.mark.parametrize("property_name", ["x_min", "size", "center"])
def test_detections_property_extract_empty(property_name):
    empty = Detections.empty(image_size=(640, 480), parent_id="image")
    assert extract(empty, property_name) == []


def test_detections_property_anchor_types():
    [point, _] = extract(two_boxes(), "center")
    assert all(type(coordinate) is int for coordinate in point)


@pytest.mark.parametrize(
    ("property_name", "expected"),
    [
        ("class_name", "['person', 'bus']"),
        ("class_id", "[0, 1]"),
        # float32 confidences as Python floats, as Roboflow's tolist() gives.
        ("confidence", "[0.8999999761581421, 0.5]"),
        ("center", "[[30, 50], [111, 4]]"),
        ("detection_id", "['d1', 'd2']"),
    ],
)
def test_to_string_of_detection_property(property_name, expected):
    text = extract(two_boxes(), property_name, {"type": "ToString"})
    assert text == expected
