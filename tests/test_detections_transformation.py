"""The detections transformation: Roboflow's operations, chained in order."""

import numpy as np
import pytest

from runner.models import Run
from tests.conftest import start_cli_run
from tests.definitions import compare, detection, detection_property, group, static
from workflows.blocks.base import StepContext
from workflows.blocks.detection_offset.v1 import DetectionOffsetBlock
from workflows.blocks.detections_transformation.v1 import (
    DetectionsTransformationBlock,
)
from workflows.compiler import build_plan
from workflows.detections import Detections
from workflows.errors import DefinitionError, StepExecutionError
from workflows.executor import collect_outputs


def detections() -> Detections:
    """Return four detections; detection i has the id "i".

    ==  =======  ==========  ================
    i   class    confidence  x/y min, max
    ==  =======  ==========  ================
    0   Normal   0.5         40, 0, 60, 10
    1   Fall     0.9         0, 0, 10, 10
    2   Normal   0.7         70, 0, 100, 30
    3   Fall     0.9         20, 0, 24, 4
    ==  =======  ==========  ================
    """
    return Detections(
        xyxy=np.array(
            [[40, 0, 60, 10], [0, 0, 10, 10], [70, 0, 100, 30], [20, 0, 24, 4]],
            dtype=np.float32,
        ),
        confidence=np.array([0.5, 0.9, 0.7, 0.9], dtype=np.float32),
        class_id=np.array([0, 1, 0, 1], dtype=np.int64),
        class_names=["Normal", "Fall", "Normal", "Fall"],
        image_size=(100, 100),
        parent_id="image",
        detection_ids=["0", "1", "2", "3"],
    )


def transformed(operations: list, parameters: dict | None = None) -> Detections:
    return DetectionsTransformationBlock().run(
        StepContext(step_name="transform", models=None, timer=None),
        predictions=detections(),
        operations=operations,
        operations_parameters=parameters or {},
    )["predictions"]


def transformation_definition(operations, parameters=None) -> dict:
    definition = detection()
    step = {
        "type": "DetectionsTransformation",
        "name": "transform",
        "predictions": "$steps.people.predictions",
        "operations": operations,
    }
    if parameters is not None:
        step["operations_parameters"] = parameters
    definition["steps"].append(step)
    return definition


def keep_normal() -> dict:
    return {
        "type": "DetectionsFilter",
        "filter_operation": group(
            compare(detection_property("class_name"), "==", static("Normal"))
        ),
    }


def test_transformation_filter():
    assert transformed([keep_normal()]).detection_ids == ["0", "2"]


def test_transformation_offset_not_clipped():
    moved = transformed([{"type": "DetectionsOffset", "offset_x": 10, "offset_y": 6}])
    assert moved.xyxy[1].tolist() == [-5, -3, 15, 13]
    assert moved.detection_ids == ["0", "1", "2", "3"]


def test_transformation_shift():
    moved = transformed([{"type": "DetectionsShift", "shift_x": 5, "shift_y": -2}])
    assert moved.xyxy[0].tolist() == [45, -2, 65, 8]


@pytest.mark.parametrize(
    ("mode", "kept"),
    [
        ("first", "0"),
        ("last", "3"),
        ("left_most", "1"),
        ("right_most", "2"),
        # Detections 1 and 3 share the top confidence: the first one wins.
        ("top_confidence", "1"),
    ],
)
def test_transformation_selection(mode, kept):
    selected = transformed([{"type": "DetectionsSelection", "mode": mode}])
    assert selected.detection_ids == [kept]


@pytest.mark.parametrize(
    ("mode", "ascending", "order"),
    [
        ("x_min", True, ["1", "3", "0", "2"]),
        ("x_min", False, ["2", "0", "3", "1"]),
        ("size", True, ["3", "1", "0", "2"]),
        ("center_y", False, ["2", "1", "0", "3"]),
    ],
)
def test_transformation_sort(mode, ascending, order):
    operation = {"type": "SortDetections", "mode": mode, "ascending": ascending}
    assert transformed([operation]).detection_ids == order


def test_transformation_chain_in_order():
    # The filter runs first, so the left-most detection is a Normal one.
    operations = [keep_normal(), {"type": "DetectionsSelection", "mode": "left_most"}]
    assert transformed(operations).detection_ids == ["0"]


def test_transformation_empty_detections():
    block = DetectionsTransformationBlock()
    empty = Detections.empty((100, 100), "image")
    for operation in (
        {"type": "DetectionsSelection", "mode": "top_confidence"},
        {"type": "SortDetections", "mode": "confidence"},
        {"type": "DetectionsOffset", "offset_x": 4, "offset_y": 4},
    ):
        output = block.run(
            StepContext(step_name="transform", models=None, timer=None),
            predictions=empty,
            operations=[operation],
            operations_parameters={},
        )["predictions"]
        assert len(output) == 0


