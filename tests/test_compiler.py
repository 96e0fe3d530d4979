"""The compiler: structured errors for every kind of invalid definition, caching."""

import copy

import pytest

from tests.conftest import image_b64
from tests.definitions import (
    compare,
    detect_then_crops,
    detection,
    detection_property,
    filtered_detection,
    image_height,
    keep_where,
    parameter,
)
from workflows.compiler import PlanCache, build_plan, definition_digest
from workflows.compiler.plan import InputRef, Literal, MappingBinding, StepRef
from workflows.errors import DefinitionError
from workflows.inputs import read_inputs


def compile_errors(definition) -> list:
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    return caught.value.errors


def test_compile_valid_detection_definition():
    plan = build_plan(detection(), "digest")
    assert [step.name for step in plan.steps] == ["people", "count"]
    assert plan.model_ids({}) == [("people", "people-detector")]


def test_compile_accepts_aliases_and_full_names():
    definition = detection()
    definition["steps"][0]["type"] = "ObjectDetectionModel"
    definition["steps"][1]["type"] = "roboflow_core/property_definition@v1"
    assert len(build_plan(definition, "digest").steps) == 2


def test_compile_accepts_property_extraction_alias():
    definition = detection()
    definition["steps"][1]["type"] = "PropertyExtraction"
    plan = build_plan(definition, "digest")
    assert plan.steps[1].block.type == "roboflow_core/property_definition@v1"


def test_compile_accepts_null_class_agnostic_nms():
    definition = detection()
    definition["steps"][0]["class_agnostic_nms"] = None
    plan = build_plan(definition, "digest")
    assert plan.steps[0].bindings["class_agnostic_nms"] == Literal(None)


def test_compile_unknown_block_type_names_step_and_field():
    definition = image_height()
    definition["steps"][0]["type"] = "roboflow_core/teleport@v1"
    [error] = compile_errors(definition)
    assert error.block_id == "h"
    assert error.property_name == "type"
    assert "teleport" in error.property_details


def test_compile_step_without_type_says_missing():
    definition = image_height()
    del definition["steps"][0]["type"]
    [error] = compile_errors(definition)
    assert error.block_id == "h"
    assert error.property_details.startswith(
        "step 'h': block type is missing (field 'type'); known types: "
    )
    assert "None" not in error.property_details


@pytest.mark.parametrize(
    ("part", "value", "problem"),
    [
        ("steps", None, "steps[0]: step name is missing (field 'name')"),
        ("steps", 7, "steps[0]: step name must be a string, not an integer"),
        ("inputs", None, "inputs[0]: input name is missing (field 'name')"),
        ("outputs", "", "outputs[0]: output name is missing (field 'name')"),
        ("outputs", ["h"], "outputs[0]: output name must be a string, not an array"),
        (
            "steps",
            "s" * 201,
            "steps[0]: step name is 201 characters long; at most 200 are allowed",
        ),
        (
            "inputs",
            "9lives",
            "inputs[0]: input name '9lives' must start with an ASCII letter or "
            "'_' and contain only ASCII letters, digits, '_' or '-'",
        ),
        (
            "inputs",
            "图像",
            "inputs[0]: input name '图像' must start with an ASCII letter or "
            "'_' and contain only ASCII letters, digits, '_' or '-'",
        ),
    ],
)
def test_compile_bad_names_say_what_is_wrong(part, value, problem):
    definition = image_height()
    if value is None:
        del definition[part][0]["name"]
    else:
        definition[part][0]["name"] = value
    errors = compile_errors(definition)
    assert problem in [error.property_details for error in errors]


def test_compile_non_object_items_name_their_place():
    definition = image_height()
    definition["inputs"].append(3)
    definition["steps"].append("h")
    definition["outputs"].append(None)
    details = [error.property_details for error in compile_errors(definition)]
    assert details == [
        "inputs[1] must be an object, not an integer",
        "steps[1] must be an object, not a string",
        "outputs[1] must be an object, not null",
    ]


def test_compile_missing_required_field():
    definition = detection()
    del definition["steps"][0]["model_id"]
    [error] = compile_errors(definition)
    assert error.block_id == "people"
    assert error.property_name == "model_id"
    assert "missing" in error.property_details


