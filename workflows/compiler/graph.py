"""Second compiler phase: bind step fields, resolve selectors, order the steps.

Checks that every selector names an existing input, step and output of the
right kind, that no step depends on itself through other steps, and computes
each step's nesting level (crops make lists of images) with the crop steps
that made it, its lineage.
"""

from graphlib import CycleError, TopologicalSorter
from typing import Any

from workflows.blocks.base import (
    ANY,
    IMAGE,
    STEPS,
    VALUE,
    Block,
    Field,
    json_type_names,
    shown,
)
from workflows.compiler.parse import (
    ParsedDefinition,
    is_selector_like,
    nested_too_deep,
    parse_selector,
)
from workflows.compiler.plan import (
    IMAGE_INPUT,
    PARAMETER_INPUT,
    Binding,
    InputRef,
    InputSpec,
    Literal,
    MappingBinding,
    OutputSpec,
    SequenceBinding,
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
    if field.kind == STEPS:
        return _bind_step_names(parsed, step, block, field, value, blocks)
    if field.sequence:
        return _bind_sequence(parsed, step, block, field, value, inputs, blocks)
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
        elif reference is None and literal_depth_problem(item):
            parsed.error(
                step,
                block.type,
                field.name,
                f"the value at key '{key}' {literal_depth_problem(item)}",
            )
            bound = None
        elif reference is None:
            bound = Literal(item)
        elif isinstance(reference, InputRef):
            bound = _check_input_reference(
                parsed,
                step,
                block,
                field.name,
                reference,
                inputs,
                None if field.kind == ANY else PARAMETER_INPUT,
            )
        else:
            bound = _check_step_reference(
                parsed,
                step,
                block,
                field.name,
                reference,
                blocks,
                ANY if field.kind == ANY else VALUE,
            )
        if bound is None:
            failed = True
        else:
            entries.append((key, bound))
    return None if failed else MappingBinding(tuple(entries))


def _bind_sequence(
    parsed,
    step,
    block: type[Block],
    field: Field,
    value: Any,
    inputs: dict[str, InputSpec],
    blocks: dict[str, type[Block]],
) -> SequenceBinding | None:
    """Bind a ``sequence`` field: a non-empty list of selectors of its kind."""
    if not isinstance(value, list) or not value:
        parsed.error(
            step,
            block.type,
            field.name,
            f"must be a non-empty list of selectors of kind '{field.kind}', such "
            f'as ["$steps.a.predictions", "$steps.b.predictions"], got '
            f"{shown(value)}",
        )
        return None
    entries: list[InputRef | StepRef] = []
    failed = False
    for index, item in enumerate(value):
        reference = parse_selector(item)
        bound: InputRef | StepRef | None = None
        if reference is None:
            parsed.error(
                step,
                block.type,
                field.name,
                f"item {index}, {shown(item)}, is not a selector; use "
                "$steps.<step>.<output>",
            )
        elif isinstance(reference, InputRef):
            if field.kind != IMAGE:
                parsed.error(
                    step,
                    block.type,
                    field.name,
                    f"item {index}, '{item}', is an input, but this field needs "
                    f"outputs of steps of kind '{field.kind}'",
                )
            else:
                bound = _check_input_reference(
                    parsed, step, block, field.name, reference, inputs, IMAGE_INPUT
                )
        else:
            bound = _check_step_reference(
                parsed, step, block, field.name, reference, blocks, field.kind
            )
        if bound is None:
            failed = True
        else:
            entries.append(bound)
    return None if failed else SequenceBinding(tuple(entries))


# A step selector names a step without an output, as in Roboflow's
# StepSelector: "$steps.<step>".
STEP_SELECTOR_PREFIX = "$steps."


def _bind_step_names(
    parsed,
    step,
    block: type[Block],
    field: Field,
    value: Any,
    blocks: dict[str, type[Block]],
) -> Literal | None:
    """Bind a STEPS field to the tuple of step names that its selectors name.

    Each selector must name another step of the definition, once.
    """
    if not isinstance(value, list):
        parsed.error(
            step,
            block.type,
            field.name,
            f'must be a list of step selectors such as ["$steps.crop"], got '
            f"{shown(value)}",
        )
        return None
    names: list[str] = []
    failed = False
    for index, item in enumerate(value):
        name = (
            item[len(STEP_SELECTOR_PREFIX) :]
            if isinstance(item, str) and item.startswith(STEP_SELECTOR_PREFIX)
            else None
        )
        problem = None
        if name is None or not name or "." in name or name.strip() != name:
            problem = (
                f"item {index}, {shown(item)}, is not a step selector; write "
                "$steps.<step name>, without an output"
            )
        elif name == step:
            problem = f"item {index}, '{item}', names this step itself"
        elif name in names:
            problem = (
                f"item {index}, '{item}', names step '{name}' a second time; "
                "name each step once"
            )
        elif name not in blocks:
            if name in parsed.broken_steps:
                failed = True
                continue
            problem = (
                f"item {index}, '{item}', names no step; steps: "
                f"{', '.join(sorted(blocks)) or 'none'}"
            )
        if problem is not None:
            parsed.error(step, block.type, field.name, problem)
            failed = True
            continue
        names.append(name)
    return None if failed else Literal(tuple(names))


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


# Deepest nesting of lists and objects in a literal of a definition. Runners
# walk step outputs recursively, so a literal near Python's recursion limit
# of 1,000 would fail the run there. The bound leaves room for conditions of
# 32 nested statement groups, which take two levels each.
MAX_LITERAL_DEPTH = 100


def literal_depth_problem(value: Any) -> str | None:
    """Describe why a literal nests too deeply, or return None."""
    if nested_too_deep(value, MAX_LITERAL_DEPTH):
        return f"nests lists and objects more than {MAX_LITERAL_DEPTH} levels deep"
    return None


def _check_literal(parsed, step, block, field, value) -> Literal | None:
    # Depth first: checks such as the filter language parse recursively.
    problem = literal_depth_problem(value) or value_problem(field, value)
    if problem:
        parsed.error(step, block.type, field.name, problem)
        return None
    return Literal(value)


def _check_default(parsed, step, block, field: Field, spec: InputSpec) -> None:
    """Report a parameter's default that the field it feeds would reject.

    Every run that does not set the parameter would fail with it. A null
    default is left alone: it means the same as no default, which Roboflow's
    definitions write it for, and a run that leaves out a parameter that
    feeds a field rejecting null is rejected when its inputs are read.
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
        if reference.name in parsed.broken_inputs:
            return None
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
    """Return the steps with dependencies first; problems go to ``parsed.errors``.

    A step runs after the steps it reads from, and after each flow-control
    step that names it in its next steps.
    """
    blocks = {name: block for name, block, _ in parsed.steps}
    gates = _gates(blocks, bound)
    sorter: TopologicalSorter[str] = TopologicalSorter()
    for name, bindings in bound.items():
        sorter.add(
            name,
            *{ref.step for b in bindings.values() for ref in step_references(b)},
            *gates.get(name, ()),
        )
    try:
        order = list(sorter.static_order())
    except CycleError as error:
        _report_cycle(parsed, blocks, bound, error.args[1])
        return []
    lineages: dict[str, tuple[str, ...]] = {}
    plans = []
    for name in order:
        block = blocks[name]
        bindings = bound[name]
        reported = _check_same_lineage(parsed, name, block, bindings, lineages)
        inherited = _inherited_lineage(
            parsed, name, block, bindings, lineages, reported
        )
        lineages[name] = inherited + (name,) * block.adds_dimension
        for gate in gates.get(name, ()):
            _check_gate_lineage(parsed, blocks, gate, name, lineages, inherited)
        plans.append(
            StepPlan(
                name=name,
                block=block(),
                bindings=bindings,
                dimension=len(lineages[name]),
                gated_by=gates.get(name, ()),
            )
        )
    return plans


def describe_lineage(lineage: tuple[str, ...]) -> str:
    """Describe what a value with this lineage is computed for, in words."""
    if not lineage:
        return "per input image"
    described = f"per crop of step '{lineage[-1]}'"
    if len(lineage) > 1:
        outer = ", ".join(f"'{step}'" for step in lineage[:-1])
        noun = "step" if len(lineage) == 2 else "steps"
        described += f" (nested in the crops of {noun} {outer})"
    return described


def _selector(reference: InputRef | StepRef) -> str:
    if isinstance(reference, InputRef):
        return f"$inputs.{reference.name}"
    return f"$steps.{reference.step}.{reference.output}"


def _lineage_of(
    reference: InputRef | StepRef, lineages: dict[str, tuple[str, ...]]
) -> tuple[str, ...]:
    return lineages[reference.step] if isinstance(reference, StepRef) else ()


def _inherited_lineage(
    parsed,
    name: str,
    block: type[Block],
    bindings: dict[str, Binding],
    lineages: dict[str, tuple[str, ...]],
    reported: set[str],
) -> tuple[str, ...]:
    """Return the crop steps that step ``name`` runs per crop of, outermost first.

    The executor pairs the crops of two values by position, so every step
    output that a step reads must be per crop of the same crop steps as the
    deepest one, or per image those crops were cut from. Roboflow's compiler
    likewise rejects step inputs of incompatible lineage ("Data Lineage
    verification" in docs/workflows/workflows_compiler.md of
    roboflow/inference). Fields in ``reported`` already have an error and
    get no second one.
    """
    sources = [
        (field_name, reference, lineages[reference.step])
        for field_name, binding in bindings.items()
        for reference in step_references(binding)
    ]
    if not sources:
        return ()
    deepest_field, deepest, lineage = max(sources, key=lambda source: len(source[2]))
    for field_name, reference, other in sources:
        if lineage[: len(other)] == other or field_name in reported:
            continue
        reported.add(field_name)
        parsed.error(
            name,
            block.type,
            field_name,
            f"'{_selector(reference)}' is {describe_lineage(other)}, but "
            f"'{_selector(deepest)}' (field '{deepest_field}') is "
            f"{describe_lineage(lineage)}; the crops of different crop steps "
            "cannot be paired, so read both from the crops of one crop step, "
            "or read one from the images that step cropped",
        )
    return lineage


def _check_same_lineage(
    parsed,
    name: str,
    block: type[Block],
    bindings: dict[str, Binding],
    lineages: dict[str, tuple[str, ...]],
) -> set[str]:
    """Report a field of ``block.same_lineage_fields`` that mixes levels or crops.

    Returns the names of the fields reported.
    """
    reported = set()
    for field_name in block.same_lineage_fields:
        binding = bindings.get(field_name)
        if isinstance(binding, SequenceBinding):
            entries = list(binding.entries)
        elif isinstance(binding, InputRef | StepRef):
            entries = [binding]
        else:
            continue
        first = _lineage_of(entries[0], lineages)
        for index, entry in enumerate(entries[1:], start=1):
            other = _lineage_of(entry, lineages)
            if other == first:
                continue
            reported.add(field_name)
            parsed.error(
                name,
                block.type,
                field_name,
                f"item {index}, '{_selector(entry)}', is {describe_lineage(other)}, "
                f"but item 0, '{_selector(entries[0])}', is "
                f"{describe_lineage(first)}; the block combines their values as "
                "data of one image or crop, so every item must come "
                "from steps that ran on the same images: all on an input "
                "image, or all on the crops of one crop step",
            )
            break
    return reported


def next_steps_field(block: type[Block]) -> Field | None:
    """Return the STEPS field of a flow-control block, or None."""
    return next((field for field in block.fields if field.kind == STEPS), None)


def _gates(
    blocks: dict[str, type[Block]], bound: dict[str, dict[str, Binding]]
) -> dict[str, tuple[str, ...]]:
    """Return, for each step, the flow-control steps that name it."""
    gates: dict[str, list[str]] = {}
    for name, bindings in bound.items():
        field = next_steps_field(blocks[name])
        binding = bindings.get(field.name) if field is not None else None
        if not isinstance(binding, Literal):
            continue
        for target in binding.value:
            gates.setdefault(target, []).append(name)
    return {target: tuple(sources) for target, sources in gates.items()}


def _check_gate_lineage(
    parsed, blocks, gate, target, lineages, target_lineage: tuple[str, ...]
) -> None:
    """Report a flow-control step that decides per crop for a step that is not.

    A decision made once per crop cannot decide whether a step that runs once
    per image should run, so, as in Roboflow's compiler, the flow-control
    step's data must be at the target's level or above it. A decision per
    crop of one crop step cannot decide for the crops of another either,
    because the executor would pair their crops by position.
    """
    gate_lineage = lineages[gate]
    if target_lineage[: len(gate_lineage)] == gate_lineage:
        return
    field = next_steps_field(blocks[gate])
    if len(gate_lineage) > len(target_lineage):
        problem = (
            f"step '{gate}' decides once per crop (nesting level "
            f"{len(gate_lineage)}), but step '{target}' runs on data of level "
            f"{len(target_lineage)}; make the condition read data of step "
            f"'{target}''s level, or name a step that reads the crops"
        )
    else:
        problem = (
            f"step '{gate}' decides {describe_lineage(gate_lineage)}, but step "
            f"'{target}' runs {describe_lineage(target_lineage)}; the crops of "
            "different crop steps cannot be paired, so make the condition read "
            f"data of the crops that step '{target}' runs on, or of the images "
            "they were cut from"
        )
    parsed.error(
        gate,
        blocks[gate].type,
        field.name if field is not None else None,
        problem,
    )


def _report_cycle(parsed, blocks, bound, cycle: list[str]) -> None:
    # graphlib lists the cycle so that each step is an input of the next
    # one and the last equals the first, so the first step reads from
    # the one before the last.
    step, source = cycle[0], cycle[-2]
    field_name = next(
        (
            field
            for field, binding in bound[step].items()
            if any(ref.step == source for ref in step_references(binding))
        ),
        None,
    )
    if field_name is None:
        # The edge is a flow-control one: the source names the step.
        field = next_steps_field(blocks[source])
        if field is not None:
            step, field_name = source, field.name
    parsed.error(
        step,
        blocks[step].type,
        field_name,
        f"steps form a cycle: {' -> '.join(cycle)}",
    )


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
            if reference.name in parsed.broken_inputs:
                continue
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
