"""Start a run from a request, the same way for every entry point.

The REST API, the Roboflow-compatible routes, the browser and the
``runworkflow`` command all call ``start_run``.
"""

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction

from runner import keys
from runner.dispatch import (
    Submission,
    lock_live_workflow,
    resolve_models,
    submit,
    wait_for_result,
)
from runner.estimate import estimate_run
from runner.models import Run
from webapp.models import lock_user_row
from webapp.requests import TooManyRequests
from workflows.compiler import plan_cache
from workflows.compiler.plan import ExecutionPlan
from workflows.errors import WorkflowError
from workflows.inputs import (
    RunInputs,
    input_mapping,
    read_inputs,
    reject_undeclared_inputs,
)

# Synchronous requests waiting in this process, by owner.
_waiting: Counter[int] = Counter()
_waiting_lock = threading.Lock()


@contextmanager
def waiting_slot(owner_id: int) -> Iterator[None]:
    """Hold one of the owner's SYNC_WAITS_PER_USER slots in this process.

    A waiting request occupies a web server thread for up to its timeout, so
    without a limit one user's requests could hold every thread, and every
    other user would wait.
    """
    limit = settings.GLASSBOX["SYNC_WAITS_PER_USER"]
    with _waiting_lock:
        if _waiting[owner_id] >= limit:
            raise TooManyRequests(
                f"you already have {limit} synchronous requests waiting for runs "
                "on this server process",
                context="request_limits",
                hint="Wait for one to finish, or send runs asynchronously and "
                "follow their URLs.",
            )
        _waiting[owner_id] += 1
    try:
        yield
    finally:
        with _waiting_lock:
            _waiting[owner_id] -= 1
            if not _waiting[owner_id]:
                del _waiting[owner_id]


@contextmanager
def queued_run_slot(owner_id: int) -> Iterator[None]:
    """Check QUEUED_RUNS_PER_USER and store the new run in one transaction.

    The transaction locks the owner's row first, so the owner's concurrent
    asynchronous requests count and store one after another and cannot
    pass the limit together. The job is queued when the transaction commits.
    """
    with transaction.atomic():
        lock_user_row(owner_id)
        check_queued_runs(owner_id)
        yield


@contextmanager
def live_workflow_slot(workflow_version_id: int) -> Iterator[None]:
    """Lock the run's workflow in a transaction that the queued-run limit joins.

    A queued run is stored inside the transaction of queued_run_slot, which
    locks the owner's row. The workflow's row must be locked before that,
    in the order a workflow save takes them: the save locks the workflow,
    and its foreign key check at commit waits for the owner's row. The
    reverse order deadlocks with a save of the same workflow. submit()
    locks the workflow again before its INSERT, which this transaction
    already holds.
    """
    with transaction.atomic():
        lock_live_workflow(workflow_version_id)
        yield


def check_queued_runs(owner_id: int) -> None:
    """Raise TooManyRequests if the owner has QUEUED_RUNS_PER_USER runs queued."""
    limit = settings.GLASSBOX["QUEUED_RUNS_PER_USER"]
    queued = (
        Run.objects.filter(owner_id=owner_id, status=Run.Status.QUEUED)
        .values("pk")[:limit]
        .count()
    )
    if queued >= limit:
        raise TooManyRequests(
            f"you already have {limit} runs queued, the most one user may have",
            context="request_limits",
            hint="Wait for queued runs to start before sending more asynchronous runs.",
        )


