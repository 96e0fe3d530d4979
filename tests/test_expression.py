"""Expression: Roboflow's switch of cases over named variables."""

import numpy as np
import pytest

from tests.definitions import compare, detection, group, parameter, static
from workflows.blocks.base import StepContext
from workflows.blocks.expression.v1 import ExpressionBlock, parsed_cases
from workflows.compiler import build_plan
from workflows.detections import Detections
from workflows.errors import DefinitionError, StepExecutionError


def people(*classes: str) -> Detections:
    """Return one 10x10 detection per class name, side by side."""
    count = len(classes)
    return Detections(
        xyxy=np.array(
            [[10 * i, 0, 10 * i + 10, 10] for i in range(count)], dtype=np.float32
        ).reshape(-1, 4),
        confidence=np.full(count, 0.5, dtype=np.float32),
        class_id=np.zeros(count, dtype=np.int64),
        class_names=list(classes),
        image_size=(100, 100),
        parent_id="image",
    )


def case(condition: dict, result: dict) -> dict:
    return {"type": "CaseDefinition", "condition": condition, "result": result}


def static_result(value) -> dict:
    return {"type": "StaticCaseResult", "value": value}


def dynamic_result(name: str, operations: list | None = None) -> dict:
    found = {"type": "DynamicCaseResult", "parameter_name": name}
    if operations is not None:
        found["operations"] = operations
    return found


def switch(*cases: dict, default: dict | None = None) -> dict:
    return {
        "type": "CasesDefinition",
        "cases": list(cases),
        "default": default or static_result("FAIL"),
    }


# Roboflow's example: PASS when the detected class names equal the reference.
CLASS_NAMES_MATCH = switch(
    case(
        group(compare(parameter("class_name"), "==", parameter("reference"))),
        static_result("PASS"),
    )
)
CLASS_NAME_OPERATIONS = {
    "class_name": [{"type": "DetectionsPropertyExtract", "property_name": "class_name"}]
}


def evaluate(data: dict, cases: dict, operations: dict | None = None):
    return ExpressionBlock().run(
        StepContext(step_name="verdict", models=None, timer=None),
        data=data,
        data_operations=operations or {},
        switch=cases,
    )["output"]


def test_first_matching_case_wins():
    cases = switch(
        case(
            group(compare(parameter("n"), "(Number) >", static(5))),
            static_result("many"),
        ),
        case(
            group(compare(parameter("n"), "(Number) >", static(0))),
            static_result("some"),
        ),
        default=static_result("none"),
    )
    assert evaluate({"n": 9}, cases) == "many"
    assert evaluate({"n": 3}, cases) == "some"
    assert evaluate({"n": 0}, cases) == "none"


def test_data_operations_transform_detections():
    data = {"class_name": people("person", "bus"), "reference": ["person", "bus"]}
    assert evaluate(data, CLASS_NAMES_MATCH, CLASS_NAME_OPERATIONS) == "PASS"
    data["reference"] = ["bus", "person"]
    assert evaluate(data, CLASS_NAMES_MATCH, CLASS_NAME_OPERATIONS) == "FAIL"


def test_detections_compared_by_value():
    # Roboflow's detections (supervision's Detections) compare equal when
    # their arrays and data are equal, so a case can test whether a
    # transformation changed any detection.
    cases = switch(
        case(
            group(compare(parameter("before"), "==", parameter("after"))),
            static_result("unchanged"),
        ),
        default=static_result("changed"),
    )

    before = people("person", "bus")
    same = before.take(np.arange(2))
    assert evaluate({"before": before, "after": same}, cases) == "unchanged"
    assert evaluate({"before": before, "after": before.take(np.arange(1))}, cases) == (
        "changed"
    )

    renamed = before.take(np.arange(2))
    renamed.class_names = ["person", "car"]
    assert evaluate({"before": before, "after": renamed}, cases) == "changed"

    moved = before.take(np.arange(2))
    moved.xyxy = moved.xyxy + 1
    assert evaluate({"before": before, "after": moved}, cases) == "changed"

    listed = switch(
        case(
            group(compare(parameter("after"), "in (Sequence)", parameter("seen"))),
            static_result("seen"),
        ),
        default=static_result("new"),
    )
    assert evaluate({"after": same, "seen": [before]}, listed) == "seen"
    assert evaluate({"after": moved, "seen": [before]}, listed) == "new"


def test_dynamic_result_returns_variable():
    cases = switch(
        case(
            group(compare(parameter("found"), "(Number) >", static(0))),
            dynamic_result("found"),
        ),
        default=dynamic_result("found", [{"type": "ToString"}]),
    )
    counting = {"found": [{"type": "SequenceLength"}]}
    assert evaluate({"found": people("a", "b")}, cases, counting) == 2
    assert evaluate({"found": people()}, cases, counting) == "0"


