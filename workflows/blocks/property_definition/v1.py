"""Property definition: derive a value (size, count, class names) from data.

``operations`` is a chain applied left to right, using the operation names of
Roboflow's query language for the subset supported here.
"""

from typing import Any

import numpy as np

from workflows.blocks.base import (
    ANY,
    DETECTIONS,
    IMAGE,
    JSON_TYPE_NAMES,
    VALUE,
    Block,
    Field,
    StepContext,
    shown,
)
from workflows.detections import Detections
from workflows.errors import StepExecutionError
from workflows.images import WorkflowImage

IMAGE_PROPERTIES = ("width", "height", "aspect_ratio", "size")
# Box corners and centre that DetectionsPropertyExtract returns as [x, y]
# pairs of whole pixels, rounded half to even as NumPy rounds.
DETECTION_ANCHORS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")
DETECTION_PROPERTIES = (
    # The names of Roboflow's query language (DetectionsProperty in
    # roboflow/inference, query_language/entities/enums.py).
    "class_name",
    "class_id",
    "confidence",
    "x_min",
    "y_min",
    "x_max",
    "y_max",
    "size",
    *DETECTION_ANCHORS,
    # This server's own: the box centre and size as in serialized
    # detections, and the detection ids.
    "x",
    "y",
    "width",
    "height",
    "detection_id",
)
OPERATIONS = {
    "ExtractImageProperty": "property_name: one of " + ", ".join(IMAGE_PROPERTIES),
    "SequenceLength": "number of detections or items",
    "DetectionsPropertyExtract": "property_name: one of "
    + ", ".join(DETECTION_PROPERTIES),
    "ToString": "the value as text, as Python's str() writes it",
}

# The kinds each operation reads and makes, for the compile-time check.
# Besides IMAGE and DETECTIONS, values are numbers, strings or lists. A
# VALUE from a parameter or another step is known only when the run
# reaches it, so the check skips it.
NUMBER, STRING, LIST, OBJECT = "number", "string", "list", "object"
READS = {
    "ExtractImageProperty": (IMAGE,),
    "SequenceLength": (DETECTIONS, LIST, STRING, OBJECT),
    "DetectionsPropertyExtract": (DETECTIONS,),
    "ToString": (NUMBER, STRING, LIST),
}
MAKES = {
    "ExtractImageProperty": NUMBER,
    "SequenceLength": NUMBER,
    "DetectionsPropertyExtract": LIST,
    "ToString": STRING,
}
KIND_NAMES = {
    IMAGE: "an image",
    DETECTIONS: "detections",
    NUMBER: "a number",
    STRING: "a string",
    LIST: "a list",
    OBJECT: "an object",
}


