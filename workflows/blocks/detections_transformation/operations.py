"""The operations of Roboflow's detections transformation, in part.

``operations`` is a list applied in order, each to the output of the one
before, as Roboflow's query language chains them. Supported:

- ``DetectionsFilter``: keeps the detections whose ``filter_operation``
  is true, in the filter block's language (detections_filter/operations.py);
- ``DetectionsOffset``: grows each box by ``offset_x`` and ``offset_y``
  pixels, half on each side, not clipped to the image;
- ``DetectionsShift``: moves each box by ``shift_x`` and ``shift_y`` pixels;
- ``DetectionsSelection``: keeps one detection by ``mode``: ``first``,
  ``last``, ``left_most`` or ``right_most`` (by box centre), or
  ``top_confidence``;
- ``SortDetections``: sorts by ``mode`` (``confidence``, ``x_min``,
  ``x_max``, ``y_min``, ``y_max``, ``size``, ``center_x``, ``center_y``),
  ``ascending`` unless it is false.

The arithmetic is that of Roboflow's query language (``inference`` 1.5.0).
Other operations, such as ``DetectionsRename``, raise OperationsSyntaxError
with their path.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from workflows.blocks.base import shown
from workflows.blocks.detections_filter.evaluation import keep_mask
from workflows.blocks.detections_filter.operations import (
    OperationsSyntaxError,
    parse_filter,
    read_operation,
)
from workflows.blocks.detections_filter.statements import StatementGroup
from workflows.detections import Detections

OPERATION_TYPES = (
    "DetectionsFilter",
    "DetectionsOffset",
    "DetectionsShift",
    "DetectionsSelection",
    "SortDetections",
)


def _centre_x(detections: Detections) -> np.ndarray:
    return (detections.xyxy[:, 0] + detections.xyxy[:, 2]) * 0.5


def _centre_y(detections: Detections) -> np.ndarray:
    return (detections.xyxy[:, 1] + detections.xyxy[:, 3]) * 0.5


def _area(detections: Detections) -> np.ndarray:
    xyxy = detections.xyxy
    return (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])


SORT_KEYS: dict[str, Callable[[Detections], np.ndarray]] = {
    "confidence": lambda detections: detections.confidence,
    "x_min": lambda detections: detections.xyxy[:, 0],
    "x_max": lambda detections: detections.xyxy[:, 2],
    "y_min": lambda detections: detections.xyxy[:, 1],
    "y_max": lambda detections: detections.xyxy[:, 3],
    "size": _area,
    "center_x": _centre_x,
    "center_y": _centre_y,
}

# The index of the one detection each selection mode keeps, for a non-empty
# list. np.argmin and np.argmax return the first of equal values.
SELECTIONS: dict[str, Callable[[Detections], int]] = {
    "first": lambda detections: 0,
    "last": lambda detections: len(detections) - 1,
    "left_most": lambda detections: int(np.argmin(_centre_x(detections))),
    "right_most": lambda detections: int(np.argmax(_centre_x(detections))),
    "top_confidence": lambda detections: int(np.argmax(detections.confidence)),
}


@dataclass(frozen=True)
class Filter:
    condition: StatementGroup


@dataclass(frozen=True)
class Move:
    """An offset or a shift: pixels added to (x_min, y_min, x_max, y_max)."""

    delta: tuple[float, float, float, float]


@dataclass(frozen=True)
class Select:
    mode: str


@dataclass(frozen=True)
class Sort:
    mode: str
    ascending: bool


Operation = Filter | Move | Select | Sort


def parse_transformations(value: Any) -> tuple[Operation, ...]:
    """Return the operations of ``operations``, in order.

    Raises OperationsSyntaxError at the first part that is not supported.
    """
    if not isinstance(value, list):
        raise OperationsSyntaxError("operations", f"must be a list, got {shown(value)}")
    return tuple(
        _parse_operation(item, f"operations[{index}]")
        for index, item in enumerate(value)
    )


def check_transformations(value: Any) -> str | None:
    """Return the first problem in ``operations``, with its path, or None."""
    try:
        parse_transformations(value)
    except OperationsSyntaxError as error:
        return str(error)
    return None


def filter_conditions(operations: tuple[Operation, ...]) -> tuple[StatementGroup, ...]:
    return tuple(op.condition for op in operations if isinstance(op, Filter))


def transform(
    operations: tuple[Operation, ...],
    detections: Detections,
    parameters: Mapping[str, Any],
) -> Detections:
    """Apply ``operations`` in order. Raises EvaluationError as the filter does."""
    for operation in operations:
        detections = _apply(operation, detections, parameters)
    return detections


def _apply(
    operation: Operation, detections: Detections, parameters: Mapping[str, Any]
) -> Detections:
    if isinstance(operation, Filter):
        everything = np.ones(len(detections), dtype=bool)
        keep = keep_mask((operation.condition,), detections, parameters, everything)
        return detections.select(keep)
    if isinstance(operation, Move):
        moved = detections.xyxy + np.array(operation.delta, dtype=np.float32)
        return dataclasses.replace(detections, xyxy=moved.astype(np.float32))
    if len(detections) == 0:
        return detections
    if isinstance(operation, Select):
        keep = np.zeros(len(detections), dtype=bool)
        keep[SELECTIONS[operation.mode](detections)] = True
        return detections.select(keep)
    order = np.argsort(SORT_KEYS[operation.mode](detections))
    if not operation.ascending:
        order = order[::-1]
    return detections.take(order)


def _parse_operation(item: Any, path: str) -> Operation:
    fields = read_operation(item, path, OPERATION_TYPES)
    kind = fields["type"]
    if kind == "DetectionsFilter":
        return Filter(parse_filter(fields, path))
    if kind == "DetectionsOffset":
        half_x = _integer(fields, "offset_x", path) / 2
        half_y = _integer(fields, "offset_y", path) / 2
        return Move((-half_x, -half_y, half_x, half_y))
    if kind == "DetectionsShift":
        shift_x = _integer(fields, "shift_x", path)
        shift_y = _integer(fields, "shift_y", path)
        return Move((shift_x, shift_y, shift_x, shift_y))
    if kind == "DetectionsSelection":
        return Select(_choice(fields, "mode", path, tuple(SELECTIONS)))
    ascending = fields.get("ascending", True)
    if not isinstance(ascending, bool):
        raise OperationsSyntaxError(
            f"{path}.ascending", f"must be true or false, got {shown(ascending)}"
        )
    return Sort(_choice(fields, "mode", path, tuple(SORT_KEYS)), ascending)


def _integer(fields: dict[str, Any], key: str, path: str) -> int:
    if key not in fields:
        raise OperationsSyntaxError(path, f'"{key}" is missing')
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise OperationsSyntaxError(
            f"{path}.{key}", f"must be an integer number of pixels, got {shown(value)}"
        )
    return value


def _choice(
    fields: dict[str, Any], key: str, path: str, choices: tuple[str, ...]
) -> str:
    if key not in fields:
        raise OperationsSyntaxError(path, f'"{key}" is missing')
    value = fields[key]
    if value not in choices:
        raise OperationsSyntaxError(
            f"{path}.{key}",
            f"must be one of {', '.join(choices)}, got {shown(value)}",
        )
    return value
