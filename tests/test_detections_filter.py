"""The detections filter's operations: Roboflow's semantics and compile errors."""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.definitions import (
    compare,
    detection_property,
    filtered_detection,
    group,
    keep_where,
    parameter,
    static,
)
from workflows.blocks.base import StepContext, shown
from workflows.blocks.detections_filter.evaluation import (
    COMPARATORS,
    PROPERTIES,
    UNARY_OPERATORS,
    MemberList,
)
from workflows.blocks.detections_filter.operations import MAX_GROUP_DEPTH
from workflows.blocks.detections_filter.v1 import DetectionsFilterBlock
from workflows.compiler import build_plan
from workflows.deadline import Deadline
from workflows.detections import Detections
from workflows.errors import DefinitionError, StepExecutionError

# A typical Roboflow filter: a class listed in the parameter "classes", and
# confidence at least 0.65.
EXAMPLE = keep_where(
    compare(detection_property("class_name"), "in (Sequence)", parameter("classes")),
    compare(detection_property("confidence"), "(Number) >=", static(0.65)),
    operator="and",
)


def detections() -> Detections:
    """Four detections; detection i has the id "i".

    ==  =======  ==  ==========  ================  ====
    i   class    id  confidence  x/y min, max      size
    ==  =======  ==  ==========  ================  ====
    0   Normal   0   0.9         0, 0, 10, 20      200
    1   Fall     1   0.7         10, 10, 30, 20    200
    2   Normal   0   0.3         50, 0, 60, 100    1000
    3   Fall     1   0.5         5, 40, 7, 45      10
    ==  =======  ==  ==========  ================  ====
    """
    return Detections(
        xyxy=np.array(
            [[0, 0, 10, 20], [10, 10, 30, 20], [50, 0, 60, 100], [5, 40, 7, 45]],
            dtype=np.float32,
        ),
        confidence=np.array([0.9, 0.7, 0.3, 0.5], dtype=np.float32),
        class_id=np.array([0, 1, 0, 1], dtype=np.int64),
        class_names=["Normal", "Fall", "Normal", "Fall"],
        image_size=(100, 100),
        parent_id="image",
        detection_ids=["0", "1", "2", "3"],
    )


def kept(
    operations: list,
    parameters: dict | None = None,
    *,
    class_names: list[str] | None = None,
    min_confidence: float = 0.0,
    predictions: Detections | None = None,
) -> list[int]:
    """Run the block on ``detections()``; return the indices of those kept."""
    output = DetectionsFilterBlock().run(
        StepContext(step_name="filter", models=None, timer=None),
        predictions=detections() if predictions is None else predictions,
        operations=operations,
        operations_parameters=parameters or {},
        class_names=class_names,
        min_confidence=min_confidence,
    )
    return [int(i) for i in output["predictions"].detection_ids]


def compile_errors(definition) -> list:
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    return caught.value.errors


def test_example_with_literal_classes():
    assert kept(EXAMPLE, {"classes": ["Fall"]}) == [1]
    assert kept(EXAMPLE, {"classes": ["Normal", "Fall"]}) == [0, 1]
    assert kept(EXAMPLE, {"classes": []}) == []


def test_example_compiles_with_parameter_classes():
    definition = filtered_detection(EXAMPLE, {"classes": "$inputs.classes"})
    definition["inputs"].append({"type": "WorkflowParameter", "name": "classes"})
    plan = build_plan(definition, "digest")
    assert [step.name for step in plan.steps] == ["people", "count", "filter"]
    assert plan.warnings == ()


