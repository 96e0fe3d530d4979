"""Continue if: run the next steps for an image only where a condition holds.

The fields are Roboflow's (``roboflow_core/continue_if@v1``). The condition
is a StatementGroup of Roboflow's query language, as the detections filter
reads it, whose operands name keys of ``evaluation_parameters``. The
executor skips each step in ``next_steps`` for every image or crop where the
condition is false; see ``workflows/executor.py``.
"""

from typing import Any

from workflows.blocks.base import (
    ANY,
    FLOW_CONTROL,
    STEPS,
    VALUE,
    Block,
    Field,
    ParsedByIdentity,
    StepContext,
    number_between,
)
from workflows.blocks.detections_filter.evaluation import (
    EvaluationError,
    evaluate_condition,
)
from workflows.blocks.detections_filter.operations import (
    OperationsSyntaxError,
    condition_parameters,
    parse_condition,
)
from workflows.blocks.detections_filter.statements import StatementGroup
from workflows.errors import StepExecutionError

CONDITION_PATH = "condition_statement"


def check_condition(value: Any) -> str | None:
    """Return the first problem in a condition statement, with its path, or None."""
    try:
        parse_condition(value, CONDITION_PATH)
    except OperationsSyntaxError as error:
        return str(error)
    return None


class ContinueIfBlock(Block):
    type = "roboflow_core/continue_if@v1"
    aliases = ("ContinueIf",)
    title = "Continue if"
    description = (
        "Runs the steps named in next_steps for an image (or crop) only where "
        "condition_statement holds; elsewhere they are skipped and their "
        "outputs are null, as are those of the steps that read them."
    )
    flow_control = True
    fields = (
        Field(
            "condition_statement",
            VALUE,
            "Roboflow's StatementGroup: statements comparing the values of "
            "evaluation_parameters, by key, with each other or with static "
            "values.",
            types=(dict,),
            check=check_condition,
        ),
        Field(
            "evaluation_parameters",
            ANY,
            "Values the condition's operands name, each a selector of an "
            "input or a step output (of any kind), or a literal.",
            required=False,
            default={},
            mapping=True,
        ),
        Field(
            "next_steps",
            STEPS,
            'Steps to run where the condition holds, as ["$steps.<name>"].',
        ),
        Field(
            "stop_delay",
            VALUE,
            "Roboflow's seconds to keep selecting next_steps after the "
            "condition was last true, across video frames. Accepted and "
            "ignored: each image of a run is decided on its own.",
            required=False,
            default=0,
            types=(int, float),
            check=number_between(0, 86400),
        ),
    )
    outputs: dict[str, str] = {}

    @classmethod
    def check_bound(cls, kinds, literals) -> list[tuple[str, str]]:
        # As Roboflow's block, the condition takes no selector.
        if CONDITION_PATH not in literals:
            return [
                (
                    CONDITION_PATH,
                    "must be written in the definition, not given by a selector",
                )
            ]
        condition = parse_condition(literals[CONDITION_PATH], CONDITION_PATH)
        names = literals["evaluation_parameters"]
        return [
            (CONDITION_PATH, problem)
            for problem in undeclared_names(condition, names, "evaluation_parameters")
        ]

    def run(
        self,
        context: StepContext,
        *,
        condition_statement: dict,
        evaluation_parameters: dict[str, Any],
        next_steps: tuple[str, ...],
        stop_delay: float,
    ) -> dict[str, Any]:
        if not next_steps:
            return {FLOW_CONTROL: False}
        try:
            selected = evaluate_condition(
                parsed_condition(condition_statement), evaluation_parameters
            )
        except EvaluationError as error:
            raise StepExecutionError(
                str(error), step=context.step_name, user_error=True
            ) from error
        return {FLOW_CONTROL: selected}


def undeclared_names(
    condition: StatementGroup, names: dict[str, Any], field_name: str
) -> list[str]:
    """Return a problem for each operand named in no key of ``names``."""
    problems = []
    for parameter in condition_parameters(condition):
        if parameter.name not in names:
            declared = ", ".join(f'"{name}"' for name in names) or "none"
            problems.append(
                f'{parameter.path}: "{parameter.name}" is not a key of '
                f"{field_name} (keys: {declared}). Add it there"
            )
    return problems


# Each condition of a plan is parsed once.
parsed_condition = ParsedByIdentity(
    lambda condition: parse_condition(condition, CONDITION_PATH)
)
