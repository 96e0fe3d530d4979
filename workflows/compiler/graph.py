"""Second compiler phase: bind step fields, resolve selectors, order the steps.

Checks that every selector names an existing input, step and output of the
right kind, that no step depends on itself through other steps, and computes
each step's nesting level (crops make lists of images).
"""

from graphlib import CycleError, TopologicalSorter
from typing import Any

from workflows.blocks.base import (
    ANY,
    IMAGE,
    VALUE,
    Block,
    Field,
    json_type_names,
    shown,
)
from workflows.compiler.parse import ParsedDefinition, is_selector_like, parse_selector
from workflows.compiler.plan import (
    IMAGE_INPUT,
    PARAMETER_INPUT,
    Binding,
    InputRef,
    InputSpec,
    Literal,
    MappingBinding,
    OutputSpec,
    StepPlan,
    StepRef,
    step_references,
)

# Input kinds with their article, for messages.
KIND_ARTICLES = {IMAGE_INPUT: "an image", PARAMETER_INPUT: "a parameter"}


def bind_steps(parsed: ParsedDefinition) -> dict[str, dict[str, Binding]]:
    """Return each step's field bindings; problems go to ``parsed.errors``."""
    inputs = {spec.name: spec for spec in parsed.inputs}
    blocks = {name: block for name, block, _ in parsed.steps}
    bound: dict[str, dict[str, Binding]] = {}
    for name, block, raw in parsed.steps:
        bindings: dict[str, Binding] = {}
        for field in block.fields:
            used = [spelling for spelling in field.spellings if spelling in raw]
            if len(used) > 1:
                parsed.error(
                    name,
                    block.type,
                    field.name,
                    f"field '{field.name}' is given twice, as "
                    f"{' and '.join(repr(u) for u in used)}; keep one",
                )
                continue
            if not used:
                if field.required:
                    parsed.error(
                        name,
                        block.type,
                        field.name,
                        f"required field '{field.name}' is missing "
                        f"({field.description})",
                    )
                else:
                    bindings[field.name] = Literal(field.default)
                continue
            binding = _bind_field(
                parsed, name, block, field, raw[used[0]], inputs, blocks
            )
            if binding is not None:
                bindings[field.name] = binding
        if len(bindings) == len(block.fields):
            kinds = {
                field: _binding_kind(binding, inputs, blocks)
                for field, binding in bindings.items()
            }
            # A mapping field is passed as written, selectors and all.
            literals = {
                field.name: binding.value
                if isinstance(binding, Literal)
                else next(raw[s] for s in field.spellings if s in raw)
                for field in block.fields
                if isinstance(binding := bindings[field.name], Literal | MappingBinding)
            }
            for field_name, problem in block.check_bound(kinds, literals):
                parsed.error(name, block.type, field_name, problem)
        known = {s for f in block.fields for s in f.spellings} | {"type", "name"}
        ignored = sorted(set(raw) - known)
        if ignored:
            parsed.warnings.append(
                f"step '{name}': fields not used by {block.type} were ignored: "
                f"{', '.join(ignored)}"
            )
        bound[name] = bindings
    return bound


def _binding_kind(
    binding: Binding, inputs: dict[str, InputSpec], blocks: dict[str, type[Block]]
) -> str:
    """Return the kind of what feeds a bound field: IMAGE, DETECTIONS or VALUE."""
    if isinstance(binding, InputRef):
        return IMAGE if inputs[binding.name].kind == IMAGE_INPUT else VALUE
    if isinstance(binding, StepRef):
        return blocks[binding.step].outputs.get(binding.output, VALUE)
    return VALUE


