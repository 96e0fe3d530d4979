"""Compile a workflow definition into an immutable, cached execution plan.

Phases run in order and each adds its problems to one list: shape
(``parse``), then bindings, selectors and step order (``graph``).  Plans are
cached by the SHA-256 of the canonical JSON of the definition (sorted keys,
no whitespace), so two definitions that differ only in key order share a
plan.
"""

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from workflows.blocks.property_definition.value_operations import regex_time_budget
from workflows.compiler.graph import bind_outputs, bind_steps, order_steps
from workflows.compiler.parse import parse_definition
from workflows.compiler.plan import ExecutionPlan
from workflows.errors import BlockError, DefinitionError

CACHE_SIZE = 256
# Limits on a definition, checked before it is compiled or cached, so one
# request cannot make the web server or a runner build and hold a huge plan.
MAX_STEPS = 250
MAX_INPUTS = 100
MAX_OUTPUTS = 100
MAX_DEFINITION_BYTES = 256 * 1024


def canonical_json(definition: Any) -> str:
    return json.dumps(
        definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def definition_digest(definition: Any) -> str:
    return hashlib.sha256(canonical_json(definition).encode()).hexdigest()


def build_plan(definition: Any, digest: str) -> ExecutionPlan:
    """Compile without the cache; raise DefinitionError listing every problem."""
    # Checking the fields runs the operations of static operands, whose
    # StringMatches searches share one time limit.
    with regex_time_budget():
        return _build_plan(definition, digest)


def _build_plan(definition: Any, digest: str) -> ExecutionPlan:
    parsed = parse_definition(definition)
    if not parsed.readable:
        raise DefinitionError(parsed.errors, context="workflow_compilation | parsing")
    bound = bind_steps(parsed)
    outputs = bind_outputs(parsed)
    if parsed.errors:
        raise DefinitionError(
            parsed.errors, context="workflow_compilation | execution_graph_construction"
        )
    steps = order_steps(parsed, bound)
    if parsed.errors:
        raise DefinitionError(
            parsed.errors, context="workflow_compilation | execution_graph_construction"
        )
    if not outputs:
        raise DefinitionError(
            [BlockError(None, None, "outputs", "the workflow declares no outputs")],
            context="workflow_compilation | parsing",
        )
    return ExecutionPlan(
        digest=digest,
        inputs=tuple(parsed.inputs),
        steps=tuple(steps),
        outputs=tuple(outputs),
        warnings=tuple(parsed.warnings),
    )


def check_size(definition: Any) -> None:
    """Raise DefinitionError if ``definition`` has more parts than the limits allow."""
    if not isinstance(definition, dict):
        return
    limits = (("steps", MAX_STEPS), ("inputs", MAX_INPUTS), ("outputs", MAX_OUTPUTS))
    for key, limit in limits:
        items = definition.get(key)
        if isinstance(items, list) and len(items) > limit:
            raise _too_large(
                key, f"'{key}' has {len(items)} entries; at most {limit} are accepted"
            )


def _too_large(key: str | None, details: str) -> DefinitionError:
    return DefinitionError(
        [BlockError(None, None, key, details + "; split the workflow")],
        context="workflow_compilation | parsing",
    )


@dataclass(frozen=True)
class CompileResult:
    plan: ExecutionPlan
    cache_hit: bool
    duration_ns: int


class PlanCache:
    """A thread-safe LRU cache of plans keyed by owner and definition digest.

    Each owner has entries of their own, although a plan does not depend on
    its owner. Each run reports its compile time and whether it was a hit, so
    a hit on another user's plan would show that someone had run that exact
    definition.
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._plans: OrderedDict[tuple[int | None, str], ExecutionPlan] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, definition: Any, owner_id: int | None = None) -> CompileResult:
        """Return the plan for ``definition``, timing the lookup or the compile."""
        started = time.perf_counter_ns()
        check_size(definition)
        text = canonical_json(definition)
        if len(text.encode()) > MAX_DEFINITION_BYTES:
            raise _too_large(
                None,
                f"the definition is {len(text.encode())} bytes of JSON; at most "
                f"{MAX_DEFINITION_BYTES} are accepted",
            )
        digest = hashlib.sha256(text.encode()).hexdigest()
        plan = self.get(digest, owner_id)
        cache_hit = plan is not None
        if plan is None:
            plan = build_plan(definition, digest)
            with self._lock:
                self._plans[(owner_id, digest)] = plan
                while len(self._plans) > self.size:
                    self._plans.popitem(last=False)
        return CompileResult(plan, cache_hit, time.perf_counter_ns() - started)

    def get(self, digest: str, owner_id: int | None = None) -> ExecutionPlan | None:
        """Return the owner's cached plan for a definition digest, or None."""
        key = (owner_id, digest)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
        return plan


plan_cache = PlanCache()