def test_compile_type_error_names_json_types():
    definition = detection()
    definition["steps"][0]["max_detections"] = None
    definition["steps"][0]["confidence"] = {"a": 1}
    errors = {e.property_name: e.property_details for e in compile_errors(definition)}
    assert errors["max_detections"] == "must be an integer, got null"
    assert errors["confidence"] == 'must be a number, got {"a": 1}'


@pytest.mark.parametrize(
    ("data", "operations", "problem"),
    [
        (
            "$inputs.image",
            [{"type": "SequenceLength"}],
            "operation 0 (SequenceLength) needs detections, a list, a string, an "
            "object or bytes, but gets an image; read a property of it first with "
            "ExtractImageProperty",
        ),
        (
            "$steps.people.predictions",
            [{"type": "ExtractImageProperty", "property_name": "width"}],
            "operation 0 (ExtractImageProperty) needs an image, but gets detections",
        ),
        (
            "$steps.people.predictions",
            [{"type": "SequenceLength"}, {"type": "SequenceLength"}],
            "operation 1 (SequenceLength) needs detections, a list, a string, an "
            "object or bytes, but gets a number",
        ),
        (
            "$steps.people.predictions",
            [{"type": "ToString"}],
            "operation 0 (ToString) needs a number, a string, a list, a boolean, "
            "an object or bytes, but gets detections",
        ),
    ],
    ids=["length-of-image", "image-property-of-detections", "length-twice", "text"],
)
def test_compile_property_operations_check_kinds(data, operations, problem):
    definition = detection()
    definition["steps"][1]["data"] = data
    definition["steps"][1]["operations"] = operations
    [error] = compile_errors(definition)
    assert error.block_id == "count"
    assert error.property_name == "operations"
    assert problem in error.property_details


def test_compile_property_chain_of_matching_kinds():
    definition = detection()
    definition["steps"][1]["operations"] = [
        {"type": "DetectionsPropertyExtract", "property_name": "class_name"},
        {"type": "SequenceLength"},
        {"type": "ToString"},
    ]
    assert len(build_plan(definition, "digest").steps) == 2


def test_compile_parameter_default_checked_against_field():
    definition = detection()
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "confidence", "default_value": 5}
    )
    definition["steps"][0]["confidence"] = "$inputs.confidence"
    [error] = compile_errors(definition)
    assert error.block_id == "people"
    assert error.property_name == "confidence"
    assert "default_value of '$inputs.confidence' is invalid" in error.property_details
    assert "from 0 to 1, got 5" in error.property_details


@pytest.mark.parametrize(
    "parameter",
    [
        {"type": "WorkflowParameter", "name": "confidence"},
        {"type": "WorkflowParameter", "name": "confidence", "default_value": None},
    ],
    ids=["no-default", "null-default"],
)
def test_compile_parameter_without_default_is_not_checked(parameter):
    definition = detection()
    definition["inputs"].append(parameter)
    definition["steps"][0]["confidence"] = "$inputs.confidence"
    assert build_plan(definition, "digest").steps


def test_compile_wrong_kind_selector():
    definition = detection()
    # An image field fed with detections.
    definition["steps"][0]["images"] = "$steps.count.output"
    errors = compile_errors(definition)
    assert errors[0].block_id == "people"
    assert errors[0].property_name == "images"


def test_compile_model_id_from_step_output_rejected():
    # Model ids are resolved before the run is queued, so one that a step
    # computes would reach the runner unresolved.
    definition = detection()
    definition["steps"][0]["model_id"] = "$steps.count.output"
    errors = compile_errors(definition)
    assert [error.block_id for error in errors] == ["people"]
    assert errors[0].property_name == "model_id"
    assert "step output" in errors[0].property_details


def test_compile_literal_where_selector_needed():
    definition = detection()
    definition["steps"][0]["images"] = "bus.jpg"
    [error] = compile_errors(definition)
    assert error.property_name == "images"
    assert "literal" in error.property_details


@pytest.mark.parametrize(
    "field, selector",
    [("images", "$inputs.image\n"), ("data", "$steps.people.predictions\n")],
    ids=["input", "step-output"],
)
def test_compile_selector_with_trailing_newline(field, selector):
    definition = detection()
    step = 0 if field == "images" else 1
    definition["steps"][step][field] = selector
    [error] = compile_errors(definition)
    assert error.property_name == field
    assert "not a valid selector" in error.property_details