@pytest.mark.parametrize(
    ("left", "comparator", "right", "expected"),
    [
        ("class_name", "==", "Fall", [1, 3]),
        ("class_name", "!=", "Fall", [0, 2]),
        ("class_id", "(Number) ==", 1, [1, 3]),
        ("class_id", "(Number) !=", 1, [0, 2]),
        ("confidence", "(Number) >", 0.5, [0, 1]),
        ("confidence", "(Number) >=", 0.5, [0, 1, 3]),
        ("confidence", "(Number) <", 0.5, [2]),
        ("confidence", "(Number) <=", 0.5, [2, 3]),
        ("size", "(Number) in range", [100, 500], [0, 1]),
        ("class_name", "in (Sequence)", ["Fall"], [1, 3]),
        # Python's "in": against a string, a substring test.
        ("class_name", "in (Sequence)", "Falling", [1, 3]),
        # Python's iteration: the letters of the class name.
        ("class_name", "any in (Sequence)", ["N"], [0, 2]),
        ("class_name", "all in (Sequence)", ["F", "a", "l"], [1, 3]),
        ("class_name", "(String) startsWith", "No", [0, 2]),
        ("class_name", "(String) endsWith", "all", [1, 3]),
        ("class_name", "(String) contains", "orm", [0, 2]),
        # A number equals the same number written as a float.
        ("class_id", "==", 1.0, [1, 3]),
        # A number never equals a string.
        ("class_id", "==", "1", []),
    ],
)
def test_comparator(left, comparator, right, expected):
    operations = keep_where(
        compare(detection_property(left), comparator, static(right))
    )
    assert kept(operations) == expected


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("x_min", (">", 8), [1, 2]),
        ("y_min", (">=", 10), [1, 3]),
        ("x_max", ("<", 10), [3]),
        ("y_max", ("<=", 20), [0, 1]),
        ("size", ("==", 200), [0, 1]),
    ],
)
def test_box_property(name, value, expected):
    comparator, number = value
    statement = compare(
        detection_property(name), f"(Number) {comparator}", static(number)
    )
    assert kept(keep_where(statement)) == expected


def test_parameter_on_either_side():
    statement = compare(
        parameter("threshold"), "(Number) <", detection_property("confidence")
    )
    assert kept(keep_where(statement), {"threshold": 0.5}) == [0, 1]


def test_negate_inverts_statement():
    statement = compare(detection_property("class_name"), "==", static("Fall"), True)
    assert kept(keep_where(statement)) == [0, 2]


def test_group_operators():
    fall = compare(detection_property("class_name"), "==", static("Fall"))
    confident = compare(detection_property("confidence"), "(Number) >", static(0.6))
    assert kept(keep_where(fall, confident, operator="and")) == [1]
    assert kept(keep_where(fall, confident, operator="or")) == [0, 1, 3]
    # Roboflow's StatementGroup defaults to "or".
    assert kept(keep_where(fall, confident)) == [0, 1, 3]


def test_nested_groups():
    normal = compare(detection_property("class_name"), "==", static("Normal"))
    unsure = compare(detection_property("confidence"), "(Number) <", static(0.5))
    small = compare(detection_property("size"), "(Number) <", static(50))
    not_large = compare(detection_property("size"), "(Number) <=", static(200))
    normal_and_unsure = group(normal, unsure, operator="and")
    assert kept(keep_where(normal_and_unsure, small, operator="or")) == [2, 3]
    normal_or_unsure = group(normal, unsure, operator="or")
    assert kept(keep_where(normal_or_unsure, not_large, operator="and")) == [0]


@pytest.mark.parametrize(
    ("operand", "operator", "expected"),
    [
        (detection_property("class_name"), "Exists", [0, 1, 2, 3]),
        (parameter("nothing"), "Exists", []),
        (parameter("nothing"), "DoesNotExist", [0, 1, 2, 3]),
        (static(True), "(Boolean) is True", [0, 1, 2, 3]),
        (static(1), "(Boolean) is True", []),
        (static(False), "(Boolean) is False", [0, 1, 2, 3]),
        (parameter("empty"), "(Sequence) is empty", [0, 1, 2, 3]),
        (detection_property("class_name"), "(Sequence) is empty", []),
        (detection_property("class_name"), "(Sequence) is not empty", [0, 1, 2, 3]),
    ],
)
def test_unary_statement(operand, operator, expected):
    statement = {
        "type": "UnaryStatement",
        "operand": operand,
        "operator": {"type": operator},
    }
    parameters = {"nothing": None, "empty": []}
    assert kept(keep_where(statement), parameters) == expected
    negated = {**statement, "negate": True}
    assert kept(keep_where(negated), parameters) == [
        i for i in range(4) if i not in expected
    ]


def test_filters_apply_in_order():
    confident = keep_where(
        compare(detection_property("confidence"), "(Number) >=", static(0.5))
    )
    normal = keep_where(
        compare(detection_property("class_name"), "==", static("Normal"))
    )
    assert kept(confident + normal) == [0]


def test_no_operations_keep_everything():
    assert kept([]) == [0, 1, 2, 3]


def test_own_fields_and_operations_both_apply():
    confident = keep_where(
        compare(detection_property("confidence"), "(Number) >=", static(0.5))
    )
    assert kept(confident, class_names=["Normal"]) == [0]
    fall = keep_where(compare(detection_property("class_name"), "==", static("Fall")))
    assert kept(fall, min_confidence=0.6) == [1]


