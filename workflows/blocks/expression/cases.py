"""The ``switch`` of Roboflow's Expression block: cases tried in order.

Read as Roboflow's CasesDefinition (``formatters/expression/v1.py`` in
roboflow/inference):

- ``{"type": "CasesDefinition", "cases": [...], "default": result}``
- a case is ``{"type": "CaseDefinition", "condition": StatementGroup,
  "result": result}``; the condition is read as ``parse_condition`` reads
  ContinueIf's
- a result is ``{"type": "StaticCaseResult", "value": ...}``, or
  ``{"type": "DynamicCaseResult", "parameter_name": name, "operations":
  [...]}``, which returns the variable ``name`` after the property
  definition operations, if any.

Unknown keys are rejected, as in the detections filter.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from workflows.blocks.base import shown
from workflows.blocks.detections_filter.operations import (
    OperationsSyntaxError,
    condition_parameters,
    parse_condition,
)
from workflows.blocks.detections_filter.statements import StatementGroup
from workflows.blocks.property_definition.v1 import (
    check_operations as check_value_operations,
)

KEYS = {
    "CasesDefinition": ("type", "cases", "default"),
    "CaseDefinition": ("type", "condition", "result"),
    "StaticCaseResult": ("type", "value"),
    "DynamicCaseResult": ("type", "parameter_name", "operations"),
}


@dataclass(frozen=True)
class StaticResult:
    value: Any


@dataclass(frozen=True)
class DynamicResult:
    name: str
    operations: tuple[dict, ...]
    # The path of the name in ``switch``, for errors.
    path: str


Result = StaticResult | DynamicResult


@dataclass(frozen=True)
class Case:
    condition: StatementGroup
    result: Result


@dataclass(frozen=True)
class Cases:
    cases: tuple[Case, ...]
    default: Result


def parse_cases(value: Any, path: str = "switch") -> Cases:
    """Return the cases of ``value``; raise OperationsSyntaxError at a bad part."""
    fields = _object(value, path, "CasesDefinition")
    cases = fields.get("cases")
    if not isinstance(cases, list):
        raise OperationsSyntaxError(
            f"{path}.cases", f"must be a list of CaseDefinition, got {shown(cases)}"
        )
    if "default" not in fields:
        raise OperationsSyntaxError(path, '"default" is missing')
    parsed = []
    for index, case in enumerate(cases):
        where = f"{path}.cases[{index}]"
        case_fields = _object(case, where, "CaseDefinition")
        for key in ("condition", "result"):
            if key not in case_fields:
                raise OperationsSyntaxError(where, f'"{key}" is missing')
        parsed.append(
            Case(
                parse_condition(case_fields["condition"], f"{where}.condition"),
                _parse_result(case_fields["result"], f"{where}.result"),
            )
        )
    return Cases(tuple(parsed), _parse_result(fields["default"], f"{path}.default"))


def variable_uses(cases: Cases) -> Iterator[tuple[str, str]]:
    """Yield (path, variable name) for every variable that ``cases`` read."""
    for case in cases.cases:
        for parameter in condition_parameters(case.condition):
            yield parameter.path, parameter.name
        if isinstance(case.result, DynamicResult):
            yield case.result.path, case.result.name
    if isinstance(cases.default, DynamicResult):
        yield cases.default.path, cases.default.name


def _parse_result(value: Any, path: str) -> Result:
    if not isinstance(value, dict) or value.get("type") not in (
        "StaticCaseResult",
        "DynamicCaseResult",
    ):
        raise OperationsSyntaxError(
            path,
            "must be a StaticCaseResult or DynamicCaseResult object, got "
            f"{shown(value)}",
        )
    fields = _object(value, path, value["type"])
    if fields["type"] == "StaticCaseResult":
        if "value" not in fields:
            raise OperationsSyntaxError(path, '"value" is missing')
        return StaticResult(fields["value"])
    name = fields.get("parameter_name")
    if not isinstance(name, str):
        raise OperationsSyntaxError(
            f"{path}.parameter_name", f"must be a string, got {shown(name)}"
        )
    operations = fields.get("operations") or []
    if not isinstance(operations, list):
        raise OperationsSyntaxError(
            f"{path}.operations", f"must be a list, got {shown(operations)}"
        )
    if operations:
        problem = check_value_operations(operations)
        if problem is not None:
            raise OperationsSyntaxError(f"{path}.operations", problem)
    return DynamicResult(name, tuple(operations), f"{path}.parameter_name")


def _object(value: Any, path: str, type_name: str) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") != type_name:
        raise OperationsSyntaxError(
            path,
            f'must be an object such as {{"type": "{type_name}"}}, got {shown(value)}',
        )
    for key in value:
        if key not in KEYS[type_name]:
            raise OperationsSyntaxError(
                path,
                f"unknown key {shown(key)}; a {type_name} has the keys "
                f"{', '.join(KEYS[type_name])}",
            )
    return value
