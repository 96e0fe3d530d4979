"""Property definition: Roboflow's operations on detections, numbers and text."""

import base64
import json

import cv2
import numpy as np
import pytest

from tests.conftest import image_b64, image_bytes
from tests.definitions import detection, image_height
from workflows.blocks.base import StepContext
from workflows.blocks.property_definition.v1 import PropertyDefinitionBlock
from workflows.compiler import build_plan, definition_digest
from workflows.deadline import Deadline
from workflows.detections import Detections
from workflows.errors import DefinitionError, StepExecutionError
from workflows.executor import collect_outputs, execute_plan
from workflows.images import WorkflowImage
from workflows.timing import RunTimer


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


def apply(value, *operations: dict):
    context = StepContext(step_name="property", models=None, timer=None)
    return PropertyDefinitionBlock().run(
        context, data=value, operations=list(operations)
    )["output"]


@pytest.mark.parametrize(
    ("value", "operation", "expected"),
    [
        ("2.7", {"type": "ToNumber", "cast_to": "int"}, 2),
        ("2.5", {"type": "ToNumber", "cast_to": "float"}, 2.5),
        (True, {"type": "ToNumber", "cast_to": "int"}, 1),
        (2.345, {"type": "NumberRound", "decimal_digits": 2}, 2.35),
        (3, {"type": "Multiply", "other": 1.5}, 4.5),
        (3, {"type": "Divide", "other": 2}, 1.5),
        (0.0, {"type": "ToBoolean"}, False),
        ("Fall", {"type": "StringToLowerCase"}, "fall"),
        ("Fall", {"type": "StringToUpperCase"}, "FALL"),
        # Python's slice: the default end of -1 leaves out the last character.
        ("person", {"type": "StringSubSequence"}, "perso"),
        ("person", {"type": "StringSubSequence", "start": 1, "end": 3}, "er"),
        ("person-1", {"type": "StringMatches", "regex": r"-\d$"}, True),
        ("a", {"type": "LookupTable", "lookup_table": {"a": 1}}, 1),
        (["a", "b"], {"type": "SequenceMap", "lookup_table": {"a": 1, "b": 2}}, [1, 2]),
        ([1, "a"], {"type": "SequenceJoin"}, "1, a"),
        ([1, "a"], {"type": "SequenceJoin", "separator": "|"}, "1|a"),
        (["a", "b", "b"], {"type": "SequenceAggregate", "mode": "most_common"}, "b"),
        (["a", "b", "b"], {"type": "SequenceAggregate", "mode": "least_common"}, "a"),
        (["a", "b"], {"type": "SequenceAggregate", "mode": "last"}, "b"),
        ([3, 1, 2], {"type": "NumericSequenceAggregate", "function": "max"}, 3),
        ([3, 1, 2], {"type": "NumericSequenceAggregate", "function": "sum"}, 6),
        (
            [],
            {"type": "NumericSequenceAggregate", "function": "min", "neutral_value": 0},
            0,
        ),
        (["a", "b", "a"], {"type": "SequenceElementsCount"}, {"a": 2, "b": 1}),
        # Roboflow cuts keys to 128 characters, so these two count together.
        (
            ["x" * 130, "x" * 129, "x" * 128],
            {"type": "SequenceElementsCount"},
            {"x" * 128 + " [...]": 2, "x" * 128: 1},
        ),
        ({"a": [1, None]}, {"type": "ConvertDictionaryToJSON"}, '{"a": [1, null]}'),
        (
            [1.25, 2.5],
            {
                "type": "SequenceApply",
                "operations": [
                    {"type": "Multiply", "other": 2},
                    {"type": "ToString"},
                ],
            },
            ["2.5", "5.0"],
        ),
    ],
)
def test_value_operation_results(value, operation, expected):
    assert apply(value, operation) == expected


def test_number_round_integer_far_left():
    # Python's round(5, -10**8) computes 10**(10**8) and takes minutes.
    assert apply(5, {"type": "NumberRound", "decimal_digits": -(10**8)}) == 0
    assert apply(-5, {"type": "NumberRound", "decimal_digits": -(10**8)}) == 0


@pytest.mark.parametrize("value", [5, -5, 15, 10**50 + 1, -7 * 10**50, 2**200])
def test_number_round_integer_matches_python(value):
    for digits in range(-80, 3):
        operation = {"type": "NumberRound", "decimal_digits": digits}
        assert apply(value, operation) == round(value, digits), digits


