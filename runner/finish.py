"""Finish a run: final state and its one bill in a single transaction.

Finishing is conditional on the run still being in the state the caller saw
(``running`` on the expected runner, or ``queued``), so a runner and a reaper
racing over the same run cannot both finish it or bill it twice.  After the
commit, one Redis round trip pushes the final payload to the run's list
(waking any request waiting for the result), publishes the events still
pending with ``done``, and deletes the run's input images.
"""

import datetime
import json
import logging
import time
from typing import Any

import redis
from django.db import transaction

from billing.models import Bill
from billing.policy import BillingPolicy, BillLine
from runner import keys, sql
from runner.events import REAPER_FIRST_SEQ, RunEvents
from runner.models import Run
from webapp.clock import clock
from webapp.redis import get_redis, restart_embedded_redis_if_down

logger = logging.getLogger(__name__)

DONE_TTL_S = 600
# Pauses between attempts to push a finished run's result: about 30 s in
# all, long enough for `up` or another process to restart an embedded Redis.
PUSH_RETRY_DELAYS_S = (0.1, 0.5, 1, 2, 5, 10, 12)


def bill_fields(line: BillLine | Bill) -> dict[str, Any]:
    """Return a bill's fields, from a policy's BillLine or a stored Bill."""
    return {
        "billed": line.billed,
        "components": line.components,
        "billable_us": line.billable_us,
        "billed_ms": line.billed_ms,
        "rate_microcredits_per_second": line.rate_microcredits_per_second,
        "minimum_ms": line.minimum_ms,
        "amount_microcredits": line.amount_microcredits,
        "policy": line.policy,
        "formula": line.formula,
        "capped": line.capped,
    }


def finish_run(
    run: Run,
    *,
    status: str,
    outputs: Any,
    outputs_json: str,
    breakdown: dict[str, Any] | None,
    error: dict[str, Any] | None,
    bill: BillLine,
    runner_name: str,
    runner_instance: str,
    events: RunEvents,
) -> bool:
    """Store the result and the bill; return False if someone else finished it."""
    # One time for every attempt, so that an attempt after a lost connection
    # can tell whether an earlier one committed.
    finished_at = clock.now()
    stored = sql.retry_if_disconnected(
        lambda: _store_result(
            run,
            status=status,
            outputs=outputs,
            breakdown=breakdown,
            error=error,
            bill=bill,
            runner_name=runner_name,
            runner_instance=runner_instance,
            finished_at=finished_at,
        ),
        f"runner {runner_name}: finishing run {run.pk}",
    )
    if not stored:
        return False
    payload_meta = result_meta(
        run.pk,
        status,
        breakdown,
        error,
        bill_fields(bill),
        run.warnings,
        runner_name,
        queue=run.queue_name,
    )
    # The runner can take no job while Redis is away, so it may as well wait.
    push_done(
        str(run.pk),
        outputs_json,
        payload_meta,
        events,
        retry_delays_s=PUSH_RETRY_DELAYS_S,
        runner_name=runner_name,
    )
    return True


def _store_result(
    run: Run,
    *,
    status: str,
    outputs: Any,
    breakdown: dict[str, Any] | None,
    error: dict[str, Any] | None,
    bill: BillLine,
    runner_name: str,
    runner_instance: str,
    finished_at: datetime.datetime,
) -> bool:
    """Write the run's final state and its bill in one transaction.

    Returns False, writing nothing, if the run is no longer running under
    ``runner_name`` and ``runner_instance``. Returns True, writing nothing,
    if an earlier attempt with the same ``finished_at`` committed, and the
    connection broke before its COMMIT's reply came.
    """
    with transaction.atomic():
        updated = sql.update_where(
            Run,
            {
                "status": status,
                "finished_at": finished_at,
                "outputs": outputs,
                "breakdown": breakdown,
                "error": error,
                "warnings": run.warnings,
                "cold": bool(breakdown and any(m["cold"] for m in breakdown["models"])),
                "total_us": breakdown["total"] if breakdown else None,
                "runner_total_us": breakdown["runner_total"] if breakdown else None,
            },
            where={
                "pk": run.pk,
                "status": Run.Status.RUNNING,
                "runner_name": runner_name,
                "runner_instance": runner_instance,
            },
        )
        if not updated:
            if _stored_before(run.pk, status, runner_instance, finished_at):
                return True
            _log_result_dropped(run.pk, runner_name)
            return False
        sql.insert(
            Bill(
                run_id=run.pk,
                owner_id=run.owner_id,
                created_at=finished_at,
                **bill_fields(bill),
            )
        )
    return True


def _stored_before(
    run_id, status: str, runner_instance: str, finished_at: datetime.datetime
) -> bool:
    """Return whether this runner process already stored this result.

    A reaper that failed the run keeps its ``runner_instance`` but writes
    its own finish time.
    """
    return Run.objects.filter(
        pk=run_id,
        status=status,
        runner_instance=runner_instance,
        finished_at=finished_at,
    ).exists()


