"""The detection offset block: Roboflow's arithmetic, clamping and new ids."""

import numpy as np
import pytest

from tests.definitions import detection
from workflows.blocks.base import StepContext
from workflows.blocks.detection_offset.v1 import DetectionOffsetBlock
from workflows.compiler import build_plan
from workflows.detections import Detections
from workflows.errors import DefinitionError


def detections() -> Detections:
    """Return two boxes in a 100x80 image. The second is 1 pixel from the left edge."""
    return Detections(
        xyxy=np.array([[20, 20, 40, 60], [1, 10, 11, 30]], dtype=np.float32),
        confidence=np.array([0.9, 0.8], dtype=np.float32),
        class_id=np.array([0, 0], dtype=np.int64),
        class_names=["Normal", "Normal"],
        image_size=(100, 80),
        parent_id="image",
        detection_ids=["a", "b"],
    )


def offset(**fields) -> Detections:
    fields.setdefault("units", "Pixels")
    return DetectionOffsetBlock().run(
        StepContext(step_name="offset", models=None, timer=None),
        predictions=detections(),
        **fields,
    )["predictions"]


def offset_definition(**fields) -> dict:
    definition = detection()
    definition["steps"].append(
        {
            "type": "roboflow_core/detection_offset@v1",
            "name": "offset",
            "predictions": "$steps.people.predictions",
            **fields,
        }
    )
    return definition


def test_offset_pixels_half_on_each_side():
    grown = offset(offset_width=10, offset_height=7)
    # 7 // 2 = 3 pixels above and below, as in Roboflow's block.
    assert grown.xyxy[0].tolist() == [15, 17, 45, 63]


def test_offset_clamped_to_image():
    grown = offset(offset_width=10, offset_height=100)
    assert grown.xyxy[1].tolist() == [0, 0, 16, 80]


def test_offset_percent_of_box():
    # The first box is 20x40: 50% of its width adds int(20 * 50 / 200) = 5
    # pixels on each side, 25% of its height int(40 * 25 / 200) = 5.
    grown = offset(offset_width=50, offset_height=25, units="Percent (%)")
    assert grown.xyxy[0].tolist() == [15, 15, 45, 65]


def test_offset_gives_new_detection_ids():
    grown = offset(offset_width=10, offset_height=10)
    assert len(set(grown.detection_ids)) == 2
    assert not set(grown.detection_ids) & {"a", "b"}


def test_offset_keeps_classes_and_parent():
    grown = offset(offset_width=10, offset_height=10)
    assert grown.class_names == ["Normal", "Normal"]
    assert grown.confidence.tolist() == pytest.approx([0.9, 0.8])
    assert grown.parent_id == "image"
    assert grown.image_size == (100, 80)


def test_offset_accepts_roboflow_aliases():
    plan = build_plan(offset_definition(offset_x=10, offset_y=10), "digest")
    assert "offset" in {step.name for step in plan.steps}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"offset_width": 0, "offset_height": 10}, "offset_width"),
        ({"offset_width": 10, "offset_height": 2.5}, "offset_height"),
        ({"offset_width": 10, "offset_height": 10, "units": "px"}, "units"),
        ({"offset_height": 10}, "offset_width"),
    ],
)
def test_offset_rejects_bad_fields(fields, field):
    with pytest.raises(DefinitionError) as raised:
        build_plan(offset_definition(**fields), "digest")
    assert raised.value.field_name == field
