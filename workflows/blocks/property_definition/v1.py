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
    ParsedByIdentity,
    StepContext,
    shown,
)
from workflows.blocks.property_definition.image_operations import IMAGE_OPERATIONS
from workflows.blocks.property_definition.value_operations import (
    BOOLEAN,
    BYTES,
    LIST,
    MAX_APPLY_DEPTH,
    NUMBER,
    OBJECT,
    RANDOM_OPERATIONS,
    STRING,
    UNKNOWN,
    VALUE_OPERATIONS,
    ValueOperationError,
    apply_value_operation,
    check_sequence_length,
    regex_time_budget,
    value_operation_problem,
)
from workflows.deadline import slices_within_time_limit
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
# Operations of the detections transformation block that also apply here,
# each making detections from detections. Property definition and operands
# have no operations_parameters, so their values are written in place.
DETECTIONS_OPERATIONS = (
    "DetectionsFilter",
    "DetectionsOffset",
    "DetectionsShift",
    "DetectionsSelection",
    "SortDetections",
    "DetectionsRename",
    "PickDetectionsByParentClass",
)
OPERATIONS = {
    "ExtractImageProperty": "property_name: one of " + ", ".join(IMAGE_PROPERTIES),
    "SequenceLength": "number of detections or items",
    "DetectionsPropertyExtract": "property_name: one of "
    + ", ".join(DETECTION_PROPERTIES),
    "ToString": "the value as text, as Python's str() writes it",
    "ToNumber": 'cast_to: "int" or "float"',
    "NumberRound": "decimal_digits: an integer",
    "Multiply": "other: a number",
    "Divide": "other: a number other than 0",
    "ToBoolean": "whether a number is not 0",
    "StringToLowerCase": "the string in lower case",
    "StringToUpperCase": "the string in upper case",
    "StringSubSequence": "start (0) and end (-1): a Python slice of the string",
    "StringMatches": "regex: whether a regular expression matches in the string",
    "LookupTable": "lookup_table: an object whose value for the key replaces it",
    "SequenceMap": "lookup_table: LookupTable on each item",
    "SequenceApply": "operations: a chain applied to each item",
    "SequenceJoin": 'separator (", "): the items as text, joined',
    "SequenceAggregate": "mode: first, last, most_common or least_common",
    "NumericSequenceAggregate": "function: min, max or sum; neutral_value for "
    "an empty list",
    "SequenceElementsCount": "an object counting each item, keyed by its text",
    "ConvertDictionaryToJSON": "an object as JSON text",
    "ConvertImageToJPEG": "compression_level (95): an image as JPEG bytes",
    "ConvertImageToBase64": "an image as base64 text: an input's file as sent, "
    "any other image as JPEG",
    "RandomNumber": "min_value (0) and max_value (1): a random number in place "
    "of any value, different on every run",
    "DetectionsToDictionary": "detections as an object in Roboflow's response "
    "format, in the coordinates of their own image",
    **{
        name: f"the detections transformation's {name}, on detections"
        for name in DETECTIONS_OPERATIONS
    },
}

# Operations of Roboflow's language that read what only a video frame has,
# with the reason they are rejected. This server takes images, which carry
# no frame number or timestamp.
VIDEO_OPERATIONS = {
    "ExtractFrameMetadata": "it reads a video frame's number or timestamp, but "
    "this server takes images, which have neither. Remove it",
    "TimestampToISOFormat": "it reads a timestamp, which only "
    "ExtractFrameMetadata makes from a video frame, but this server takes "
    "images, which have none. Remove it",
}

# The operations that a ValueOperation of a table defines: its keys, the
# kinds it reads and makes, and how it applies.
TABLE_OPERATIONS = {**VALUE_OPERATIONS, **IMAGE_OPERATIONS}