def check_operations(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of operations"
    for index, operation in enumerate(value):
        if not isinstance(operation, dict):
            return (
                f"operation {index} must be an object such as "
                f'{{"type": "SequenceLength"}}, got {shown(operation)}'
            )
        kind = operation.get("type")
        if not isinstance(kind, str) or kind not in OPERATIONS:
            return (
                f"operation {index} has unknown type {kind!r}; "
                f"supported: {', '.join(OPERATIONS)}"
            )
        name = operation.get("property_name")
        if operation["type"] == "ExtractImageProperty" and name not in IMAGE_PROPERTIES:
            return f"operation {index}: property_name must be one of {IMAGE_PROPERTIES}"
        if (
            operation["type"] == "DetectionsPropertyExtract"
            and name not in DETECTION_PROPERTIES
        ):
            return (
                f"operation {index}: property_name must be one of "
                f"{DETECTION_PROPERTIES}"
            )
    return None


class PropertyDefinitionBlock(Block):
    type = "roboflow_core/property_definition@v1"
    aliases = ("PropertyDefinition", "PropertyExtraction")
    title = "Property"
    description = (
        "Extracts a property: image width/height/aspect ratio, detection count "
        "or class names."
    )
    fields = (
        Field("data", ANY, "Image or detections to read the property from."),
        Field(
            "operations",
            VALUE,
            'Operations applied in order, e.g. [{"type": "SequenceLength"}].',
            types=(list,),
            check=check_operations,
        ),
    )
    outputs = {"output": VALUE}

    @classmethod
    def check_bound(cls, kinds, literals) -> list[tuple[str, str]]:
        operations = literals.get("operations")
        if not isinstance(operations, list):
            return []
        current = kinds["data"]
        for index, operation in enumerate(operations):
            kind = operation["type"]
            if current in KIND_NAMES and current not in READS[kind]:
                return [("operations", _mismatch(index, kind, current))]
            current = MAKES[kind]
        return []

    def run(
        self, context: StepContext, *, data: Any, operations: list
    ) -> dict[str, Any]:
        value = data
        try:
            for operation in operations:
                value = apply_operation(operation, value)
        except OperationError as error:
            raise StepExecutionError(
                str(error), step=context.step_name, user_error=True
            ) from error
        return {"output": value}


class OperationError(ValueError):
    """An operation that got a value of a kind it cannot read."""


def apply_operation(operation: dict, value: Any) -> Any:
    """Return ``value`` after one operation that ``check_operations`` accepted.

    Raises OperationError when the value is of a kind the operation cannot read.
    """
    kind = operation["type"]
    if kind == "ExtractImageProperty":
        if not isinstance(value, WorkflowImage):
            raise _wrong_input(kind, value)
        name = operation["property_name"]
        if name == "aspect_ratio":
            return value.width / value.height if value.height else 0.0
        if name == "size":
            return value.width * value.height
        return getattr(value, name)
    if kind == "SequenceLength":
        if not isinstance(value, (Detections, list, str, dict)):
            raise _wrong_input(kind, value)
        return len(value)
    if kind == "DetectionsPropertyExtract":
        if not isinstance(value, Detections):
            raise _wrong_input(kind, value)
        return _detection_property(value, operation["property_name"])
    # Roboflow's to_string (query_language/operations/strings/base.py in
    # roboflow/inference) returns str(value) for any value. An image or
    # detections would give an object's repr, so those are rejected instead.
    if isinstance(value, (WorkflowImage, Detections)):
        raise _wrong_input(kind, value)
    return str(value)


def _detection_property(detections: Detections, name: str) -> list:
    if name == "class_name":
        return list(detections.class_names)
    if name == "class_id":
        return [int(v) for v in detections.class_id]
    if name == "confidence":
        return [float(v) for v in detections.confidence]
    if name == "detection_id":
        return list(detections.detection_ids)
    boxes = detections.xyxy.astype(np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = boxes.T
    if name in DETECTION_ANCHORS:
        horizontal, vertical = {
            "center": ((x1 + x2) / 2, (y1 + y2) / 2),
            "top_left": (x1, y1),
            "top_right": (x2, y1),
            "bottom_left": (x1, y2),
            "bottom_right": (x2, y2),
        }[name]
        points = np.stack([horizontal, vertical], axis=1).round().astype(int)
        return points.tolist()
    columns = {
        "x_min": x1,
        "y_min": y1,
        "x_max": x2,
        "y_max": y2,
        "size": (x2 - x1) * (y2 - y1),
        "x": (x1 + x2) / 2,
        "y": (y1 + y2) / 2,
        "width": x2 - x1,
        "height": y2 - y1,
    }
    return [float(v) for v in columns[name]]


def _expected(kind: str) -> str:
    names = [KIND_NAMES[read] for read in READS[kind]]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _mismatch(index: int, kind: str, current: str) -> str:
    hint = {
        IMAGE: "read a property of it first with ExtractImageProperty",
        DETECTIONS: "read a property of them first with DetectionsPropertyExtract, "
        "or count them with SequenceLength",
    }.get(current, "remove it or reorder the operations")
    return (
        f"operation {index} ({kind}) needs {_expected(kind)}, but gets "
        f"{KIND_NAMES[current]}; {hint}"
    )


def _described(value: Any) -> str:
    if isinstance(value, WorkflowImage):
        return KIND_NAMES[IMAGE]
    if isinstance(value, Detections):
        return KIND_NAMES[DETECTIONS]
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _wrong_input(kind: str, value: Any) -> OperationError:
    return OperationError(f"{kind} needs {_expected(kind)}, got {_described(value)}")