def test_transformation_filter_parameter():
    operation = {
        "type": "DetectionsFilter",
        "filter_operation": group(
            compare(
                detection_property("confidence"),
                "(Number) >=",
                {"type": "DynamicOperand", "operand_name": "threshold"},
            )
        ),
    }
    kept = transformed([operation], {"threshold": 0.8})
    assert kept.detection_ids == ["1", "3"]


def test_transformation_filter_error_names_step():
    operation = {
        "type": "DetectionsFilter",
        "filter_operation": group(
            compare(detection_property("confidence"), "(Number) >", static("high"))
        ),
    }
    with pytest.raises(StepExecutionError) as raised:
        transformed([operation])
    assert raised.value.step == "transform"


def test_transformation_rename_strict():
    renamed = transformed(
        [
            {
                "type": "DetectionsRename",
                "class_map": {"Normal": "upright", "Fall": "down"},
            }
        ]
    )
    assert renamed.class_names == ["upright", "down", "upright", "down"]
    # Strict: ids are the new names' indices in sorted order.
    assert renamed.class_id.tolist() == [1, 0, 1, 0]
    assert renamed.detection_ids == ["0", "1", "2", "3"]


def test_transformation_rename_not_strict():
    operation = {
        "type": "DetectionsRename",
        "class_map": "mapping",
        "strict": "strict",
        "new_classes_id_offset": 10,
    }
    renamed = transformed([operation], {"mapping": {"Fall": "down"}, "strict": False})
    assert renamed.class_names == ["Normal", "down", "Normal", "down"]
    assert renamed.class_id.tolist() == [0, 10, 0, 10]


def test_transformation_rename_unmapped_class_fails():
    operation = {"type": "DetectionsRename", "class_map": {"Fall": "down"}}
    with pytest.raises(StepExecutionError) as raised:
        transformed([operation])
    assert raised.value.step == "transform"
    assert '"Normal" is not in class_map' in raised.value.message


def test_transformation_rename_bad_parameter_fails():
    operation = {"type": "DetectionsRename", "class_map": "mapping"}
    with pytest.raises(StepExecutionError) as raised:
        transformed([operation], {"mapping": ["Normal"]})
    assert "class_map must be an object" in raised.value.message


def parents_and_children() -> Detections:
    """Return two cars and the detections around them; each id is its class.

    The centre of "plate-edge" lies on the right edge of "car-1".
    """
    boxes = {
        "plate-in": [10, 10, 20, 20],
        "car-1": [0, 0, 50, 50],
        "plate-out": [60, 60, 70, 70],
        "plate-edge": [45, 10, 55, 20],
        "car-2": [100, 100, 200, 200],
        "person": [140, 140, 160, 160],
    }
    return Detections(
        xyxy=np.array(list(boxes.values()), dtype=np.float32),
        confidence=np.full(len(boxes), 0.9, dtype=np.float32),
        class_id=np.array(
            [0 if name.startswith("car") else 1 for name in boxes], dtype=np.int64
        ),
        class_names=[name.split("-")[0] for name in boxes],
        image_size=(300, 300),
        parent_id="image",
        detection_ids=list(boxes),
    )


def picked(parent_class: str) -> Detections:
    return DetectionsTransformationBlock().run(
        StepContext(step_name="transform", models=None, timer=None),
        predictions=parents_and_children(),
        operations=[
            {"type": "PickDetectionsByParentClass", "parent_class": parent_class}
        ],
        operations_parameters={},
    )["predictions"]


def test_pick_by_parent_class_keeps_children():
    kept = picked("car")
    # Parents first, then the detections centred in one of them, each in order.
    assert kept.detection_ids == ["car-1", "car-2", "plate-in", "plate-edge", "person"]
    assert kept.class_names == ["car", "car", "plate", "plate", "person"]


def test_pick_by_parent_class_without_parents():
    kept = picked("truck")
    assert len(kept) == 0
    assert kept.image_size == (300, 300)


def test_pick_by_parent_class_compiles():
    operation = {"type": "PickDetectionsByParentClass", "parent_class": "person"}
    plan = build_plan(transformation_definition([operation]), "digest")
    assert "transform" in {step.name for step in plan.steps}


def test_transformation_compiles():
    plan = build_plan(
        transformation_definition([{"type": "SortDetections", "mode": "size"}]),
        "digest",
    )
    assert "transform" in {step.name for step in plan.steps}


