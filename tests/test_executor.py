"""The executor's bounds on images that steps create and on output size, on
real blocks and pixels."""

import json

import pytest

from tests.conftest import image_bytes
from workflows.compiler import build_plan, definition_digest
from workflows.deadline import current_call_deadline
from workflows.errors import StepExecutionError
from workflows.executor import (
    Deadline,
    DetectionBudget,
    OutputBudget,
    PixelBudget,
    collect_outputs,
    execute_plan,
)
from workflows.images import WorkflowImage
from workflows.timing import RunTimer


def three_crops() -> dict:
    """Three 800x1000 crops of the input: 800,000 pixels each."""
    crop = {
        "type": "roboflow_core/absolute_static_crop@v1",
        "images": "$inputs.image",
        "x_center": 405,
        "y_center": 540,
        "width": 800,
        "height": 1000,
    }
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [{**crop, "name": f"crop_{index}"} for index in range(3)],
        "outputs": [
            {"type": "JsonField", "name": "last", "selector": "$steps.crop_2.crops"}
        ],
    }


def run(budget: PixelBudget) -> None:
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")
    definition = three_crops()
    execute_plan(
        build_plan(definition, definition_digest(definition)),
        [{"image": image}],
        models=None,
        timer=RunTimer(),
        pixel_budget=budget,
    )


def test_created_images_within_budget():
    budget = PixelBudget(limit=2_400_000)
    run(budget)
    assert budget.used == 2_400_000


def test_created_images_over_budget_fail_at_that_step():
    with pytest.raises(StepExecutionError) as caught:
        run(PixelBudget(limit=2_000_000))
    assert caught.value.step == "crop_2"
    assert caught.value.user_error is True
    assert "2400000 pixels together" in caught.value.message


def test_crop_of_a_crop_names_both_origins():
    crop = {
        "type": "roboflow_core/absolute_static_crop@v1",
        "width": 200,
        "height": 100,
    }
    definition = {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [
            # (300, 450) to (500, 550) of the 810x1080 input.
            {**crop, "name": "outer", "images": "$inputs.image"}
            | {"x_center": 400, "y_center": 500},
            # (20, 30) to (120, 80) of the 200x100 outer crop.
            {"type": crop["type"], "name": "inner", "images": "$steps.outer.crops"}
            | {"x_center": 70, "y_center": 55, "width": 100, "height": 50},
        ],
        "outputs": [
            {"type": "JsonField", "name": "inner", "selector": "$steps.inner.crops"}
        ],
    }
    plan = build_plan(definition, definition_digest(definition))
    inputs = {"image": WorkflowImage.from_bytes(image_bytes(), parent_id="image")}
    [results] = execute_plan(plan, [inputs], models=None, timer=RunTimer())
    inner = collect_outputs(plan, inputs, results)["inner"]
    assert inner["parent_origin"] == {
        "offset_x": 20,
        "offset_y": 30,
        "width": 200,
        "height": 100,
    }
    assert inner["root_parent_origin"] == {
        "offset_x": 320,
        "offset_y": 480,
        "width": 810,
        "height": 1080,
    }
    assert inner["root_parent_id"] == "image"
    # Each static crop has an id of its own, which detections in it carry.
    assert inner["parent_id"].startswith("absolute_static_crop.")


def test_dynamic_crop_rounds_box_edges():
    import numpy as np

    from workflows.blocks.dynamic_crop.v1 import DynamicCropBlock
    from workflows.detections import Detections

    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")
    boxes = Detections(
        xyxy=np.array([[10.6, 127.775, 50.4, 639.2]], dtype=np.float32),
        confidence=np.array([0.9], dtype=np.float32),
        class_id=np.array([0]),
        class_names=["Normal"],
        image_size=(image.width, image.height),
        parent_id="image",
        detection_ids=["d1"],
    )
    [crop] = DynamicCropBlock().run(None, images=image, predictions=boxes)["crops"]
    # Edges 11, 128, 50 and 639, each the nearest pixel.
    assert crop.parent_origin == (11, 128, 810, 1080)
    assert (crop.width, crop.height) == (39, 511)
    assert crop.parent_id == "d1"


def test_dynamic_crop_stops_at_pixel_budget():
    import numpy as np

    from workflows.blocks.dynamic_crop.v1 import DynamicCropBlock
    from workflows.detections import Detections

    # Three boxes over the whole 810x1080 image: 874,800 pixels per crop.
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")
    boxes = Detections(
        xyxy=np.array([[0, 0, 810, 1080]] * 3, dtype=np.float32),
        confidence=np.full(3, 0.9, dtype=np.float32),
        class_id=np.zeros(3, dtype=np.int64),
        class_names=["Normal"] * 3,
        image_size=(image.width, image.height),
        parent_id="image",
    )
    budget = PixelBudget(limit=2_000_000)
    budget.used = 100_000

    # The third crop passes the budget, and the call stops there, before
    # it returns the crops for the executor to charge.
    with budget.during_call("crop"):
        with pytest.raises(StepExecutionError) as caught:
            DynamicCropBlock().run(None, images=image, predictions=boxes)
    assert caught.value.step == "crop"
    assert caught.value.user_error is True
    message = caught.value.message
    assert "images of 2724400 pixels together" in message
    assert "over the limit of 2000000 (MAX_RUN_PIXELS)" in message
    assert "at step 'crop', at crop 2 of 3" in message

    # Within the budget, every crop is cut, and only the executor charges.
    roomy = PixelBudget(limit=3_000_000)
    with roomy.during_call("crop"):
        crops = DynamicCropBlock().run(None, images=image, predictions=boxes)
    assert len(crops["crops"]) == 3
    assert roomy.used == 0


