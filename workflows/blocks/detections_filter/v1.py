"""Detections filter: keep detections by Roboflow's operations, class, confidence.

``operations`` and ``operations_parameters`` are Roboflow's fields, for the
subset of its filter language that ``operations.py`` describes.
``class_names`` and ``min_confidence`` are this server's own. A detection is
kept only if it passes all of them.
"""

from types import NoneType
from typing import Any

import numpy as np

from workflows.blocks.base import (
    DETECTIONS,
    VALUE,
    Block,
    Field,
    ParsedByIdentity,
    StepContext,
    list_of_strings,
    number_between,
)
from workflows.blocks.detections_filter.evaluation import EvaluationError, keep_mask
from workflows.blocks.detections_filter.operations import (
    check_operations,
    check_parameters,
    parse_operations,
    undeclared_parameter,
)
from workflows.detections import Detections
from workflows.errors import StepExecutionError


class DetectionsFilterBlock(Block):
    type = "roboflow_core/detections_filter@v1"
    aliases = ("DetectionsFilter",)
    title = "Filter detections"
    description = (
        "Keeps the detections that pass Roboflow's filter operations "
        "(DetectionsFilter with statement groups that compare class_name, "
        "class_id, confidence or box properties), and whose class is listed "
        "and confidence high enough."
    )
    fields = (
        Field("predictions", DETECTIONS, "Detections to filter."),
        Field(
            "operations",
            VALUE,
            "Roboflow's filter operations, applied in order: DetectionsFilter "
            "operations whose statements compare detection properties with "
            "values or operations_parameters.",
            required=False,
            default=[],
            types=(list,),
            check=check_operations,
        ),
        Field(
            "operations_parameters",
            VALUE,
            "Values that operands of operations name, each a literal, a "
            "parameter input or a value output of a step.",
            required=False,
            default={},
            check=check_parameters,
            mapping=True,
        ),
        Field(
            "class_names",
            VALUE,
            "Classes to keep; null keeps every class.",
            required=False,
            default=None,
            types=(list, NoneType),
            check=list_of_strings,
        ),
        Field(
            "min_confidence",
            VALUE,
            "Minimum confidence kept.",
            required=False,
            default=0.0,
            types=(int, float),
            check=number_between(0, 1),
        ),
    )
    outputs = {"predictions": DETECTIONS}

    @classmethod
    def check_bound(cls, kinds, literals) -> list[tuple[str, str]]:
        # Roboflow's block takes no selector here either. Written in the
        # definition, every operand's parameter is checked before any run.
        if "operations" not in literals:
            return [
                (
                    "operations",
                    "must be written in the definition, not given by a selector",
                )
            ]
        filters = parse_operations(literals["operations"])
        problem = undeclared_parameter(filters, literals["operations_parameters"])
        return [("operations", problem)] if problem else []

    def run(
        self,
        context: StepContext,
        *,
        predictions: Detections,
        operations: list,
        operations_parameters: dict[str, Any],
        class_names: list[str] | None,
        min_confidence: float,
    ) -> dict[str, Any]:
        keep = predictions.confidence >= float(min_confidence)
        if class_names is not None:
            allowed = set(class_names)
            keep &= np.array(
                [name in allowed for name in predictions.class_names], dtype=bool
            )
        filters = parsed_operations(operations)
        try:
            keep = keep_mask(filters, predictions, operations_parameters, keep)
        except EvaluationError as error:
            raise StepExecutionError(
                str(error), step=context.step_name, user_error=True
            ) from error
        return {"predictions": predictions.select(keep)}


# Each operations list of a plan is parsed once.
parsed_operations = ParsedByIdentity(parse_operations)