def test_chain_on_detection_confidences():
    percent = extract(
        two_boxes(),
        "confidence",
        {
            "type": "SequenceApply",
            "operations": [
                {"type": "Multiply", "other": 100},
                {"type": "NumberRound", "decimal_digits": 0},
            ],
        },
        {"type": "NumericSequenceAggregate", "function": "max"},
    )
    assert percent == 90


@pytest.mark.parametrize(
    ("value", "operation", "message"),
    [
        (
            "3",
            {"type": "Multiply", "other": 2},
            "Multiply needs a number, got a string",
        ),
        (3, {"type": "Divide", "other": 0}, "Divide cannot divide 3 by 0"),
        ("x", {"type": "ToNumber", "cast_to": "int"}, 'ToNumber cannot convert "x"'),
        (
            "c",
            {"type": "LookupTable", "lookup_table": {"a": 1}},
            'LookupTable "c" is not a key of lookup_table (keys: "a")',
        ),
        (
            "z",
            {
                "type": "LookupTable",
                "lookup_table": {f"k{number}": number for number in range(25)},
            },
            'LookupTable "z" is not a key of lookup_table (keys: '
            + ", ".join(f'"k{number}"' for number in range(20))
            + ", and 5 more). JSON keys are strings",
        ),
        (
            "z",
            {"type": "LookupTable", "lookup_table": {}},
            'LookupTable "z" is not a key of lookup_table (keys: none)',
        ),
        (
            ["x" * 600_000] * 3,
            {"type": "SequenceJoin"},
            "SequenceJoin the joined string would be longer than 1000000 "
            "characters, the maximum: the first 2 of 3 items make 1200002",
        ),
        (
            [],
            {"type": "SequenceAggregate", "mode": "first"},
            "SequenceAggregate cannot aggregate an empty list",
        ),
        (
            5,
            {"type": "SequenceApply", "operations": [{"type": "ToString"}]},
            "SequenceApply needs a list, got an integer",
        ),
        (
            10**4299,
            {"type": "Multiply", "other": 10},
            "Multiply failed on 1000000000000000000000000000000000000000000000000"
            "000000000000000000000000000000…: the result has more than 4300 digits",
        ),
        (
            [int("9" * 4300), 1],
            {"type": "NumericSequenceAggregate", "function": "sum"},
            f"NumericSequenceAggregate failed on [{'9' * 78}…: the result has more "
            "than 4300 digits",
        ),
        (
            int("9" * 4300),
            {"type": "NumberRound", "decimal_digits": -1},
            "NumberRound failed on 9999999999999999999999999999999999999999999999999"
            "999999999999999999999999999999…: the result has more than 4300 digits",
        ),
        (
            # 800 bytes of JSON that would stand for 80 MB.
            ["a"] * 400,
            {"type": "SequenceMap", "lookup_table": {"a": "x" * 200_000}},
            "SequenceMap result of 400 items would be about 80001602 characters "
            "long as JSON; at most 67108864 are allowed",
        ),
        (
            ["a"] * 400,
            {
                "type": "SequenceApply",
                "operations": [
                    {"type": "LookupTable", "lookup_table": {"a": "x" * 200_000}}
                ],
            },
            "SequenceApply result of 400 items would be about 80001602 characters "
            "long as JSON; at most 67108864 are allowed",
        ),
        (
            # Each search takes about 0.03 s, far under the limit of one, but
            # together they would take 12 s.
            ["a" * 24 + "!"] * 400,
            {
                "type": "SequenceApply",
                "operations": [{"type": "StringMatches", "regex": "^(a|aa)+$"}],
            },
            'StringMatches regex "^(a|aa)+$" was stopped on a string of 25 '
            "characters: StringMatches searches took 5.0 s in all, the most that "
            "a step's run or a definition's compilation may spend on them",
        ),
        (
            {"confidence": float("nan")},
            {"type": "ConvertDictionaryToJSON"},
            "ConvertDictionaryToJSON failed: Out of range float values",
        ),
        (
            # Backtracks for years with Python's re.
            "a" * 60 + "!",
            {"type": "StringMatches", "regex": "^(a|aa)+$"},
            'StringMatches regex "^(a|aa)+$" was stopped after 0.5 s on a string '
            "of 61 characters: it backtracks too much",
        ),
    ],
    ids=[
        "multiply-string",
        "divide-zero",
        "to-number",
        "lookup",
        "lookup-many-keys",
        "lookup-empty-table",
        "join-length",
        "empty",
        "apply",
        "multiply-digits",
        "sum-digits",
        "round-digits",
        "map-length",
        "apply-length",
        "regex-total",
        "json-nan",
        "regex-backtracking",
    ],
)
def test_value_operation_failure_names_it(value, operation, message):
    with pytest.raises(StepExecutionError) as caught:
        apply(value, operation)
    assert caught.value.step == "property"
    assert caught.value.user_error is True
    assert caught.value.message.startswith(f"step 'property': {message}")


