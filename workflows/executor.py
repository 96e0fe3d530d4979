"""Run a compiled plan on one batch of inputs, then serialize its outputs.

The executor reads only the plan, never the raw definition.  Steps whose
inputs are lists (crops) run once per element; values at a lower nesting
level are repeated for each element.
"""

import base64
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from workflows.blocks.base import FLOW_CONTROL, VALUE, Field, StepContext
from workflows.blocks.property_definition.value_operations import regex_time_budget
from workflows.compiler.graph import value_problem
from workflows.compiler.plan import (
    Binding,
    ExecutionPlan,
    InputRef,
    Literal,
    MappingBinding,
    OutputSpec,
    SequenceBinding,
    StepPlan,
    StepRef,
)
from workflows.deadline import Deadline
from workflows.detections import Detections
from workflows.errors import StepExecutionError, WorkflowError
from workflows.images import WorkflowImage
from workflows.pixel_budget import PixelBudget
from workflows.timing import RunTimer

logger = logging.getLogger(__name__)


class _Skipped:
    """The value of each output of a step that did not run for an image or crop.

    A flow-control step that did not select the step, or a skipped step
    that it reads from, skips it. Outputs serialize it as null.
    """

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED = _Skipped()


class DetectionBudget:
    """Detections that a run's steps may create, across its batch.

    A runner keeps every step's detections until the run ends, about 100
    bytes each (box, confidence, class and a detection_id string). A model
    call makes up to max_detections, and a step that copies detections,
    such as a detection offset, takes about 20 ms for 8,400, so within
    RUN_TIME_LIMIT_S 250 such steps on 100 images would hold over 20 GB.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, step_name: str, produced: Any) -> None:
        """Add the detections in ``produced``, a block call's outputs."""
        self.used += _detection_count(produced)
        if self.used > self.limit:
            raise StepExecutionError(
                f"the run's steps created {self.used} detections together, over "
                f"the limit of {self.limit} (MAX_RUN_DETECTIONS), at step "
                f"'{step_name}'; keep fewer detections, such as with a higher "
                "confidence or a lower max_detections, use fewer steps or crops "
                "that make detections, or send fewer images per run",
                step=step_name,
                user_error=True,
            )


def _detection_count(value: Any) -> int:
    if isinstance(value, Detections):
        return len(value)
    if isinstance(value, dict):
        return sum(_detection_count(item) for item in value.values())
    if isinstance(value, list):
        return sum(_detection_count(item) for item in value)
    return 0


def execute_plan(
    plan: ExecutionPlan,
    batch: Sequence[Mapping[str, Any]],
    *,
    models: Any,
    timer: RunTimer,
    pixel_budget: PixelBudget | None = None,
    detection_budget: DetectionBudget | None = None,
    deadline: Deadline | None = None,
) -> list[dict[str, dict[str, Any]]]:
    """Run every step on each set of inputs in ``batch``, one step at a time.

    Each step runs on the whole batch before the next step starts, so a model
    that shares the memory budget with other models is loaded once per step,
    not once per image. Returns each set's step outputs by step name.
    """
    results: list[dict[str, dict[str, Any]]] = [{} for _ in batch]
    dimensions: dict[str, int] = {}
    for step in plan.steps:
        started = time.perf_counter_ns()
        calls = _CallCount()
        try:
            # The StringMatches searches of a step share one time limit.
            with regex_time_budget():
                for inputs, element_results in zip(batch, results, strict=True):
                    values, value_dims = _resolve(
                        step, inputs, element_results, dimensions
                    )
                    call = _StepCall(
                        step=step,
                        context=StepContext(
                            step_name=step.name, models=models, timer=timer
                        ),
                        target=max(value_dims.values(), default=0),
                        data_fields=_data_fields(step),
                        step_inputs=_step_inputs(step),
                        step_values=_step_value_fields(step),
                        pixel_budget=pixel_budget,
                        detection_budget=detection_budget,
                        deadline=deadline,
                        calls=calls,
                    )
                    element_results[step.name] = _run_lifted(
                        call, values, value_dims, 0
                    )
        except WorkflowError as error:
            if error.step is None:
                error.step = step.name
            raise
        except Exception as error:
            logger.exception("step %s (%s) failed", step.name, step.block.type)
            raise StepExecutionError(
                f"step '{step.name}' ({step.block.type}) failed: "
                f"{type(error).__name__}: {error}",
                step=step.name,
                user_error=False,
            ) from error
        finally:
            # A failed step's time counts too, so that it does not land in
            # overhead. A step that called its block for no image or crop
            # (skipped everywhere) takes no time, and its glue is overhead.
            timer.add_step(
                step.name,
                step.block.type,
                time.perf_counter_ns() - started if calls.count else 0,
                step.block.uses_model,
            )
        dimensions[step.name] = step.dimension
    return results