def test_compile_output_selector_with_trailing_newline():
    definition = detection()
    definition["outputs"][0]["selector"] += "\n"
    [error] = compile_errors(definition)
    assert error.property_name == "outputs.predictions.selector"


def test_compile_selector_to_missing_input():
    definition = image_height()
    definition["steps"][0]["data"] = "$inputs.photo"
    [error] = compile_errors(definition)
    assert error.block_id == "h"
    assert error.property_name == "data"
    assert "photo" in error.property_details


def test_compile_selector_to_missing_step():
    definition = detection()
    definition["steps"][1]["data"] = "$steps.ghost.predictions"
    [error] = compile_errors(definition)
    assert error.block_id == "count"
    assert "ghost" in error.property_details


def test_compile_selector_to_missing_output():
    definition = detection()
    definition["steps"][1]["data"] = "$steps.people.boxes"
    [error] = compile_errors(definition)
    assert error.block_id == "count"
    assert "boxes" in error.property_details


def test_compile_output_selector_to_missing_step():
    definition = image_height()
    definition["outputs"][0]["selector"] = "$steps.nowhere.output"
    [error] = compile_errors(definition)
    assert error.property_name == "outputs.height.selector"


def test_compile_duplicate_step_names():
    definition = image_height()
    definition["steps"].append(copy.deepcopy(definition["steps"][0]))
    [error] = compile_errors(definition)
    assert error.block_id == "h"
    assert "twice" in error.property_details


def test_compile_duplicate_input_names():
    definition = image_height()
    definition["inputs"].append({"type": "WorkflowImage", "name": "image"})
    [error] = compile_errors(definition)
    assert "twice" in error.property_details


def batch_input(**fields) -> dict:
    """Return image_height() with its image input declared as a WorkflowBatchInput."""
    definition = image_height()
    definition["inputs"] = [{"type": "WorkflowBatchInput", "name": "image", **fields}]
    return definition


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": ["image"]},
        {"kind": [{"name": "image", "description": "Image"}], "dimensionality": 1},
    ],
    ids=["name", "kind-object"],
)
def test_compile_batch_input_of_images(fields):
    plan = build_plan(batch_input(**fields), "digest")
    assert [spec.name for spec in plan.image_inputs] == ["image"]


def test_batch_input_reads_list_of_images():
    plan = build_plan(batch_input(kind=["image"]), "digest")
    image = {"type": "base64", "value": image_b64()}
    inputs = read_inputs(plan, {"image": [image, image]}, max_pixels=10_000_000)
    assert inputs.batch_size == 2


@pytest.mark.parametrize(
    ("fields", "key", "problem"),
    [
        (
            {},
            "kind",
            "input 'image' is a WorkflowBatchInput of kind [\"*\"], which is not "
            'supported: only a batch of images, "kind": ["image"], is. For one '
            "value per run use a WorkflowParameter",
        ),
        (
            {"kind": ["string"]},
            "kind",
            "input 'image' is a WorkflowBatchInput of kind [\"string\"], which is "
            "not supported",
        ),
        (
            {"kind": ["image", "string"]},
            "kind",
            'input \'image\' is a WorkflowBatchInput of kind ["image", "string"]',
        ),
        (
            {"kind": ["image"], "dimensionality": 2},
            "dimensionality",
            "input 'image' has dimensionality 2, which is not supported: only 1, "
            "one image per element of the batch, is",
        ),
        (
            {"kind": [["image"]]},
            "kind",
            "input 'image' is a WorkflowBatchInput of kind [[\"image\"]], which "
            "is not supported",
        ),
        (
            {"kind": [{"name": ["image"]}]},
            "kind",
            'input \'image\' is a WorkflowBatchInput of kind [{"name": ["image"]}]',
        ),
    ],
    ids=["any-kind", "strings", "mixed", "nested", "list-in-list", "list-name"],
)
def test_compile_rejects_batch_input_not_images(fields, key, problem):
    # The step that reads the rejected input gets no second error saying
    # that no such input is declared.
    (error,) = compile_errors(batch_input(**fields))
    assert error.block_id is None
    assert error.block_type == "WorkflowBatchInput"
    assert error.property_name == f"inputs[0].{key}"
    assert error.property_details.startswith(problem)