# A square from (0, 0) to (20, 20). Detection 0's centre (5, 10) is inside
# it, detection 1's (20, 15) is on its edge, and detection 3's (6, 42.5) and
# detection 2's (55, 50) are outside it.
SQUARE = [[0, 0], [20, 0], [20, 20], [0, 20]]


@pytest.mark.parametrize(
    ("anchor", "zone", "expected"),
    [
        ("center", SQUARE, [0]),
        # Vertex order and a repeated first vertex do not change the polygon.
        ("center", [*reversed(SQUARE), SQUARE[-1]], [0]),
        # Detection 1's top-left corner (10, 10) is inside; detection 0's
        # (0, 0) is a vertex, so outside.
        ("top_left", SQUARE, [1]),
        # A bow tie contains its two lobes: (5, 10) lies in the left one,
        # and (20, 15) on an edge.
        ("center", [[0, 0], [20, 20], [20, 0], [0, 20]], [0]),
        ("center", [], []),
    ],
    ids=["square", "reversed-closed", "top-left", "bow-tie", "empty"],
)
def test_detection_in_zone(anchor, zone, expected):
    in_zone = compare(detection_property(anchor), "(Detection) in zone", static(zone))
    assert kept(keep_where(in_zone)) == expected
    in_parameter = compare(
        detection_property(anchor), "(Detection) in zone", parameter("zone")
    )
    assert kept(keep_where(in_parameter), {"zone": zone}) == expected


@pytest.mark.parametrize(
    ("zone", "problem"),
    [
        ([[0, 0], [20, 20]], "the zone has 2 points, but a polygon needs at least 3"),
        ([[0, 0], [20], [0, 20]], "zone point 1 must be [x, y], got [20]"),
        ("square", 'the zone must be a list of [x, y] points, got "square"'),
        (
            [[0, 0], [10**400, 0], [0, 20]],
            "zone point 1 must be [x, y] numbers within a float's range, got "
            + shown([10**400, 0]),
        ),
        (
            [[0, 0], ["inf", 0], [0, 20]],
            'zone point 1 must be [x, y] finite numbers, got ["inf", 0]',
        ),
    ],
    ids=["two-points", "short-point", "string", "huge-coordinate", "infinite"],
)
def test_detection_in_zone_bad_zone(zone, problem):
    statement = compare(
        detection_property("center"), "(Detection) in zone", parameter("zone")
    )
    with pytest.raises(StepExecutionError) as caught:
        kept(keep_where(statement), {"zone": zone})
    assert caught.value.user_error is True
    assert (
        "(Detection) in zone failed on detection 0 with the values [5.0, 10.0], "
        in caught.value.message
    )
    assert f"ValueError: {problem}" in caught.value.message

    static_zone = compare(
        detection_property("center"), "(Detection) in zone", static(zone)
    )
    [error] = compile_errors(filtered_detection(keep_where(static_zone)))
    assert error.property_name == "operations"
    assert error.property_details == (f"{STATEMENT}.right_operand: {problem}")


def test_detection_in_zone_of_random_points():
    # The zone is drawn when the statement is evaluated, so its value in
    # the definition, which is no zone, is not checked as one. Every point
    # drawn lies within [0, 1], away from all four centres.
    draw = {"type": "RandomNumber", "min_value": 0, "max_value": 1}
    zone = {
        "type": "StaticOperand",
        "value": [["a", "b"], ["c", "d"], ["e", "f"]],
        "operations": [
            {
                "type": "SequenceApply",
                "operations": [{"type": "SequenceApply", "operations": [draw]}],
            }
        ],
    }
    in_zone = compare(detection_property("center"), "(Detection) in zone", zone)
    assert kept(keep_where(in_zone)) == []


def many_detections(count: int) -> Detections:
    return Detections(
        xyxy=np.tile(np.array([[0, 0, 10, 10]], dtype=np.float32), (count, 1)),
        confidence=np.full(count, 0.5, dtype=np.float32),
        class_id=np.zeros(count, dtype=np.int64),
        class_names=["Normal"] * count,
        image_size=(100, 100),
        parent_id="image",
        detection_ids=[str(index) for index in range(count)],
    )


RANDOM = {"type": "RandomNumber"}