def _resolve(step: StepPlan, inputs, results, dimensions):
    """Return the step's values and the nesting level of each non-literal one.

    Each entry of a mapping field is a value of its own, named
    "<field>.<key>", so that lifting can map over an entry that comes from a
    step with list outputs. ``_call_values`` puts the object back together.
    """
    values: dict[str, Any] = {}
    value_dims: dict[str, int] = {}
    for field_name, field_binding in step.bindings.items():
        for name, binding in _named_bindings(field_name, field_binding):
            if isinstance(binding, Literal):
                values[name] = binding.value
            elif isinstance(binding, InputRef):
                values[name] = inputs[binding.name]
                value_dims[name] = 0
            else:
                values[name] = results[binding.step][binding.output]
                value_dims[name] = dimensions[binding.step]
    for gate in step.gated_by:
        values[_gate_name(gate)] = results[gate][FLOW_CONTROL]
        value_dims[_gate_name(gate)] = dimensions[gate]
    return values, value_dims


def _gate_name(step: str) -> str:
    """Return the value name of a flow-control step's decision (never a field's)."""
    return f"\x00gate:{step}"


def _shown_name(name: str) -> str:
    """Return a value's name for messages, naming a decision by its step."""
    prefix = _gate_name("")
    if name.startswith(prefix):
        return f"the decisions of step '{name[len(prefix) :]}'"
    return name


def _named_bindings(
    name: str, binding: Binding
) -> list[tuple[str, Literal | InputRef | StepRef]]:
    if isinstance(binding, MappingBinding):
        return [(f"{name}.{key}", entry) for key, entry in binding.entries]
    if isinstance(binding, SequenceBinding):
        return [
            (f"{name}[{index}]", entry) for index, entry in enumerate(binding.entries)
        ]
    return [(name, binding)]


def _call_values(step: StepPlan, values: dict[str, Any]) -> dict[str, Any]:
    """Return the block's keyword arguments, mapping fields as objects again."""
    arguments = {}
    for name, binding in step.bindings.items():
        if isinstance(binding, MappingBinding):
            arguments[name] = {
                key: values[f"{name}.{key}"] for key, _ in binding.entries
            }
        elif isinstance(binding, SequenceBinding):
            arguments[name] = [
                values[f"{name}[{index}]"] for index in range(len(binding.entries))
            ]
        else:
            arguments[name] = values[name]
    return arguments


class _CallCount:
    """How many times a step called its block, over the whole batch."""

    def __init__(self) -> None:
        self.count = 0


@dataclass(frozen=True)
class _StepCall:
    """The data every call of one step's block shares, at any list level."""

    step: StepPlan
    context: StepContext
    # The list level at which the block is called.
    target: int
    # Values that take data, not settings, from other steps (_data_fields).
    data_fields: tuple[str, ...]
    # Values read from other steps' outputs, decisions of flow-control
    # steps included (_step_inputs).
    step_inputs: tuple[str, ...]
    # Settings that other steps' outputs feed, with their selectors: only
    # these reach the block unchecked by the compiler or the web server.
    step_values: tuple[tuple[Field, str], ...]
    pixel_budget: PixelBudget | None
    detection_budget: DetectionBudget | None
    deadline: Deadline | None
    calls: _CallCount


