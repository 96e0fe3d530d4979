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
  ``ascending`` unless it is false;
- ``DetectionsRename``: renames classes by ``class_map``. With ``strict``
  (the default) every class must be mapped, and class ids become the
  indices of the new names in sorted order. Without it, unmapped classes
  keep their names and ids, and new names get ids from
  ``new_classes_id_offset`` (1024) up, in sorted order. ``class_map`` and
  ``strict`` may each be a key of ``operations_parameters`` instead.
- ``PickDetectionsByParentClass``: keeps the detections of class
  ``parent_class``, then every other detection whose box centre lies in
  one of their boxes, edges included, each group in its own order. With no
  detection of that class, it keeps none.

The arithmetic is that of Roboflow's query language (``inference`` 1.5.0;
``PickDetectionsByParentClass`` as in ``inference`` 1.8.3). Other
operations raise OperationsSyntaxError with their path.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from workflows.blocks.base import shown
from workflows.blocks.detections_filter.evaluation import EvaluationError, keep_mask
from workflows.blocks.detections_filter.operations import (
    OperationsSyntaxError,
    parse_filter,
    read_operation,
)
from workflows.blocks.detections_filter.statements import StatementGroup
from workflows.blocks.property_definition.v1 import DETECTIONS_OPERATIONS
from workflows.detections import Detections

# Property definition and filter operands apply the same operations, so the
# list lives there: this module imports that one, not the other way round.
OPERATION_TYPES = DETECTIONS_OPERATIONS


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


@dataclass(frozen=True)
class Rename:
    """A class renaming. A string ``class_map`` or ``strict`` names a parameter."""

    class_map: dict[str, str] | str
    strict: bool | str
    new_classes_id_offset: int


@dataclass(frozen=True)
class PickByParent:
    parent_class: str


Operation = Filter | Move | Select | Sort | Rename | PickByParent


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


def rename_parameters(operations: tuple[Operation, ...]) -> list[tuple[str, str]]:
    """Return (path, parameter name) for each rename value given by a parameter."""
    named = []
    for index, operation in enumerate(operations):
        if not isinstance(operation, Rename):
            continue
        for key in ("class_map", "strict"):
            value = getattr(operation, key)
            if isinstance(value, str):
                named.append((f"operations[{index}].{key}", value))
    return named


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
    if isinstance(operation, Rename):
        return _rename(operation, detections, parameters)
    if isinstance(operation, PickByParent):
        return _pick_by_parent(operation.parent_class, detections)
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
    if kind == "DetectionsRename":
        return _parse_rename(fields, path)
    if kind == "PickDetectionsByParentClass":
        if "parent_class" not in fields:
            raise OperationsSyntaxError(path, '"parent_class" is missing')
        parent_class = fields["parent_class"]
        if not isinstance(parent_class, str):
            raise OperationsSyntaxError(
                f"{path}.parent_class",
                f"must be a class name, got {shown(parent_class)}",
            )
        return PickByParent(parent_class)
    ascending = fields.get("ascending", True)
    if not isinstance(ascending, bool):
        raise OperationsSyntaxError(
            f"{path}.ascending", f"must be true or false, got {shown(ascending)}"
        )
    return Sort(_choice(fields, "mode", path, tuple(SORT_KEYS)), ascending)


# The largest offset or shift in pixels, as the detection offset block bounds
# its own. An integer beyond a 64-bit float's range would fail the step.
MAX_PIXELS = 1_000_000

# Class ids are stored as 64-bit integers. A 32-bit range leaves room for
# the offset plus the number of new names.
CLASS_ID_RANGE = (-(2**31), 2**31 - 1)


