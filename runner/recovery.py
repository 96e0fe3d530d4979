"""Recovery of queued and running runs that no runner will move forward.

Redis can lose a queued run's job, a runner can pop a job and stop before
taking it, and a runner can fail to finish a run. The checks here queue
such runs again or fail them, unbilled. Live runners call them
periodically, and a reap calls them for the dead runner's runs.
"""

import logging
import uuid

from rq import Queue
from rq.job import Job

from runner import keys
from runner.fleet import live_instances, live_runners
from webapp.clock import clock
from webapp.redis import get_redis

logger = logging.getLogger(__name__)


# A queued run whose job is missing for this long is treated as lost; the
# delay covers the moment between the row's commit and the job's push.
LOST_AFTER_S = 30
# At a reap, a run queued at least this long ago whose job id is in no
# queue, with its job hash still in Redis, counts as popped by the dead
# runner. A live runner takes a job within milliseconds of popping it.
POPPED_AFTER_S = 2


def fail_abandoned_runs(runtime) -> int:
    """Fail the runs under this runner's name that no live process executes.

    ``runtime`` is this process's RunnerRuntime. A runner fails a run itself
    when finishing it fails. When the database rejects that write too, the
    run stays "running" under a live runner, which the reaper never checks.
    A run that an earlier process under this name claimed is failed once
    that process is gone. One that it still executes (it was paused past
    RUNNER_DEAD_AFTER_S, and this process took the name meanwhile) is left
    to it. The runner's current run is read after the runs, and a job names
    its run as current before claiming it, so a run claimed meanwhile is
    never failed. Returns how many runs failed.
    """
    from runner.finish import fail_run
    from runner.models import Run

    running = Run.objects.filter(status=Run.Status.RUNNING, runner_name=runtime.name)
    runs = [
        (str(run_id), instance)
        for run_id, instance in running.values_list("pk", "runner_instance")[:100]
    ]
    current_run = runtime.current_run
    others = {instance for _, instance in runs if instance != runtime.instance}
    alive = live_instances(others)
    failed = 0
    for run_id, instance in runs:
        if instance == runtime.instance:
            if run_id == current_run:
                continue
            reason = (
                f"runner {runtime.name} could not finish the run (a database or "
                "Redis write failed; its log has the error); send the request again"
            )
        elif instance in alive:
            continue
        else:
            reason = f"runner {runtime.name} restarted while running this run"
        failed += fail_run(
            run_id,
            reason,
            expected_status=Run.Status.RUNNING,
            expected_runner=runtime.name,
            expected_instance=instance,
        )
    return failed


def recover_lost_jobs(
    lost_after_s: float = LOST_AFTER_S, popped_only: bool = False
) -> int:
    """Queue again, or fail, queued runs whose RQ job Redis no longer has.

    Redis can lose jobs it had not yet written to disk when it crashes.  A
    lost run whose input images survived is queued again on the shared
    queue; one whose inputs are gone too fails, unbilled.  Returns how many
    runs were found.

    ``popped_only`` looks only for jobs whose id is in no queue while their
    job hash is still there: a runner popped them and stopped before taking
    them. A reap looks for those at once, with a short ``lost_after_s``.
    A job without a hash may be a run whose push is still on its way, so
    only the full LOST_AFTER_S separates the two.
    """
    from runner.models import Run

    connection = get_redis()
    # The periodic check keeps its lock until it expires, so the runners
    # check in turn, not each every few seconds. A reap's check releases
    # its own lock when done.
    lock = f"{keys.PREFIX}:reconcile" + (":popped" if popped_only else "")
    if not connection.set(lock, "1", nx=True, ex=10):
        return 0  # another runner is checking right now
    # queued_at_ns and clock are both on the Redis server's clock. The web
    # server's created_at is not: a runner whose clock ran ahead of it would
    # find runs lost in the moment between their commit and their push.
    cutoff_ns = clock.now_ns() - int(lost_after_s * 1_000_000_000)
    stale = Run.objects.filter(status=Run.Status.QUEUED, queued_at_ns__lt=cutoff_ns)
    taking = _runs_being_taken(connection)
    found = 0
    try:
        for run in stale.order_by("queued_at_ns")[:100]:
            found += _recover_if_lost(connection, run, taking, popped_only)
    finally:
        if popped_only:
            connection.delete(lock)
    return found


