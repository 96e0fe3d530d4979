"""The timing breakdown of a run, measured with monotonic clocks.

Durations are kept as integer nanoseconds while measuring and reported as
integer microseconds.  ``overhead`` is computed last, as the runner total
minus every other runner component, so the components add up to the total
exactly; a negative overhead would mean double counting and raises.

A live event reports how much its phase added to a component, in whole
microseconds of the running sum (``us_added``). So the events of one
model's calls, one per image or crop, add up to the stored value exactly,
where converting each call on its own would lose up to a microsecond per
call.

Components, in the order a run goes through them:

- request: the web server parsing and checking the request, until the run is queued
- queue: queued until a runner starts it, taking the job and its inputs included
  (wall clocks of two processes)
- compile: definition to execution plan on the runner (cache lookup on a hit)
- cold_load: reading weights, building the model, moving it to the device and
  the warm-up pass, for each model that was not loaded yet
- preprocess, inference, postprocess: inside model steps
- blocks: every step that is not a model call
- serialization: turning outputs into JSON
- overhead: everything else on the runner (claiming the run, step glue)
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RUNNER_COMPONENTS = (
    "compile",
    "cold_load",
    "preprocess",
    "inference",
    "postprocess",
    "blocks",
    "serialization",
    "overhead",
)
COMPONENTS = ("request", "queue", *RUNNER_COMPONENTS)


def ns_to_us(ns: int) -> int:
    return ns // 1000


def us_added(before_ns: int, after_ns: int) -> int:
    """Return how many whole microseconds going from before_ns to after_ns adds."""
    return ns_to_us(after_ns) - ns_to_us(before_ns)


@dataclass
class ModelUse:
    """Use of one model in one run: its cold load, stage times and calls."""

    model_id: str
    source: str = ""
    pretrained: bool = True
    device: str = "cpu"
    cold: bool = False
    # Cold loads in this run: more than one when the model was evicted
    # during the run (a batch whose models do not fit the memory budget).
    loads: int = 0
    load_read_ns: int = 0
    load_to_device_ns: int = 0
    load_warmup_ns: int = 0
    preprocess_ns: int = 0
    inference_ns: int = 0
    postprocess_ns: int = 0
    calls: int = 0
    memory_bytes: int = 0
    steps: list[str] = field(default_factory=list)

    @property
    def cold_load_ns(self) -> int:
        return self.load_read_ns + self.load_to_device_ns + self.load_warmup_ns

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "source": self.source,
            "pretrained": self.pretrained,
            "device": self.device,
            "cold": self.cold,
            "loads": self.loads,
            "cold_load": {
                "read": ns_to_us(self.load_read_ns),
                "to_device": ns_to_us(self.load_to_device_ns),
                "warmup": ns_to_us(self.load_warmup_ns),
                "total": (
                    ns_to_us(self.load_read_ns)
                    + ns_to_us(self.load_to_device_ns)
                    + ns_to_us(self.load_warmup_ns)
                ),
            },
            "preprocess": ns_to_us(self.preprocess_ns),
            "inference": ns_to_us(self.inference_ns),
            "postprocess": ns_to_us(self.postprocess_ns),
            "calls": self.calls,
            "memory_bytes": self.memory_bytes,
            "steps": list(self.steps),
        }


@dataclass
class RunTimer:
    """Collects a run's timings on the runner while it executes."""

    compile_ns: int = 0
    compile_cache_hit: bool = False
    serialization_ns: int = 0
    models: dict[str, ModelUse] = field(default_factory=dict)
    # Each step's time over the whole batch.
    steps: dict[str, int] = field(default_factory=dict)
    model_steps: set[str] = field(default_factory=set)
    # Called with (phase, data) as each phase ends, for the live timeline.
    listener: Callable[..., None] | None = None
    # Facts the runner found while running, added to the run's warnings.
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def emit(self, phase: str, **data: Any) -> None:
        if self.listener is not None:
            self.listener(phase, **data)

    def model(self, model_id: str) -> ModelUse:
        use = self.models.get(model_id)
        if use is None:
            use = self.models[model_id] = ModelUse(model_id=model_id)
        return use

    def add_step(
        self, name: str, block_type: str, duration_ns: int, is_model_step: bool
    ) -> None:
        before = self.steps.get(name, 0)
        self.steps[name] = before + duration_ns
        if is_model_step:
            self.model_steps.add(name)
        self.emit(
            "step",
            step=name,
            type=block_type,
            model_step=is_model_step,
            duration=us_added(before, self.steps[name]),
        )

    @property
    def blocks_us(self) -> int:
        """Time in steps that are not model calls, as the sum of the steps' own."""
        return sum(
            ns_to_us(duration)
            for name, duration in self.steps.items()
            if name not in self.model_steps
        )

    def breakdown(
        self,
        *,
        runner_total_ns: int,
        request_us: int,
        queue_us: int,
        step_types: dict[str, str],
    ) -> dict[str, Any]:
        """Return the stored breakdown; components sum to ``total`` exactly."""
        models = [use.to_dict() for use in self.models.values()]
        components = {
            "request": request_us,
            "queue": queue_us,
            "compile": ns_to_us(self.compile_ns),
            "cold_load": sum(m["cold_load"]["total"] for m in models),
            "preprocess": sum(m["preprocess"] for m in models),
            "inference": sum(m["inference"] for m in models),
            "postprocess": sum(m["postprocess"] for m in models),
            "blocks": self.blocks_us,
            "serialization": ns_to_us(self.serialization_ns),
        }
        runner_total = ns_to_us(runner_total_ns)
        measured = sum(components[name] for name in RUNNER_COMPONENTS[:-1])
        overhead = runner_total - measured
        if overhead < 0:
            raise ValueError(
                f"runner components add up to {measured} us, more than the runner "
                f"total {runner_total} us: a phase was counted twice"
            )
        components["overhead"] = overhead
        return {
            "unit": "us",
            "total": sum(components.values()),
            "runner_total": runner_total,
            "components": components,
            "compile_cache_hit": self.compile_cache_hit,
            "models": models,
            "steps": [
                {
                    "name": name,
                    "type": step_types.get(name, ""),
                    "duration": ns_to_us(duration),
                }
                for name, duration in self.steps.items()
            ],
        }
