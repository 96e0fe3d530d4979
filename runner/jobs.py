"""The job a runner executes for one run."""

import json
import logging
import time
from datetime import UTC, datetime

import redis
from django.conf import settings

from billing.policy import BillingPolicy
from runner import fleet, handoff, keys, sql
from runner.events import RunEvents
from runner.finish import clear_mark, fail_run, finish_run
from runner.model_cache import ModelProvider
from runner.models import Run
from runner.registry import ModelSource, check_model_path
from runner.runtime import current_runtime
from webapp.clock import clock
from webapp.redis import get_redis
from workflows.compiler import plan_cache
from workflows.compiler.plan import ExecutionPlan
from workflows.errors import InputsExpiredError, WorkflowError
from workflows.executor import (
    Deadline,
    DetectionBudget,
    OutputBudget,
    PixelBudget,
    collect_outputs,
    execute_plan,
)
from workflows.images import WorkflowImage
from workflows.models import WorkflowVersion
from workflows.timing import RunTimer

logger = logging.getLogger(__name__)

PLATFORM_FAILURE = "the run failed because of the platform"


def execute_run(
    run_id: str,
    snapshot: dict | None = None,
    inputs: dict | None = None,
    queue: str | None = None,
    declined_by: list[str] | None = None,
) -> None:
    """Claim the run, execute it, and finish it with its bill.

    ``snapshot`` contains the run's fields (see dispatch.job_snapshot); jobs
    queued without one read the row instead. ``inputs`` is the run's input
    hash as the worker read it with the job; without it the images are read
    here. ``queue`` is the queue the job was taken from, which the claim
    records: a run moved off a reaped runner's queue ran from another.
    ``declined_by`` names the runners that handed the job on because they
    lack a model's weights file (runner.handoff).
    """
    started = time.perf_counter_ns()
    started_monotonic = time.monotonic()
    started_wall = clock.now_ns()
    runtime = current_runtime()
    if handoff.pass_on_if_lacking(run_id, runtime, snapshot, queue, declined_by or []):
        return
    # Named before the claim, so that the check for runs this runner claimed
    # and no longer executes (recovery.fail_abandoned_runs) never finds this
    # one claimed and not yet named.
    runtime.current_run = run_id
    try:
        claimed = _claim_run(run_id, runtime, started_wall, queue)
    except Exception:
        # The job id is not a UUID, or the database is unreachable. The job
        # is dropped, and the lost-run check queues a real run it belongs to
        # again.
        runtime.current_run = None
        clear_mark(get_redis(), runtime.name, run_id)
        raise
    if not claimed:
        logger.info(
            "runner %s: run %s is no longer queued; skipped", runtime.name, run_id
        )
        runtime.current_run = None
        clear_mark(get_redis(), runtime.name, run_id)
        return
    try:
        _refresh_instance(runtime, run_id)
        run = _run_from(run_id, snapshot)
        routed_queue = run.queue_name
        if queue:
            run.queue_name = queue
        _execute(
            run,
            runtime,
            started,
            started_wall,
            inputs,
            started_monotonic,
            routed_queue,
        )
    except BaseException as error:
        # _execute finishes the run itself when the workflow fails. This catches
        # failures around it (database, Redis), so that the run does not stay
        # "running" on a live runner, and a second stop signal, which ends
        # the process in the middle of the run.
        if isinstance(error, Exception):
            logger.exception("runner %s could not finish run %s", runtime.name, run_id)
            reason = f"could not finish the run: {type(error).__name__}"
        else:
            logger.error("runner %s stopped during run %s", runtime.name, run_id)
            reason = "was stopped during the run"
        runtime.last_finished_ns = clock.now_ns()
        fail_run(
            run_id,
            f"runner {runtime.name} {reason}",
            expected_status=Run.Status.RUNNING,
            expected_runner=runtime.name,
            expected_instance=runtime.instance,
        )
        raise
    finally:
        runtime.current_run = None
        runtime.runs_done += 1
        if runtime.last_finished_ns < started_wall:
            runtime.last_finished_ns = clock.now_ns()