@pytest.mark.parametrize(
    "operand",
    [
        {"type": "StaticOperand", "value": 0, "operations": [RANDOM]},
        {
            "type": "StaticOperand",
            "value": "x",
            "operations": [{"type": "StringToUpperCase"}, RANDOM],
        },
        {"type": "DynamicOperand", "operand_name": "any", "operations": [RANDOM]},
        {
            "type": "DynamicOperand",
            "operations": [
                {"type": "ExtractDetectionProperty", "property_name": "size"},
                RANDOM,
            ],
        },
    ],
    ids=["static", "static-after-operation", "parameter", "detection"],
)
def test_random_number_drawn_per_detection(operand):
    # Roboflow's operands draw a number each time they are evaluated, so
    # each detection draws its own.
    sample = keep_where(compare(operand, "(Number) <", static(0.5)))
    kept_ids = kept(sample, {"any": None}, predictions=many_detections(200))
    # One number for all 200 would keep all or none. Either happens with
    # a probability of 2**-199 when each detection draws its own.
    assert 0 < len(kept_ids) < 200


def test_random_number_static_operand_fails_at_run():
    operand = {
        "type": "StaticOperand",
        "value": 0,
        "operations": [RANDOM, {"type": "LookupTable", "lookup_table": {"a": 1}}],
    }
    statement = compare(operand, "==", static(1))
    with pytest.raises(StepExecutionError) as caught:
        kept(keep_where(statement))
    assert caught.value.user_error is True
    assert caught.value.message.startswith(
        f"step 'filter': {STATEMENT}.left_operand.operations: operation 1 of the "
        "static value failed: LookupTable 0."
    )
    assert 'is not a key of lookup_table (keys: "a")' in caught.value.message


def test_comparison_that_fails_rejects_step():
    operations = keep_where(
        compare(detection_property("class_name"), "==", static("Normal")),
        compare(detection_property("confidence"), "(Number) >", static("high")),
        operator="or",
    )
    # The first statement is true for detection 0, but every statement of a
    # group is evaluated, as in Roboflow, so the error still fails the step.
    with pytest.raises(StepExecutionError) as caught:
        kept(operations)
    assert caught.value.step == "filter"
    assert caught.value.user_error is True
    assert caught.value.message.startswith(
        "step 'filter': operations[0].filter_operation.statements[1]: "
        "(Number) > failed on "
        'detection 0 with the values 0.8999999761581421, "high": TypeError'
    )


@pytest.mark.parametrize(
    "property_name, comparator, expected",
    [
        (
            "center",
            "(Number) >",
            "TypeError: '>' not supported between instances of 'tuple' and 'list'",
        ),
        (
            "class_name",
            "(String) startsWith",
            "TypeError: startswith first arg must be str or a tuple of str, not list",
        ),
    ],
    ids=["number", "string"],
)
def test_comparison_error_names_list_type(property_name, comparator, expected):
    operations = keep_where(
        compare(detection_property(property_name), comparator, parameter("values"))
    )
    with pytest.raises(StepExecutionError) as caught:
        kept(operations, {"values": ["N", "F"]})
    assert caught.value.message.endswith(expected)
    assert "MemberList" not in caught.value.message


def with_operations(operand: dict, *operations: dict) -> dict:
    """Return ``operand`` with ``operations`` after any it has."""
    return {**operand, "operations": [*operand.get("operations", []), *operations]}


def test_detection_operand_chains_operations():
    lower_name = with_operations(
        detection_property("class_name"), {"type": "StringToLowerCase"}
    )
    operations = keep_where(compare(lower_name, "==", static("fall")))
    assert kept(operations) == [1, 3]


def test_detection_operand_number_operations():
    percent = with_operations(
        detection_property("confidence"),
        {"type": "Multiply", "other": 100},
        {"type": "NumberRound", "decimal_digits": 0},
    )
    operations = keep_where(compare(percent, "(Number) ==", static(70)))
    assert kept(operations) == [1]


def test_parameter_operand_operations():
    # A threshold in percent, converted to the confidence scale.
    threshold = with_operations(
        parameter("threshold"),
        {"type": "ToNumber", "cast_to": "float"},
        {"type": "Divide", "other": 100},
    )
    operations = keep_where(
        compare(detection_property("confidence"), "(Number) >=", threshold)
    )
    assert kept(operations, {"threshold": "60"}) == [0, 1]


def test_parameter_operand_sequence_operations():
    classes = with_operations(
        parameter("classes"),
        {"type": "SequenceApply", "operations": [{"type": "StringToUpperCase"}]},
    )
    upper_name = with_operations(
        detection_property("class_name"), {"type": "StringToUpperCase"}
    )
    operations = keep_where(compare(upper_name, "in (Sequence)", classes))
    assert kept(operations, {"classes": ["fall"]}) == [1, 3]


