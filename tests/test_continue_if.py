"""ContinueIf: compile checks of next_steps, and steps skipped per image or crop.

The executor tests run the people detector in this process on two photos
from ultralytics' assets: bus.jpg, where it finds 3 people at the default
confidence, and zidane.jpg, where it finds 1.
"""

import copy

import numpy as np
import pytest

from runner.model_cache import ModelCache, ModelProvider
from runner.registry import resolve_model
from tests.conftest import image_bytes
from tests.definitions import (
    compare,
    detection,
    detection_property,
    group,
    parameter,
    static,
)
from workflows.blocks.base import FLOW_CONTROL, StepContext
from workflows.blocks.continue_if.v1 import ContinueIfBlock
from workflows.compiler import build_plan, definition_digest
from workflows.detections import Detections
from workflows.errors import DefinitionError, StepExecutionError
from workflows.executor import collect_outputs, execute_plan
from workflows.images import WorkflowImage
from workflows.timing import RunTimer

MIB = 1024 * 1024


def people_count(name: str = "people") -> dict:
    """Return an operand that counts the detections in parameter ``name``."""
    return {
        "type": "DynamicOperand",
        "operand_name": name,
        "operations": [{"type": "SequenceLength"}],
    }


def at_least(count: int) -> dict:
    return group(compare(people_count(), "(Number) >=", static(count)))


def gated_crops(minimum: int = 3) -> dict:
    """Return a detection whose crops, and their widths, need ``minimum`` people."""
    definition = detection()
    definition["steps"] += [
        {
            "type": "roboflow_core/continue_if@v1",
            "name": "enough",
            "condition_statement": at_least(minimum),
            "evaluation_parameters": {"people": "$steps.people.predictions"},
            "next_steps": ["$steps.crops"],
        },
        {
            "type": "roboflow_core/dynamic_crop@v1",
            "name": "crops",
            "images": "$inputs.image",
            "predictions": "$steps.people.predictions",
        },
        {
            "type": "PropertyDefinition",
            "name": "widths",
            "data": "$steps.crops.crops",
            "operations": [{"type": "ExtractImageProperty", "property_name": "width"}],
        },
    ]
    definition["outputs"] += [
        {"type": "JsonField", "name": "widths", "selector": "$steps.widths.output"},
        {"type": "JsonField", "name": "crops", "selector": "$steps.crops.*"},
        {"type": "JsonField", "name": "decision", "selector": "$steps.enough.*"},
    ]
    return definition


def compile_errors(definition: dict) -> list:
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    return caught.value.errors


def decide(condition: dict, parameters: dict, next_steps=("crops",)) -> bool:
    output = ContinueIfBlock().run(
        StepContext(step_name="enough", models=None, timer=None),
        condition_statement=condition,
        evaluation_parameters=parameters,
        next_steps=tuple(next_steps),
        stop_delay=0,
    )
    return output[FLOW_CONTROL]


# The block on its own.


def test_condition_true_selects_next_steps():
    assert decide(group(compare(parameter("n"), "(Number) >", static(2))), {"n": 3})


def test_condition_false_skips_next_steps():
    condition = group(compare(parameter("n"), "(Number) >", static(2)))
    assert not decide(condition, {"n": 2})


def test_empty_next_steps_never_selects():
    # Roboflow's block ends the branch when next_steps is empty.
    condition = group(compare(parameter("n"), "(Number) >", static(2)))
    assert not decide(condition, {"n": 3}, next_steps=())


def test_operand_operations_read_values():
    condition = group(
        compare(
            {
                "type": "DynamicOperand",
                "operand_name": "names",
                "operations": [{"type": "SequenceLength"}],
            },
            "(Number) ==",
            static(2),
        ),
        compare(parameter("names"), "any in (Sequence)", static(["dog"])),
        operator="and",
    )
    assert decide(condition, {"names": ["cat", "dog"]})
    assert not decide(condition, {"names": ["cat", "cow"]})


def test_operand_operation_on_wrong_kind_rejects_step():
    with pytest.raises(StepExecutionError) as caught:
        decide(at_least(1), {"people": 5})
    assert caught.value.user_error is True
    assert "SequenceLength needs detections" in caught.value.message
    assert "statements[0].left_operand" in caught.value.message


