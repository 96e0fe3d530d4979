"""Evaluate filter statements on detections as Roboflow's query language does."""

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from workflows.blocks.base import shown
from workflows.blocks.detections_filter.geometry import point_in_zone
from workflows.blocks.detections_filter.statements import (
    Operand,
    Parameter,
    Statement,
    StatementGroup,
    StaticValue,
    UnaryStatement,
)
from workflows.blocks.property_definition.v1 import (
    OperationError,
    apply_operation,
    first_random_index,
)
from workflows.blocks.property_definition.value_operations import LIST, NUMBER, STRING
from workflows.detections import Detections


def _box(detections: Detections, index: int) -> tuple[float, float, float, float]:
    x_min, y_min, x_max, y_max = (float(v) for v in detections.xyxy[index])
    return x_min, y_min, x_max, y_max


def _center(detections: Detections, index: int) -> tuple[np.float64, np.float64]:
    # NumPy scalars, not floats, as in Roboflow: comparing one with a list
    # makes an array, whose truth value is an error.
    x_min, y_min, x_max, y_max = (np.float64(v) for v in detections.xyxy[index])
    return x_min + (x_max - x_min) / 2, y_min + (y_max - y_min) / 2


def _size(detections: Detections, index: int) -> float:
    x_min, y_min, x_max, y_max = _box(detections, index)
    return (y_max - y_min) * (x_max - x_min)


ANCHORS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")

# Properties of one detection, named and typed as Roboflow's
# ExtractDetectionProperty returns them. Boxes are in pixels of the image the
# detections were found in (a crop, for detections in crops).
PROPERTIES: dict[str, Callable[[Detections, int], Any]] = {
    "class_name": lambda detections, index: detections.class_names[index],
    "class_id": lambda detections, index: int(detections.class_id[index]),
    "confidence": lambda detections, index: float(detections.confidence[index]),
    "x_min": lambda detections, index: _box(detections, index)[0],
    "y_min": lambda detections, index: _box(detections, index)[1],
    "x_max": lambda detections, index: _box(detections, index)[2],
    "y_max": lambda detections, index: _box(detections, index)[3],
    "size": _size,
    "center": _center,
    "top_left": lambda detections, index: _box(detections, index)[0:2],
    "top_right": lambda detections, index: (
        _box(detections, index)[2],
        _box(detections, index)[1],
    ),
    "bottom_left": lambda detections, index: (
        _box(detections, index)[0],
        _box(detections, index)[3],
    ),
    "bottom_right": lambda detections, index: _box(detections, index)[2:4],
}

# The kind of value each property is, for checking the operations after it.
PROPERTY_KINDS = {name: NUMBER for name in PROPERTIES}
PROPERTY_KINDS["class_name"] = STRING
PROPERTY_KINDS.update((name, LIST) for name in ANCHORS)


class MemberList(list):
    """A list whose ``in`` looks its items up in a set, where they hash.

    ``in`` on a plain list compares the value with every item, so a filter
    testing one long list against another, for each detection, took time
    that grows with the product of their lengths. Equal hashable values
    hash alike, so the set returns what the list would. A value or item
    that does not hash falls back to the list.
    """

    def __init__(self, items: list) -> None:
        super().__init__(items)
        try:
            self._members: frozenset | None = frozenset(self)
        except TypeError:
            self._members = None

    def __contains__(self, value: object) -> bool:
        if self._members is not None:
            try:
                return value in self._members
            except TypeError:
                pass
        return super().__contains__(value)


def with_member_set(value: Any) -> Any:
    """Return a list ``value`` as a MemberList, anything else as it is."""
    return MemberList(value) if isinstance(value, list) else value


ZONE_COMPARATOR = "(Detection) in zone"

COMPARATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "(Number) ==": operator.eq,
    "(Number) !=": operator.ne,
    "(Number) >": operator.gt,
    "(Number) >=": operator.ge,
    "(Number) <": operator.lt,
    "(Number) <=": operator.le,
    "(Number) in range": lambda value, bounds: bounds[0] <= value <= bounds[1],
    "in (Sequence)": lambda value, sequence: value in sequence,
    "any in (Sequence)": lambda values, sequence: any(v in sequence for v in values),
    "all in (Sequence)": lambda values, sequence: all(v in sequence for v in values),
    "(String) startsWith": lambda text, prefix: text.startswith(prefix),
    "(String) endsWith": lambda text, suffix: text.endswith(suffix),
    "(String) contains": lambda text, part: part in text,
    # Whether a point, such as a detection's "center", is inside a polygon.
    ZONE_COMPARATOR: point_in_zone,
}

UNARY_OPERATORS: dict[str, Callable[[Any], bool]] = {
    "Exists": lambda value: value is not None,
    "DoesNotExist": lambda value: value is None,
    "(Boolean) is True": lambda value: value is True,
    "(Boolean) is False": lambda value: value is False,
    "(Sequence) is empty": lambda value: len(value) == 0,
    "(Sequence) is not empty": lambda value: len(value) > 0,
}


class EvaluationError(ValueError):
    """A statement that failed on the values of one detection."""


