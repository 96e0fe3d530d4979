"""Read a run request's ``inputs`` against a plan: images and parameters.

Images arrive as Roboflow clients send them, ``{"type": "base64", "value":
...}`` or a list of those for a batch, or as raw bytes from a form upload.
"""

from dataclasses import dataclass
from typing import Any

from workflows.blocks.base import VALUE, json_type_name
from workflows.compiler.graph import value_problem
from workflows.compiler.parse import MAX_VALUE_DEPTH, nested_too_deep
from workflows.compiler.plan import ExecutionPlan, InputRef
from workflows.errors import InputError
from workflows.images import ImageInfo, check_complete, decode_base64, inspect_image


@dataclass
class RunInputs:
    images: dict[str, list[bytes]]
    image_info: dict[str, list[dict[str, Any]]]
    parameters: dict[str, Any]
    batch_size: int


def read_inputs(
    plan: ExecutionPlan,
    raw: Any,
    *,
    max_pixels: int,
    max_total_pixels: int | None = None,
    max_images: int | None = None,
    uploads: dict[str, bytes] | None = None,
) -> RunInputs:
    """Check every input the plan declares; raise InputError naming the bad one.

    Each image may have ``max_pixels``, and all of them together
    ``max_total_pixels``. Totals are checked from headers, before any image
    is decoded to see whether it is whole. An image input may carry at most
    ``max_images`` images.
    """
    raw = input_mapping(raw)
    uploads = uploads or {}
    images: dict[str, list[bytes]] = {}
    headers: dict[str, list[ImageInfo]] = {}
    info: dict[str, list[dict[str, Any]]] = {}
    # Inputs sent as a list, whose errors name the image by its index.
    batched: set[str] = set()
    for spec in plan.image_inputs:
        if spec.name in uploads:
            blobs = [uploads[spec.name]]
        elif spec.name in raw:
            value = raw[spec.name]
            if isinstance(value, list):
                batched.add(spec.name)
                # Counted before any base64 is decoded.
                _check_image_count(spec.name, len(value), max_images)
            blobs = _image_values(value, spec.name)
        else:
            raise InputError(
                f"image input '{spec.name}' is missing{_undeclared_note(plan, raw)}",
                context="request_parsing",
                field_name=spec.name,
                hint=f'Send inputs.{spec.name} = {{"type": "base64", '
                '"value": "<base64 image>"}.',
            )
        images[spec.name] = blobs
        headers[spec.name] = [
            inspect_image(
                blob,
                input_name=_item_name(spec.name, index, spec.name in batched),
                max_pixels=max_pixels,
                complete=False,
                field_name=spec.name,
            )
            for index, blob in enumerate(blobs)
        ]
    total = sum(i.width * i.height for infos in headers.values() for i in infos)
    if max_total_pixels is not None and total > max_total_pixels:
        raise InputError(
            f"the run's images have {total} pixels together, over the limit of "
            f"{max_total_pixels}",
            context="request_parsing",
            hint="Send fewer or smaller images per run.",
        )
    for name, infos in headers.items():
        pairs = zip(images[name], infos, strict=True)
        for index, (blob, image_info) in enumerate(pairs):
            item_name = _item_name(name, index, name in batched)
            check_complete(blob, image_info, input_name=item_name, field_name=name)
        info[name] = [
            _describe(image_info, blob)
            for blob, image_info in zip(images[name], infos, strict=True)
        ]
    parameters = read_parameters(plan, raw)
    return RunInputs(images, info, parameters, _batch_size(images))


def _undeclared_note(plan: ExecutionPlan, raw: dict[str, Any]) -> str:
    """Name the inputs in ``raw`` that ``plan`` does not declare, if any.

    Roboflow's routes ignore such inputs, so an image sent under another
    name would otherwise be reported only as missing.
    """
    declared = {spec.name for spec in (*plan.image_inputs, *plan.parameter_inputs)}
    unknown = sorted(set(raw) - declared)
    if not unknown:
        return ""
    shown_names = ", ".join(repr(name) for name in unknown)[:300]
    return (
        f"; the request's inputs also name {shown_names}, which the workflow "
        "does not declare"
    )


