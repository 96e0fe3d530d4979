"""Any JSON at all either compiles or raises DefinitionError, nothing else."""

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.definitions import (
    compare,
    detection,
    detection_property,
    filtered_detection,
    keep_where,
    parameter,
)
from workflows.compiler import build_plan
from workflows.errors import DefinitionError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(
        ["$inputs.image", "$steps.people.*", "$steps.count.output", "$", "$steps.."]
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def compiles_or_reports(definition) -> None:
    try:
        build_plan(definition, "digest")
    except DefinitionError as error:
        assert error.errors
        assert error.to_dict()["message"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_compile_arbitrary_json(value):
    compiles_or_reports(value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    section=st.sampled_from(["inputs", "steps", "outputs"]),
    index=st.integers(min_value=0, max_value=3),
    key=st.sampled_from(
        [
            "type",
            "name",
            "images",
            "model_id",
            "confidence",
            "data",
            "operations",
            "selector",
            "default_value",
            "coordinates_system",
            "class_filter",
        ]
    ),
    value=json_values,
)
def test_compile_mutated_definition(section, index, key, value):
    definition = copy.deepcopy(detection())
    items = definition[section]
    if index < len(items) and isinstance(items[index], dict):
        items[index][key] = value
    else:
        items.append({key: value})
    compiles_or_reports(definition)


# A detections filter's operations with every kind of part: a group, binary
# and unary statements, and each kind of operand, with and without
# operations of its own.
FILTER_OPERATIONS = keep_where(
    compare(detection_property("class_name"), "in (Sequence)", parameter("classes")),
    {
        "type": "UnaryStatement",
        "operand": {"type": "StaticOperand", "value": 1},
        "operator": {"type": "Exists"},
        "negate": False,
    },
    compare(
        {
            **detection_property("confidence"),
            "operations": [
                {"type": "ExtractDetectionProperty", "property_name": "confidence"},
                {"type": "Multiply", "other": 100},
                {"type": "NumberRound", "decimal_digits": 0},
            ],
        },
        "(Number) >=",
        {
            "type": "StaticOperand",
            "value": ["a", "b"],
            "operations": [
                {"type": "SequenceApply", "operations": [{"type": "ToString"}]},
                {"type": "SequenceMap", "lookup_table": {"a": 1, "b": 2}},
                {"type": "NumericSequenceAggregate", "function": "sum"},
                {"type": "ToNumber", "cast_to": "float"},
            ],
        },
    ),
    compare(
        {
            "type": "StaticOperand",
            "value": "person",
            "operations": [
                {"type": "StringSubSequence", "start": 0, "end": 3},
                {"type": "StringMatches", "regex": "^p"},
            ],
        },
        "==",
        {
            **parameter("classes"),
            "operations": [{"type": "SequenceJoin", "separator": "|"}],
        },
    ),
    operator="and",
)


def nested_paths(value, path=()) -> list[tuple]:
    """Return the path of every part of ``value``, its lists and objects included."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += nested_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += nested_paths(item, (*path, index))
    return found


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(nested_paths(FILTER_OPERATIONS)[1:]),
    key=st.one_of(st.none(), st.sampled_from(["type", "operator", "value", "x"])),
    value=json_values,
)
def test_compile_mutated_filter_operations(path, key, value):
    operations = copy.deepcopy(FILTER_OPERATIONS)
    parent = operations
    for step in path[:-1]:
        parent = parent[step]
    if key is not None and isinstance(parent[path[-1]], dict):
        parent[path[-1]][key] = value
    else:
        parent[path[-1]] = value
    compiles_or_reports(filtered_detection(operations, {"classes": ["Normal"]}))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=json_values)
def test_read_inputs_arbitrary_json(inputs):
    from workflows.errors import InputError
    from workflows.inputs import read_inputs

    definition = detection()
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "threshold", "default_value": 0.5}
    )
    definition["steps"][0]["confidence"] = "$inputs.threshold"
    plan = build_plan(definition, "digest")
    try:
        read_inputs(plan, inputs, max_pixels=1_000_000)
    except InputError as error:
        assert error.to_dict()["message"]