class Unprintable:
    """A list item whose text fails, to show that an operation never writes it."""

    def __str__(self) -> str:
        raise AssertionError("str() was called on an item past the limit")


def test_sequence_join_stops_at_limit():
    items = ["x" * 1_000_001, Unprintable()]
    with pytest.raises(StepExecutionError) as caught:
        apply(items, {"type": "SequenceJoin"})
    assert "the first 1 of 2 items make 1000001" in caught.value.message


def definition_with(data: str, operations: list) -> dict:
    definition = image_height()
    definition["inputs"].append({"type": "WorkflowParameter", "name": "label"})
    definition["steps"][0]["data"] = data
    definition["steps"][0]["operations"] = operations
    return definition


@pytest.mark.parametrize(
    ("operations", "problem"),
    [
        (
            [
                {"type": "ExtractImageProperty", "property_name": "width"},
                {"type": "StringToLowerCase"},
            ],
            "operation 1 (StringToLowerCase) needs a string, but gets a number; "
            "remove it or reorder the operations",
        ),
        (
            [{"type": "Multiply"}],
            'operation 0 (Multiply): "other" is missing',
        ),
        (
            [{"type": "Divide", "other": "2"}],
            'operation 0 (Divide): other must be a number, got "2"',
        ),
        (
            [{"type": "StringSubSequence", "begin": 1}],
            'operation 0 (StringSubSequence): unknown key "begin"; a '
            "StringSubSequence has the keys type, start, end",
        ),
        (
            [{"type": "StringMatches", "regex": "("}],
            'operation 0 (StringMatches): regex "(" is not a valid regular expression',
        ),
        (
            [{"type": "SequenceApply", "operations": [{"type": "Round"}]}],
            "operation 0 (SequenceApply): operations: operation 0 has unknown "
            "type 'Round'; supported: ExtractImageProperty",
        ),
        (
            [{"type": "ClassificationPropertyExtract"}],
            "operation 0 has unknown type 'ClassificationPropertyExtract'; "
            "supported: ExtractImageProperty, SequenceLength",
        ),
        (
            [{"type": "ConvertImageToJPEG", "compression_level": 0}],
            "operation 0 (ConvertImageToJPEG): compression_level must be an "
            "integer from 1 to 100, got 0",
        ),
        (
            [
                {"type": "ExtractImageProperty", "property_name": "width"},
                {"type": "ConvertImageToBase64"},
            ],
            "operation 1 (ConvertImageToBase64) needs an image, but gets a number",
        ),
        (
            [{"type": "ConvertImageToJPEG"}, {"type": "StringToLowerCase"}],
            "operation 1 (StringToLowerCase) needs a string, but gets bytes",
        ),
        (
            [{"type": "RandomNumber", "max_value": "1"}],
            'operation 0 (RandomNumber): max_value must be a number, got "1"',
        ),
        (
            # Valid JSON, but too large for a float, which math.isfinite()
            # converts it to.
            [{"type": "RandomNumber", "min_value": 10**400}],
            "operation 0 (RandomNumber): min_value must be a number, got 1000",
        ),
        (
            [{"type": "Multiply", "other": -(10**400)}],
            "operation 0 (Multiply): other must be a number, got -1000",
        ),
        (
            [{"type": "TimestampToISOFormat"}],
            "operation 0 (TimestampToISOFormat) is not supported: it reads a "
            "timestamp, which only ExtractFrameMetadata makes from a video frame",
        ),
    ],
    ids=[
        "kind",
        "missing",
        "type",
        "unknown-key",
        "regex",
        "nested",
        "unsupported",
        "jpeg-quality",
        "base64-of-number",
        "text-of-bytes",
        "random-bound",
        "random-huge-bound",
        "multiply-huge-integer",
        "timestamp",
    ],
)
def test_compile_rejects_bad_operations(operations, problem):
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition_with("$inputs.image", operations), "digest")
    [error] = caught.value.errors
    assert error.block_id == "h"
    assert error.property_name == "operations"
    assert error.property_details.startswith(problem)