def people_detector(timer: RunTimer):
    """Return the models of a run that calls the people detector, on the CPU."""
    from runner.model_cache import ModelCache, ModelProvider
    from runner.registry import resolve_model

    cache = ModelCache(
        budget_bytes=512 * 1024 * 1024, device="cpu", warmup_size=64, torch_threads=1
    )
    return ModelProvider(
        cache, {"people-detector": resolve_model("people-detector")}, timer
    )


@pytest.mark.django_db
def test_executor_stops_dynamic_crop_at_budget():
    from tests.definitions import detection

    # The 3 people on bus.jpg, grown to the whole 810x1080 image, and a crop
    # of each: 874,800 pixels per crop.
    definition = detection()
    definition["steps"] += [
        {
            "type": "roboflow_core/detection_offset@v1",
            "name": "grow",
            "predictions": "$steps.people.predictions",
            "offset_width": 1_000_000,
            "offset_height": 1_000_000,
        },
        {
            "type": "roboflow_core/dynamic_crop@v1",
            "name": "crop",
            "images": "$inputs.image",
            "predictions": "$steps.grow.predictions",
        },
    ]
    plan = build_plan(definition, definition_digest(definition))
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")

    timer = RunTimer()
    with pytest.raises(StepExecutionError) as caught:
        execute_plan(
            plan,
            [{"image": image}],
            models=people_detector(timer),
            timer=timer,
            pixel_budget=PixelBudget(limit=2_000_000),
        )
    assert caught.value.step == "crop"
    assert "at step 'crop', at crop 2 of 3" in caught.value.message


def test_deadline_stops_next_block_call():
    definition = three_crops()
    plan = build_plan(definition, definition_digest(definition))
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")
    with pytest.raises(StepExecutionError) as caught:
        execute_plan(
            plan,
            [{"image": image}],
            models=None,
            timer=RunTimer(),
            deadline=Deadline(limit_s=0.0),
        )
    assert caught.value.step == "crop_0"
    assert caught.value.user_error is True
    assert "took longer than RUN_TIME_LIMIT_S (0 s)" in caught.value.message
    assert "stopped before call 1 of step 'crop_0'" in caught.value.message

    # With time to spare, every step runs, and no limit stays set for code
    # that runs outside a block call.
    execute_plan(
        plan, [{"image": image}], models=None, timer=RunTimer(), deadline=Deadline(60)
    )
    assert current_call_deadline() is None


def crop_sized_by(property_name: str) -> dict:
    """A static crop whose width is the input image's property ``property_name``."""
    definition = three_crops()
    definition["steps"] = [
        {
            "type": "roboflow_core/property_definition@v1",
            "name": "measure",
            "data": "$inputs.image",
            "operations": [
                {"type": "ExtractImageProperty", "property_name": property_name}
            ],
        },
        {**definition["steps"][0], "name": "crop_2", "width": "$steps.measure.output"},
    ]
    return definition


def test_setting_from_step_output_is_checked():
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")

    # bus.jpg is 810 wide, a valid crop width.
    definition = crop_sized_by("width")
    results = execute_plan(
        build_plan(definition, definition_digest(definition)),
        [{"image": image}],
        models=None,
        timer=RunTimer(),
    )
    assert results[0]["crop_2"]["crops"].width == 810

    # Its aspect ratio, 0.75, is under the least width of 1 pixel.
    definition = crop_sized_by("aspect_ratio")
    with pytest.raises(StepExecutionError) as caught:
        execute_plan(
            build_plan(definition, definition_digest(definition)),
            [{"image": image}],
            models=None,
            timer=RunTimer(),
        )
    assert caught.value.step == "crop_2"
    assert caught.value.user_error is True
    assert caught.value.message.startswith(
        "step 'crop_2', field 'width': the value of $steps.measure.output is "
        "invalid here: "
    )