def test_rejected_input_reported_once():
    definition = image_height()
    definition["inputs"][0]["type"] = "WorkflowPicture"
    definition["outputs"].append(
        {"type": "JsonField", "name": "image", "selector": "$inputs.image"}
    )

    (error,) = compile_errors(definition)

    assert error.property_name == "inputs[0].type"
    assert "unknown input type 'WorkflowPicture'" in error.property_details


def test_reading_ignored_input_is_an_error():
    definition = image_height()
    definition["inputs"].append({"type": "WorkflowVideoMetadata", "name": "video"})
    definition["outputs"].append(
        {"type": "JsonField", "name": "video", "selector": "$inputs.video"}
    )

    (error,) = compile_errors(definition)

    assert error.property_details == "output 'video': '$inputs.video' names no input"


def test_compile_cycle_names_the_steps():
    definition = image_height()
    definition["steps"] = [
        {
            "type": "PropertyDefinition",
            "name": "a",
            "data": "$steps.b.output",
            "operations": [{"type": "SequenceLength"}],
        },
        {
            "type": "PropertyDefinition",
            "name": "b",
            "data": "$steps.a.output",
            "operations": [{"type": "SequenceLength"}],
        },
    ]
    definition["outputs"][0]["selector"] = "$steps.a.output"
    [error] = compile_errors(definition)
    assert "cycle" in error.property_details
    assert "a" in error.property_details
    assert "b" in error.property_details


# A filter that reads one entry of operations_parameters.
CLASS_ID_BELOW_LIMIT = keep_where(
    compare(detection_property("class_id"), "(Number) <", parameter("limit"))
)


def test_compile_mapping_field_binds_each_value():
    definition = filtered_detection(
        CLASS_ID_BELOW_LIMIT,
        {"limit": "$steps.count.output", "names": "$inputs.names", "fixed": [0.5]},
    )
    definition["inputs"].append({"type": "WorkflowParameter", "name": "names"})
    # The filter comes before the step it reads, so only the binding of
    # operations_parameters orders them.
    people, count, filter_step = definition["steps"]
    definition["steps"] = [people, filter_step, count]
    plan = build_plan(definition, "digest")
    assert [step.name for step in plan.steps] == ["people", "count", "filter"]
    assert plan.steps[2].bindings["operations_parameters"] == MappingBinding(
        (
            ("limit", StepRef("count", "output")),
            ("names", InputRef("names")),
            ("fixed", Literal([0.5])),
        )
    )


def test_compile_mapping_field_without_value_is_empty():
    plan = build_plan(filtered_detection([]), "digest")
    assert plan.steps[2].bindings["operations_parameters"] == Literal({})


def test_compile_mapping_field_cycle_names_it():
    definition = filtered_detection(
        CLASS_ID_BELOW_LIMIT, {"limit": "$steps.count.output"}
    )
    definition["steps"][1]["data"] = "$steps.filter.predictions"
    [error] = compile_errors(definition)
    assert error.block_id == "filter"
    assert error.property_name == "operations_parameters"
    assert error.property_details == "steps form a cycle: filter -> count -> filter"


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        (
            "$inputs.limit",
            "must be an object whose values are literals or selectors such as "
            '{"name": "$inputs.name"}, got "$inputs.limit"',
        ),
        (
            {"limit": "$inputs.image"},
            "'$inputs.image' is an image input, this field needs a parameter input",
        ),
        (
            {"limit": "$steps.people.predictions"},
            "'$steps.people.predictions' is of kind 'object_detection_prediction', "
            "this field needs 'value'",
        ),
        (
            {"limit": "$inputs.nowhere"},
            "'$inputs.nowhere' names no input; declared inputs: image",
        ),
        (
            {"limit": "$steps.count"},
            "'$steps.count' at key 'limit' is not a valid selector; use "
            "$inputs.<name> or $steps.<step>.<output>",
        ),
    ],
    ids=["selector", "image-input", "detections-output", "no-input", "bad-selector"],
)
def test_compile_mapping_field_rejects_value(parameters, problem):
    [error] = compile_errors(filtered_detection(CLASS_ID_BELOW_LIMIT, parameters))
    assert error.block_id == "filter"
    assert error.property_name == "operations_parameters"
    assert error.property_details == problem