@pytest.mark.parametrize("data", ["$inputs.label", "$inputs.image"])
def test_compile_checks_sequence_apply_chain(data):
    operations = [
        {
            "type": "SequenceApply",
            "operations": [{"type": "ToString"}, {"type": "Multiply", "other": 2}],
        }
    ]
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition_with(data, operations), "digest")
    [error] = caught.value.errors
    assert error.block_id == "h"
    assert error.property_name == "operations"
    assert error.property_details.startswith(
        "operation 0 (SequenceApply): operations: operation 1 (Multiply) needs a "
        "number, but gets a string"
    )


@pytest.mark.parametrize(
    ("property_name", "nested", "problem"),
    [
        (
            "class_name",
            {"type": "Multiply", "other": 2},
            "operation 0 (Multiply) needs a number, but gets a string",
        ),
        (
            "confidence",
            {"type": "StringToUpperCase"},
            "operation 0 (StringToUpperCase) needs a string, but gets a number",
        ),
        (
            "center",
            {"type": "NumberRound", "decimal_digits": 0},
            "operation 0 (NumberRound) needs a number, but gets a list",
        ),
    ],
    ids=["class-name", "confidence", "center"],
)
def test_compile_checks_sequence_apply_items(property_name, nested, problem):
    definition = detection()
    definition["steps"][1]["operations"] = [
        {"type": "DetectionsPropertyExtract", "property_name": property_name},
        {"type": "SequenceApply", "operations": [nested]},
    ]
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    [error] = caught.value.errors
    assert error.block_id == "count"
    assert error.property_name == "operations"
    assert error.property_details.startswith(
        f"operation 1 (SequenceApply): operations: {problem}"
    )


def test_empty_sequence_apply_keeps_items():
    # Roboflow's SequenceApply with no operations returns the list as it is.
    empty = {"type": "SequenceApply", "operations": []}
    assert extract(two_boxes(), "class_name", empty) == ["person", "bus"]

    definition = detection()
    definition["steps"][1]["operations"] = [
        {"type": "DetectionsPropertyExtract", "property_name": "class_name"},
        empty,
    ]
    build_plan(definition, "digest")

    # The items keep their kind for the operations after it.
    definition["steps"][1]["operations"].append(
        {"type": "SequenceApply", "operations": [{"type": "Multiply", "other": 2}]}
    )
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    [error] = caught.value.errors
    assert error.property_details.startswith(
        "operation 2 (SequenceApply): operations: operation 0 (Multiply) needs a "
        "number, but gets a string"
    )


def test_empty_operations_output_data():
    # Roboflow's property definition with no operations outputs its data.
    context = StepContext(step_name="property", models=None, timer=None)
    block = PropertyDefinitionBlock()
    assert block.run(context, data="bus", operations=[])["output"] == "bus"

    build_plan(definition_with("$inputs.label", []), "digest")


@pytest.mark.parametrize(
    ("data", "kind"),
    [("$inputs.image", "an image"), ("$steps.people.predictions", "detections")],
)
def test_empty_operations_reject_image_or_detections(data, kind):
    definition = detection()
    definition["steps"][1]["data"] = data
    definition["steps"][1]["operations"] = []
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    [error] = caught.value.errors
    assert error.block_id == "count"
    assert error.property_name == "operations"
    assert error.property_details.startswith(
        f"is empty, so the output would be {kind}, but a property definition "
        "outputs a value"
    )


def bus_image() -> WorkflowImage:
    return WorkflowImage.from_bytes(image_bytes(), parent_id="image")


def decoded(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)