def keep_mask(
    filters: tuple[StatementGroup, ...],
    detections: Detections,
    parameters: Mapping[str, Any],
    keep: np.ndarray,
) -> np.ndarray:
    """Return which of the detections that ``keep`` marks pass every filter.

    A filter is evaluated only on the detections that passed the ones before
    it, as Roboflow applies each to the output of the previous one. Raises
    EvaluationError when a statement fails on a detection's values.
    """
    keep = keep.copy()
    parameters = {name: with_member_set(value) for name, value in parameters.items()}
    # A parameter's value after its operations is the same for every
    # detection, so each is computed once, on the first detection that
    # reads it. Computed per detection, a SequenceApply over a parameter of
    # 100,000 items took 0.14 s for each detection (CPython 3.11, one core),
    # in one block call that the run's time limit cannot stop.
    computed: dict[int, Any] = {}
    for condition in filters:
        for index in np.flatnonzero(keep):
            keep[index] = _evaluate(
                condition, detections, int(index), parameters, computed
            )
    return keep


def evaluate_condition(condition: StatementGroup, parameters: Mapping) -> bool:
    """Return whether a condition from ``parse_condition`` holds for ``parameters``.

    ``parameters`` maps every name the condition's operands use to its value.
    Raises EvaluationError when a statement or an operand's operation fails.
    """
    parameters = {name: with_member_set(value) for name, value in parameters.items()}
    return _evaluate(condition, None, None, parameters, {})


def _value(
    operand: Operand,
    detections: Detections | None,
    index: int | None,
    parameters: Mapping,
    computed: dict[int, Any],
) -> Any:
    """Return ``operand``'s value, from ``computed`` (by id) for a parameter.

    ``computed`` stores each parameter operand's value after its operations
    up to the first random one, for the rest of the block call. The random
    one and those after it run on every evaluation.
    """
    if isinstance(operand, StaticValue):
        if not operand.operations:
            return operand.value
        value = _apply_operations(
            operand,
            operand.operations,
            operand.value,
            "the static value",
            operand.first,
        )
        return with_member_set(value)
    if isinstance(operand, Parameter):
        return _parameter_value(operand, parameters, computed)
    assert detections is not None and index is not None
    value = PROPERTIES[operand.name](detections, index)
    # A detection operand's operation 0 is its ExtractDetectionProperty.
    value = _apply_operations(
        operand,
        operand.operations,
        value,
        f"{operand.name} of detection {index}",
        1,
    )
    return with_member_set(value) if operand.operations else value


def _parameter_value(
    operand: Parameter, parameters: Mapping, computed: dict[int, Any]
) -> Any:
    operations = operand.operations
    subject = f'"{operand.name}"'
    random_index = first_random_index(operations)
    if random_index is None:
        random_index = len(operations)
    if id(operand) in computed:
        value = computed[id(operand)]
    else:
        value = _apply_operations(
            operand, operations[:random_index], parameters[operand.name], subject, 0
        )
        if random_index == len(operations) and operations:
            value = with_member_set(value)
        computed[id(operand)] = value
    if random_index == len(operations):
        return value
    value = _apply_operations(
        operand, operations[random_index:], value, subject, random_index
    )
    return with_member_set(value)


def _apply_operations(
    operand: Operand, operations: Sequence[dict], value: Any, subject: str, first: int
) -> Any:
    """Return ``value`` after ``operations``, the operand's from index ``first`` on."""
    for position, operation in enumerate(operations, first):
        try:
            value = apply_operation(operation, value)
        except OperationError as error:
            raise EvaluationError(
                f"{operand.path}: operation {position} of {subject} failed: {error}"
            ) from error
    return value


def _evaluate(
    statement: Statement,
    detections: Detections | None,
    index: int | None,
    parameters: Mapping,
    computed: dict[int, Any],
) -> bool:
    if isinstance(statement, StatementGroup):
        # Every statement is evaluated before they are combined, as Roboflow
        # does, so an error in any of them fails the step.
        results = [
            _evaluate(item, detections, index, parameters, computed)
            for item in statement.statements
        ]
        return all(results) if statement.operator == "and" else any(results)
    if isinstance(statement, UnaryStatement):
        value = _value(statement.operand, detections, index, parameters, computed)
        predicate = UNARY_OPERATORS[statement.operator]
        arguments: tuple[Any, ...] = (value,)
        name = statement.operator
    else:
        left = _value(statement.left, detections, index, parameters, computed)
        right = _value(statement.right, detections, index, parameters, computed)
        predicate = COMPARATORS[statement.comparator]
        arguments = (left, right)
        name = statement.comparator
    try:
        result = bool(predicate(*arguments))
    # The predicates apply Python's operators to values from the definition
    # and its parameters, so any exception is a problem with those values.
    except Exception as error:
        shown_values = ", ".join(shown(argument) for argument in arguments)
        subject = "" if index is None else f" on detection {index}"
        raise EvaluationError(
            f"{statement.path}: {name} failed{subject} with the "
            f"values {shown_values}: {_error_text(predicate, arguments, error)}"
        ) from error
    return not result if statement.negate else result


def _error_text(predicate: Any, arguments: tuple[Any, ...], error: Exception) -> str:
    """Return the text of ``error`` as ``predicate`` raises it on plain lists.

    Python's message names each operand's class. A parameter's list arrives
    as the internal MemberList, which the definition never mentions, so the
    call is repeated with plain lists, whose message names ``list``.
    """
    plain = tuple(
        list(argument) if isinstance(argument, MemberList) else argument
        for argument in arguments
    )
    try:
        predicate(*plain)
    except Exception as plain_error:
        error = plain_error
    return f"{type(error).__name__}: {error}"