class PriceCapExceeded(WorkflowError):
    """A run's predicted price is over the price cap its request set.

    The request is valid, and the same request can pass later, when the
    model is loaded or the workflow's runs get faster, so it is a conflict
    with the fleet's current state, as 409 is used elsewhere in the API.
    ``economy`` is the estimate's summary for the same run sent with
    priority economy, given only where that run would start hot on a
    runner and cost less.
    """

    code = "price_cap_exceeded"
    status = 409

    def __init__(
        self,
        estimate: dict[str, Any],
        max_price_microcredits: int,
        economy: dict[str, Any] | None = None,
    ):
        self.estimate = estimate
        self.max_price_microcredits = max_price_microcredits
        self.economy = economy
        super().__init__(
            self.message_for("max_price_microcredits"),
            context="price_cap",
            field_name="max_price_microcredits",
            hint=self.hint_for("max_price_microcredits", "priority economy"),
        )

    def message_for(self, cap_name: str) -> str:
        """Return the message, naming the cap ``cap_name``, as ``hint_for`` does."""
        price = self.estimate["amount_microcredits"]
        start = "hot" if self.estimate["hot"] else "cold"
        return (
            f"the run's predicted price, {price} micro-credits (predicted to "
            f"start {start}), is over its {cap_name}, "
            f"{self.max_price_microcredits}; nothing was stored"
        )

    def hint_for(self, cap_name: str, economy_name: str) -> str:
        """Return the hint, naming the cap ``cap_name`` and economy ``economy_name``.

        The command line names its options where the API names its fields.
        """
        hint = f"Raise {cap_name} to at least {self.estimate['amount_microcredits']}"
        if self.economy is None:
            return f"{hint}."
        economy_price = self.economy["amount_microcredits"]
        if economy_price <= self.max_price_microcredits:
            return (
                f"Send the run with {economy_name}: it then waits for runner "
                f"{self.economy['runner']}, which has its models loaded, and is "
                f"predicted to cost {economy_price} micro-credits. Or {hint[0].lower()}"
                f"{hint[1:]}."
            )
        return (
            f"{hint}, or to {economy_price} with {economy_name}, which waits "
            f"for runner {self.economy['runner']}, where its models are loaded."
        )

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["max_price_microcredits"] = self.max_price_microcredits
        body["predicted_price_microcredits"] = self.estimate["amount_microcredits"]
        body["predicted_hot"] = self.estimate["hot"]
        body["estimate"] = self.estimate
        body["economy_estimate"] = self.economy
        return body


def check_price_cap(
    plan: ExecutionPlan,
    inputs: RunInputs,
    owner_id: int,
    max_price_microcredits: int,
    priority: str = Run.Priority.STANDARD,
) -> dict[str, Any]:
    """Estimate the run; raise PriceCapExceeded if its known price is over the cap.

    Returns the estimate's summary that the run stores. The estimate reads
    the route as routing would choose it now without marking any runner
    busy, so a rejected run leaves nothing behind. An unknown price passes,
    and the bill enforces the cap instead. A standard run predicted to
    start cold is estimated again as an economy run, for the error to say
    whether that priority would make the run cheaper.
    """
    summary = _price_summary(
        estimate_run(plan, inputs.parameters, owner_id, inputs.batch_size, priority)
    )
    price = summary["amount_microcredits"]
    if price is None or price <= max_price_microcredits:
        return summary
    economy = None
    if priority == Run.Priority.STANDARD and not summary["hot"]:
        economy = _price_summary(
            estimate_run(
                plan,
                inputs.parameters,
                owner_id,
                inputs.batch_size,
                Run.Priority.ECONOMY,
            )
        )
        cheaper = economy["amount_microcredits"] is not None and (
            economy["amount_microcredits"] < price
        )
        if not (cheaper and economy["hot"] and economy["runner"]):
            economy = None
    raise PriceCapExceeded(summary, max_price_microcredits, economy)


def _price_summary(estimate: dict[str, Any]) -> dict[str, Any]:
    """Return the parts of an estimate that a run stores and a 409 shows."""
    price = estimate["price"]
    return {
        "amount_microcredits": price["amount_microcredits"] if price else None,
        "hot": estimate["hot"],
        "runner": estimate["runner"],
        "total_us": estimate["total"],
        "runner_total_us": estimate["runner_total"],
        "unknown": estimate["unknown"],
    }


@dataclass
class RunOutcome:
    run: Run
    # The finished run's payload, or None when it is still queued or running.
    payload: dict[str, Any] | None