def _bind_field(
    parsed,
    step,
    block: type[Block],
    field,
    value: Any,
    inputs: dict[str, InputSpec],
    blocks: dict[str, type[Block]],
) -> Binding | None:
    if field.mapping:
        return _bind_mapping(parsed, step, block, field, value, inputs, blocks)
    reference = parse_selector(value)
    if reference is None and is_selector_like(value):
        parsed.error(
            step,
            block.type,
            field.name,
            f"{value!r} is not a valid selector; use $inputs.<name>, "
            "$steps.<step>.<output> or $steps.<step>.*",
        )
        return None
    if field.kind == VALUE:
        if reference is None:
            return _check_literal(parsed, step, block, field, value)
        if isinstance(reference, StepRef):
            if not field.step_outputs:
                parsed.error(
                    step,
                    block.type,
                    field.name,
                    f"'{value}' is a step output, but '{field.name}' takes a "
                    "literal or a parameter ($inputs.<name>)",
                )
                return None
            return _check_step_reference(
                parsed, step, block, field.name, reference, blocks, VALUE
            )
        bound = _check_input_reference(
            parsed, step, block, field.name, reference, inputs, PARAMETER_INPUT
        )
        if bound is not None:
            _check_default(parsed, step, block, field, inputs[bound.name])
        return bound
    if reference is None:
        parsed.error(
            step,
            block.type,
            field.name,
            f"expected a selector of kind '{field.kind}', got the literal "
            f"{shown(value)}",
        )
        return None
    if isinstance(reference, InputRef):
        wanted = None if field.kind == ANY else IMAGE_INPUT
        if field.kind not in (IMAGE, ANY):
            parsed.error(
                step,
                block.type,
                field.name,
                f"'{value}' is an input, but this field needs the output of "
                f"a step of kind '{field.kind}'",
            )
            return None
        return _check_input_reference(
            parsed, step, block, field.name, reference, inputs, wanted
        )
    return _check_step_reference(
        parsed, step, block, field.name, reference, blocks, field.kind
    )


def _bind_mapping(
    parsed,
    step,
    block: type[Block],
    field: Field,
    value: Any,
    inputs: dict[str, InputSpec],
    blocks: dict[str, type[Block]],
) -> MappingBinding | None:
    """Bind each value of a ``mapping`` field's object on its own.

    A value is a literal, a parameter input or a step output of kind VALUE.
    """
    if not isinstance(value, dict):
        parsed.error(
            step,
            block.type,
            field.name,
            "must be an object whose values are literals or selectors such as "
            f'{{"name": "$inputs.name"}}, got {shown(value)}',
        )
        return None
    problem = value_problem(field, value)
    if problem:
        parsed.error(step, block.type, field.name, problem)
        return None
    entries: list[tuple[str, Literal | InputRef | StepRef]] = []
    failed = False
    for key, item in value.items():
        reference = parse_selector(item)
        bound: Literal | InputRef | StepRef | None
        if reference is None and is_selector_like(item):
            parsed.error(
                step,
                block.type,
                field.name,
                f"{item!r} at key '{key}' is not a valid selector; use "
                "$inputs.<name> or $steps.<step>.<output>",
            )
            bound = None
        elif reference is None:
            bound = Literal(item)
        elif isinstance(reference, InputRef):
            bound = _check_input_reference(
                parsed, step, block, field.name, reference, inputs, PARAMETER_INPUT
            )
        else:
            bound = _check_step_reference(
                parsed, step, block, field.name, reference, blocks, VALUE
            )
        if bound is None:
            failed = True
        else:
            entries.append((key, bound))
    return None if failed else MappingBinding(tuple(entries))


def value_problem(field: Field, value: Any) -> str | None:
    """Describe why ``value`` does not fit a VALUE field, or return None if it does.

    Applies to literals in a definition and to parameter values sent with a run.
    """
    if (
        field.types
        and not isinstance(value, field.types)
        or (isinstance(value, bool) and bool not in field.types)
    ):
        return f"must be {json_type_names(field.types)}, got {shown(value)}"
    if field.check is not None:
        return field.check(value)
    return None


def _check_literal(parsed, step, block, field, value) -> Literal | None:
    problem = value_problem(field, value)
    if problem:
        parsed.error(step, block.type, field.name, problem)
        return None
    return Literal(value)


def _check_default(parsed, step, block, field: Field, spec: InputSpec) -> None:
    """Report a parameter's default that the field it feeds would reject.

    Every run that does not set the parameter would fail with it. A null
    default is left alone: Roboflow's definitions write it for a parameter
    without a default, so each run must send the parameter.
    """
    if not spec.has_default or spec.default is None:
        return
    problem = value_problem(field, spec.default)
    if problem:
        parsed.error(
            step,
            block.type,
            field.name,
            f"the default_value of '$inputs.{spec.name}' is invalid here: "
            f"{problem}. Change the default, or remove it to make the "
            "parameter required",
        )


def _check_input_reference(
    parsed, step, block, field_name, reference: InputRef, inputs, wanted_kind
) -> InputRef | None:
    spec = inputs.get(reference.name)
    if spec is None:
        parsed.error(
            step,
            block.type,
            field_name,
            f"'$inputs.{reference.name}' names no input; declared inputs: "
            f"{', '.join(inputs) or 'none'}",
        )
        return None
    if wanted_kind is not None and spec.kind != wanted_kind:
        parsed.error(
            step,
            block.type,
            field_name,
            f"'$inputs.{reference.name}' is {KIND_ARTICLES[spec.kind]} input, "
            f"this field needs {KIND_ARTICLES[wanted_kind]} input",
        )
        return None
    return reference