def test_compile_mapping_field_reports_every_value():
    parameters = {"limit": "$inputs.nowhere", "other": "$steps.ghost.output"}
    errors = compile_errors(filtered_detection(CLASS_ID_BELOW_LIMIT, parameters))
    assert [error.property_details for error in errors] == [
        "'$inputs.nowhere' names no input; declared inputs: image",
        "'$steps.ghost' names no step",
    ]


def test_compile_reports_every_problem_at_once():
    definition = detection()
    definition["steps"][0]["confidence"] = 7
    definition["steps"][1]["data"] = "$steps.ghost.predictions"
    assert len(compile_errors(definition)) == 2


def test_compile_error_counts_one_more_problem():
    definition = detection()
    definition["steps"][0]["confidence"] = 7
    definition["steps"][1]["data"] = "$steps.ghost.predictions"
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    assert "(and 1 more problem, listed in blocks_errors)" in caught.value.message


def test_compile_rejects_non_object():
    [error] = compile_errors(["not", "a", "definition"])
    assert "JSON object" in error.property_details


def test_compile_error_body_has_roboflow_fields():
    definition = image_height()
    definition["steps"][0]["type"] = "Nope"
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    body = caught.value.to_dict()
    assert body["blocks_errors"][0]["block_id"] == "h"
    assert body["context"].startswith("workflow_compilation")
    assert body["code"] == "invalid_definition"


def test_digest_ignores_key_order():
    definition = detection()
    reordered = {key: definition[key] for key in reversed(list(definition))}
    reordered["steps"] = [dict(reversed(list(s.items()))) for s in definition["steps"]]
    assert definition_digest(definition) == definition_digest(reordered)


def test_plan_cache_hit_on_reordered_definition():
    cache = PlanCache()
    first = cache.compile(detection())
    reordered = dict(reversed(list(detection().items())))
    second = cache.compile(reordered)
    assert first.cache_hit is False
    assert second.cache_hit is True
    assert second.plan is first.plan
    assert second.duration_ns > 0


def test_plan_is_immutable():
    plan = build_plan(image_height(), "digest")
    with pytest.raises(AttributeError):
        plan.steps = ()


@pytest.mark.parametrize("version", ["1.0", "1", "1.3.0", None])
def test_version_strings_roboflow_accepts(version):
    definition = image_height()
    definition["version"] = version
    assert len(build_plan(definition, "digest").steps) == 1


@pytest.mark.parametrize("version", [1, 1.0, 1.5])
def test_number_version_warned(version):
    definition = image_height()
    definition["version"] = version
    plan = build_plan(definition, "digest")
    assert len(plan.steps) == 1
    [warning] = [w for w in plan.warnings if "'version'" in w]
    assert "write it as a string" in warning


def test_missing_version_accepted():
    definition = image_height()
    del definition["version"]
    assert len(build_plan(definition, "digest").steps) == 1


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        (2, "'version' must be a string such as \"1.0\", not an integer"),
        (0.5, "'version' must be a string such as \"1.0\", not a number"),
        (True, "'version' must be a string such as \"1.0\", not a boolean"),
        ("one", "'version' 'one' is not a version number such as \"1.0\""),
        ("", "'version' '' is not a version number"),
        ("2.0", "'version' '2.0' is not supported: this server reads version 1"),
        # Over Python's 4,300-digit limit on converting a string to an int.
        ("1" * 5000, "'version' '1111111111"),
    ],
    ids=["integer", "number", "boolean", "word", "empty", "major-2", "5000-digits"],
)
def test_invalid_version_rejected(version, problem):
    definition = image_height()
    definition["version"] = version
    [error] = compile_errors(definition)
    assert error.block_id is None
    assert error.property_name == "version"
    assert error.property_details.startswith(problem)


def test_unused_fields_become_warnings():
    definition = image_height()
    definition["steps"][0]["disable_active_learning"] = True
    plan = build_plan(definition, "digest")
    assert any("disable_active_learning" in w for w in plan.warnings)