def test_comparison_that_fails_rejects_step():
    condition = group(compare(parameter("n"), "(Number) >", static(2)))
    with pytest.raises(StepExecutionError) as caught:
        decide(condition, {"n": "three"})
    assert caught.value.step == "enough"
    assert "(Number) > failed with the values" in caught.value.message


def test_failed_comparison_names_image_by_size():
    image = WorkflowImage(parent_id="image", width=4, height=3, data=b"\xff\xd8" * 500)
    condition = group(compare(parameter("n"), "(Number) >", static(2)))
    with pytest.raises(StepExecutionError) as caught:
        decide(condition, {"n": image})
    assert "an image of 4×3 pixels" in caught.value.message
    assert "xff" not in caught.value.message


# Compile errors.


@pytest.mark.parametrize(
    ("next_steps", "problem"),
    [
        ("$steps.crops", "must be a list of step selectors"),
        (["$steps.crops.crops"], "is not a step selector; write $steps.<step name>"),
        (["crops"], "is not a step selector"),
        (["$steps.missing"], "names no step; steps: count, crops, enough,"),
        (["$steps.enough"], "names this step itself"),
        (["$steps.crops", "$steps.crops"], "names step 'crops' a second time"),
    ],
)
def test_compile_rejects_bad_next_steps(next_steps, problem):
    definition = gated_crops()
    definition["steps"][2]["next_steps"] = next_steps
    [error] = compile_errors(definition)
    assert error.block_id == "enough"
    assert error.block_type == "roboflow_core/continue_if@v1"
    assert error.property_name == "next_steps"
    assert problem in error.property_details


def test_compile_requires_next_steps():
    definition = gated_crops()
    del definition["steps"][2]["next_steps"]
    [error] = compile_errors(definition)
    assert (error.block_id, error.property_name) == ("enough", "next_steps")
    assert "required field 'next_steps' is missing" in error.property_details


def test_compile_error_message_names_step_and_field():
    definition = gated_crops()
    definition["steps"][2]["next_steps"] = ["$steps.nothing"]
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    body = caught.value.to_dict()
    assert body["step"] == "enough"
    assert body["field"] == "next_steps"
    assert body["blocks_errors"][0]["block_id"] == "enough"
    assert (
        "Invalid workflow definition at step 'enough', field 'next_steps'"
        in (body["message"])
    )


def test_compile_rejects_next_step_cycle():
    definition = gated_crops()
    definition["steps"][2]["next_steps"] = ["$steps.people"]
    [error] = compile_errors(definition)
    assert error.block_id == "enough"
    assert error.property_name == "next_steps"
    assert "steps form a cycle" in error.property_details


def test_compile_rejects_per_crop_decision_for_image_step():
    definition = gated_crops()
    definition["steps"].append(
        {
            "type": "ContinueIf",
            "name": "wide",
            "condition_statement": group(
                compare(parameter("width"), "(Number) >", static(100))
            ),
            "evaluation_parameters": {"width": "$steps.widths.output"},
            "next_steps": ["$steps.count"],
        }
    )
    [error] = compile_errors(definition)
    assert (error.block_id, error.property_name) == ("wide", "next_steps")
    assert "decides once per crop" in error.property_details


def test_compile_rejects_operand_missing_from_parameters():
    definition = gated_crops()
    definition["steps"][2]["evaluation_parameters"] = {
        "persons": "$steps.people.predictions"
    }
    [error] = compile_errors(definition)
    assert error.property_name == "condition_statement"
    assert '"people" is not a key of evaluation_parameters' in error.property_details
    assert 'keys: "persons"' in error.property_details


def test_compile_rejects_unsupported_operand_operation():
    definition = gated_crops()
    condition = definition["steps"][2]["condition_statement"]
    condition["statements"][0]["left_operand"]["operations"] = [
        {"type": "ClassificationPropertyExtract"}
    ]
    [error] = compile_errors(definition)
    assert error.property_name == "condition_statement"
    assert "statements[0].left_operand.operations" in error.property_details
    assert "unknown type 'ClassificationPropertyExtract'" in error.property_details