def _check_step_reference(
    parsed, step, block, field_name, reference: StepRef, blocks, wanted_kind
) -> StepRef | None:
    source = blocks.get(reference.step)
    if source is None:
        if reference.step in parsed.broken_steps:
            return None
        parsed.error(
            step, block.type, field_name, f"'$steps.{reference.step}' names no step"
        )
        return None
    if reference.output == "*":
        parsed.error(
            step, block.type, field_name, "'$steps.<step>.*' is only allowed in outputs"
        )
        return None
    output_kind = source.outputs.get(reference.output)
    if output_kind is None:
        parsed.error(
            step,
            block.type,
            field_name,
            f"step '{reference.step}' has no output '{reference.output}'; "
            f"its outputs: {', '.join(source.outputs)}",
        )
        return None
    if wanted_kind not in (ANY, output_kind):
        parsed.error(
            step,
            block.type,
            field_name,
            f"'$steps.{reference.step}.{reference.output}' is of kind "
            f"'{output_kind}', this field needs '{wanted_kind}'",
        )
        return None
    return reference


def order_steps(
    parsed: ParsedDefinition, bound: dict[str, dict[str, Binding]]
) -> list[StepPlan]:
    """Return the steps with dependencies first; a cycle goes to ``parsed.errors``."""
    blocks = {name: block for name, block, _ in parsed.steps}
    sorter: TopologicalSorter[str] = TopologicalSorter()
    for name, bindings in bound.items():
        sorter.add(
            name,
            *{ref.step for b in bindings.values() for ref in step_references(b)},
        )
    try:
        order = list(sorter.static_order())
    except CycleError as error:
        # graphlib lists the cycle so that each step is an input of the next
        # one and the last equals the first, so the first step reads from
        # the one before the last.
        cycle = error.args[1]
        step, source = cycle[0], cycle[-2]
        field_name = next(
            (
                field
                for field, binding in bound[step].items()
                if any(ref.step == source for ref in step_references(binding))
            ),
            None,
        )
        parsed.error(
            step,
            blocks[step].type,
            field_name,
            f"steps form a cycle: {' -> '.join(cycle)}",
        )
        return []
    dimensions: dict[str, int] = {}
    plans = []
    for name in order:
        block = blocks[name]
        bindings = bound[name]
        inherited = max(
            (
                dimensions[ref.step]
                for binding in bindings.values()
                for ref in step_references(binding)
            ),
            default=0,
        )
        dimensions[name] = inherited + block.adds_dimension
        plans.append(
            StepPlan(
                name=name, block=block(), bindings=bindings, dimension=dimensions[name]
            )
        )
    return plans


def bind_outputs(parsed: ParsedDefinition) -> list[OutputSpec]:
    inputs = {spec.name for spec in parsed.inputs}
    blocks = {name: block for name, block, _ in parsed.steps}
    specs = []
    for item in parsed.outputs:
        name, selector = item["name"], item.get("selector")
        reference = parse_selector(selector)
        where = f"outputs.{name}.selector"
        if reference is None:
            parsed.error(
                None,
                "JsonField",
                where,
                f"output '{name}' needs a selector like $steps.<step>.<output>, "
                f"got {shown(selector)}",
            )
            continue
        if isinstance(reference, InputRef) and reference.name not in inputs:
            parsed.error(
                None,
                "JsonField",
                where,
                f"output '{name}': '$inputs.{reference.name}' names no input",
            )
            continue
        if isinstance(reference, StepRef):
            source = blocks.get(reference.step)
            if source is None:
                if reference.step in parsed.broken_steps:
                    continue
                parsed.error(
                    None,
                    "JsonField",
                    where,
                    f"output '{name}': '$steps.{reference.step}' names no step",
                )
                continue
            if reference.output != "*" and reference.output not in source.outputs:
                parsed.error(
                    None,
                    "JsonField",
                    where,
                    f"output '{name}': step '{reference.step}' has no output "
                    f"'{reference.output}'; its outputs: "
                    f"{', '.join(source.outputs)}",
                )
                continue
        specs.append(
            OutputSpec(
                name=name,
                binding=reference,
                coordinates=item.get("coordinates_system", "own"),
            )
        )
    return specs
