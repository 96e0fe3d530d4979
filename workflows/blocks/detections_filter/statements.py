"""Statements of Roboflow's filter language, as read from ``operations``."""

from dataclasses import dataclass
from typing import Any

# The operand name of the detection being tested.
DETECTION_OPERAND = "_"


@dataclass(frozen=True)
class StaticValue:
    """A StaticOperand: the same value for every detection.

    ``value`` is the operand's value after its operations, which are
    applied once, when the operations are parsed, up to the first whose
    result is random (RandomNumber). That one and the rest are left in
    ``operations``, to apply each time the operand is evaluated, as in
    Roboflow.
    """

    value: Any
    # The path of the operand in ``operations``, for errors.
    path: str = ""
    operations: tuple[dict, ...] = ()
    # The index of ``operations[0]`` among the operand's operations.
    first: int = 0


@dataclass(frozen=True)
class Parameter:
    """A DynamicOperand that names a key of operations_parameters.

    In a condition (``parse_condition``), the key names a value of the
    block's parameters. ``operations`` are property definition operations
    applied to the value before the comparison: once per block call up to
    the first random one, which and those after it run for each detection.
    """

    name: str
    # The path of the name in ``operations``, for errors.
    path: str
    operations: tuple[dict, ...] = ()


@dataclass(frozen=True)
class DetectionProperty:
    """A property of the detection being tested (ExtractDetectionProperty).

    ``operations`` are property definition operations applied to the
    property's value before the comparison.
    """

    name: str
    # The path of the operand in ``operations``, for errors.
    path: str = ""
    operations: tuple[dict, ...] = ()


Operand = StaticValue | Parameter | DetectionProperty


@dataclass(frozen=True)
class BinaryStatement:
    # The path of the statement in ``operations``, for errors.
    path: str
    left: Operand
    comparator: str
    right: Operand
    negate: bool


@dataclass(frozen=True)
class UnaryStatement:
    # The path of the statement in ``operations``, for errors.
    path: str
    operand: Operand
    operator: str
    negate: bool


@dataclass(frozen=True)
class StatementGroup:
    operator: str
    statements: tuple["BinaryStatement | UnaryStatement | StatementGroup", ...]


Statement = BinaryStatement | UnaryStatement | StatementGroup