def test_compile_rejects_operand_chain_of_wrong_kinds():
    definition = gated_crops()
    condition = definition["steps"][2]["condition_statement"]
    condition["statements"][0]["left_operand"]["operations"] = [
        {"type": "SequenceLength"},
        {"type": "StringToLowerCase"},
    ]
    [error] = compile_errors(definition)
    assert error.property_name == "condition_statement"
    assert "statements[0].left_operand.operations" in error.property_details
    assert (
        "operation 1 (StringToLowerCase) needs a string, but gets a number"
        in error.property_details
    )


def test_condition_counts_filtered_detections():
    # Roboflow's pattern for "at least N of a class": filter, then count.
    confident = {
        "type": "DetectionsFilter",
        "filter_operation": group(
            compare(detection_property("confidence"), "(Number) >=", static(0.8))
        ),
    }
    count = {
        **parameter("people"),
        "operations": [confident, {"type": "SequenceLength"}],
    }
    condition = group(compare(count, "(Number) >=", static(2)))
    detections = Detections(
        xyxy=np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], dtype=np.float32),
        confidence=np.array([0.9, 0.85, 0.3], dtype=np.float32),
        class_id=np.array([0, 0, 0]),
        class_names=["person"] * 3,
        image_size=(100, 100),
        parent_id="image",
        detection_ids=["a", "b", "c"],
    )
    assert decide(condition, {"people": detections})
    assert not decide(condition, {"people": detections.select(np.array([1, 0, 1]) > 0)})
    definition = gated_crops()
    definition["steps"][2]["condition_statement"] = condition
    assert build_plan(definition, "digest").steps


def test_compile_rejects_condition_from_selector():
    definition = gated_crops()
    definition["inputs"].append({"type": "WorkflowParameter", "name": "condition"})
    definition["steps"][2]["condition_statement"] = "$inputs.condition"
    errors = compile_errors(definition)
    assert [(e.block_id, e.property_name) for e in errors] == [
        ("enough", "condition_statement")
    ]


def test_compile_accepts_roboflow_alias_and_records_gates():
    definition = gated_crops()
    definition["steps"][2]["type"] = "ContinueIf"
    plan = build_plan(definition, "digest")
    gates = {step.name: step.gated_by for step in plan.steps}
    assert gates["crops"] == ("enough",)
    assert gates["widths"] == ()
    order = [step.name for step in plan.steps]
    assert order.index("enough") < order.index("crops")


# Running the plan with the people detector.


@pytest.fixture(scope="module")
def provider_parts():
    cache = ModelCache(
        budget_bytes=512 * MIB, device="cpu", warmup_size=64, torch_threads=1
    )
    return cache, resolve_model("people-detector")


def run_plan(definition: dict, provider_parts, names=("bus.jpg", "zidane.jpg")):
    """Run ``definition`` on the named photos; return outputs and the timer."""
    cache, source = provider_parts
    plan = build_plan(definition, definition_digest(definition))
    timer = RunTimer()
    provider = ModelProvider(cache, {"people-detector": source}, timer)
    batch = [
        {"image": WorkflowImage.from_bytes(image_bytes(name), parent_id="image")}
        for name in names
    ]
    results = execute_plan(plan, batch, models=provider, timer=timer)
    outputs = [
        collect_outputs(plan, inputs, result)
        for inputs, result in zip(batch, results, strict=True)
    ]
    return outputs, timer


@pytest.mark.django_db
def test_steps_skipped_for_image_where_condition_false(provider_parts):
    bus, zidane = run_plan(gated_crops(3), provider_parts)[0]

    assert bus["count"] == 3
    assert len(bus["widths"]) == 3
    assert all(isinstance(width, int) and width > 0 for width in bus["widths"])
    assert len(bus["crops"]["crops"]) == 3

    assert zidane["count"] == 1
    # The named step and the step that reads it did not run: null outputs.
    assert zidane["crops"] == {"crops": None, "predictions": None}
    assert zidane["widths"] is None
    # The block has no outputs of its own, as Roboflow's.
    assert bus["decision"] == {}
    assert zidane["decision"] == {}


