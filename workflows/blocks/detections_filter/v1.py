"""Detections filter: keep detections by class name and minimum confidence."""

from types import NoneType
from typing import Any

import numpy as np

from workflows.blocks.base import (
    DETECTIONS,
    VALUE,
    Block,
    Field,
    StepContext,
    list_of_strings,
    number_between,
)
from workflows.detections import Detections


class DetectionsFilterBlock(Block):
    type = "roboflow_core/detections_filter@v1"
    aliases = ("DetectionsFilter",)
    title = "Filter detections"
    description = (
        "Keeps detections whose class is listed and whose confidence is high enough."
    )
    fields = (
        Field("predictions", DETECTIONS, "Detections to filter."),
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

    def run(
        self,
        context: StepContext,
        *,
        predictions: Detections,
        class_names: list[str] | None,
        min_confidence: float,
    ) -> dict[str, Any]:
        keep = predictions.confidence >= float(min_confidence)
        if class_names is not None:
            allowed = set(class_names)
            keep &= np.array(
                [name in allowed for name in predictions.class_names], dtype=bool
            )
        return {"predictions": predictions.select(keep)}