def test_dynamic_result_operations_apply():
    cases = switch(
        default=dynamic_result(
            "found",
            [{"type": "DetectionsPropertyExtract", "property_name": "class_name"}],
        )
    )
    assert evaluate({"found": people("a", "b")}, cases) == ["a", "b"]


def test_no_cases_returns_default():
    assert evaluate({"n": 1}, switch(default=static_result(None))) is None


def test_failed_operation_rejects_step():
    with pytest.raises(StepExecutionError) as caught:
        evaluate({"n": 3}, switch(), {"n": [{"type": "SequenceLength"}]})
    assert caught.value.user_error is True
    assert caught.value.step == "verdict"
    assert "SequenceLength needs" in caught.value.message


def test_failed_comparison_rejects_step():
    cases = switch(
        case(group(compare(parameter("n"), "(Number) >", static(5))), static_result(1))
    )
    with pytest.raises(StepExecutionError) as caught:
        evaluate({"n": "x"}, cases)
    assert "cases[0].condition.statements[0]: (Number) > failed" in (
        caught.value.message
    )


def test_switch_parsed_once_per_object():
    assert parsed_cases(CLASS_NAMES_MATCH) is parsed_cases(CLASS_NAMES_MATCH)


# Compile errors.


def expression_definition(**fields) -> dict:
    definition = detection()
    step = {
        "type": "roboflow_core/expression@v1",
        "name": "verdict",
        "data": {"class_name": "$steps.people.predictions", "reference": ["Normal"]},
        "data_operations": CLASS_NAME_OPERATIONS,
        "switch": CLASS_NAMES_MATCH,
    }
    step.update(fields)
    definition["steps"].append(step)
    definition["outputs"].append(
        {"type": "JsonField", "name": "verdict", "selector": "$steps.verdict.output"}
    )
    return definition


def compile_errors(definition: dict) -> list:
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    return caught.value.errors


def test_compile_accepts_roboflow_example():
    plan = build_plan(expression_definition(type="Expression"), "digest")
    assert [step.name for step in plan.steps][-1] == "verdict"


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        (
            {"switch": {"type": "Cases"}},
            "switch",
            'such as {"type": "CasesDefinition"}',
        ),
        (
            {"switch": {"type": "CasesDefinition", "cases": []}},
            "switch",
            '"default" is missing',
        ),
        (
            {"switch": switch(default={"type": "StaticCaseResult"})},
            "switch",
            'switch.default: "value" is missing',
        ),
        (
            {"switch": switch(case(group(), static_result(1)))},
            "switch",
            "switch.cases[0].condition.statements: must be a non-empty list",
        ),
        (
            {"switch": switch(default=dynamic_result("other"))},
            "switch",
            'switch.default.parameter_name: "other" is not a key of data',
        ),
        (
            {"data_operations": {"other": [{"type": "SequenceLength"}]}},
            "data_operations",
            '"other" is not a key of data',
        ),
        (
            {"data_operations": {"class_name": [{"type": "Nope"}]}},
            "data_operations",
            "unknown type 'Nope'",
        ),
        ({"data": {"x": "$steps.nope.output"}}, "data", "names no step"),
    ],
)
def test_compile_rejects_bad_field(fields, field, problem):
    errors = compile_errors(expression_definition(**fields))
    assert errors[0].block_id == "verdict"
    assert errors[0].property_name == field
    assert problem in errors[0].property_details


def nested_list(depth: int) -> list:
    """Return ``[[...[1]...]]``, ``depth`` lists deep."""
    value: list = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        (
            {"switch": switch(default=static_result(nested_list(900)))},
            "switch",
            "nests lists and objects more than 100 levels deep",
        ),
        (
            {"data": {"deep": nested_list(101), "class_name": "$inputs.image"}},
            "data",
            "the value at key 'deep' nests lists and objects more than 100",
        ),
    ],
    ids=["static-result", "data-literal"],
)
def test_compile_rejects_deep_literal(fields, field, problem):
    # Runners walk step outputs recursively, so a run would fail with a
    # RecursionError reported as a platform failure.
    errors = compile_errors(expression_definition(**fields))
    assert errors[0].block_id == "verdict"
    assert errors[0].property_name == field
    assert problem in errors[0].property_details


def test_compile_accepts_literal_at_depth_limit():
    cases = switch(default=static_result(nested_list(97)))
    plan = build_plan(expression_definition(switch=cases), "digest")
    assert [step.name for step in plan.steps][-1] == "verdict"