def _log_result_dropped(run_id, runner_name: str) -> None:
    """Log why runner ``runner_name`` could not store the result of run ``run_id``."""
    row = (
        Run.objects.filter(pk=run_id)
        .values_list("status", "runner_name", "error")
        .first()
    )
    if row is None:
        logger.warning(
            "run %s was deleted with its owner before runner %s finished it; "
            "result dropped",
            run_id,
            runner_name,
        )
        return
    status, holder, error = row
    reason = (error or {}).get("message", "") if isinstance(error, dict) else ""
    logger.warning(
        "run %s is already %s under runner %s%s before runner %s finished it; "
        "result dropped",
        run_id,
        status,
        holder or "(none)",
        f" ({reason})" if reason else "",
        runner_name,
    )


def result_meta(
    run_id,
    status: str,
    breakdown: dict[str, Any] | None,
    error: dict[str, Any] | None,
    bill: dict[str, Any] | None,
    warnings: list[str],
    runner: str | None,
    queue: str | None = None,
) -> dict[str, Any]:
    """Return the ``meta`` part of a finished run's result payload.

    ``runner`` is the runner that held the run, also known to runs that
    failed without a breakdown. ``queue`` is the queue it ran from, where
    known.
    """
    return {
        "run_id": str(run_id),
        "runner": runner,
        "queue": queue,
        "status": status,
        "breakdown": breakdown,
        "error": error,
        "bill": bill,
        "warnings": warnings,
    }


# Deletes the busy mark KEYS[1] if it names run ARGV[1]. A process whose
# name another process took must not clear the mark of that process's run.
_CLEAR_MARK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def clear_mark(connection, runner_name: str, run_id: str) -> None:
    """Delete runner ``runner_name``'s busy mark if it names ``run_id``.

    ``connection`` may be a pipeline.
    """
    connection.eval(_CLEAR_MARK, 1, keys.current_run_key(runner_name), run_id)


def push_done(
    run_id: str,
    outputs_json: str,
    meta: dict[str, Any],
    events: RunEvents,
    retry_delays_s: tuple[float, ...] = (),
    runner_name: str | None = None,
) -> None:
    """Deliver the result, the pending events and ``done``, and drop the inputs.

    The run is already committed, so a failed push is retried after each of
    ``retry_delays_s``, then logged. Waiting requests and websockets read the
    database when the push never comes (dispatch.wait_for_result, the run
    consumer).
    """
    payload = '{"outputs":' + outputs_json + ',"meta":' + json.dumps(meta) + "}"
    delays = iter(retry_delays_s)
    while True:
        pipeline = get_redis().pipeline(transaction=False)
        pipeline.rpush(keys.done_key(run_id), payload)
        pipeline.expire(keys.done_key(run_id), DONE_TTL_S)
        pipeline.delete(keys.inputs_key(run_id))
        if runner_name is not None:
            clear_mark(pipeline, runner_name, run_id)
        # Each attempt sends its own done, because a failed pipeline may
        # have lost the last one; consumers drop whatever follows a done.
        events.emit(
            "done",
            status=meta["status"],
            breakdown=meta["breakdown"],
            bill=meta["bill"],
            error=meta["error"],
        )
        try:
            events.send_with(pipeline)
            return
        except redis.RedisError as error:
            if isinstance(error, redis.ConnectionError):
                restart_embedded_redis_if_down()
            delay = next(delays, None)
            if delay is None:
                logger.error(
                    "run %s: result not pushed to Redis (%s); readers fall back "
                    "to the database",
                    run_id,
                    error,
                )
                return
            logger.warning(
                "run %s: pushing the result failed (%s); retrying in %g s",
                run_id,
                error,
                delay,
            )
            time.sleep(delay)


def fail_run(
    run_id,
    reason: str,
    *,
    expected_status: str,
    expected_runner: str | None = None,
    expected_instance: str | None = None,
    code: str = "platform_failure",
    status: int = 500,
) -> bool:
    """End a run failed because of the platform, with a waived bill.

    ``expected_runner`` and ``expected_instance`` are the runner name and
    process (Run.runner_instance) that must hold the run, where given.
    ``status`` is the HTTP status of the responses that report the failure.
    """
    error = {
        "message": reason,
        "code": code,
        "context": "runner_pool",
        "error_type": "PlatformError",
        "status": status,
    }
    line = BillingPolicy.from_settings().waive(None, reason)
    filters: dict[str, Any] = {"pk": run_id, "status": expected_status}
    if expected_runner is not None:
        filters["runner_name"] = expected_runner
    if expected_instance is not None:
        filters["runner_instance"] = expected_instance
    now = clock.now()
    with transaction.atomic():
        updated = Run.objects.filter(**filters).update(
            status=Run.Status.FAILED, finished_at=now, error=error
        )
        if not updated:
            return False
        owner_id, runner_name = Run.objects.values_list("owner_id", "runner_name").get(
            pk=run_id
        )
        Bill.objects.create(
            run_id=run_id, owner_id=owner_id, created_at=now, **bill_fields(line)
        )
    logger.warning("run %s failed: %s", run_id, reason)
    meta = result_meta(
        run_id, "failed", None, error, bill_fields(line), [], runner_name
    )
    push_done(
        str(run_id),
        "null",
        meta,
        RunEvents(str(run_id), first_seq=REAPER_FIRST_SEQ),
        runner_name=expected_runner,
    )
    return True