def test_convert_image_to_jpeg():
    image = bus_image()
    jpeg = apply(image, {"type": "ConvertImageToJPEG"})
    assert jpeg.startswith(b"\xff\xd8")
    assert decoded(jpeg).shape == image.pixels.shape
    smaller = apply(image, {"type": "ConvertImageToJPEG", "compression_level": 10})
    assert len(smaller) < len(jpeg)
    length = apply(image, {"type": "ConvertImageToJPEG"}, {"type": "SequenceLength"})
    assert length == len(jpeg)


def test_convert_image_to_base64():
    # An input's file, as sent; any other image as JPEG.
    assert apply(bus_image(), {"type": "ConvertImageToBase64"}) == image_b64()
    crop = WorkflowImage.from_pixels(bus_image().pixels[10:50, 20:80], "crop")
    text = apply(crop, {"type": "ConvertImageToBase64"})
    assert decoded(base64.b64decode(text)).shape == (40, 60, 3)


@pytest.mark.parametrize(
    ("value", "operation", "message"),
    [
        (
            "image",
            {"type": "ConvertImageToJPEG"},
            "ConvertImageToJPEG needs an image, got a string",
        ),
        (
            two_boxes(),
            {"type": "ConvertImageToBase64"},
            "ConvertImageToBase64 needs an image, got detections",
        ),
    ],
    ids=["string", "detections"],
)
def test_convert_image_rejects_other_values(value, operation, message):
    with pytest.raises(StepExecutionError) as caught:
        apply(value, operation)
    assert caught.value.user_error is True
    assert caught.value.message == f"step 'property': {message}"


def test_image_as_jpeg_output():
    operations = [{"type": "ConvertImageToJPEG", "compression_level": 90}]
    definition = definition_with("$inputs.image", operations)
    plan = build_plan(definition, definition_digest(definition))
    inputs = {"image": bus_image()}
    [results] = execute_plan(plan, [inputs], models=None, timer=RunTimer())
    output = collect_outputs(plan, inputs, results)["height"]
    # As Roboflow's server writes bytes: standard base64 text.
    jpeg = base64.b64decode(output, validate=True)
    assert decoded(jpeg).shape == bus_image().pixels.shape


@pytest.mark.parametrize(
    "value", [None, "text", [1, 2], {"a": 1}, two_boxes(), bus_image()]
)
def test_random_number_ignores_value(value):
    draws = [
        apply(value, {"type": "RandomNumber", "min_value": 2, "max_value": 5})
        for _ in range(50)
    ]
    assert all(type(draw) is float for draw in draws)
    assert all(2 <= draw < 5 for draw in draws)
    # 50 equal draws of a float happen with a probability of about 2**-2600.
    assert len(set(draws)) > 1


def test_random_number_bounds_as_roboflow():
    assert apply(7, {"type": "RandomNumber", "min_value": 3, "max_value": 3}) == 3.0
    assert apply(7, {"type": "RandomNumber"}) < 1
    # Roboflow starts at min_value and adds up to |max_value - min_value|.
    swapped = {"type": "RandomNumber", "min_value": 1, "max_value": 0}
    assert all(1 <= apply(7, swapped) < 2 for _ in range(50))


def test_operations_on_parameter_input():
    operations = [
        {"type": "StringToUpperCase"},
        {"type": "StringSubSequence", "start": 0, "end": 3},
    ]
    definition = definition_with("$inputs.label", operations)
    definition["outputs"][0]["selector"] = "$steps.h.output"
    plan = build_plan(definition, definition_digest(definition))
    inputs = {
        "image": WorkflowImage.from_bytes(image_bytes(), parent_id="image"),
        "label": "person",
    }
    [results] = execute_plan(plan, [inputs], models=None, timer=RunTimer())
    assert collect_outputs(plan, inputs, results)["height"] == "PER"


def test_detections_operations_before_property():
    operations = [
        {"type": "SortDetections", "mode": "confidence", "ascending": True},
        {"type": "DetectionsSelection", "mode": "first"},
        {"type": "DetectionsRename", "class_map": {"bus": "vehicle"}, "strict": False},
        {"type": "DetectionsPropertyExtract", "property_name": "class_name"},
    ]
    context = StepContext(step_name="property", models=None, timer=None)
    output = PropertyDefinitionBlock().run(
        context, data=two_boxes(), operations=operations
    )["output"]
    assert output == ["vehicle"]