def test_static_operand_operations():
    lookup = with_operations(
        static("n"), {"type": "LookupTable", "lookup_table": {"n": "Normal"}}
    )
    operations = keep_where(compare(detection_property("class_name"), "==", lookup))
    assert kept(operations) == [0, 2]


def test_compile_rejects_deeply_nested_operand_filters():
    # Each level is an operand whose DetectionsFilter contains the next one:
    # six levels of JSON, and more of Python's stack to parse.
    statement = compare(detection_property("class_name"), "==", static("Fall"))
    for _ in range(150):
        nested_filter = {
            "type": "DetectionsFilter",
            "filter_operation": group(statement),
        }
        operand = with_operations(
            parameter("all"), nested_filter, {"type": "SequenceLength"}
        )
        statement = compare(operand, "(Number) >", static(0))
    definition = filtered_detection(keep_where(statement), {"all": []})
    [error] = compile_errors(definition)
    assert error.property_name == "operations"
    assert error.property_details == (
        "nests lists and objects more than 100 levels deep"
    )


def test_parameter_operation_failure_rejects_step():
    threshold = with_operations(parameter("threshold"), {"type": "Divide", "other": 2})
    operations = keep_where(
        compare(detection_property("confidence"), "(Number) >=", threshold)
    )
    with pytest.raises(StepExecutionError) as caught:
        kept(operations, {"threshold": "high"})
    assert caught.value.step == "filter"
    assert caught.value.user_error is True
    assert caught.value.message == (
        "step 'filter': operations[0].filter_operation.statements[0]"
        '.right_operand.operand_name: operation 0 of "threshold" failed: '
        "Divide needs a number, got a string"
    )


class CountedLengthDict(dict):
    """An object parameter that counts how often SequenceLength measures it."""

    lengths_taken = 0

    def __len__(self) -> int:
        self.lengths_taken += 1
        return super().__len__()


def test_filter_stops_at_expired_time_limit():
    # The run's time limit passed before the block call, so the filter stops
    # at its first statement on the first detection, as it would mid-call.
    with Deadline(limit_s=0.0).during_call("filter", 3):
        with pytest.raises(StepExecutionError) as caught:
            kept(EXAMPLE, {"classes": ["Normal"]})
    assert caught.value.step == "filter"
    assert caught.value.user_error is True
    assert caught.value.code == "step_rejected_input"
    message = caught.value.message
    assert "took longer than RUN_TIME_LIMIT_S (0 s)" in message
    assert (
        "stopped during call 3 of step 'filter', at statement "
        "operations[0].filter_operation.statements[0] on detection 0" in message
    )

    # Within the limit, the filter keeps what it keeps without one.
    with Deadline(limit_s=600).during_call("filter", 3):
        assert kept(EXAMPLE, {"classes": ["Normal"]}) == [0]


@pytest.mark.parametrize("comparator", ["any in (Sequence)", "all in (Sequence)"])
def test_sequence_lookups_stop_at_time_limit(comparator):
    # Both lists can be parameters, so one comparison can take time that
    # grows with the product of their lengths.
    values, sequence = [[1]] * 40, MemberList([[2]] * 40)
    with Deadline(limit_s=0.0).during_call("filter", 1):
        with pytest.raises(StepExecutionError) as caught:
            COMPARATORS[comparator](values, sequence)
    assert "at item 0 of the values looked up in a sequence" in caught.value.message


def test_parameter_operations_run_once_per_call():
    # Their result is the same for every detection, and a SequenceApply
    # over a long parameter took seconds for each one.
    counted = CountedLengthDict(a=1, b=2)
    length = with_operations(parameter("labels"), {"type": "SequenceLength"})
    operations = [
        *keep_where(compare(detection_property("class_id"), "(Number) <", length)),
        *keep_where(compare(length, "(Number) >", detection_property("class_id"))),
    ]
    assert kept(operations, {"labels": counted}) == [0, 1, 2, 3]
    # Once for each of the two operands, not once per detection and filter.
    assert counted.lengths_taken == 2


def test_parameter_operations_before_random_run_once():
    # Only RandomNumber has to run for each detection. The operations before
    # it read the same value each time, however long it is.
    counted = CountedLengthDict(a=1, b=2)
    operand = with_operations(parameter("labels"), {"type": "SequenceLength"}, RANDOM)
    operations = keep_where(compare(operand, "(Number) <", static(2)))
    assert kept(operations, {"labels": counted}) == [0, 1, 2, 3]
    assert counted.lengths_taken == 1


def test_comparison_on_no_detections_never_runs():
    operations = keep_where(
        compare(detection_property("confidence"), "(Number) >", static("high"))
    )
    empty = Detections.empty((100, 100), "image")
    assert kept(operations, predictions=empty) == []


