"""What every block declares: its fields, outputs and how to run it.

A block describes one step type.  The compiler reads the declarations to
validate a definition before anything runs; the executor calls ``run`` with
the resolved field values, one image-level element at a time.
"""

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from workflows.detections import Detections
from workflows.images import WorkflowImage

# Kinds of values that flow between steps.  Selectors are checked against
# them at compile time.
IMAGE = "image"
DETECTIONS = "object_detection_prediction"
ANY = "*"
# A literal JSON value, or a ``$inputs.<parameter>`` selector.
VALUE = "value"
# A list of ``$steps.<step>`` selectors that name steps, not their outputs:
# the steps a flow-control block decides to run.
STEPS = "step"


@dataclass(frozen=True)
class Field:
    """One property of a step in a definition."""

    name: str
    kind: str
    description: str
    required: bool = True
    default: Any = None
    # For VALUE fields: accepted Python types of a literal, and an optional
    # check that returns a problem description or None.
    types: tuple[type, ...] = ()
    check: Callable[[Any], str | None] | None = None
    # For VALUE fields: the value is a JSON object whose values are each a
    # literal or a selector, bound one by one. ``check`` gets the object as
    # written; the block gets it with every selector replaced by its value.
    mapping: bool = False
    # Other spellings of the name that definitions may use, as Roboflow's
    # blocks accept them (``image`` for ``images``).
    aliases: tuple[str, ...] = ()
    # For VALUE fields: whether a step output may feed the field. False for
    # a field whose value the web server reads before it queues the run.
    step_outputs: bool = True
    # For IMAGE and DETECTIONS fields: the value is a non-empty list of
    # selectors of that kind, and the block gets the list of their values.
    sequence: bool = False

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


# The key of a flow-control block's decision in what its ``run`` returns.
FLOW_CONTROL = "\x00continue"


@dataclass
class StepContext:
    """Context a block may use while running, besides its field values.

    A loop whose length the definition or its parameters decide checks the
    run's time limit through workflows.deadline.current_call_deadline(),
    which the executor sets for each call.
    """

    step_name: str
    models: Any  # runner.model_cache.ModelProvider, typed loosely to avoid a cycle
    timer: Any  # workflows.timing.RunTimer


class Block:
    """Base class.  Subclasses set the class attributes and implement ``run``."""

    type: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    title: ClassVar[str]
    description: ClassVar[str]
    fields: ClassVar[tuple[Field, ...]]
    outputs: ClassVar[Mapping[str, str]]
    # How many list levels the block adds to its outputs (dynamic crop adds one).
    adds_dimension: ClassVar[int] = 0
    # Fields whose selectors must all name data of the same image or crop
    # (the same crop steps), because the block combines their values as
    # data of one image. The compiler checks them (graph._check_same_lineage).
    same_lineage_fields: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = False
    # A flow-control block's ``run`` returns ``{FLOW_CONTROL: bool}``: whether
    # the steps its STEPS field names run for the image or crop it ran on.
    flow_control: ClassVar[bool] = False

    @classmethod
    def field(cls, name: str) -> Field | None:
        for candidate in cls.fields:
            if candidate.name == name:
                return candidate
        return None

    def run(self, context: StepContext, **values: Any) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def check_bound(
        cls, kinds: Mapping[str, str], literals: Mapping[str, Any]
    ) -> list[tuple[str, str]]:
        """Return (field, problem) pairs that only the fields taken together show.

        ``kinds`` maps every field to the kind of what feeds it: IMAGE,
        DETECTIONS, or VALUE for literals, parameters and value outputs.
        ``literals`` maps the fields written as literals, or left to their
        defaults, to their values, and each ``mapping`` field to its object
        as written, selectors included. The compiler calls this once every
        field of the step is bound.
        """
        return []

    @classmethod
    def manifest(cls) -> dict[str, Any]:
        """Describe the block for the browser's palette and the API."""
        return {
            "type": cls.type,
            "aliases": list(cls.aliases),
            "title": cls.title,
            "description": cls.description,
            "uses_model": cls.uses_model,
            "flow_control": cls.flow_control,
            "fields": [
                {
                    "name": f.name,
                    "aliases": list(f.aliases),
                    "kind": f.kind,
                    "description": f.description,
                    "required": f.required,
                    "default": f.default,
                    "step_outputs": f.step_outputs,
                    "mapping": f.mapping,
                    "sequence": f.sequence,
                }
                for f in cls.fields
            ],
            "outputs": dict(cls.outputs),
        }


Parsed = TypeVar("Parsed")


class ParsedByIdentity(Generic[Parsed]):
    """A parser that parses each literal object once, keyed by its identity.

    A plan's literal is one object for every call of its step (each crop of
    each image) and every run of the plan, so it is parsed once. Each entry
    keeps its object alive, so the id is not reused while the entry is here.
    The least recently used entries go beyond ``kept``.
    """

    def __init__(self, parse: Callable[[Any], Parsed], kept: int = 128) -> None:
        self.parse = parse
        self.kept = kept
        self._entries: OrderedDict[int, tuple[Any, Parsed]] = OrderedDict()

    def __call__(self, literal: Any) -> Parsed:
        entry = self._entries.get(id(literal))
        if entry is not None and entry[0] is literal:
            self._entries.move_to_end(id(literal))
            return entry[1]
        parsed = self.parse(literal)
        self._entries[id(literal)] = (literal, parsed)
        if len(self._entries) > self.kept:
            self._entries.popitem(last=False)
        return parsed


def shown(value: Any, limit: int = 80) -> str:
    """Return ``value`` as JSON, the way the client wrote it, cut to ``limit``.

    Images, detections and bytes, which no client writes as JSON, are named
    by their size instead of their raw contents.
    """
    if isinstance(value, WorkflowImage):
        return f"an image of {value.width}×{value.height} pixels"
    if isinstance(value, Detections):
        return f"{len(value)} detections"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# JSON's names for the Python types that fields accept.
JSON_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def json_type_name(value: Any) -> str:
    """Return the JSON name of ``value``'s type with its article: "a string"."""
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def json_type_names(types: tuple[type, ...]) -> str:
    """Return ``types`` as JSON names: (int, float) is "a number"."""
    names = [JSON_TYPE_NAMES.get(t, t.__name__) for t in types]
    if float in types and int in types:
        names.remove("an integer")
    return " or ".join(names)


def number_between(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not low <= value <= high:
            return f"must be a number from {low} to {high}, got {shown(value)}"
        return None

    return check


def integer_between(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer from {low} to {high}, got {shown(value)}"
        if not low <= value <= high:
            return f"must be an integer from {low} to {high}, got {shown(value)}"
        return None

    return check


def non_empty_string(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"must be a non-empty string, got {shown(value)}"
    return None


def list_of_strings(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"must be a list of strings, got {shown(value)}"
    return None


__all__ = [
    "ANY",
    "Block",
    "DETECTIONS",
    "Detections",
    "FLOW_CONTROL",
    "Field",
    "IMAGE",
    "STEPS",
    "StepContext",
    "integer_between",
    "VALUE",
    "WorkflowImage",
    "list_of_strings",
    "non_empty_string",
    "number_between",
]