@pytest.mark.parametrize(
    ("operations", "problem"),
    [
        ([{"type": "PickDetectionsByParentClass"}], '"parent_class" is missing'),
        (
            [{"type": "PickDetectionsByParentClass", "parent_class": ["car"]}],
            'operations[0].parent_class: must be a class name, got ["car"]',
        ),
        (
            [{"type": "ConvertImageToJPEG"}],
            'operations[0].type: operation type "ConvertImageToJPEG" is not '
            "supported; supported: DetectionsFilter, DetectionsOffset",
        ),
        ([{"type": "DetectionsRename"}], '"class_map" is missing'),
        ([{"type": "DetectionsRename", "class_map": {"a": 1}}], "class_map"),
        ([{"type": "DetectionsRename", "class_map": {}, "strict": 1}], "strict"),
        ([{"type": "DetectionsRename", "class_map": "mapping"}], '"mapping"'),
        ([{"type": "DetectionsOffset", "offset_x": 1.5, "offset_y": 1}], "offset_x"),
        ([{"type": "DetectionsOffset", "offset_x": 1}], '"offset_y" is missing'),
        (
            [{"type": "DetectionsOffset", "offset_x": 10**400, "offset_y": 1}],
            "offset_x: must be an integer number of pixels from -1000000",
        ),
        (
            [{"type": "DetectionsShift", "shift_x": 0, "shift_y": -(10**400)}],
            "shift_y: must be an integer number of pixels from -1000000",
        ),
        (
            [
                {
                    "type": "DetectionsRename",
                    "class_map": {"Normal": "upright"},
                    "strict": False,
                    "new_classes_id_offset": 10**30,
                }
            ],
            "new_classes_id_offset: must be an integer from -2147483648",
        ),
        ([{"type": "DetectionsSelection", "mode": "biggest"}], "biggest"),
        ([{"type": "SortDetections", "mode": "size", "ascending": "no"}], "ascending"),
        ([{"type": "SortDetections", "mode": "size", "reverse": True}], "reverse"),
        ("SortDetections", "must be an array"),
    ],
)
def test_transformation_rejects_bad_operations(operations, problem):
    with pytest.raises(DefinitionError) as raised:
        build_plan(transformation_definition(operations), "digest")
    assert raised.value.field_name == "operations"
    assert problem in str(raised.value)


def test_transformation_rejects_undeclared_parameter():
    operation = {
        "type": "DetectionsFilter",
        "filter_operation": group(
            compare(
                detection_property("confidence"),
                "(Number) >=",
                {"type": "DynamicOperand", "operand_name": "threshold"},
            )
        ),
    }
    with pytest.raises(DefinitionError) as raised:
        build_plan(transformation_definition([operation]), "digest")
    assert "threshold" in str(raised.value)


def test_infinite_output_rejected_as_step_error():
    # A negative offset inverts the boxes, and detection offsets in percent
    # of the (negative) side then grow them past float32's range.
    boxes = transformed(
        [{"type": "DetectionsOffset", "offset_x": -1_000_000, "offset_y": -1_000_000}]
    )
    offset = DetectionOffsetBlock()
    context = StepContext(step_name="grow", models=None, timer=None)
    for _ in range(12):
        boxes = offset.run(
            context,
            predictions=boxes,
            offset_width=1_000_000,
            offset_height=1_000_000,
            units="Percent (%)",
        )["predictions"]
    assert not np.isfinite(boxes.xyxy).all()
    definition = transformation_definition([])
    definition["steps"].append(
        {
            "type": "DetectionOffset",
            "name": "grow",
            "predictions": "$steps.transform.predictions",
            "offset_width": 1_000_000,
            "offset_height": 1_000_000,
            "units": "Percent (%)",
        }
    )
    definition["outputs"] = [
        {"type": "JsonField", "name": "grown", "selector": "$steps.grow.predictions"}
    ]
    plan = build_plan(definition, "digest")

    with pytest.raises(StepExecutionError) as raised:
        collect_outputs(plan, {}, {"grow": {"predictions": boxes}})

    assert raised.value.user_error is True
    assert raised.value.step == "grow"
    assert "output 'grown' a number that is infinite or NaN" in raised.value.message


def test_infinite_output_run_keeps_serialization_time(runner, alice):
    # The run fails while its outputs are serialized; that time is still
    # reported as serialization, and the parts still add up.
    definition = transformation_definition(
        [{"type": "DetectionsOffset", "offset_x": -1_000_000, "offset_y": -1_000_000}]
    )
    previous = "$steps.transform.predictions"
    for index in range(12):
        definition["steps"].append(
            {
                "type": "DetectionOffset",
                "name": f"grow{index}",
                "predictions": previous,
                "offset_width": 1_000_000,
                "offset_height": 1_000_000,
                "units": "Percent (%)",
            }
        )
        previous = f"$steps.grow{index}.predictions"
    definition["outputs"] = [
        {"type": "JsonField", "name": "grown", "selector": previous}
    ]

    run = start_cli_run(alice, definition, wait_s=60).run
    run.refresh_from_db()

    assert run.status == Run.Status.FAILED
    assert run.error["code"] == "step_rejected_input"
    components = run.breakdown["components"]
    assert components["serialization"] > 0
    assert sum(components.values()) == run.breakdown["total"]