def test_dynamic_crop_keeps_empty_box_as_null():
    import numpy as np

    from workflows.blocks.dynamic_crop.v1 import DynamicCropBlock
    from workflows.detections import Detections

    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")
    boxes = Detections(
        # The middle box rounds to zero width: 10.2 and 10.4 both round to 10.
        xyxy=np.array(
            [[10, 10, 50, 60], [10.2, 10, 10.4, 60], [100, 100, 120, 150]],
            dtype=np.float32,
        ),
        confidence=np.array([0.9, 0.8, 0.7], dtype=np.float32),
        class_id=np.array([0, 0, 0]),
        class_names=["Normal"] * 3,
        image_size=(image.width, image.height),
        parent_id="image",
        detection_ids=["d1", "d2", "d3"],
    )
    produced = DynamicCropBlock().run(None, images=image, predictions=boxes)
    crops = produced["crops"]
    assert len(crops) == 3
    assert crops[1] is None
    assert [crop.parent_id for crop in (crops[0], crops[2])] == ["d1", "d3"]

    # Each crop's detection, in the crop's coordinates; null with its crop.
    found = produced["predictions"]
    assert len(found) == 3
    assert found[1] is None
    first = found[0]
    assert first.xyxy.tolist() == [[0.0, 0.0, 40.0, 50.0]]
    assert first.detection_ids == ["d1"]
    assert first.parent_id == "d1"
    assert first.image_size == (40, 50)
    [own] = first.to_roboflow("own")["predictions"]
    assert (own["x"], own["y"]) == (20.0, 25.0)
    [in_input] = first.to_roboflow("parent")["predictions"]
    assert (in_input["x"], in_input["y"]) == (30.0, 35.0)


def test_serialized_detections_are_rounded():
    import numpy as np

    from workflows.detections import Detections

    boxes = Detections(
        xyxy=np.array([[10.123, 20.456, 50.789, 80.001]], dtype=np.float32),
        confidence=np.array([0.876543], dtype=np.float32),
        class_id=np.array([0]),
        class_names=["person"],
        image_size=(640, 480),
        parent_id="image",
        detection_ids=["d1"],
    )
    [prediction] = boxes.to_roboflow()["predictions"]
    # Box centre and size to 2 decimals, confidence to 4.
    assert prediction["x"] == 30.46
    assert prediction["y"] == 50.23
    assert prediction["width"] == 40.67
    assert prediction["height"] == 59.55
    assert prediction["confidence"] == 0.8765


def test_outputs_over_byte_budget_fail():
    import numpy as np

    from tests.definitions import detection
    from workflows.detections import Detections

    # 1,000 detections take about 180 kB of JSON; 3 outputs name them.
    definition = detection()
    definition["outputs"] = [
        {
            "type": "JsonField",
            "name": f"copy_{index}",
            "selector": "$steps.people.predictions",
        }
        for index in range(3)
    ]
    plan = build_plan(definition, definition_digest(definition))
    count = 1000
    boxes = Detections(
        xyxy=np.tile(np.array([[10, 10, 50, 50]], dtype=np.float32), (count, 1)),
        confidence=np.full(count, 0.9, dtype=np.float32),
        class_id=np.zeros(count, dtype=np.int64),
        class_names=["person"] * count,
        image_size=(100, 100),
        parent_id="image",
    )
    results = {"people": {"predictions": boxes}}
    one_output = len(json.dumps(boxes.to_roboflow()))

    # The third copy passes the budget.
    budget = OutputBudget(limit=2 * one_output + 1)
    with pytest.raises(StepExecutionError) as caught:
        collect_outputs(plan, {}, results, budget, image_index=4)
    assert caught.value.step == "people"
    assert caught.value.user_error is True
    message = caught.value.message
    assert f"more than {2 * one_output + 1} bytes of JSON" in message
    assert "(MAX_RUN_OUTPUT_BYTES), at output 'copy_2' of image 4" in message

    # Within the budget, every output is serialized and counted.
    roomy = OutputBudget(limit=3 * one_output)
    outputs = collect_outputs(plan, {}, results, roomy)
    assert len(outputs["copy_2"]["predictions"]) == count
    assert roomy.used == 3 * one_output


@pytest.mark.django_db
def test_detections_over_budget_fail_at_that_step():
    from tests.definitions import detection

    # The 3 people on bus.jpg, then a copy of them, grown: 6 detections.
    definition = detection()
    definition["steps"].append(
        {
            "type": "roboflow_core/detection_offset@v1",
            "name": "grow",
            "predictions": "$steps.people.predictions",
            "offset_width": 10,
            "offset_height": 10,
        }
    )
    plan = build_plan(definition, definition_digest(definition))
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")

    timer = RunTimer()
    with pytest.raises(StepExecutionError) as caught:
        execute_plan(
            plan,
            [{"image": image}],
            models=people_detector(timer),
            timer=timer,
            detection_budget=DetectionBudget(limit=5),
        )
    assert caught.value.step == "grow"
    assert caught.value.user_error is True
    message = caught.value.message
    assert "created 6 detections together" in message
    assert "over the limit of 5 (MAX_RUN_DETECTIONS), at step 'grow'" in message

    timer = RunTimer()
    budget = DetectionBudget(limit=6)
    execute_plan(
        plan,
        [{"image": image}],
        models=people_detector(timer),
        timer=timer,
        detection_budget=budget,
    )
    assert budget.used == 6