parameter_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300)
@given(
    name=st.sampled_from(list(PROPERTIES)),
    comparator=st.sampled_from(list(COMPARATORS)),
    operator=st.sampled_from(list(UNARY_OPERATORS)),
    value=parameter_values,
)
def test_any_parameter_value_keeps_or_rejects(name, comparator, operator, value):
    operations = keep_where(
        compare(detection_property(name), comparator, parameter("value")),
        compare(parameter("value"), comparator, detection_property(name)),
        {
            "type": "UnaryStatement",
            "operand": parameter("value"),
            "operator": {"type": operator},
        },
    )
    try:
        kept(operations, {"value": value})
    except StepExecutionError as error:
        assert error.user_error is True


STATEMENT = "operations[0].filter_operation.statements[0]"


def example_with(change) -> dict:
    """Return a filtered detection whose first statement ``change`` edits."""
    operations = copy.deepcopy(EXAMPLE)
    change(operations[0]["filter_operation"]["statements"][0])
    return filtered_detection(operations, {"classes": ["Normal"]})


def set_key(key, value):
    def change(statement):
        statement[key] = value

    return change


def set_property(name):
    def change(statement):
        statement["left_operand"]["operations"][0]["property_name"] = name

    return change


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            set_key("comparator", {"type": "(Number) between"}),
            f'{STATEMENT}.comparator.type: comparator "(Number) between" is not '
            "supported; supported: ==, !=, (Number) ==, (Number) !=, (Number) >, "
            "(Number) >=, (Number) <, (Number) <=, (Number) in range, in (Sequence), "
            "any in (Sequence), all in (Sequence), (String) startsWith, "
            "(String) endsWith, (String) contains, (Detection) in zone",
        ),
        (
            set_property("tracker_id"),
            f"{STATEMENT}.left_operand.operations[0].property_name: property "
            '"tracker_id" is not supported; supported: class_name, class_id, '
            "confidence, x_min, y_min, x_max, y_max, size, center, top_left, "
            "top_right, bottom_left, bottom_right",
        ),
        (
            set_key("right_operand", {"type": "Operand", "value": 1}),
            f'{STATEMENT}.right_operand.type: operand type "Operand" is not '
            "supported; supported: StaticOperand, DynamicOperand",
        ),
        (
            set_key("type", "TernaryStatement"),
            f'{STATEMENT}.type: statement type "TernaryStatement" is not '
            "supported; supported: BinaryStatement, UnaryStatement, StatementGroup",
        ),
        (
            set_key("negated", True),
            f'{STATEMENT}: unknown key "negated"; a BinaryStatement has the keys '
            "type, left_operand, comparator, right_operand, negate",
        ),
        (
            set_key("negate", "yes"),
            f'{STATEMENT}.negate: must be true or false, got "yes"',
        ),
        (
            set_key(
                "left_operand",
                {
                    **detection_property("class_name"),
                    "operations": [{"type": "StringToLowerCase"}],
                },
            ),
            f'{STATEMENT}.left_operand.operations[0].type: the operand "_" is the '
            "detection being tested; its first operation must be "
            "ExtractDetectionProperty, to read a property of it, got "
            '"StringToLowerCase"',
        ),
        (
            set_key("left_operand", {"type": "DynamicOperand"}),
            f'{STATEMENT}.left_operand.operations: the operand "_" is the '
            "detection being tested; it needs an ExtractDetectionProperty "
            "operation first to read a property of it, got 0 operations",
        ),
        (
            set_key(
                "right_operand",
                {**detection_property("class_name"), "operand_name": "classes"},
            ),
            f"{STATEMENT}.right_operand.operations[0].type: "
            "ExtractDetectionProperty reads a property of the detection being "
            'tested by a detections filter; only the operand "_" takes it',
        ),
        (
            set_key(
                "right_operand",
                {
                    **parameter("classes"),
                    "operations": [{"type": "ClassificationPropertyExtract"}],
                },
            ),
            f"{STATEMENT}.right_operand.operations: operation 0 has unknown type "
            "'ClassificationPropertyExtract'; supported: ExtractImageProperty, "
            "SequenceLength",
        ),
        (
            set_key(
                "left_operand",
                with_operations(
                    detection_property("class_name"), {"type": "Multiply", "other": 2}
                ),
            ),
            f"{STATEMENT}.left_operand.operations: operation 1 (Multiply) needs a "
            "number, but gets a string",
        ),
        (
            set_key(
                "left_operand",
                with_operations(
                    detection_property("confidence"), {"type": "NumberRound"}
                ),
            ),
            f"{STATEMENT}.left_operand.operations: operation 1 (NumberRound): "
            '"decimal_digits" is missing',
        ),
        (
            set_key(
                "right_operand",
                with_operations(
                    static("x"), {"type": "LookupTable", "lookup_table": {"y": 1}}
                ),
            ),
            f"{STATEMENT}.right_operand.operations[0]: operation failed on the "
            'value "x": LookupTable "x" is not a key of lookup_table (keys: "y")',
        ),
        (
            set_key("right_operand", {"type": "StaticOperand"}),
            f'{STATEMENT}.right_operand: "value" is missing',
        ),
        (
            set_key("right_operand", parameter("names")),
            f'{STATEMENT}.right_operand.operand_name: "names" is not a key of '
            'operations_parameters (keys: "classes"). Add it there, or use "_" '
            "for the detection being tested",
        ),
    ],
    ids=[
        "comparator",
        "property",
        "operand-type",
        "statement-type",
        "unknown-key",
        "negate-type",
        "operand-operation",
        "detection-without-property",
        "parameter-with-property",
        "parameter-with-operation",
        "detection-operation-kind",
        "operation-key-missing",
        "static-operation-fails",
        "static-without-value",
        "undeclared-parameter",
    ],
)
def test_compile_rejects_unsupported_statement(change, problem):
    [error] = compile_errors(example_with(change))
    assert error.block_id == "filter"
    assert error.block_type == "roboflow_core/detections_filter@v1"
    assert error.property_name == "operations"
    assert error.property_details.startswith(problem)


