"""Roboflow's ``operations`` language for the detections filter, in part.

The supported subset reads and evaluates as Roboflow's query language does
in roboflow_workflows 0.2.13:

- ``operations`` is a list of ``DetectionsFilter`` operations, applied in
  order. Each keeps the detections for which its ``filter_operation``, a
  ``StatementGroup``, is true.
- A ``StatementGroup`` combines a non-empty list of statements with the
  ``operator`` "and" or "or", and "or" when the operator is left out.
  Every statement of a group is evaluated, without short-circuiting, so an
  error in any of them fails the step.
  Groups nest at most MAX_GROUP_DEPTH levels deep, which Roboflow does not
  limit.
- A ``BinaryStatement`` compares two operands with a ``comparator``; a
  ``UnaryStatement`` tests one ``operand`` with an ``operator``. Either may
  set ``negate``.
- An operand is a ``StaticOperand`` with a ``value``, or a
  ``DynamicOperand`` whose ``operand_name`` is a key of
  ``operations_parameters``. The name "_", the default, is the detection
  being tested, and such an operand must read one of its properties with
  an ``ExtractDetectionProperty`` operation first.
- Any operand may apply property definition operations to its value
  (property_definition/v1.py), such as ``StringToLowerCase``. A
  ``StaticOperand``'s run once, when the operations are parsed.
- Comparisons apply Python's operators to the values, as Roboflow's do:
  "in (Sequence)" against a string tests for a substring, and comparing a
  number with a string fails the step. "(Detection) in zone" tests whether
  a point, such as a detection's "center", lies inside a polygon
  (geometry.py); a zone written in a StaticOperand is checked here.

Anything else raises OperationsSyntaxError, with the path of the part that
is not supported. So does a key that Roboflow's models do not declare:
Roboflow ignores such keys, but a misspelled "negate" would then change
which detections are kept without any error.
"""

import re
from collections.abc import Iterator, Mapping
from typing import Any

from workflows.blocks.base import shown
from workflows.blocks.detections_filter.evaluation import (
    COMPARATORS,
    PROPERTIES,
    PROPERTY_KINDS,
    UNARY_OPERATORS,
    ZONE_COMPARATOR,
    with_member_set,
)
from workflows.blocks.detections_filter.geometry import zone_ring
from workflows.blocks.detections_filter.statements import (
    DETECTION_OPERAND,
    BinaryStatement,
    DetectionProperty,
    Operand,
    Parameter,
    Statement,
    StatementGroup,
    StaticValue,
    UnaryStatement,
)
from workflows.blocks.property_definition.v1 import (
    OPERATIONS,
    OperationError,
    apply_operation,
    chain_problem,
    first_random_index,
)
from workflows.blocks.property_definition.v1 import (
    check_operations as check_value_operations,
)

GROUP_OPERATORS = ("and", "or")

# The maximum nesting depth of StatementGroups, the filter's own group
# included. Parsing and evaluation recurse at each level, so a deeper filter
# would exhaust Python's stack instead of being rejected.
MAX_GROUP_DEPTH = 32

# The keys each object may have, as Roboflow's models declare them.
KEYS = {
    "DetectionsFilter": ("type", "filter_operation"),
    "StatementGroup": ("type", "statements", "operator"),
    "BinaryStatement": (
        "type",
        "left_operand",
        "comparator",
        "right_operand",
        "negate",
    ),
    "UnaryStatement": ("type", "operand", "operator", "negate"),
    "StaticOperand": ("type", "value", "operations"),
    "DynamicOperand": ("type", "operand_name", "operations"),
    "ExtractDetectionProperty": ("type", "property_name"),
    # Operations that only the detections transformation block takes.
    "DetectionsOffset": ("type", "offset_x", "offset_y"),
    "DetectionsShift": ("type", "shift_x", "shift_y"),
    "DetectionsSelection": ("type", "mode"),
    "SortDetections": ("type", "mode", "ascending"),
    "DetectionsRename": ("type", "class_map", "strict", "new_classes_id_offset"),
    "PickDetectionsByParentClass": ("type", "parent_class"),
}