def test_field_spellings_roboflow_accepts():
    definition = detect_then_crops("yolov8n.yaml")
    steps = {step["name"]: step for step in definition["steps"]}
    steps["people"]["image"] = steps["people"].pop("images")
    steps["crops"]["image"] = steps["crops"].pop("images")
    steps["crops"]["detections"] = steps["crops"].pop("predictions")
    plan = build_plan(definition, "digest")
    bindings = {step.name: step.bindings for step in plan.steps}
    assert bindings["people"]["images"] == InputRef("image")
    assert bindings["crops"]["images"] == InputRef("image")
    assert bindings["crops"]["predictions"] == StepRef("people", "predictions")
    assert plan.warnings == ()


def test_field_given_under_two_spellings_rejected():
    definition = detection()
    definition["steps"][0]["image"] = "$inputs.image"
    [error] = compile_errors(definition)
    assert error.block_id == "people"
    assert error.property_name == "images"
    assert "given twice, as 'images' and 'image'" in error.property_details


def test_crop_steps_nest_one_level():
    definition = detection("yolov8n.yaml")
    definition["steps"].append(
        {
            "type": "DynamicCrop",
            "name": "crops",
            "images": "$inputs.image",
            "predictions": "$steps.people.predictions",
        }
    )
    definition["steps"].append(
        {
            "type": "ObjectDetectionModel",
            "name": "inner",
            "images": "$steps.crops.crops",
            "model_id": "yolov8n.yaml",
        }
    )
    plan = build_plan(definition, "digest")
    dimensions = {step.name: step.dimension for step in plan.steps}
    assert dimensions["crops"] == 1
    assert dimensions["inner"] == 1
    assert dimensions["people"] == 0


def two_crop_steps() -> dict:
    """Return crops of the people found, a model on them, and a second crop step.

    ``inner`` runs per crop of step ``crops``; ``other_crops`` cuts the same
    boxes again, so its crops are as many but of another step.
    """
    definition = detect_then_crops("yolov8n.yaml")
    definition["steps"].append(
        {
            "type": "DynamicCrop",
            "name": "other_crops",
            "images": "$inputs.image",
            "predictions": "$steps.people.predictions",
        }
    )
    return definition


def test_compile_rejects_crops_of_two_crop_steps():
    definition = two_crop_steps()
    definition["steps"].append(
        {
            "type": "BoundingBoxVisualization",
            "name": "boxes",
            "image": "$steps.other_crops.crops",
            "predictions": "$steps.inner.predictions",
        }
    )
    [error] = compile_errors(definition)
    assert error.block_id == "boxes"
    assert error.block_type == "roboflow_core/bounding_box_visualization@v1"
    assert error.property_name == "predictions"
    assert (
        "'$steps.inner.predictions' is per crop of step 'crops', but "
        "'$steps.other_crops.crops' (field 'image') is per crop of step "
        "'other_crops'" in error.property_details
    )
    assert "read both from the crops of one crop step" in error.property_details


def test_compile_rejects_nested_crops_of_other_crop_step():
    definition = two_crop_steps()
    definition["steps"] += [
        {
            "type": "DynamicCrop",
            "name": "inner_crops",
            "images": "$steps.crops.crops",
            "predictions": "$steps.inner.predictions",
        },
        {
            "type": "BoundingBoxVisualization",
            "name": "boxes",
            "image": "$steps.other_crops.crops",
            "predictions": "$steps.inner_crops.predictions",
        },
    ]
    [error] = compile_errors(definition)
    assert (error.block_id, error.property_name) == ("boxes", "image")
    assert (
        "is per crop of step 'inner_crops' (nested in the crops of step 'crops')"
        in error.property_details
    )


def test_compile_accepts_crops_with_parent_images():
    definition = two_crop_steps()
    definition["steps"] += [
        {
            "type": "DynamicCrop",
            "name": "inner_crops",
            "images": "$steps.crops.crops",
            "predictions": "$steps.inner.predictions",
        },
        {
            "type": "BoundingBoxVisualization",
            "name": "boxes",
            "image": "$steps.crops.crops",
            "predictions": "$steps.inner.predictions",
        },
    ]
    plan = build_plan(definition, "digest")
    dimensions = {step.name: step.dimension for step in plan.steps}
    assert dimensions["inner_crops"] == 2
    assert dimensions["boxes"] == 1
    assert dimensions["other_crops"] == 1