def _run_lifted(
    call: _StepCall, values: dict[str, Any], value_dims: dict[str, int], level: int
):
    """Call the block, mapping over list levels deeper than ``level``.

    A step whose data input from another step is null (a crop that fell
    outside its image) is skipped, and its outputs are null, as in
    Roboflow's engine. So is a step that a flow-control step did not
    select, or that reads an output of a skipped step, but its outputs are
    SKIPPED, so that the steps reading them are skipped too.
    """
    step = call.step
    names = _produced_names(step)
    if any(values[name] is SKIPPED for name in call.step_inputs):
        return dict.fromkeys(names, SKIPPED)
    if any(
        value_dims[_gate_name(gate)] <= level and values[_gate_name(gate)] is not True
        for gate in step.gated_by
    ):
        return dict.fromkeys(names, SKIPPED)
    if any(values[name] is None for name in call.data_fields):
        return dict.fromkeys(names)
    if level == call.target:
        _check_step_values(call, values)
        produced = _call_block(call, values)
        if call.pixel_budget is not None:
            call.pixel_budget.charge(step.name, produced)
        if call.detection_budget is not None:
            call.detection_budget.charge(step.name, produced)
        return produced
    nested = [name for name, dim in value_dims.items() if dim > level]
    lengths = {len(values[name]) for name in nested}
    if len(lengths) > 1:
        raise StepExecutionError(
            f"step '{step.name}' received lists of different lengths "
            f"({', '.join(f'{_shown_name(n)}: {len(values[n])}' for n in nested)})",
            step=step.name,
            user_error=True,
        )
    count = lengths.pop() if lengths else 0
    outputs: dict[str, list] = {name: [] for name in names}
    for index in range(count):
        element = dict(values)
        for name in nested:
            element[name] = values[name][index]
        produced = _run_lifted(call, element, value_dims, level + 1)
        for name in outputs:
            outputs[name].append(produced[name])
    return outputs


def _call_block(call: _StepCall, values: dict[str, Any]) -> dict[str, Any]:
    """Call the step's block, within the run's time limit and pixel budget.

    The limit is checked before the call, and the block's own loops check
    it during the call through ``current_call_deadline()``. A block that
    creates many images checks them against the budget as it goes through
    ``current_call_pixel_budget()``.
    """
    step = call.step
    if call.deadline is not None:
        call.deadline.check(step.name, call.calls.count + 1)
    call.calls.count += 1
    with ExitStack() as limits:
        if call.deadline is not None:
            limits.enter_context(call.deadline.during_call(step.name, call.calls.count))
        if call.pixel_budget is not None:
            limits.enter_context(call.pixel_budget.during_call(step.name))
        return step.block.run(call.context, **_call_values(step, values))


def _step_value_fields(step: StepPlan) -> tuple[tuple[Field, str], ...]:
    """Return the settings of ``step`` that step outputs feed, with their selectors."""
    fields = []
    for field in step.block.fields:
        binding = step.bindings.get(field.name)
        if field.kind == VALUE and isinstance(binding, StepRef):
            fields.append((field, f"$steps.{binding.step}.{binding.output}"))
    return tuple(fields)


def _check_step_values(call: _StepCall, values: dict[str, Any]) -> None:
    """Check settings fed by step outputs as literals and parameters are checked.

    A null from a step leaves an optional setting at the block's handling of
    null, as before.
    """
    for field, selector in call.step_values:
        value = values[field.name]
        if value is None and not field.required:
            continue
        problem = value_problem(field, value)
        if problem:
            raise StepExecutionError(
                f"step '{call.step.name}', field '{field.name}': the value of "
                f"{selector} is invalid here: {problem}",
                step=call.step.name,
                user_error=True,
            )


def _produced_names(step: StepPlan) -> tuple[str, ...]:
    """Return the keys of the block's results: its outputs, and its decision
    if it is a flow-control block."""
    if step.block.flow_control:
        return (*step.block.outputs, FLOW_CONTROL)
    return tuple(step.block.outputs)


def _data_fields(step: StepPlan) -> tuple[str, ...]:
    """Return the values of ``step`` that take data (not settings) from other steps.

    Each selector of a ``sequence`` field is a value of its own.
    """
    names = []
    for field in step.block.fields:
        binding = step.bindings.get(field.name)
        if field.kind == VALUE or binding is None or field.mapping:
            continue
        for name, entry in _named_bindings(field.name, binding):
            if isinstance(entry, StepRef):
                names.append(name)
    return tuple(names)


def _step_inputs(step: StepPlan) -> tuple[str, ...]:
    """Return the values of ``step`` read from other steps' outputs or decisions."""
    names = [
        name
        for field_name, binding in step.bindings.items()
        for name, entry in _named_bindings(field_name, binding)
        if isinstance(entry, StepRef)
    ]
    return (*names, *(_gate_name(gate) for gate in step.gated_by))