# The kinds each operation reads and makes, for the compile-time check.
# Besides IMAGE and DETECTIONS, values are numbers, strings, booleans, lists,
# objects or bytes. A VALUE from a parameter or another step is known only when
# the run reaches it, and so is the result of a lookup, so the check skips
# it.
READS = {
    "ExtractImageProperty": (IMAGE,),
    "SequenceLength": (DETECTIONS, LIST, STRING, OBJECT, BYTES),
    "DetectionsPropertyExtract": (DETECTIONS,),
    "ToString": (NUMBER, STRING, LIST, BOOLEAN, OBJECT, BYTES),
    "SequenceApply": (LIST,),
    "DetectionsToDictionary": (DETECTIONS,),
    **{name: spec.reads for name, spec in TABLE_OPERATIONS.items()},
    **{name: (DETECTIONS,) for name in DETECTIONS_OPERATIONS},
}
MAKES = {
    "ExtractImageProperty": NUMBER,
    "SequenceLength": NUMBER,
    "DetectionsPropertyExtract": LIST,
    "ToString": STRING,
    "SequenceApply": LIST,
    "DetectionsToDictionary": OBJECT,
    **{name: spec.makes for name, spec in TABLE_OPERATIONS.items()},
    **{name: DETECTIONS for name in DETECTIONS_OPERATIONS},
}
# The kind of the items of each list that DetectionsPropertyExtract makes.
DETECTION_PROPERTY_KINDS = {name: NUMBER for name in DETECTION_PROPERTIES}
DETECTION_PROPERTY_KINDS.update(class_name=STRING, detection_id=STRING)
DETECTION_PROPERTY_KINDS.update((name, LIST) for name in DETECTION_ANCHORS)
KIND_NAMES = {
    IMAGE: "an image",
    DETECTIONS: "detections",
    NUMBER: "a number",
    STRING: "a string",
    LIST: "a list",
    OBJECT: "an object",
    BOOLEAN: "a boolean",
    BYTES: "bytes",
}


def check_operations(value: Any, depth: int = 1) -> str | None:
    """Return the first problem in a chain of operations, or None.

    Besides each operation's keys, the kinds are checked where the chain
    itself makes them known: ``[ToString, Multiply]`` is rejected whatever
    it reads, and so is such a chain inside a SequenceApply.
    """
    # A SequenceApply's chain may be empty, as in Roboflow, where it returns
    # the list unchanged.
    if not isinstance(value, list) or not value and depth == 1:
        qualifier = "non-empty " if depth == 1 else ""
        return f"must be a {qualifier}list of operations"
    for index, operation in enumerate(value):
        problem = _operation_problem(operation, depth)
        if problem:
            return f"operation {index}{problem}"
    if depth == 1:
        return chain_problem(value, UNKNOWN)
    return None


def _operation_problem(operation: Any, depth: int) -> str | None:
    """Return what is wrong with one operation, after its index, or None."""
    if not isinstance(operation, dict):
        return (
            ' must be an object such as {"type": "SequenceLength"}, got '
            f"{shown(operation)}"
        )
    kind = operation.get("type")
    if isinstance(kind, str) and kind in VIDEO_OPERATIONS:
        return f" ({kind}) is not supported: {VIDEO_OPERATIONS[kind]}"
    if not isinstance(kind, str) or kind not in OPERATIONS:
        return f" has unknown type {kind!r}; supported: {', '.join(OPERATIONS)}"
    name = operation.get("property_name")
    if kind == "ExtractImageProperty" and name not in IMAGE_PROPERTIES:
        return f": property_name must be one of {IMAGE_PROPERTIES}"
    if kind == "DetectionsPropertyExtract" and name not in DETECTION_PROPERTIES:
        return f": property_name must be one of {DETECTION_PROPERTIES}"
    if kind in TABLE_OPERATIONS:
        problem = value_operation_problem(operation, TABLE_OPERATIONS[kind])
        return f" ({kind}): {problem}" if problem else None
    if kind == "SequenceApply":
        return _sequence_apply_problem(operation, depth)
    if kind in DETECTIONS_OPERATIONS:
        return _detections_operation_problem(operation)
    return None