def test_detections_filter_then_count():
    keep_people = {
        "type": "DetectionsFilter",
        "filter_operation": {
            "type": "StatementGroup",
            "statements": [
                {
                    "type": "BinaryStatement",
                    "left_operand": {
                        "type": "DynamicOperand",
                        "operations": [
                            {
                                "type": "ExtractDetectionProperty",
                                "property_name": "class_name",
                            }
                        ],
                    },
                    "comparator": {"type": "=="},
                    "right_operand": {"type": "StaticOperand", "value": "person"},
                }
            ],
        },
    }
    context = StepContext(step_name="property", models=None, timer=None)
    count = PropertyDefinitionBlock().run(
        context,
        data=two_boxes(),
        operations=[keep_people, {"type": "SequenceLength"}],
    )["output"]
    assert count == 1


@pytest.mark.parametrize(
    ("operations", "problem"),
    [
        (
            [{"type": "SortDetections", "mode": "confidence"}],
            "the last operation (SortDetections) makes detections, but a property "
            "definition outputs a value. End with an operation that reads them",
        ),
        (
            [
                {"type": "DetectionsSelection", "mode": "biggest"},
                {"type": "SequenceLength"},
            ],
            "operation 0 (DetectionsSelection): mode: must be one of first, last, "
            'left_most, right_most, top_confidence, got "biggest"',
        ),
        (
            [
                {"type": "DetectionsRename", "class_map": "mapping"},
                {"type": "SequenceLength"},
            ],
            "operation 0 (DetectionsRename): values cannot name parameters here, "
            "because only the detections transformation block has "
            "operations_parameters",
        ),
        (
            [
                {"type": "ExtractImageProperty", "property_name": "width"},
                {"type": "DetectionsShift", "shift_x": 1, "shift_y": 1},
            ],
            "operation 1 (DetectionsShift) needs detections, but gets a number",
        ),
    ],
    ids=["ends-with-detections", "bad-mode", "parameter", "kind"],
)
def test_compile_rejects_bad_detections_operations(operations, problem):
    definition = detection()
    definition["steps"][1]["operations"] = operations
    if operations[0]["type"] == "ExtractImageProperty":
        definition["steps"][1]["data"] = "$inputs.image"
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    [error] = caught.value.errors
    assert error.block_id == "count"
    assert error.property_name == "operations"
    assert error.property_details.startswith(problem)


def test_detections_to_dictionary_as_json():
    context = StepContext(step_name="property", models=None, timer=None)
    block = PropertyDefinitionBlock()
    as_object = block.run(
        context, data=two_boxes(), operations=[{"type": "DetectionsToDictionary"}]
    )["output"]
    assert as_object == two_boxes().to_roboflow("own")
    assert [p["class"] for p in as_object["predictions"]] == ["person", "bus"]
    as_text = block.run(
        context,
        data=two_boxes(),
        operations=[
            {"type": "DetectionsToDictionary"},
            {"type": "ConvertDictionaryToJSON"},
        ],
    )["output"]
    assert json.loads(as_text) == as_object


@pytest.mark.parametrize(
    ("operation", "where"),
    [
        (
            {"type": "SequenceApply", "operations": [{"type": "ToString"}]},
            "item 0 of 3 of the list of a SequenceApply",
        ),
        (
            {"type": "SequenceMap", "lookup_table": {"a": 1}},
            "item 0 of 3 of the list of a SequenceMap",
        ),
        (
            {"type": "SequenceElementsCount"},
            "item 0 of 3 of the list of a SequenceElementsCount",
        ),
    ],
)
def test_sequence_operation_stops_at_time_limit(operation, where):
    # The run's time limit has passed when the block call starts, so the
    # operation stops before its first item, as it would mid-list.
    with Deadline(limit_s=0.0).during_call("property", 2):
        with pytest.raises(StepExecutionError) as caught:
            apply(["a", "a", "a"], operation)
    assert caught.value.step == "property"
    assert caught.value.code == "step_rejected_input"
    assert "took longer than RUN_TIME_LIMIT_S (0 s)" in caught.value.message
    assert (
        f"stopped during call 2 of step 'property', at {where}" in caught.value.message
    )

    # Within the limit, or outside a run's block call, it runs to its end.
    with Deadline(limit_s=600).during_call("property", 2):
        within_limit = apply(["a", "a", "a"], operation)
    assert within_limit == apply(["a", "a", "a"], operation)