@pytest.mark.parametrize(
    ("operations", "problem"),
    [
        (
            [{"type": "SortDetections", "mode": "confidence"}],
            'operations[0].type: operation type "SortDetections" is not '
            "supported; supported: DetectionsFilter",
        ),
        (
            [{"type": "DetectionsFilter"}],
            'operations[0]: "filter_operation" is missing',
        ),
        (
            keep_where(operator="and"),
            "operations[0].filter_operation.statements: must be a non-empty list "
            "of statements, got []",
        ),
        (
            keep_where(compare(static(1), "==", static(1)), operator="xor"),
            'operations[0].filter_operation.operator: must be "and" or "or", got "xor"',
        ),
        (
            keep_where(
                {
                    "type": "UnaryStatement",
                    "operand": static(1),
                    "operator": {"type": "(Number) is odd"},
                }
            ),
            "operations[0].filter_operation.statements[0].operator.type: operator "
            '"(Number) is odd" is not supported; supported: Exists, DoesNotExist, '
            "(Boolean) is True, (Boolean) is False, (Sequence) is empty, "
            "(Sequence) is not empty",
        ),
    ],
    ids=["operation-type", "no-filter", "no-statements", "group-operator", "unary"],
)
def test_compile_rejects_unsupported_operation(operations, problem):
    [error] = compile_errors(filtered_detection(operations))
    assert error.block_id == "filter"
    assert error.property_name == "operations"
    assert error.property_details == problem


def nested_groups(depth: int) -> list:
    """Return ``operations`` whose filter is ``depth`` groups nested in a line."""
    statement = compare(detection_property("confidence"), "(Number) >", static(0.6))
    for _ in range(depth - 1):
        statement = group(statement)
    return keep_where(statement)


def test_groups_nested_to_the_limit_compile():
    build_plan(filtered_detection(nested_groups(MAX_GROUP_DEPTH)), "digest")
    assert kept(nested_groups(MAX_GROUP_DEPTH)) == [0, 1]


def test_compile_rejects_groups_nested_too_deep():
    [error] = compile_errors(filtered_detection(nested_groups(MAX_GROUP_DEPTH + 1)))
    assert error.property_name == "operations"
    assert f"nested more than {MAX_GROUP_DEPTH} levels" in error.property_details
    path = "operations[0].filter_operation" + ".statements[0]" * MAX_GROUP_DEPTH
    assert error.property_details.startswith(f"{path}: ")


def test_compile_rejects_groups_past_literal_depth():
    # 400 groups are 800 levels of JSON, over the limit of any literal,
    # which the compiler checks before it parses the filter.
    [error] = compile_errors(filtered_detection(nested_groups(400)))
    assert error.property_name == "operations"
    assert error.property_details == (
        "nests lists and objects more than 100 levels deep"
    )