def _detections_operation_problem(operation: dict) -> str | None:
    # Imported here because the transformation's parser imports this module.
    from workflows.blocks.detections_filter.operations import (
        OperationsSyntaxError,
        undeclared_parameter,
    )
    from workflows.blocks.detections_transformation.operations import (
        filter_conditions,
        parse_transformations,
        rename_parameters,
    )

    kind = operation["type"]
    try:
        parsed = parse_transformations([operation])
    except OperationsSyntaxError as error:
        where = error.path.removeprefix("operations[0]").lstrip(".")
        return f" ({kind}): {where + ': ' if where else ''}{error.problem}"
    named = [name for _, name in rename_parameters(parsed)]
    problem = undeclared_parameter(filter_conditions(parsed), {})
    if named or problem:
        return (
            f" ({kind}): values cannot name parameters here, because only the "
            "detections transformation block has operations_parameters. Write "
            "the values in place, or use a detections transformation step"
        )
    return None


def _sequence_apply_problem(operation: dict, depth: int) -> str | None:
    for key in operation:
        if key not in ("type", "operations"):
            return (
                f" (SequenceApply): unknown key {shown(key)}; a SequenceApply "
                "has the keys type, operations"
            )
    if depth >= MAX_APPLY_DEPTH:
        return (
            f" (SequenceApply): SequenceApply operations are nested more than "
            f"{MAX_APPLY_DEPTH} levels deep"
        )
    problem = check_operations(operation.get("operations"), depth + 1)
    if problem:
        return f" (SequenceApply): operations: {problem}"
    return None


def chain_problem(operations: list, kind: str, item_kind: str = UNKNOWN) -> str | None:
    """Return why ``operations`` cannot read a value of ``kind`` in turn, or None.

    ``operations`` passed ``check_operations``'s checks of keys. A kind
    outside KIND_NAMES, such as VALUE, is known only at run time, so the
    operation that reads it passes, and the check resumes with the kind that
    operation makes. The chain of a SequenceApply is checked the same way,
    on the kind of the list's items: ``item_kind`` for ``kind``, or the
    kind of the items that an operation before it makes.
    """
    current = kind
    items = item_kind
    for index, operation in enumerate(operations):
        name = operation["type"]
        if current in KIND_NAMES and current not in READS[name]:
            return _mismatch(index, name, current)
        if name == "SequenceApply":
            nested = operation["operations"]
            problem = chain_problem(nested, items)
            if problem:
                return f"operation {index} (SequenceApply): operations: {problem}"
            if nested:
                items = MAKES[nested[-1]["type"]]
        elif name == "DetectionsPropertyExtract":
            items = DETECTION_PROPERTY_KINDS[operation["property_name"]]
        else:
            items = UNKNOWN
        current = MAKES[name]
    return None


def first_random_index(operations: list) -> int | None:
    """Return the index of the first operation whose result is random, or None.

    A SequenceApply is random when an operation of its chain is.
    """
    for index, operation in enumerate(operations):
        kind = operation["type"]
        if kind in RANDOM_OPERATIONS:
            return index
        if (
            kind == "SequenceApply"
            and first_random_index(operation["operations"]) is not None
        ):
            return index
    return None


def _check_block_operations(value: Any) -> str | None:
    # Roboflow's block takes an empty chain and outputs ``data`` unchanged.
    # check_bound rejects that for an image or detections.
    if value == []:
        return None
    return check_operations(value)


class PropertyDefinitionBlock(Block):
    type = "roboflow_core/property_definition@v1"
    aliases = ("PropertyDefinition", "PropertyExtraction")
    title = "Property"
    description = (
        "Extracts a property: image width/height/aspect ratio, detection count "
        "or class names, and converts it with Roboflow's operations on "
        "numbers, strings and lists."
    )
    fields = (
        Field("data", ANY, "Image or detections to read the property from."),
        Field(
            "operations",
            VALUE,
            'Operations applied in order, e.g. [{"type": "SequenceLength"}].',
            types=(list,),
            check=_check_block_operations,
        ),
    )
    outputs = {"output": VALUE}

    @classmethod
    def check_bound(cls, kinds, literals) -> list[tuple[str, str]]:
        operations = literals.get("operations")
        if not isinstance(operations, list):
            return []
        if not operations:
            data_kind = kinds["data"]
            if data_kind not in (IMAGE, DETECTIONS):
                return []
            return [
                (
                    "operations",
                    f"is empty, so the output would be {KIND_NAMES[data_kind]}, "
                    "but a property definition outputs a value. Add an "
                    "operation that reads it, such as SequenceLength or "
                    "ExtractImageProperty",
                )
            ]
        problem = chain_problem(operations, kinds["data"])
        if problem:
            return [("operations", problem)]
        last = operations[-1]["type"]
        if MAKES[last] == DETECTIONS:
            return [
                (
                    "operations",
                    f"the last operation ({last}) makes detections, but a "
                    "property definition outputs a value. End with an operation "
                    "that reads them, such as SequenceLength or "
                    "DetectionsPropertyExtract, or use a detections "
                    "transformation step to output detections",
                )
            ]
        return []

    def run(
        self, context: StepContext, *, data: Any, operations: list
    ) -> dict[str, Any]:
        value = data
        try:
            with regex_time_budget():
                for operation in operations:
                    value = apply_operation(operation, value)
        except OperationError as error:
            raise StepExecutionError(
                str(error), step=context.step_name, user_error=True
            ) from error
        return {"output": value}