class OperationsSyntaxError(ValueError):
    """A part of ``operations`` that is invalid or not supported here."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def parse_operations(value: Any) -> tuple[StatementGroup, ...]:
    """Return the filter of each DetectionsFilter operation, in order.

    Raises OperationsSyntaxError at the first part that is not supported.
    """
    path = "operations"
    if not isinstance(value, list):
        raise OperationsSyntaxError(path, f"must be a list, got {shown(value)}")
    filters = []
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        fields = read_operation(item, where, ("DetectionsFilter",))
        filters.append(parse_filter(fields, where))
    return tuple(filters)


def read_operation(value: Any, path: str, types: tuple[str, ...]) -> dict[str, Any]:
    """Return ``value`` as an operation of one of ``types``, with only its keys."""
    return _object(value, path, types, "operation")


def parse_filter(fields: dict[str, Any], path: str) -> StatementGroup:
    """Return the condition of the DetectionsFilter operation ``fields``."""
    condition = _required(fields, "filter_operation", path)
    return _parse_group(condition, f"{path}.filter_operation", 1)


def parse_condition(value: Any, path: str) -> StatementGroup:
    """Return the StatementGroup ``value`` as a condition on named values.

    Unlike a filter's, a condition tests no detection: every DynamicOperand
    names a parameter, "_" included, and may apply property definition
    operations to it, as Roboflow's ContinueIf and Expression blocks do.
    Raises OperationsSyntaxError at the first part that is not supported.
    """
    return _parse_group(value, path, 1, condition=True)


def condition_parameters(condition: Statement) -> list[Parameter]:
    """Return the parameters that operands of ``condition`` name, in order."""
    return [
        operand for operand in _operands((condition,)) if isinstance(operand, Parameter)
    ]


def check_operations(value: Any) -> str | None:
    """Return the first problem in ``operations``, with its path, or None."""
    try:
        parse_operations(value)
    except OperationsSyntaxError as error:
        return str(error)
    return None


def check_parameters(value: Any) -> str | None:
    """Return why an ``operations_parameters`` object is invalid, or None."""
    if isinstance(value, dict) and DETECTION_OPERAND in value:
        return (
            f'the key "{DETECTION_OPERAND}" is reserved: an operand named '
            f'"{DETECTION_OPERAND}" is the detection being tested. Rename the key'
        )
    return None


def undeclared_parameter(
    filters: tuple[StatementGroup, ...], names: Mapping[str, Any]
) -> str | None:
    """Return a problem for the first operand named in no key of ``names``."""
    for operand in _operands(filters):
        if isinstance(operand, Parameter) and operand.name not in names:
            declared = ", ".join(f'"{name}"' for name in names) or "none"
            return (
                f'{operand.path}: "{operand.name}" is not a key of '
                f"operations_parameters (keys: {declared}). Add it there, or "
                f'use "{DETECTION_OPERAND}" for the detection being tested'
            )
    return None


def _object(
    value: Any, path: str, types: tuple[str, ...], label: str
) -> dict[str, Any]:
    """Return ``value`` as an object of one of ``types``, with only its keys."""
    supported = ", ".join(types)
    if not isinstance(value, dict):
        raise OperationsSyntaxError(
            path,
            f'must be an object such as {{"type": "{types[0]}"}}, got {shown(value)}',
        )
    found = value.get("type")
    if found not in types:
        found_text = "missing" if "type" not in value else shown(found)
        raise OperationsSyntaxError(
            f"{path}.type",
            f"{label} type {found_text} is not supported; supported: {supported}",
        )
    allowed = KEYS[found]
    for key in value:
        if key not in allowed:
            raise OperationsSyntaxError(
                path,
                f"unknown key {shown(key)}; a {found} has the keys "
                f"{', '.join(allowed)}",
            )
    return value


def _required(fields: dict[str, Any], key: str, path: str) -> Any:
    if key not in fields:
        raise OperationsSyntaxError(path, f'"{key}" is missing')
    return fields[key]


def _parse_group(
    value: Any, path: str, depth: int, condition: bool = False
) -> StatementGroup:
    if depth > MAX_GROUP_DEPTH:
        raise OperationsSyntaxError(
            path,
            f"statement groups are nested more than {MAX_GROUP_DEPTH} levels "
            "deep. Combine their statements into fewer groups",
        )
    fields = _object(value, path, ("StatementGroup",), "statement group")
    group_operator = fields.get("operator", "or")
    if group_operator not in GROUP_OPERATORS:
        raise OperationsSyntaxError(
            f"{path}.operator",
            f'must be "and" or "or", got {shown(group_operator)}',
        )
    statements = _required(fields, "statements", path)
    if not isinstance(statements, list) or not statements:
        raise OperationsSyntaxError(
            f"{path}.statements",
            f"must be a non-empty list of statements, got {shown(statements)}",
        )
    return StatementGroup(
        group_operator,
        tuple(
            _parse_statement(item, f"{path}.statements[{index}]", depth, condition)
            for index, item in enumerate(statements)
        ),
    )


def _parse_statement(
    value: Any, path: str, depth: int, condition: bool = False
) -> Statement:
    """Parse one statement of a group that is ``depth`` groups deep."""
    kinds = ("BinaryStatement", "UnaryStatement", "StatementGroup")
    fields = _object(value, path, kinds, "statement")
    if fields["type"] == "StatementGroup":
        return _parse_group(value, path, depth + 1, condition)
    negate = fields.get("negate", False)
    if not isinstance(negate, bool):
        raise OperationsSyntaxError(
            f"{path}.negate", f"must be true or false, got {shown(negate)}"
        )
    if fields["type"] == "UnaryStatement":
        operand = _parse_operand(
            _required(fields, "operand", path), f"{path}.operand", condition
        )
        name = _operator(
            _required(fields, "operator", path),
            f"{path}.operator",
            UNARY_OPERATORS,
            "operator",
        )
        return UnaryStatement(path, operand, name, negate)
    left = _parse_operand(
        _required(fields, "left_operand", path), f"{path}.left_operand", condition
    )
    comparator = _operator(
        _required(fields, "comparator", path),
        f"{path}.comparator",
        COMPARATORS,
        "comparator",
    )
    right = _parse_operand(
        _required(fields, "right_operand", path), f"{path}.right_operand", condition
    )
    # A static zone with a random operation left is known only when it runs.
    if (
        comparator == ZONE_COMPARATOR
        and isinstance(right, StaticValue)
        and not right.operations
    ):
        _check_static_zone(right.value, f"{path}.right_operand")
    return BinaryStatement(path, left, comparator, right, negate)


def _check_static_zone(zone: Any, path: str) -> None:
    """Raise OperationsSyntaxError for a static zone that every test would fail on.

    Roboflow's comparator fails when it runs, for each detection; a zone
    written in the definition is checked here instead.
    """
    try:
        zone_ring(zone)
    except ValueError as error:
        raise OperationsSyntaxError(path, str(error)) from error


def _operator(value: Any, path: str, supported: Mapping[str, Any], label: str) -> str:
    if not isinstance(value, dict):
        raise OperationsSyntaxError(
            path, f'must be an object such as {{"type": "=="}}, got {shown(value)}'
        )
    found = value.get("type")
    if not isinstance(found, str) or found not in supported:
        found_text = "missing" if "type" not in value else shown(found)
        raise OperationsSyntaxError(
            f"{path}.type",
            f"{label} {found_text} is not supported; supported: {', '.join(supported)}",
        )
    for key in value:
        if key != "type":
            raise OperationsSyntaxError(
                path, f"unknown key {shown(key)}; a {label} has only the key type"
            )
    return found


def _parse_operand(value: Any, path: str, condition: bool = False) -> Operand:
    fields = _object(value, path, ("StaticOperand", "DynamicOperand"), "operand")
    operations = fields.get("operations", [])
    if not isinstance(operations, list):
        raise OperationsSyntaxError(
            f"{path}.operations", f"must be a list, got {shown(operations)}"
        )

    if fields["type"] == "StaticOperand":
        value = _required(fields, "value", path)
        _check_value_operations(operations, path)
        random_index = first_random_index(operations)
        if random_index is None:
            random_index = len(operations)
        fixed = _static_value(value, operations[:random_index], path)
        return StaticValue(
            with_member_set(fixed),
            f"{path}.operations",
            tuple(operations[random_index:]),
            random_index,
        )

    name = fields.get("operand_name", DETECTION_OPERAND)
    if not isinstance(name, str):
        raise OperationsSyntaxError(
            f"{path}.operand_name", f"must be a string, got {shown(name)}"
        )
    if condition or name != DETECTION_OPERAND:
        _check_value_operations(operations, path, condition=condition)
        return Parameter(name, f"{path}.operand_name", tuple(operations))

    if not operations:
        raise OperationsSyntaxError(
            f"{path}.operations",
            f'the operand "{DETECTION_OPERAND}" is the detection being tested; '
            "it needs an ExtractDetectionProperty operation first to read "
            "a property of it, got 0 operations",
        )
    where = f"{path}.operations[0]"
    first_type = operations[0].get("type") if isinstance(operations[0], dict) else None
    if isinstance(first_type, str) and first_type in OPERATIONS:
        raise OperationsSyntaxError(
            f"{where}.type",
            f'the operand "{DETECTION_OPERAND}" is the detection being tested; '
            "its first operation must be ExtractDetectionProperty, to read a "
            f"property of it, got {shown(first_type)}. Add one "
            "before this operation",
        )
    extract = _object(
        operations[0], where, ("ExtractDetectionProperty",), "operand operation"
    )
    property_name = _required(extract, "property_name", where)
    if not isinstance(property_name, str) or property_name not in PROPERTIES:
        raise OperationsSyntaxError(
            f"{where}.property_name",
            f"property {shown(property_name)} is not supported; supported: "
            f"{', '.join(PROPERTIES)}",
        )
    then = operations[1:]
    if then:
        _check_value_operations(then, path, first=1)
        problem = chain_problem(then, PROPERTY_KINDS[property_name])
        if problem:
            raise OperationsSyntaxError(
                f"{path}.operations", _shift_indices(problem, 1)
            )
    return DetectionProperty(property_name, f"{path}.operations", tuple(then))


def _check_value_operations(
    operations: list, path: str, first: int = 0, condition: bool = False
) -> None:
    """Raise OperationsSyntaxError for the first invalid operation of an operand.

    ``first`` is the index of ``operations[0]`` in the operand's operations.
    """
    for index, operation in enumerate(operations):
        if isinstance(operation, dict) and operation.get("type") == (
            "ExtractDetectionProperty"
        ):
            where = (
                "a condition tests no detection, so none of its operands takes it"
                if condition
                else f'only the operand "{DETECTION_OPERAND}" takes it, as its '
                "first operation"
            )
            raise OperationsSyntaxError(
                f"{path}.operations[{index + first}].type",
                "ExtractDetectionProperty reads a property of the detection "
                f"being tested by a detections filter; {where}. Use "
                "DetectionsPropertyExtract to read a property of all detections",
            )
    if not operations:
        return
    problem = check_value_operations(operations)
    if problem is not None:
        raise OperationsSyntaxError(
            f"{path}.operations", _shift_indices(problem, first)
        )


def _shift_indices(problem: str, first: int) -> str:
    """Renumber the leading "operation N" of ``problem`` as N + ``first``."""
    return re.sub(
        r"^operation (\d+)",
        lambda match: f"operation {int(match.group(1)) + first}",
        problem,
    )


def _static_value(value: Any, operations: list, path: str) -> Any:
    """Return a StaticOperand's value after its operations.

    They read the same value for every detection, so they run once, here,
    and a failure is a problem with the definition. ``operations`` passed
    ``_check_value_operations``.
    """
    for position, operation in enumerate(operations):
        try:
            value = apply_operation(operation, value)
        except OperationError as error:
            raise OperationsSyntaxError(
                f"{path}.operations[{position}]",
                f"operation failed on the value {shown(value)}: {error}",
            ) from error
    return value


def _operands(statements: tuple[Statement, ...]) -> Iterator[Operand]:
    """Yield the operands of ``statements`` and their groups', in order."""
    for statement in statements:
        if isinstance(statement, StatementGroup):
            yield from _operands(statement.statements)
        elif isinstance(statement, BinaryStatement):
            yield statement.left
            yield statement.right
        else:
            yield statement.operand