def start_run(
    *,
    owner_id: int,
    source: str,
    definition: dict,
    raw_inputs: Any,
    started_ns: int,
    wait_s: float,
    workflow_version_id: int | None = None,
    token_id: int | None = None,
    uploads: dict[str, bytes] | None = None,
    runner: str | None = None,
    on_queued: Callable[[Run], None] | None = None,
    strict_inputs: bool = False,
    max_price_microcredits: int | None = None,
    priority: str = Run.Priority.STANDARD,
) -> RunOutcome:
    """Compile, check inputs, queue, and wait up to ``wait_s`` for the result.

    Raises DefinitionError, InputError, ModelNotFoundError, NoRunnerError,
    PriceCapExceeded or TooManyRequests before anything is stored.
    Synchronous requests are limited by SYNC_WAITS_PER_USER, asynchronous
    ones (``wait_s`` 0) by QUEUED_RUNS_PER_USER. Both limits apply after
    the definition, the inputs, the model ids and the price cap are
    checked, so an invalid request gets its own error rather than a 429.
    ``on_queued`` is called with the stored run before the wait. With
    ``strict_inputs``, inputs the definition does not declare are rejected.
    With ``max_price_microcredits``, the run is estimated first
    (``check_price_cap``) and billed at most that much. ``priority`` is a
    Run.Priority value, checked by the caller.
    """
    compiled = plan_cache.compile(definition, owner_id)
    if strict_inputs:
        reject_undeclared_inputs(compiled.plan, input_mapping(raw_inputs))
    inputs = read_inputs(
        compiled.plan,
        raw_inputs,
        max_pixels=settings.GLASSBOX["MAX_IMAGE_PIXELS"],
        max_total_pixels=settings.GLASSBOX["MAX_RUN_PIXELS"],
        max_images=settings.GLASSBOX["MAX_RUN_IMAGES"],
        uploads=uploads,
    )
    models = resolve_models(compiled.plan, inputs.parameters, owner_id)
    price_estimate = None
    if max_price_microcredits is not None:
        price_estimate = check_price_cap(
            compiled.plan, inputs, owner_id, max_price_microcredits, priority
        )
    with waiting_slot(owner_id) if wait_s > 0 else nullcontext():
        # The image checks above can take a while, so they stay outside the
        # transaction that the workflow lock and the queued-run limit hold.
        # A run that waits for its result takes the workflow lock in
        # submit(), right before its INSERT.
        queued = wait_s <= 0
        with (
            (
                live_workflow_slot(workflow_version_id)
                if queued and workflow_version_id is not None
                else nullcontext()
            ),
            queued_run_slot(owner_id) if queued else nullcontext(),
        ):
            run = submit(
                Submission(
                    owner_id=owner_id,
                    source=source,
                    plan=compiled.plan,
                    inputs=inputs,
                    request_started_ns=started_ns,
                    workflow_version_id=workflow_version_id,
                    inline_definition=None if workflow_version_id else definition,
                    token_id=token_id,
                    runner=runner,
                    models=models,
                    max_price_microcredits=max_price_microcredits,
                    price_estimate=price_estimate,
                    priority=priority,
                ),
                require_runner=wait_s > 0,
            )
        if on_queued is not None:
            on_queued(run)
        payload = wait_for_result(str(run.id), wait_s)
        if payload is not None and payload["meta"].get("queue") is None:
            _follow_requeue(run, payload["meta"].get("runner"))
        return RunOutcome(run, payload)


def _follow_requeue(run: Run, runner_name: str | None) -> None:
    """Read the run's queue again if another runner than the routed one took it.

    A result from a runner names the queue the run ran from. A run failed
    without one, routed to one runner's own queue and held by another, was
    moved when the first was reaped, and the row names the queue it went to.
    """
    routed_to = keys.runner_of_queue(run.queue_name)
    if routed_to is not None and runner_name not in (None, routed_to):
        run.refresh_from_db(fields=["queue_name"])
