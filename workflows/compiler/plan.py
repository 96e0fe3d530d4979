"""The immutable result of compiling a definition, read by the executor."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workflows.blocks.base import Block

IMAGE_INPUT = "image"
PARAMETER_INPUT = "parameter"


@dataclass(frozen=True)
class Literal:
    value: Any


@dataclass(frozen=True)
class InputRef:
    name: str


@dataclass(frozen=True)
class StepRef:
    step: str
    output: str  # "*" means every output of the step


@dataclass(frozen=True)
class MappingBinding:
    """A ``mapping`` field: each key of its object with that value's binding."""

    entries: tuple[tuple[str, Literal | InputRef | StepRef], ...]


@dataclass(frozen=True)
class SequenceBinding:
    """A ``sequence`` field: the selectors of its list, in order."""

    entries: tuple[InputRef | StepRef, ...]


Binding = Literal | InputRef | StepRef | MappingBinding | SequenceBinding


def step_references(binding: Binding) -> list[StepRef]:
    """Return the step outputs that ``binding`` reads."""
    if isinstance(binding, StepRef):
        return [binding]
    if isinstance(binding, MappingBinding):
        return [entry for _, entry in binding.entries if isinstance(entry, StepRef)]
    if isinstance(binding, SequenceBinding):
        return [entry for entry in binding.entries if isinstance(entry, StepRef)]
    return []


@dataclass(frozen=True)
class InputSpec:
    name: str
    kind: str  # IMAGE_INPUT or PARAMETER_INPUT
    default: Any = None
    has_default: bool = False


@dataclass(frozen=True)
class StepPlan:
    name: str
    block: Block
    bindings: Mapping[str, Binding]
    # Nesting level of this step's outputs: 0 per input image, 1 per crop, ...
    dimension: int
    # The flow-control steps that name this step in their next steps. The
    # step runs for an image or crop only where each of them selected it.
    gated_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputSpec:
    name: str
    binding: InputRef | StepRef
    coordinates: str  # "own" or "parent"


@dataclass(frozen=True)
class ExecutionPlan:
    digest: str
    inputs: tuple[InputSpec, ...]
    steps: tuple[StepPlan, ...]  # in an order where dependencies come first
    outputs: tuple[OutputSpec, ...]
    warnings: tuple[str, ...] = ()

    @property
    def image_inputs(self) -> tuple[InputSpec, ...]:
        return tuple(i for i in self.inputs if i.kind == IMAGE_INPUT)

    @property
    def parameter_inputs(self) -> tuple[InputSpec, ...]:
        return tuple(i for i in self.inputs if i.kind == PARAMETER_INPUT)

    def model_ids(self, parameters: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Return (step name, model id) for every model step, given parameter values."""
        found = []
        for step in self.steps:
            if not step.block.uses_model:
                continue
            binding = step.bindings["model_id"]
            if isinstance(binding, Literal):
                found.append((step.name, binding.value))
            elif isinstance(binding, InputRef):
                found.append((step.name, parameters.get(binding.name)))
        return found