def _integer(fields: dict[str, Any], key: str, path: str) -> int:
    if key not in fields:
        raise OperationsSyntaxError(path, f'"{key}" is missing')
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise OperationsSyntaxError(
            f"{path}.{key}", f"must be an integer number of pixels, got {shown(value)}"
        )
    if abs(value) > MAX_PIXELS:
        raise OperationsSyntaxError(
            f"{path}.{key}",
            f"must be an integer number of pixels from {-MAX_PIXELS} to "
            f"{MAX_PIXELS}, got {shown(value)}",
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


def _parse_rename(fields: dict[str, Any], path: str) -> Rename:
    if "class_map" not in fields:
        raise OperationsSyntaxError(path, '"class_map" is missing')
    class_map = fields["class_map"]
    if not isinstance(class_map, str):
        problem = _class_map_problem(class_map)
        if problem:
            raise OperationsSyntaxError(f"{path}.class_map", problem)
    strict = fields.get("strict", True)
    if not isinstance(strict, (bool, str)):
        raise OperationsSyntaxError(
            f"{path}.strict",
            "must be true, false or the name of a key of operations_parameters, "
            f"got {shown(strict)}",
        )
    offset = fields.get("new_classes_id_offset", 1024)
    lowest, highest = CLASS_ID_RANGE
    if (
        isinstance(offset, bool)
        or not isinstance(offset, int)
        or not lowest <= offset <= highest
    ):
        raise OperationsSyntaxError(
            f"{path}.new_classes_id_offset",
            f"must be an integer from {lowest} to {highest}, got {shown(offset)}",
        )
    return Rename(class_map, strict, offset)


def _class_map_problem(class_map: Any) -> str | None:
    if not isinstance(class_map, dict) or not all(
        isinstance(name, str) for name in class_map.values()
    ):
        return (
            "must be an object that maps class names to new class names, or the "
            f"name of a key of operations_parameters, got {shown(class_map)}"
        )
    return None


def _rename(
    operation: Rename, detections: Detections, parameters: Mapping[str, Any]
) -> Detections:
    class_map = operation.class_map
    if isinstance(class_map, str):
        class_map = parameters[class_map]
        problem = _class_map_problem(class_map)
        if problem:
            raise EvaluationError(f"DetectionsRename class_map {problem}")
    strict = operation.strict
    if isinstance(strict, str):
        strict = parameters[strict]
        if not isinstance(strict, bool):
            raise EvaluationError(
                f"DetectionsRename strict must be true or false, got {shown(strict)}"
            )

    names = detections.class_names
    if strict:
        unmapped = sorted({name for name in names if name not in class_map})
        if unmapped:
            raise EvaluationError(
                f"DetectionsRename: class {shown(unmapped[0])} is not in class_map, "
                "and strict is true. Map every class, or set strict to false"
            )
        ids = {
            name: index for index, name in enumerate(sorted(set(class_map.values())))
        }
    else:
        ids = dict(zip(names, detections.class_id.tolist(), strict=True))
        added = sorted({name for name in class_map.values() if name not in ids})
        for index, name in enumerate(added):
            ids[name] = operation.new_classes_id_offset + index

    renamed = [class_map.get(name, name) for name in names]
    return dataclasses.replace(
        detections,
        class_names=renamed,
        class_id=np.array([ids[name] for name in renamed], dtype=np.int64),
    )


def _pick_by_parent(parent_class: str, detections: Detections) -> Detections:
    is_parent = np.array(
        [name == parent_class for name in detections.class_names], dtype=bool
    )
    parents = np.flatnonzero(is_parent)
    if len(parents) == 0:
        return detections.select(is_parent)
    others = np.flatnonzero(~is_parent)
    parent_boxes = detections.xyxy[parents]
    centre_x = _centre_x(detections)[others][:, None]
    centre_y = _centre_y(detections)[others][:, None]
    inside = (
        (parent_boxes[:, 0] <= centre_x)
        & (centre_x <= parent_boxes[:, 2])
        & (parent_boxes[:, 1] <= centre_y)
        & (centre_y <= parent_boxes[:, 3])
    ).any(axis=1)
    return detections.take(np.concatenate([parents, others[inside]]))
