"""First compiler phase: check the definition's shape and read its parts.

Problems are collected, not raised one at a time, so a user fixing a
definition sees every error of this phase at once.
"""

import json
import re
from typing import Any

from packaging.version import Version

from workflows.blocks import find_block, known_type_names
from workflows.blocks.base import Block, json_type_name
from workflows.compiler.plan import (
    IMAGE_INPUT,
    PARAMETER_INPUT,
    InputRef,
    InputSpec,
    StepRef,
)
from workflows.errors import BlockError

INPUT_TYPES = {
    "WorkflowImage": IMAGE_INPUT,
    "InferenceImage": IMAGE_INPUT,
    "WorkflowParameter": PARAMETER_INPUT,
    "InferenceParameter": PARAMETER_INPUT,
    # Accepted only as a batch of images (_batch_input_problem). A
    # WorkflowImage input already takes a list of images.
    "WorkflowBatchInput": IMAGE_INPUT,
    "WorkflowVideoMetadata": None,
}
# The kind name of images in Roboflow's kinds.
IMAGE_KIND = "image"
# Input types that compile to image inputs, for pages and commands that
# read a stored definition's inputs without compiling it.
IMAGE_INPUT_TYPES = tuple(
    name for name, kind in INPUT_TYPES.items() if kind == IMAGE_INPUT
)
# The keys of a definition that the compiler reads. Roboflow's engine ignores
# others, such as "metadata", and so does this one, with a warning.
TOP_LEVEL_KEYS = frozenset({"version", "inputs", "steps", "outputs"})
# Deepest nesting of lists and objects allowed in a parameter value or default.
MAX_VALUE_DEPTH = 32
# Used with fullmatch: "$" alone would also accept a trailing newline.
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
# Maximum length of an input, step or output name, as for workflow names and
# model ids.
MAX_NAME_LENGTH = 200


def name_problem(kind: str, name: Any, any_text: bool = False) -> str | None:
    """Return what is wrong with an input, step or output name, or None.

    Names must match NAME_PATTERN unless ``any_text``.
    """
    if name is None:
        return f"{kind} name is missing (field 'name')"
    if not isinstance(name, str):
        return f"{kind} name must be a string, not {json_type_name(name)}"
    if len(name) > MAX_NAME_LENGTH:
        return (
            f"{kind} name is {len(name)} characters long; at most "
            f"{MAX_NAME_LENGTH} are allowed"
        )
    if not any_text and not NAME_PATTERN.fullmatch(name):
        return (
            f"{kind} name {name!r} must start with an ASCII letter or '_' and "
            "contain only ASCII letters, digits, '_' or '-'"
        )
    return None


# Used with fullmatch, as NAME_PATTERN is, because "$" alone would also accept
# a trailing newline, which the builder's pattern (static/js/builder.js) rejects.
SELECTOR_PATTERN = re.compile(
    r"\$(?:inputs\.(?P<input>[^.\s]+)|steps\.(?P<step>[^.\s]+)\.(?P<output>[^.\s]+))"
)


def parse_selector(value: Any) -> InputRef | StepRef | None:
    """Return the reference a selector string names, or None if it is no selector."""
    if not isinstance(value, str) or not value.startswith("$"):
        return None
    match = SELECTOR_PATTERN.fullmatch(value)
    if match is None:
        return None
    if match["input"] is not None:
        return InputRef(match["input"])
    return StepRef(match["step"], match["output"])