def _claim_run(run_id: str, runtime, started_wall: int, queue: str | None) -> bool:
    """Set the queued run running under this process; return whether it is.

    The claim is made once more on a new connection if the first one lost
    its connection (sql.retry_if_disconnected).
    """
    claim = {
        "status": Run.Status.RUNNING,
        "runner_name": runtime.name,
        "runner_instance": runtime.instance,
        "started_at": datetime.fromtimestamp(started_wall / 1e9, tz=UTC),
    }
    if queue:
        claim["queue_name"] = queue
    attempts = 0

    def claim_once() -> bool:
        nonlocal attempts
        attempts += 1
        return _claim(run_id, claim, runtime.instance, retried=attempts > 1)

    return sql.retry_if_disconnected(
        claim_once, f"runner {runtime.name}: claiming run {run_id}"
    )


def _claim(run_id: str, claim: dict, instance: str, retried: bool) -> bool:
    """Claim the run if it is queued; return whether it runs under ``instance``.

    A claim that committed before the connection broke leaves the run
    running under ``instance`` when the claim is ``retried`` on a new
    connection. Only this process writes its own instance, so the run is
    still this process's to execute. A first attempt does not look: a run
    left running under this process by a finish that failed is not run
    again.
    """
    if sql.update_where(Run, claim, where={"pk": run_id, "status": Run.Status.QUEUED}):
        return True
    if not retried:
        return False
    claimed_by_instance = {
        "pk": run_id,
        "status": Run.Status.RUNNING,
        "runner_instance": instance,
    }
    return sql.select_row(Run, ("pk",), where=claimed_by_instance) is not None


def _refresh_instance(runtime, run_id: str) -> None:
    """Set this process's instance key again right after claiming ``run_id``.

    A process paused past RUNNER_DEAD_AFTER_S in its claim resumes with its
    instance key expired. Until set again here, a check for runs of dead
    processes would fail this run. The run itself needs Redis only when its
    result is pushed, so an unreachable Redis server does not fail it. No
    check can read the instance keys while Redis is unreachable, and the
    next heartbeat sets the key.
    """
    try:
        fleet.refresh_instance(runtime.name, runtime.instance)
    except (redis.ConnectionError, redis.TimeoutError) as error:
        logger.warning(
            "runner %s: Redis unreachable after claiming run %s (%s); running it",
            runtime.name,
            run_id,
            error,
        )


def _run_from(run_id: str, snapshot: dict | None) -> Run:
    """Build the run from its job's snapshot, or read the row without one.

    NOTE: the snapshot's fields are trusted as read from Redis, so a writer
    to Redis can change whom the run bills. Only model paths are checked.
    """
    if snapshot is None:
        return Run.objects.get(pk=run_id)
    run = Run(id=run_id, **snapshot)
    for model in run.model_refs:
        check_model_path(ModelSource.from_dict(model["source"]))
    return run


def _waited_for_runner(run: Run, routed_queue: str, runtime) -> bool:
    """Return whether the run waited for a runner instead of finding one free.

    The estimate predicts queue time only from runs that did not wait.
    """
    # Queued before this runner finished its previous run: an idle runner
    # would have taken it at once.
    if run.queued_at_ns < runtime.last_finished_ns:
        return True
    # Routed to a runner's own queue and taken from another one: the run
    # waited on that runner until it stopped or went down and its jobs were
    # moved, however free the runner that took it then was.
    routed_to_runner = keys.runner_of_queue(routed_queue) is not None
    return routed_to_runner and routed_queue != run.queue_name