def serialize_value(
    value: Any, coordinates: str, charge: Callable[[int], None] | None = None
) -> Any:
    """Turn a step output into JSON-compatible data in Roboflow's shapes.

    ``charge``, if given, receives the JSON size in bytes of each detections
    object, image and bytes value as it is serialized, and may raise to stop.
    """
    if value is SKIPPED:
        return None
    if isinstance(value, Detections):
        serialized = value.to_roboflow(coordinates)
        if charge is not None:
            charge(len(json.dumps(serialized)))
        return serialized
    if isinstance(value, WorkflowImage):
        serialized = serialize_image(value)
        if charge is not None:
            charge(len(serialized["value"]))
        return serialized
    if isinstance(value, bytes):
        # As Roboflow's HTTP server writes bytes (orjson_utils.default in
        # inference 1.8.3): standard base64 text.
        text = base64.b64encode(value).decode("ascii")
        if charge is not None:
            charge(len(text))
        return text
    if isinstance(value, list | tuple):
        return [serialize_value(item, coordinates, charge) for item in value]
    if isinstance(value, dict):
        return {
            key: serialize_value(item, coordinates, charge)
            for key, item in value.items()
        }
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def serialize_image(image: WorkflowImage) -> dict[str, Any]:
    """Return ``image`` as base64 JPEG, with where it was cut from if a crop.

    The keys are Roboflow's: a crop names its parent and the input image at
    the root, with its offset and their sizes in each.
    """
    serialized: dict[str, Any] = {"type": "base64", "value": image.to_jpeg_base64()}
    if image.parent_origin is None or image.root_size is None:
        return serialized
    offset_x, offset_y, parent_width, parent_height = image.parent_origin
    root_width, root_height = image.root_size
    serialized["parent_id"] = image.parent_id
    serialized["parent_origin"] = {
        "offset_x": offset_x,
        "offset_y": offset_y,
        "width": parent_width,
        "height": parent_height,
    }
    serialized["root_parent_id"] = image.root
    serialized["root_parent_origin"] = {
        "offset_x": image.origin[0],
        "offset_y": image.origin[1],
        "width": root_width,
        "height": root_height,
    }
    return serialized


class OutputBudget:
    """Bytes of JSON that a run's outputs may take, across its batch.

    Only detections, images and bytes are counted, because their size grows
    with max_detections and the images. Other values are bounded by the
    definition and its inputs. A definition may have 100 outputs that name
    the same detections, and each is serialized again.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charger(self, spec: OutputSpec, image_index: int) -> Callable[[int], None]:
        """Return a ``serialize_value`` charge for one output of one image."""
        step = spec.binding.step if isinstance(spec.binding, StepRef) else None

        def charge(size: int) -> None:
            self.used += size
            if self.used > self.limit:
                raise StepExecutionError(
                    f"the run's outputs take more than {self.limit} bytes of "
                    "JSON (MAX_RUN_OUTPUT_BYTES), at output "
                    f"'{spec.name}' of image {image_index}; return fewer "
                    "outputs, images or detections, such as with a higher "
                    "confidence or a lower max_detections, or send fewer "
                    "images per run",
                    step=step,
                    user_error=True,
                )

        return charge


def collect_outputs(
    plan: ExecutionPlan,
    inputs: Mapping[str, Any],
    results: dict[str, dict[str, Any]],
    budget: OutputBudget | None = None,
    image_index: int = 0,
) -> dict[str, Any]:
    """Serialize the declared outputs of one batch element, nulls included.

    Raises StepExecutionError, as the step's user error, for an output with
    an infinite or NaN number, which JSON cannot carry and the run's record
    cannot store. Chained blocks can reach one, such as detection offsets in
    percent that grow an inverted box past float32's range. Raises it too
    when the outputs pass ``budget``, naming ``image_index``, the element's
    index in the batch.
    """
    outputs = {}
    for spec in plan.outputs:
        charge = None if budget is None else budget.charger(spec, image_index)
        value = serialize_value(
            _output_value(spec, inputs, results), spec.coordinates, charge
        )
        # Inputs come from parsed JSON, so only a step can produce one.
        if isinstance(spec.binding, StepRef) and _has_non_finite_number(value):
            raise StepExecutionError(
                f"step '{spec.binding.step}' gave output '{spec.name}' a number "
                "that is infinite or NaN, which JSON cannot carry; check the "
                "settings that scale or move its values",
                step=spec.binding.step,
                user_error=True,
            )
        outputs[spec.name] = value
    return outputs


def _has_non_finite_number(value: Any) -> bool:
    """Return whether ``value`` contains a float that is infinite or NaN."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False


def _output_value(spec: OutputSpec, inputs, results) -> Any:
    binding = spec.binding
    if isinstance(binding, InputRef):
        return inputs.get(binding.name)
    assert isinstance(binding, StepRef)
    step_outputs = results[binding.step]
    if binding.output == "*":
        return {
            name: value for name, value in step_outputs.items() if name != FLOW_CONTROL
        }
    return step_outputs.get(binding.output)