def test_compile_rejects_static_operand_too_many_digits():
    # 9…9 of 4,300 digits rounds up to 10**4300, which str() cannot write.
    rounded = with_operations(
        static(int("9" * 4300)),
        {"type": "NumberRound", "decimal_digits": -1},
        {"type": "ToString"},
    )
    operations = keep_where(compare(detection_property("class_name"), "==", rounded))
    [error] = compile_errors(filtered_detection(operations))
    assert error.property_name == "operations"
    assert error.property_details.startswith(
        "operations[0].filter_operation.statements[0].right_operand.operations[0]: "
        "operation failed on the value 999"
    )
    assert error.property_details.endswith(
        "NumberRound failed on 9999999999999999999999999999999999999999999999999"
        "999999999999999999999999999999…: the result has more than 4300 digits, "
        "the maximum that an output may have"
    )


def test_compile_stops_slow_static_regex_searches():
    # Each search takes about 0.03 s, far under the limit of one, but
    # together they would take 12 s of the web server's time.
    matches = with_operations(
        static(["a" * 24 + "!"] * 400),
        {
            "type": "SequenceApply",
            "operations": [{"type": "StringMatches", "regex": "^(a|aa)+$"}],
        },
    )
    operations = keep_where(
        compare(detection_property("class_name"), "in (Sequence)", matches)
    )
    [error] = compile_errors(filtered_detection(operations))
    assert error.property_name == "operations"
    assert error.property_details.endswith(
        'StringMatches regex "^(a|aa)+$" was stopped on a string of 25 '
        "characters: StringMatches searches took 5.0 s in all, the most that a "
        "step's run or a definition's compilation may spend on them. Write a "
        "regex that backtracks less, or search fewer or shorter strings"
    )


def test_compile_rejects_reserved_parameter_name():
    definition = filtered_detection(EXAMPLE, {"classes": ["Fall"], "_": 1})
    [error] = compile_errors(definition)
    assert error.block_id == "filter"
    assert error.property_name == "operations_parameters"
    assert error.property_details.startswith('the key "_" is reserved')


def test_operations_from_selector_rejected():
    # Only operations written in the definition can be checked against
    # operations_parameters before a run is stored.
    definition = filtered_detection("$inputs.operations", {"classes": ["Fall"]})
    definition["inputs"].append({"type": "WorkflowParameter", "name": "operations"})
    [error] = compile_errors(definition)
    assert error.block_id == "filter"
    assert error.property_name == "operations"
    assert "not given by a selector" in error.property_details


NAN = float("nan")


@pytest.mark.parametrize(
    ("value", "items"),
    [
        (True, [1]),
        (1.0, [1]),
        (0.5, [np.float32(0.5)]),
        ([1, 2], [[1, 2]]),
        ({"a": 1}, [{"a": 1}]),
        ("Normal", ["Fall", "Normal"]),
        (NAN, [NAN]),
        (float("nan"), [NAN]),
        (3, []),
    ],
)
def test_member_list_answers_as_a_list(value, items):
    assert (value in MemberList(items)) == (value in items)


def test_member_list_finds_items_without_scanning():
    class Counted:
        comparisons = 0

        def __init__(self, number):
            self.number = number

        def __hash__(self):
            return hash(self.number)

        def __eq__(self, other):
            Counted.comparisons += 1
            return self.number == other.number

    items = MemberList([Counted(number) for number in range(10_000)])
    Counted.comparisons = 0
    assert Counted(9_999) in items
    # A list compares with every item before the last; a set with one.
    assert Counted.comparisons == 1


def test_filter_looks_classes_up_in_a_set():
    class CountedText(str):
        comparisons = 0

        def __eq__(self, other):
            CountedText.comparisons += 1
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    classes = [CountedText(f"class-{n}") for n in range(5_000)]
    classes.append(CountedText("Normal"))
    CountedText.comparisons = 0
    # Detections 0 and 1 pass the confidence test; only 0 is "Normal".
    assert kept(EXAMPLE, {"classes": classes}) == [0]
    # One lookup per detection, not a comparison with each of 5,001 names.
    assert CountedText.comparisons <= 4


def test_operations_parsed_once_per_list():
    from workflows.blocks.detections_filter.v1 import parsed_operations

    # Every call of a step gets its plan's one list, so the parse is kept.
    assert parsed_operations(EXAMPLE) is parsed_operations(EXAMPLE)
    # An equal list that is another object is parsed on its own.
    copied = copy.deepcopy(EXAMPLE)
    assert parsed_operations(copied) is not parsed_operations(EXAMPLE)
    assert parsed_operations(copied) == parsed_operations(EXAMPLE)
