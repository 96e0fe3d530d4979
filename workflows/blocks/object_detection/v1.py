"""Object detection with an ultralytics YOLO model, hot or cold on the runner."""

from dataclasses import dataclass
from types import NoneType
from typing import Any

from workflows.blocks.base import (
    DETECTIONS,
    IMAGE,
    VALUE,
    Block,
    Field,
    StepContext,
    WorkflowImage,
    integer_between,
    list_of_strings,
    non_empty_string,
    number_between,
)


@dataclass(frozen=True)
class DetectionOptions:
    confidence: float
    iou_threshold: float
    max_detections: int
    class_filter: tuple[str, ...] | None
    class_agnostic_nms: bool


class ObjectDetectionBlock(Block):
    type = "roboflow_core/roboflow_object_detection_model@v1"
    aliases = ("ObjectDetectionModel", "RoboflowObjectDetectionModel")
    title = "Object detection"
    description = (
        "Finds objects with a YOLO detector; the model stays loaded on the runner."
    )
    uses_model = True
    fields = (
        Field(
            "images",
            IMAGE,
            "Image (or crops) to run the model on.",
            aliases=("image",),
        ),
        Field(
            "model_id",
            VALUE,
            "Model id: a file in the model directory, an upload, or an ultralytics "
            "architecture such as yolov8n.yaml (untrained).",
            types=(str,),
            check=non_empty_string,
            # The web server resolves every model id before it queues the
            # run, and a runner can load only the models resolved then.
            step_outputs=False,
        ),
        Field(
            "confidence",
            VALUE,
            "Minimum confidence of a detection.",
            required=False,
            default=0.4,
            types=(int, float),
            check=number_between(0, 1),
        ),
        Field(
            "iou_threshold",
            VALUE,
            "IoU above which non-max suppression merges boxes.",
            required=False,
            default=0.3,
            types=(int, float),
            check=number_between(0, 1),
        ),
        Field(
            "max_detections",
            VALUE,
            "Maximum detections kept per image.",
            required=False,
            default=300,
            types=(int,),
            # ultralytics' NMS keeps at most 30,000 candidate boxes (max_nms in
            # ultralytics/utils/nms.py, 8.4), so a larger limit changes nothing.
            check=integer_between(1, 30000),
        ),
        Field(
            "class_filter",
            VALUE,
            "Class names to keep; empty or null keeps all.",
            required=False,
            default=None,
            types=(list, NoneType),
            check=list_of_strings,
        ),
        Field(
            "class_agnostic_nms",
            VALUE,
            "Suppress overlapping boxes across classes; null means false.",
            required=False,
            default=False,
            # Roboflow's block takes null here, and its model then runs
            # per-class NMS.
            types=(bool, NoneType),
        ),
    )
    outputs = {"predictions": DETECTIONS, "inference_id": VALUE}

    def run(
        self,
        context: StepContext,
        *,
        images: WorkflowImage,
        model_id: str,
        confidence: float,
        iou_threshold: float,
        max_detections: int,
        class_filter: list[str] | None,
        class_agnostic_nms: bool,
    ) -> dict[str, Any]:
        options = DetectionOptions(
            confidence=float(confidence),
            iou_threshold=float(iou_threshold),
            max_detections=int(max_detections),
            class_filter=tuple(class_filter) if class_filter else None,
            class_agnostic_nms=bool(class_agnostic_nms),
        )
        detections = context.models.detect(
            model_id, images, options, step=context.step_name
        )
        return {"predictions": detections, "inference_id": detections.inference_id}
