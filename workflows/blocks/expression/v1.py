"""Expression: return the result of the first case whose condition holds.

The fields are Roboflow's (``roboflow_core/expression@v1``): ``data`` names
variables, ``data_operations`` transforms some of them with property
definition operations, and ``switch`` (``cases.py``) picks the output.
"""

from typing import Any

from workflows.blocks.base import (
    ANY,
    VALUE,
    Block,
    Field,
    ParsedByIdentity,
    StepContext,
    shown,
)
from workflows.blocks.detections_filter.evaluation import (
    EvaluationError,
    evaluate_condition,
)
from workflows.blocks.detections_filter.operations import OperationsSyntaxError
from workflows.blocks.expression.cases import (
    DynamicResult,
    Result,
    parse_cases,
    variable_uses,
)
from workflows.blocks.property_definition.v1 import (
    OperationError,
    apply_operation,
)
from workflows.blocks.property_definition.v1 import (
    check_operations as check_value_operations,
)
from workflows.errors import StepExecutionError


def check_switch(value: Any) -> str | None:
    try:
        parse_cases(value)
    except OperationsSyntaxError as error:
        return str(error)
    return None


def check_data_operations(value: Any) -> str | None:
    for name, operations in value.items():
        if not isinstance(operations, list):
            return (
                f"the operations of {shown(name)} must be a list, got "
                f"{shown(operations)}"
            )
        problem = check_value_operations(operations) if operations else None
        if problem is not None:
            return f"the operations of {shown(name)}: {problem}"
    return None


class ExpressionBlock(Block):
    type = "roboflow_core/expression@v1"
    aliases = ("Expression",)
    title = "Expression"
    description = (
        "Returns the result of the first case of switch whose condition holds "
        "for the variables in data, or its default."
    )
    fields = (
        Field(
            "data",
            ANY,
            "Variables by name, each a selector of an input or a step output "
            "(of any kind), or a literal.",
            mapping=True,
        ),
        Field(
            "data_operations",
            VALUE,
            "Property definition operations applied to variables before the "
            'cases, by variable name: {"predictions": [{"type": '
            '"SequenceLength"}]}.',
            required=False,
            default={},
            types=(dict,),
            check=check_data_operations,
        ),
        Field(
            "switch",
            VALUE,
            "Roboflow's CasesDefinition: cases, each a condition and a result, "
            "tried in order, and the default result.",
            types=(dict,),
            check=check_switch,
        ),
    )
    outputs = {"output": VALUE}

    @classmethod
    def check_bound(cls, kinds, literals) -> list[tuple[str, str]]:
        problems = []
        for field_name in ("data_operations", "switch"):
            if field_name not in literals:
                problems.append(
                    (
                        field_name,
                        "must be written in the definition, not given by a selector",
                    )
                )
        if problems:
            return problems
        names = literals["data"]
        declared = ", ".join(f'"{name}"' for name in names) or "none"
        for name in literals["data_operations"]:
            if name not in names:
                problems.append(
                    (
                        "data_operations",
                        f'"{name}" is not a key of data (keys: {declared}). '
                        "Add it there",
                    )
                )
        for path, name in variable_uses(parse_cases(literals["switch"])):
            if name not in names:
                problems.append(
                    (
                        "switch",
                        f'{path}: "{name}" is not a key of data (keys: '
                        f"{declared}). Add it there",
                    )
                )
        return problems

    def run(
        self,
        context: StepContext,
        *,
        data: dict[str, Any],
        data_operations: dict[str, list],
        switch: dict,
    ) -> dict[str, Any]:
        try:
            variables = dict(data)
            for name, operations in data_operations.items():
                variables[name] = _apply(operations, variables[name], name)
            cases = parsed_cases(switch)
            for case in cases.cases:
                if evaluate_condition(case.condition, variables):
                    return {"output": _result(case.result, variables)}
            return {"output": _result(cases.default, variables)}
        except EvaluationError as error:
            raise StepExecutionError(
                str(error), step=context.step_name, user_error=True
            ) from error


def _apply(operations: list, value: Any, where: str) -> Any:
    for index, operation in enumerate(operations):
        try:
            value = apply_operation(operation, value)
        except OperationError as error:
            raise EvaluationError(
                f"{where}: operation {index} failed: {error}"
            ) from error
    return value


def _result(result: Result, variables: dict[str, Any]) -> Any:
    if isinstance(result, DynamicResult):
        return _apply(list(result.operations), variables[result.name], result.path)
    return result.value


# Each switch of a plan is parsed once.
parsed_cases = ParsedByIdentity(parse_cases)
