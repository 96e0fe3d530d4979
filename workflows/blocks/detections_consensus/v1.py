"""Detections consensus: keep the objects that enough models agree on.

The fields, defaults and outputs are Roboflow's
(``roboflow_core/detections_consensus@v1``); ``consensus.py`` describes the
algorithm. Masks are not supported, because no block here makes them, so
``detections_merge_mask_aggregation`` is checked and has no effect.
"""

from types import NoneType
from typing import Any

from workflows.blocks.base import (
    DETECTIONS,
    VALUE,
    Block,
    Field,
    StepContext,
    list_of_strings,
    number_between,
    shown,
)
from workflows.blocks.detections_consensus.consensus import (
    AGGREGATIONS,
    MASK_AGGREGATIONS,
    ConsensusInputError,
    ConsensusSettings,
    agree,
)
from workflows.detections import Detections
from workflows.errors import StepExecutionError


def positive_integer(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be an integer of at least 1, got {shown(value)}"
    return None


def required_objects_problem(value: Any) -> str | None:
    """Return why a ``required_objects`` value is invalid, or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        for name, count in value.items():
            if positive_integer(count) is not None:
                return (
                    f"the count for class {shown(name)} must be an integer of "
                    f"at least 1, got {shown(count)}"
                )
        return None
    if positive_integer(value) is not None:
        return (
            "must be null, an integer of at least 1, or an object of such "
            f"integers by class name, got {shown(value)}"
        )
    return None


def one_of(choices: tuple[str, ...]):
    def check(value: Any) -> str | None:
        if value not in choices:
            listed = ", ".join(f'"{choice}"' for choice in choices)
            return f"must be one of {listed}, got {shown(value)}"
        return None

    return check


def aggregation(name: str, default: str, description: str) -> Field:
    return Field(
        name,
        VALUE,
        f"{description}: one of {', '.join(AGGREGATIONS)}.",
        required=False,
        default=default,
        types=(str,),
        check=one_of(AGGREGATIONS),
    )


class DetectionsConsensusBlock(Block):
    type = "roboflow_core/detections_consensus@v1"
    aliases = ("DetectionsConsensus",)
    title = "Detections consensus"
    description = (
        "Merges the detections of several models on the same image, keeping "
        "the objects that at least required_votes of them found (boxes that "
        "overlap by more than iou_threshold), and says whether the required "
        "objects are present."
    )
    fields = (
        Field(
            "predictions_batches",
            DETECTIONS,
            'Detections to merge, one selector per model, as ["$steps.a.'
            'predictions", "$steps.b.predictions"].',
            sequence=True,
            aliases=("predictions",),
        ),
        Field(
            "required_votes",
            VALUE,
            "How many sources must find an object for it to be kept.",
            types=(int,),
            check=positive_integer,
        ),
        Field(
            "class_aware",
            VALUE,
            "Whether only detections of the same class vote together.",
            required=False,
            default=True,
            types=(bool,),
        ),
        Field(
            "iou_threshold",
            VALUE,
            "Boxes vote together only above this intersection over union.",
            required=False,
            default=0.3,
            types=(int, float),
            check=number_between(0, 1),
        ),
        Field(
            "confidence",
            VALUE,
            "Minimum confidence of a merged detection.",
            required=False,
            default=0.0,
            types=(int, float),
            check=number_between(0, 1),
        ),
        Field(
            "classes_to_consider",
            VALUE,
            "Classes to merge; null or an empty list considers every class.",
            required=False,
            default=None,
            types=(list, NoneType),
            check=list_of_strings,
        ),
        Field(
            "required_objects",
            VALUE,
            "Merged detections needed for object_present: a count, or a count "
            "per class name.",
            required=False,
            default=None,
            types=(int, dict, NoneType),
            check=required_objects_problem,
        ),
        aggregation(
            "presence_confidence_aggregation",
            "max",
            "How presence_confidence combines the merged confidences of a class",
        ),
        aggregation(
            "detections_merge_confidence_aggregation",
            "average",
            "How a merged detection's confidence (and class) is chosen",
        ),
        aggregation(
            "detections_merge_coordinates_aggregation",
            "average",
            "How a merged box is chosen: the average box, the largest (max) "
            "or the smallest (min)",
        ),
        Field(
            "detections_merge_mask_aggregation",
            VALUE,
            "Roboflow's mask merge, one of "
            f"{', '.join(MASK_AGGREGATIONS)}; no effect on boxes.",
            required=False,
            default="union",
            types=(str,),
            check=one_of(MASK_AGGREGATIONS),
        ),
    )
    # Merged detections must be of one image: detections per input image and
    # detections per crop would otherwise reach ``agree`` together.
    same_lineage_fields = ("predictions_batches",)
    outputs = {
        "predictions": DETECTIONS,
        "object_present": VALUE,
        "presence_confidence": VALUE,
    }

    @classmethod
    def _or_default(cls, field_name: str, value: Any) -> Any:
        """Return ``value``, or the field's default when it is null."""
        if value is not None:
            return value
        return next(field.default for field in cls.fields if field.name == field_name)

    def run(
        self,
        context: StepContext,
        *,
        predictions_batches: list[Detections],
        required_votes: int,
        class_aware: bool,
        iou_threshold: float,
        confidence: float,
        classes_to_consider: list[str] | None,
        required_objects: int | dict[str, int] | None,
        presence_confidence_aggregation: str,
        detections_merge_confidence_aggregation: str,
        detections_merge_coordinates_aggregation: str,
        detections_merge_mask_aggregation: str,
    ) -> dict[str, Any]:
        # A step output may feed an optional setting a null, which the
        # executor passes on unchecked. It takes the default, as an omitted
        # setting does.
        settings = ConsensusSettings(
            required_votes=required_votes,
            class_aware=self._or_default("class_aware", class_aware),
            iou_threshold=float(self._or_default("iou_threshold", iou_threshold)),
            confidence=float(self._or_default("confidence", confidence)),
            classes_to_consider=classes_to_consider,
            required_objects=required_objects,
            presence_confidence_aggregation=self._or_default(
                "presence_confidence_aggregation", presence_confidence_aggregation
            ),
            merge_confidence_aggregation=self._or_default(
                "detections_merge_confidence_aggregation",
                detections_merge_confidence_aggregation,
            ),
            merge_coordinates_aggregation=self._or_default(
                "detections_merge_coordinates_aggregation",
                detections_merge_coordinates_aggregation,
            ),
        )
        try:
            result = agree(predictions_batches, settings)
        except ConsensusInputError as error:
            raise StepExecutionError(
                str(error), step=context.step_name, user_error=True
            ) from error
        return {
            "predictions": result.predictions,
            "object_present": result.object_present,
            "presence_confidence": result.presence_confidence,
        }