def _execute(
    run: Run,
    runtime,
    started: int,
    started_wall: int,
    inputs: dict | None,
    started_monotonic: float,
    routed_queue: str,
) -> None:
    events = RunEvents(str(run.pk))
    timer = RunTimer(listener=events.emit)
    queue_us = max(0, (started_wall - run.queued_at_ns) // 1000)
    events.emit("request", duration=run.request_us)
    events.emit("queue", duration=queue_us, runner=runtime.name)
    policy = BillingPolicy.from_settings()
    outputs, outputs_json, error, status = None, "null", None, Run.Status.SUCCEEDED
    # Set when the run must not be billed.
    waive_reason: str | None = None
    plan = None
    try:
        plan = _plan_for(run, timer)
        events.emit(
            "compile",
            duration=timer.compile_ns // 1000,
            cache_hit=timer.compile_cache_hit,
        )
        batch_inputs = _batch_inputs(run, plan, inputs)
        batch_results = _execute_batch(run, runtime, plan, batch_inputs, timer)
        serialize_started = time.perf_counter_ns()
        try:
            budget = OutputBudget(settings.GLASSBOX["MAX_RUN_OUTPUT_BYTES"])
            batch = [
                collect_outputs(plan, inputs, results, budget, index)
                for index, (inputs, results) in enumerate(
                    zip(batch_inputs, batch_results, strict=True)
                )
            ]
            outputs_json = json.dumps(batch)
        finally:
            # An output that cannot be serialized fails the run, and the
            # time spent finding it is still serialization, not overhead.
            timer.serialization_ns += time.perf_counter_ns() - serialize_started
        events.emit("serialization", duration=timer.serialization_ns // 1000)
        outputs = batch
    except WorkflowError as failure:
        status = Run.Status.FAILED
        error, waive_reason = _report_failure(run, runtime, failure)
    except Exception as failure:
        status = Run.Status.FAILED
        error, waive_reason = _report_crash(run, runtime, failure)

    breakdown = _breakdown(run, runtime, plan, timer, started, queue_us, routed_queue)
    stall_reason = _stall_reason(runtime, started_monotonic)
    if stall_reason is not None and not waive_reason:
        waive_reason = stall_reason
    if waive_reason:
        bill = policy.waive(breakdown, waive_reason)
    else:
        bill = policy.bill(breakdown, run.max_price_microcredits)
    run.warnings = [*run.warnings, *timer.warnings]
    # Before the result is published: a run queued once a client has it
    # found this runner free, and must not count as having waited.
    runtime.last_finished_ns = clock.now_ns()
    finish_run(
        run,
        status=status,
        outputs=outputs,
        outputs_json=outputs_json,
        breakdown=breakdown,
        error=error,
        bill=bill,
        runner_name=runtime.name,
        runner_instance=runtime.instance,
        events=events,
    )


def _batch_inputs(run: Run, plan: ExecutionPlan, inputs: dict | None) -> list[dict]:
    """Build the inputs of each image in the batch: the run's parameters and images."""
    images = _images(run, [spec.name for spec in plan.image_inputs], inputs)
    batch_inputs = []
    for index in range(run.batch_size):
        inputs = dict(run.parameters)
        for name, items in images.items():
            inputs[name] = items[index if len(items) > 1 else 0]
        batch_inputs.append(inputs)
    return batch_inputs


def _execute_batch(
    run: Run, runtime, plan: ExecutionPlan, batch_inputs: list[dict], timer: RunTimer
) -> list:
    """Execute ``plan`` on each of ``batch_inputs``, with the models from the cache."""
    sources = {
        m["model_id"]: ModelSource.from_dict(m["source"]) for m in run.model_refs
    }
    provider = ModelProvider(runtime.cache, sources, timer)
    pixel_budget = PixelBudget(settings.GLASSBOX["MAX_RUN_PIXELS"])
    detection_budget = DetectionBudget(settings.GLASSBOX["MAX_RUN_DETECTIONS"])
    deadline = Deadline(settings.GLASSBOX["RUN_TIME_LIMIT_S"])
    return execute_plan(
        plan,
        batch_inputs,
        models=provider,
        timer=timer,
        pixel_budget=pixel_budget,
        detection_budget=detection_budget,
        deadline=deadline,
    )


def _report_failure(
    run: Run, runtime, failure: WorkflowError
) -> tuple[dict, str | None]:
    """Log ``failure``; return the run's error and why it is not billed.

    The reason is None for a user error that is billable.
    """
    error = failure.to_dict()
    error["status"] = failure.status
    waive_reason = None
    if not failure.user_error:
        waive_reason = PLATFORM_FAILURE
    elif not failure.billable:
        waive_reason = "the input passed the server's checks but failed on the runner"
    logger.info("run %s failed on runner %s: %s", run.pk, runtime.name, failure.message)
    return error, waive_reason


def _report_crash(run: Run, runtime, failure: Exception) -> tuple[dict, str]:
    """Log an unexpected exception; return the run's error and why it is not billed."""
    error = {
        "message": f"internal error on runner {runtime.name}: {type(failure).__name__}",
        "code": "platform_failure",
        "context": "workflow_execution",
        "error_type": type(failure).__name__,
        "status": 500,
    }
    logger.exception("run %s crashed on runner %s", run.pk, runtime.name)
    return error, PLATFORM_FAILURE


def _breakdown(
    run: Run,
    runtime,
    plan: ExecutionPlan | None,
    timer: RunTimer,
    started: int,
    queue_us: int,
    routed_queue: str,
) -> dict:
    """Build the run's timing breakdown, with the runner that executed it."""
    runner_total_ns = time.perf_counter_ns() - started
    step_types = {step.name: step.block.type for step in plan.steps} if plan else {}
    breakdown = timer.breakdown(
        runner_total_ns=runner_total_ns,
        request_us=run.request_us,
        queue_us=queue_us,
        step_types=step_types,
    )
    breakdown["runner"] = runtime.name
    breakdown["device"] = runtime.device
    breakdown["waited_for_runner"] = _waited_for_runner(run, routed_queue, runtime)
    return breakdown


def _stall_reason(runtime, started_monotonic: float) -> str | None:
    """Return why the run is not billed if the runner stalled during it, or None."""
    dead_after = settings.GLASSBOX["RUNNER_DEAD_AFTER_S"]
    stall_s = runtime.stall_since(started_monotonic, dead_after)
    if stall_s is None:
        return None
    # The fleet counts a runner this long without a heartbeat as down,
    # and a run it held is then failed unbilled. With no other runner
    # to reap it, the run finished, but the pause is not the user's.
    limit = f"longer than RUNNER_DEAD_AFTER_S, {dead_after:g} s"
    if runtime.stall_in_redis:
        return (
            f"the Redis server of runner {runtime.name} did not answer for "
            f"{stall_s:.1f} s during the run ({limit})"
        )
    return (
        f"runner {runtime.name} was stopped or starved for {stall_s:.1f} s "
        f"during the run ({limit})"
    )


def _plan_for(run: Run, timer: RunTimer) -> ExecutionPlan:
    """Find the plan by digest, compiling the stored definition on a miss.

    The compile component includes reading the definition from the database,
    which only happens on a miss.
    """
    started = time.perf_counter_ns()
    plan = plan_cache.get(run.definition_digest, run.owner_id)
    timer.compile_cache_hit = plan is not None
    if plan is None:
        if run.workflow_version_id is not None:
            definition = WorkflowVersion.objects.values_list(
                "definition", flat=True
            ).get(pk=run.workflow_version_id)
        else:
            definition = Run.objects.values_list("inline_definition", flat=True).get(
                pk=run.pk
            )
        plan = plan_cache.compile(definition, run.owner_id).plan
    timer.compile_ns = time.perf_counter_ns() - started
    return plan


def _images(
    run: Run, names: list[str], inputs: dict | None
) -> dict[str, list[WorkflowImage]]:
    """Build the run's images from its input hash, read now if not given."""
    if inputs is None:
        inputs = get_redis().hgetall(keys.inputs_key(str(run.pk)))
    images: dict[str, list[WorkflowImage]] = {name: [] for name in names}
    for name in names:
        for index, info in enumerate(run.image_info.get(name, [])):
            blob = inputs.get(keys.input_field(name, index).encode())
            if blob is None:
                raise InputsExpiredError(
                    f"input image '{name}' #{index} expired before a runner started "
                    "the run; send the request again",
                    context="input_fetch",
                    field_name=name,
                )
            images[name].append(
                WorkflowImage(
                    parent_id=f"{name}.{index}" if index else name,
                    width=info["width"],
                    height=info["height"],
                    data=blob,
                )
            )
    return images