@pytest.mark.django_db
def test_skipped_steps_take_no_block_time(provider_parts):
    outputs, timer = run_plan(gated_crops(10), provider_parts)
    assert [output["widths"] for output in outputs] == [None, None]
    assert timer.steps["crops"] == 0
    assert timer.steps["widths"] == 0
    assert timer.steps["enough"] > 0

    breakdown = timer.breakdown(
        runner_total_ns=sum(timer.steps.values()) + 10**9,
        request_us=0,
        queue_us=0,
        step_types={},
    )
    components = breakdown["components"]
    assert sum(components.values()) == breakdown["total"]
    steps = {step["name"]: step["duration"] for step in breakdown["steps"]}
    assert steps["crops"] == 0
    assert steps["widths"] == 0


@pytest.mark.django_db
def test_condition_on_crops_skips_per_crop(provider_parts):
    definition = gated_crops(1)
    definition["steps"] += [
        {
            "type": "ContinueIf",
            "name": "wide",
            "condition_statement": group(
                compare(parameter("width"), "(Number) >=", static(150))
            ),
            "evaluation_parameters": {"width": "$steps.widths.output"},
            "next_steps": ["$steps.heights"],
        },
        {
            "type": "PropertyDefinition",
            "name": "heights",
            "data": "$steps.crops.crops",
            "operations": [{"type": "ExtractImageProperty", "property_name": "height"}],
        },
    ]
    definition["outputs"].append(
        {"type": "JsonField", "name": "heights", "selector": "$steps.heights.output"}
    )
    [bus] = run_plan(definition, provider_parts, names=("bus.jpg",))[0]

    widths = bus["widths"]
    assert any(width >= 150 for width in widths)
    assert any(width < 150 for width in widths)
    assert len(bus["heights"]) == len(widths)
    for width, height in zip(widths, bus["heights"], strict=True):
        if width >= 150:
            assert isinstance(height, int) and height > 0
        else:
            assert height is None


@pytest.mark.django_db
def test_two_conditions_must_both_select(provider_parts):
    definition = gated_crops(1)
    second = copy.deepcopy(definition["steps"][2])
    second["name"] = "plenty"
    second["condition_statement"] = at_least(3)
    definition["steps"].append(second)
    bus, zidane = run_plan(definition, provider_parts)[0]
    assert len(bus["widths"]) == 3
    assert zidane["widths"] is None


def test_compile_rejects_decision_on_other_crops():
    # The condition decides for each crop of the people found at 0.4, and
    # gates a step that reads the crops of the people found at 0.1.
    definition = gated_crops(1)
    definition["steps"] += [
        {
            "type": "ContinueIf",
            "name": "wide",
            "condition_statement": group(
                compare(parameter("width"), "(Number) >=", static(150))
            ),
            "evaluation_parameters": {"width": "$steps.widths.output"},
            "next_steps": ["$steps.all_widths"],
        },
        {
            "type": "ObjectDetectionModel",
            "name": "everyone",
            "images": "$inputs.image",
            "model_id": "people-detector",
            "confidence": 0.1,
        },
        {
            "type": "roboflow_core/dynamic_crop@v1",
            "name": "all_crops",
            "images": "$inputs.image",
            "predictions": "$steps.everyone.predictions",
        },
        {
            "type": "PropertyDefinition",
            "name": "all_widths",
            "data": "$steps.all_crops.crops",
            "operations": [{"type": "ExtractImageProperty", "property_name": "width"}],
        },
    ]
    [error] = compile_errors(definition)
    assert (error.block_id, error.property_name) == ("wide", "next_steps")
    assert (
        "step 'wide' decides per crop of step 'crops', but step 'all_widths' "
        "runs per crop of step 'all_crops'" in error.property_details
    )


@pytest.mark.django_db
def test_skipped_condition_selects_nothing(provider_parts):
    # The condition of "enough" is true here, but a step that never runs
    # gates it.
    definition = gated_crops(1)
    definition["steps"].append(
        {
            "type": "ContinueIf",
            "name": "never",
            "condition_statement": at_least(100),
            "evaluation_parameters": {"people": "$steps.people.predictions"},
            "next_steps": ["$steps.enough"],
        }
    )
    outputs, timer = run_plan(definition, provider_parts)
    assert [output["widths"] for output in outputs] == [None, None]
    assert timer.steps["enough"] == 0
    assert timer.steps["crops"] == 0
