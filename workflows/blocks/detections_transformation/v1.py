"""Detections transformation: filter, move, select and sort detections.

``operations`` and ``operations_parameters`` are Roboflow's fields, for the
subset of its query language that ``operations.py`` describes.
"""

from typing import Any

from workflows.blocks.base import (
    DETECTIONS,
    VALUE,
    Block,
    Field,
    ParsedByIdentity,
    StepContext,
)
from workflows.blocks.detections_filter.evaluation import EvaluationError
from workflows.blocks.detections_filter.operations import (
    check_parameters,
    undeclared_parameter,
)
from workflows.blocks.detections_transformation.operations import (
    check_transformations,
    filter_conditions,
    parse_transformations,
    rename_parameters,
    transform,
)
from workflows.detections import Detections
from workflows.errors import StepExecutionError


class DetectionsTransformationBlock(Block):
    type = "roboflow_core/detections_transformation@v1"
    aliases = ("DetectionsTransformation",)
    title = "Transform detections"
    description = (
        "Applies Roboflow's detections operations in order: DetectionsFilter, "
        "DetectionsOffset, DetectionsShift, DetectionsSelection, "
        "SortDetections, DetectionsRename and PickDetectionsByParentClass."
    )
    fields = (
        Field("predictions", DETECTIONS, "Detections to transform."),
        Field(
            "operations",
            VALUE,
            "Roboflow's detections operations, each applied to the output of "
            "the one before.",
            types=(list,),
            check=check_transformations,
        ),
        Field(
            "operations_parameters",
            VALUE,
            "Values that operands of DetectionsFilter operations name, each a "
            "literal, a parameter input or a value output of a step.",
            required=False,
            default={},
            check=check_parameters,
            mapping=True,
        ),
    )
    outputs = {"predictions": DETECTIONS}

    @classmethod
    def check_bound(cls, kinds, literals) -> list[tuple[str, str]]:
        # As in the filter block, Roboflow takes no selector for operations.
        if "operations" not in literals:
            return [
                (
                    "operations",
                    "must be written in the definition, not given by a selector",
                )
            ]
        operations = parse_transformations(literals["operations"])
        parameters = literals["operations_parameters"]
        problem = undeclared_parameter(filter_conditions(operations), parameters)
        if problem:
            return [("operations", problem)]
        for path, name in rename_parameters(operations):
            if name not in parameters:
                declared = ", ".join(f'"{key}"' for key in parameters) or "none"
                return [
                    (
                        "operations",
                        f'{path}: "{name}" is not a key of operations_parameters '
                        f"(keys: {declared}). Add it there, or write the value here",
                    )
                ]
        return []

    def run(
        self,
        context: StepContext,
        *,
        predictions: Detections,
        operations: list,
        operations_parameters: dict[str, Any],
    ) -> dict[str, Any]:
        try:
            transformed = transform(
                parsed_transformations(operations), predictions, operations_parameters
            )
        except EvaluationError as error:
            raise StepExecutionError(
                str(error), step=context.step_name, user_error=True
            ) from error
        return {"predictions": transformed}


# Each operations list of a plan is parsed once.
parsed_transformations = ParsedByIdentity(parse_transformations)