def is_selector_like(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("$")


class ParsedDefinition:
    def __init__(self) -> None:
        self.inputs: list[InputSpec] = []
        self.steps: list[tuple[str, type[Block], dict[str, Any]]] = []
        self.outputs: list[dict[str, Any]] = []
        self.errors: list[BlockError] = []
        self.warnings: list[str] = []
        # Steps named in the definition but unusable (unknown type); references
        # to them are not reported again.
        self.broken_steps: set[str] = set()
        # The same for inputs declared with a usable name but rejected (an
        # unknown type, a batch of what this server cannot run).
        self.broken_inputs: set[str] = set()
        # False when the top level is unusable and no later phase can run.
        self.readable = True

    def error(self, block_id, block_type, prop, details) -> None:
        self.errors.append(BlockError(block_id, block_type, prop, details))


def parse_definition(definition: Any) -> ParsedDefinition:
    parsed = ParsedDefinition()
    if not isinstance(definition, dict):
        parsed.error(None, None, None, "definition must be a JSON object")
        parsed.readable = False
        return parsed
    _parse_version(definition.get("version"), parsed)
    ignored = sorted(set(definition) - TOP_LEVEL_KEYS)
    if ignored:
        parsed.warnings.append(
            "top-level keys not in the definition format were ignored: "
            f"{', '.join(ignored)}"
        )
    for key in ("inputs", "steps", "outputs"):
        if key not in definition:
            parsed.error(None, None, key, f"'{key}' is missing")
        elif not isinstance(definition[key], list):
            parsed.error(None, None, key, f"'{key}' must be a list")
    if parsed.errors:
        parsed.readable = False
        return parsed
    _parse_inputs(definition["inputs"], parsed)
    _parse_steps(definition["steps"], parsed)
    _parse_outputs(definition["outputs"], parsed)
    return parsed


# The major version of the definition format this compiler reads: that of
# Roboflow's Execution Engine 1.x.
FORMAT_MAJOR_VERSION = 1


def _parse_version(version: Any, parsed: ParsedDefinition) -> None:
    """Check the optional top-level ``version``, a string such as "1.0".

    Roboflow's ``inference`` server reads it as a PEP 440 version string
    (``packaging.version.Version``) and runs the definition on its Execution
    Engine of the same major version. So "1" and "1.0" are accepted there
    and here. A JSON number is rejected there, and here only outside 1.x. A
    missing or null version means the current format.
    """
    if version is None:
        return
    example = f'such as "{FORMAT_MAJOR_VERSION}.0"'
    is_number = isinstance(version, int | float) and not isinstance(version, bool)
    if is_number and FORMAT_MAJOR_VERSION <= version < FORMAT_MAJOR_VERSION + 1:
        # Definitions saved before versions were checked may hold a number.
        # They keep running, but Roboflow's server rejects a number.
        parsed.warnings.append(
            f"'version' is the number {version}; write it as a string {example}, "
            "since Roboflow's server rejects a number"
        )
        return
    if not isinstance(version, str):
        parsed.error(
            None,
            None,
            "version",
            f"'version' must be a string {example}, not {json_type_name(version)}",
        )
        return
    try:
        parsed_version = Version(version)
    except ValueError:
        # InvalidVersion, or a ValueError from int() on a release number
        # over Python's limit of 4,300 digits.
        parsed.error(
            None,
            None,
            "version",
            f"'version' {version[:40]!r} is not a version number {example}",
        )
        return
    if parsed_version.major != FORMAT_MAJOR_VERSION:
        parsed.error(
            None,
            None,
            "version",
            f"'version' {version[:40]!r} is not supported: this server reads version "
            f"{FORMAT_MAJOR_VERSION} definitions; use a version {example}",
        )


def _parse_inputs(inputs: list, parsed: ParsedDefinition) -> None:
    seen: set[str] = set()
    for index, item in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(item, dict):
            parsed.error(
                None,
                None,
                where,
                f"{where} must be an object, not {json_type_name(item)}",
            )
            continue
        name, input_type = item.get("name"), item.get("type")
        problem = name_problem("input", name)
        if problem is not None:
            parsed.error(None, input_type, f"{where}.name", f"{where}: {problem}")
            continue
        if name in seen:
            parsed.error(
                None, input_type, f"{where}.name", f"input name '{name}' is used twice"
            )
            continue
        seen.add(name)
        # Every check below that rejects the input reports it once.
        parsed.broken_inputs.add(name)
        if not isinstance(input_type, str) or input_type not in INPUT_TYPES:
            parsed.error(
                None,
                input_type,
                f"{where}.type",
                f"unknown input type {input_type!r}; use one of "
                f"{', '.join(t for t, k in INPUT_TYPES.items() if k)}",
            )
            continue
        if input_type == "WorkflowBatchInput":
            batch_problem = _batch_input_problem(item)
            if batch_problem is not None:
                key, details = batch_problem
                parsed.error(None, input_type, f"{where}.{key}", details)
                continue
        kind = INPUT_TYPES[input_type]
        if kind is None:
            # Not rejected: a step that reads it gets its own error.
            parsed.broken_inputs.discard(name)
            parsed.warnings.append(f"input '{name}' of type {input_type} is ignored")
            continue
        if nested_too_deep(item.get("default_value")):
            parsed.error(
                None,
                input_type,
                f"{where}.default_value",
                f"the default of '{name}' nests lists and objects more than "
                f"{MAX_VALUE_DEPTH} levels deep",
            )
            continue
        parsed.broken_inputs.discard(name)
        parsed.inputs.append(
            InputSpec(
                name=name,
                kind=kind,
                default=item.get("default_value"),
                has_default="default_value" in item,
            )
        )


def _batch_input_problem(item: dict) -> tuple[str, str] | None:
    """Return (key, problem) for a WorkflowBatchInput that is not of images.

    Roboflow's WorkflowBatchInput carries a batch of any kind, one element
    per image, nested ``dimensionality`` levels deep. This engine runs a
    batch of images, one level deep, so it takes only that case.
    """
    name = item["name"]
    kinds = item.get("kind", ["*"])
    names = [
        kind.get("name") if isinstance(kind, dict) else kind
        for kind in (kinds if isinstance(kinds, list) else [kinds])
    ]
    # Compared one by one: a name may be a list or an object, which no set
    # can hold.
    if not isinstance(kinds, list) or not names or any(n != IMAGE_KIND for n in names):
        return (
            "kind",
            f"input '{name}' is a WorkflowBatchInput of kind "
            f"{json.dumps(kinds, default=str)[:80]}, which is not supported: "
            f'only a batch of images, "kind": ["{IMAGE_KIND}"], is. For one '
            "value per run use a WorkflowParameter, and for images a "
            "WorkflowImage, which also takes a list of images",
        )
    dimensionality = item.get("dimensionality", 1)
    if dimensionality != 1 or isinstance(dimensionality, bool):
        return (
            "dimensionality",
            f"input '{name}' has dimensionality {json.dumps(dimensionality)[:80]}, "
            "which is not supported: only 1, one image per element of the "
            "batch, is. Send nested images as separate runs",
        )
    return None


def nested_too_deep(value: Any, max_depth: int = MAX_VALUE_DEPTH) -> bool:
    """Return whether ``value`` nests lists and objects over ``max_depth`` deep.

    Runners copy parameter values into outputs recursively, and Python's
    recursion limit ends that near 1,000 levels.
    """
    # The containers at each depth; a container counts even when it is empty.
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            return True
        level = [
            item
            for container in level
            for item in (
                container.values() if isinstance(container, dict) else container
            )
            if isinstance(item, dict | list)
        ]
    return False


def _parse_steps(steps: list, parsed: ParsedDefinition) -> None:
    seen: set[str] = set()
    for index, item in enumerate(steps):
        where = f"steps[{index}]"
        if not isinstance(item, dict):
            parsed.error(
                None,
                None,
                where,
                f"{where} must be an object, not {json_type_name(item)}",
            )
            continue
        name, type_name = item.get("name"), item.get("type")
        problem = name_problem("step", name)
        if problem is not None:
            parsed.error(None, type_name, "name", f"{where}: {problem}")
            continue
        if name in seen:
            parsed.error(name, type_name, "name", f"step name '{name}' is used twice")
            continue
        seen.add(name)
        block = find_block(type_name) if isinstance(type_name, str) else None
        if block is None:
            parsed.broken_steps.add(name)
            if type_name is None:
                problem = "block type is missing (field 'type')"
            elif not isinstance(type_name, str):
                problem = (
                    f"block type must be a string, not {json_type_name(type_name)}"
                )
            else:
                problem = f"unknown block type {type_name!r}"
            parsed.error(
                name,
                type_name,
                "type",
                f"step '{name}': {problem}; known types: "
                f"{', '.join(known_type_names())}",
            )
            continue
        parsed.steps.append((name, block, item))


def _parse_outputs(outputs: list, parsed: ParsedDefinition) -> None:
    seen: set[str] = set()
    for index, item in enumerate(outputs):
        where = f"outputs[{index}]"
        if not isinstance(item, dict):
            parsed.error(
                None,
                None,
                where,
                f"{where} must be an object, not {json_type_name(item)}",
            )
            continue
        name = item.get("name")
        # Output names are keys of the result, so any text will do.
        problem = name_problem("output", None if name == "" else name, any_text=True)
        if problem is not None:
            parsed.error(None, "JsonField", f"{where}.name", f"{where}: {problem}")
            continue
        if name in seen:
            parsed.error(
                None,
                "JsonField",
                f"{where}.name",
                f"output name '{name}' is used twice",
            )
            continue
        seen.add(name)
        if item.get("type", "JsonField") != "JsonField":
            parsed.error(
                None,
                item.get("type"),
                f"{where}.type",
                "output type must be 'JsonField'",
            )
            continue
        if item.get("coordinates_system", "own") not in ("own", "parent"):
            parsed.error(
                None,
                "JsonField",
                f"{where}.coordinates_system",
                "coordinates_system must be 'own' or 'parent'",
            )
            continue
        parsed.outputs.append(item)