# How many items a SequenceApply runs its chain on between two reads of the
# clock for the run's time limit. A chain takes a microsecond or more on
# each item.
APPLIED_ITEMS_PER_TIME_CHECK = 16


class OperationError(ValueError):
    """An operation that got a value of a kind it cannot read, or failed on it."""


def apply_operation(operation: dict, value: Any) -> Any:
    """Return ``value`` after one operation that ``check_operations`` accepted.

    Raises OperationError when the value is of a kind the operation cannot
    read, or the operation fails on it.
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
        if not isinstance(value, (Detections, list, tuple, str, dict, bytes)):
            raise _wrong_input(kind, value)
        return len(value)
    if kind == "DetectionsPropertyExtract":
        if not isinstance(value, Detections):
            raise _wrong_input(kind, value)
        return _detection_property(value, operation["property_name"])
    spec = TABLE_OPERATIONS.get(kind)
    if spec is not None:
        if (
            isinstance(value, WorkflowImage)
            and IMAGE not in spec.reads
            or isinstance(value, Detections)
            and DETECTIONS not in spec.reads
        ):
            raise _wrong_input(kind, value)
        try:
            return apply_value_operation(operation, value, spec)
        except ValueOperationError as error:
            raise OperationError(f"{kind} {error}") from error
    if kind == "SequenceApply":
        if not isinstance(value, (list, tuple)):
            raise _wrong_input(kind, value)
        applied = []
        for items in slices_within_time_limit(
            value, APPLIED_ITEMS_PER_TIME_CHECK, "the list of a SequenceApply"
        ):
            applied.extend(
                [_apply_chain(operation["operations"], item) for item in items]
            )
        try:
            check_sequence_length(kind, applied)
        except ValueOperationError as error:
            raise OperationError(f"{kind} {error}") from error
        return applied
    if kind in DETECTIONS_OPERATIONS:
        if not isinstance(value, Detections):
            raise _wrong_input(kind, value)
        return _transform(operation, value)
    if kind == "DetectionsToDictionary":
        if not isinstance(value, Detections):
            raise _wrong_input(kind, value)
        return value.to_roboflow("own")
    # Roboflow's to_string (query_language/operations/strings/base.py in
    # roboflow/inference) returns str(value) for any value. An image or
    # detections would give an object's repr, so those are rejected instead.
    if isinstance(value, (WorkflowImage, Detections)):
        raise _wrong_input(kind, value)
    return str(value)


def _transform(operation: dict, detections: Detections) -> Detections:
    # Imported here because the transformation's parser imports this module.
    from workflows.blocks.detections_filter.evaluation import EvaluationError
    from workflows.blocks.detections_transformation.operations import transform

    try:
        return transform(_parsed_transformation(operation), detections, {})
    except EvaluationError as error:
        raise OperationError(f"{operation['type']} failed: {error}") from error


def _parse_transformation(operation: dict) -> tuple:
    from workflows.blocks.detections_transformation.operations import (
        parse_transformations,
    )

    return parse_transformations([operation])


# Each operation object of a plan is parsed once.
_parsed_transformation = ParsedByIdentity(_parse_transformation)


def _apply_chain(operations: list, value: Any) -> Any:
    for operation in operations:
        value = apply_operation(operation, value)
    return value


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