def _check_image_count(name: str, count: int, max_images: int | None) -> None:
    if max_images is not None and count > max_images:
        raise InputError(
            f"image input '{name}' has {count} images, over the limit of "
            f"{max_images} per run (MAX_RUN_IMAGES)",
            context="request_parsing",
            field_name=name,
            hint="Split the batch into several runs. Each image costs a model "
            "call at the model's input size, however small it is.",
        )


def input_mapping(raw: Any) -> dict[str, Any]:
    """Return a request's ``inputs`` value as a dict; absent means empty."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(
            "'inputs' must be a JSON object mapping input names to values",
            context="request_parsing",
            field_name="inputs",
        )
    return raw


def reject_undeclared_inputs(plan: ExecutionPlan, raw: dict[str, Any]) -> None:
    """Raise InputError naming the inputs in ``raw`` that ``plan`` does not declare.

    A misspelled parameter would otherwise be dropped and its default used.
    Roboflow's routes accept undeclared inputs, as Roboflow's server does.
    """
    declared = [spec.name for spec in (*plan.image_inputs, *plan.parameter_inputs)]
    unknown = sorted(set(raw) - set(declared))
    if unknown:
        shown_names = ", ".join(repr(name) for name in unknown)[:300]
        raise InputError(
            f"the workflow declares no input {shown_names}; its inputs are "
            f"{', '.join(sorted(declared)) or 'none'}",
            context="request_parsing",
            field_name=unknown[0][:100],
        )


def read_parameters(plan: ExecutionPlan, raw: dict[str, Any]) -> dict[str, Any]:
    """Return every parameter the plan declares, defaults filled in and checked."""
    parameters: dict[str, Any] = {}
    missing = set()
    for spec in plan.parameter_inputs:
        if spec.name in raw:
            _check_depth(raw[spec.name], spec.name)
            parameters[spec.name] = raw[spec.name]
        elif spec.has_default:
            parameters[spec.name] = spec.default
        else:
            # Roboflow's engine gives a parameter that has no default and
            # is not sent the value null, and so does this one.
            parameters[spec.name] = None
            missing.add(spec.name)
    _check_parameter_values(plan, parameters, missing)
    return parameters


def _check_depth(value: Any, name: str) -> None:
    """Raise InputError if ``value`` nests lists and objects too deeply.

    Runners copy parameter values into outputs recursively, so a deeper value
    would fail there, after the run was stored.
    """
    if nested_too_deep(value):
        raise InputError(
            f"parameter '{name}' nests lists and objects more than "
            f"{MAX_VALUE_DEPTH} levels deep",
            context="request_parsing",
            field_name=name,
        )


def _check_parameter_values(
    plan: ExecutionPlan, parameters: dict[str, Any], missing: set[str]
) -> None:
    """Check each parameter against the fields it feeds, as literals are checked.

    The compiler cannot see parameter values, so without this a value of the
    wrong type would fail only on a runner, after the run was stored.
    ``missing`` names the parameters that are null because the request left
    them out and they have no default.
    """
    for step in plan.steps:
        for field in step.block.fields:
            binding = step.bindings.get(field.name)
            if field.kind != VALUE or not isinstance(binding, InputRef):
                continue
            problem = value_problem(field, parameters[binding.name])
            if problem and binding.name in missing:
                raise InputError(
                    f"parameter '{binding.name}' is missing and has no default, "
                    f"so it is null, which step '{step.name}', field "
                    f"'{field.name}' rejects: {problem}; send the parameter, or "
                    "give it a default_value in the definition",
                    context="request_parsing",
                    step=step.name,
                    field_name=binding.name,
                )
            if problem:
                raise InputError(
                    f"parameter '{binding.name}' is invalid for step '{step.name}', "
                    f"field '{field.name}': {problem}",
                    context="request_parsing",
                    step=step.name,
                    field_name=binding.name,
                )


def _item_name(name: str, index: int, batched: bool) -> str:
    """Return how messages name one image of an input: ``image[2]`` in a batch.

    The error's ``field`` stays the input's name, which the definition declares.
    """
    return f"{name}[{index}]" if batched else name


def _image_values(value: Any, name: str) -> list[bytes]:
    batched = isinstance(value, list)
    return [
        decode_base64(
            text, input_name=_item_name(name, index, batched), field_name=name
        )
        for index, text in enumerate(_image_strings(value, name))
    ]


def _image_strings(value: Any, name: str) -> list[str]:
    """Return the base64 text of each image in an image input's ``value``, undecoded.

    Raise InputError for a value that contains no image object, so that a
    run and an estimate reject the same values.
    """
    batched = isinstance(value, list)
    items = value if batched else [value]
    if not items:
        raise _empty_list(name)
    texts = []
    for index, item in enumerate(items):
        item_name = _item_name(name, index, batched)
        if isinstance(item, str):
            # A bare string is base64, unless it is plainly a URL.
            item = {"type": "url" if _looks_like_url(item) else "base64", "value": item}
        if not isinstance(item, dict) or "value" not in item:
            raise InputError(
                f"image input '{item_name}' must be "
                '{"type": "base64", "value": ...}',
                context="request_parsing",
                field_name=name,
            )
        kind = item.get("type", "base64")
        # ':' is no base64 character, so a URL sent as base64 is a URL.
        if kind == "url" or (kind == "base64" and _looks_like_url(item["value"])):
            raise InputError(
                f"image input '{item_name}' is a URL; this server does not download "
                "images",
                context="request_parsing",
                field_name=name,
                hint="Send the image bytes as base64 instead.",
            )
        if kind != "base64":
            raise InputError(
                f"image input '{item_name}' has type {kind!r}; only 'base64' is "
                "supported",
                context="request_parsing",
                field_name=name,
            )
        if not isinstance(item["value"], str):
            raise InputError(
                f"image input '{item_name}' has {json_type_name(item['value'])} as its "
                "value; it must be a base64 string",
                context="request_parsing",
                field_name=name,
            )
        texts.append(item["value"])
    return texts


def _looks_like_url(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(
        ("http://", "https://")
    )


def _empty_list(name: str) -> InputError:
    return InputError(
        f"image input '{name}' is an empty list",
        context="request_parsing",
        field_name=name,
    )


def _describe(info: ImageInfo, blob: bytes) -> dict[str, Any]:
    return {
        "format": info.format,
        "width": info.width,
        "height": info.height,
        "bytes": len(blob),
    }


def batch_size_of(
    plan: ExecutionPlan, raw: dict[str, Any], max_images: int | None = None
) -> int:
    """Return the batch size that ``raw``'s image inputs would make, undecoded.

    Raise InputError, as a run would, for a value that contains no image object,
    an empty list, or a list of more than ``max_images`` images.
    """
    for spec in plan.image_inputs:
        if spec.name not in raw:
            continue
        value = raw[spec.name]
        if isinstance(value, list):
            _check_image_count(spec.name, len(value), max_images)
        _image_strings(value, spec.name)
    counts = {
        spec.name: raw[spec.name] if isinstance(raw.get(spec.name), list) else [None]
        for spec in plan.image_inputs
    }
    return _batch_size(counts)


def _batch_size(images: dict[str, list]) -> int:
    sizes = {len(blobs) for blobs in images.values()} - {1}
    if len(sizes) > 1:
        raise InputError(
            "image inputs hold batches of different sizes: "
            + ", ".join(f"{name}: {len(blobs)}" for name, blobs in images.items()),
            context="request_parsing",
        )
    return sizes.pop() if sizes else 1