def _recover_if_lost(connection, run, taking: set[str], popped_only: bool) -> int:
    """Queue ``run`` again if no runner will take its job; return 1 if it did.

    ``taking`` contains the runs live runners are taking now.
    """
    if Job.exists(str(run.id), connection=connection):
        if _is_queued(connection, run) or str(run.id) in taking:
            return 0
        # A runner popped the id and died (or lost Redis) before it read
        # and deleted the job hash, so nothing will ever take this job.
        connection.delete(Job.key_for(str(run.id)))
    elif popped_only or str(run.id) in taking:
        # A live runner has deleted the job hash and is about to claim the
        # run, so the job is not lost.
        return 0
    _queue_again(connection, run)
    return 1


def _queue_again(connection, run) -> None:
    """Queue again, on the shared queue, a run whose job no runner will take.

    The run fails, unbilled, instead when its input images are gone too.
    """
    from runner.dispatch import enqueue
    from runner.finish import fail_run
    from runner.models import Run

    if not run.image_info or connection.exists(keys.inputs_key(str(run.id))):
        logger.warning("run %s lost its queued job; queued again", run.id)
        run.queue_name = keys.SHARED_QUEUE
        Run.objects.filter(pk=run.pk).update(queue_name=run.queue_name)
        enqueue(run)
    else:
        fail_run(
            run.id,
            "the queued job and its input images were lost (Redis restarted); "
            "send the request again",
            expected_status=Run.Status.QUEUED,
        )


def recover_marked_run(connection, name: str, moved: list[str]) -> None:
    """Clear a dead runner's busy mark, and queue its run again if it never started.

    The mark names the run routing reserved the runner for, or the run it
    was taking. If that run's job id is in no queue, the runner popped it
    from its own queue and stopped, so without this the run would wait for
    the lost-run check. A runner that comes back finds the job taken and
    drops it. Ids just ``moved`` to the shared queue, and runs a live runner
    is taking, are left alone.
    """
    from runner.models import Run

    mark_key = keys.current_run_key(name)
    mark = connection.get(mark_key)
    connection.delete(mark_key)
    if mark is None:
        return
    try:
        run_id = uuid.UUID(mark.decode(errors="replace"))
    except ValueError:
        return
    if str(run_id) in moved:
        return
    run = Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).first()
    if run is not None:
        taking = _runs_being_taken(connection)
        _recover_if_lost(connection, run, taking, popped_only=False)


def _runs_being_taken(connection) -> set[str]:
    """Return the run ids that live runners hold as their current run.

    A runner names the run in the same round trip that deletes its job hash,
    before it claims the run in the database.
    """
    names = [runner.name for runner in live_runners()]
    if not names:
        return set()
    held = connection.mget([keys.current_run_key(name) for name in names])
    return {value.decode(errors="replace") for value in held if value is not None}


def _is_queued(connection, run) -> bool:
    """Return whether the run's job id is in its queue or the shared queue.

    A queue key that cannot be read (of the wrong type) counts as containing
    it, so an unreadable queue makes no job be queued twice.
    """
    names = {run.queue_name or keys.SHARED_QUEUE, keys.SHARED_QUEUE}
    pipeline = connection.pipeline(transaction=False)
    for name in names:
        pipeline.lpos(f"{Queue.redis_queue_namespace_prefix}{name}", str(run.id))
    replies = pipeline.execute(raise_on_error=False)
    return any(reply is not None for reply in replies)
