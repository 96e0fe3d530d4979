"""Hand a job on when this runner lacks the weights file of one of its models.

Every runner needs the same weights files (docs/operations.md, "Runners on
other machines"). A runner that takes a job from the shared queue, or a job
another runner handed on, and lacks the file of a model the run uses does
not fail the run while another live runner may have the file. It records
the file in its heartbeat and queues the job on the own queue of a live
runner that has not declined the job and whose heartbeat does not list the
file as missing. The job carries the names of the runners that declined it,
so each hand-off leaves one runner fewer to try and the chain ends. With no
runner left, the run fails, unbilled.

A job that routing put on a runner's own queue is not handed on: routing
picks only runners holding one of the run's models and listing none of its
files as missing (dispatch.routing_order). If the runner lost a file since,
the run fails there with WeightsFileMissingError.
"""

import logging

from runner import fleet, keys
from runner.dispatch import enqueue_job, queue_backlogs, read_queue_state
from runner.finish import clear_mark, fail_run
from runner.models import Run
from runner.registry import ModelSource, check_model_path, describe_place
from webapp.redis import get_redis
from workflows.errors import WeightsFileMissingError

logger = logging.getLogger(__name__)


def pass_on_if_lacking(
    run_id: str,
    runtime,
    snapshot: dict | None,
    queue: str | None,
    declined_by: list[str],
) -> bool:
    """Hand the job on, or fail its run, if this runner lacks a model's file.

    ``runtime`` is this process's RunnerRuntime, ``queue`` the queue the job
    was taken from and ``declined_by`` the runners that handed it on so far.
    Returns False when this runner should execute the run itself. That is
    the case for every job whose models are all loaded or on disk here, and
    the check reads no Redis key and no database row.
    """
    if snapshot is None or (queue != keys.SHARED_QUEUE and not declined_by):
        return False
    try:
        sources = [
            ModelSource.from_dict(model["source"])
            for model in snapshot.get("model_refs", [])
        ]
        for source in sources:
            check_model_path(source)
    except (KeyError, TypeError, AttributeError, ValueError):
        # An invalid snapshot (a job edited in Redis) fails the run where
        # execute_run reads it, with the error that names the field.
        return False
    missing = runtime.cache.lacking(sources)
    if not missing:
        return False
    # A job that came back through the shared queue may name this runner.
    declined = list(dict.fromkeys([*declined_by, runtime.name]))
    connection = get_redis()
    try:
        taker, listing = _choose_taker(sources, missing, declined)
        if taker is not None:
            _queue_on(run_id, keys.runner_queue(taker.name), snapshot, declined)
            logger.warning(
                "runner %s: run %s handed to runner %s, because this runner "
                "lacks the weights of %s",
                runtime.name,
                run_id,
                taker.name,
                ", ".join(source.model_id for source in missing),
            )
        else:
            fail_run(
                run_id,
                _no_runner_message(missing, declined, listing),
                expected_status=Run.Status.QUEUED,
                code="model_load_failed",
                # The request was valid and runs once the file is copied
                # into place, as WeightsFileMissingError on one runner.
                status=WeightsFileMissingError.status,
            )
    finally:
        clear_mark(connection, runtime.name, run_id)
    return True


def _choose_taker(
    sources: list[ModelSource], missing: list[ModelSource], declined: list[str]
) -> tuple[fleet.RunnerState | None, list[str]]:
    """Return the live runner to hand the job to, or None if there is none,
    with the names of the other live runners that list a file as missing.

    Idle runners come first, then busy ones. Within each group, runners
    holding most of the run's models come first, then those with the
    shortest backlog. Jobs on the shared queue are standard runs, and
    routing never makes a standard run wait for a busy runner.
    Busy marks and own queues are read live, in one round trip, because a
    runner hands on a burst of jobs faster than the heartbeats change, and
    heartbeats alone would send every job of the burst to one runner.
    """
    files = {source.file_key for source in missing}
    undeclined = [
        runner for runner in fleet.live_runners() if runner.name not in declined
    ]
    candidates = [runner for runner in undeclined if not files & runner.missing_files]
    listing = sorted(
        runner.name for runner in undeclined if files & runner.missing_files
    )
    if not candidates:
        return None, listing
    needed = {source.cache_key for source in sources}
    _, busy, own_lengths = read_queue_state(candidates)
    backlogs = queue_backlogs(busy, own_lengths)
    candidates.sort(
        key=lambda runner: (
            runner.stopping,
            busy[runner.name],
            -len(needed & runner.loaded_models),
            backlogs[runner.name],
        )
    )
    return candidates[0], listing


def _queue_on(run_id: str, queue_name: str, snapshot: dict, declined: list[str]):
    """Queue the run's job again on ``queue_name``. The input images stay in Redis.

    The row names the queue first, so the lost-job check finds the job where
    it looks (recovery._is_queued).
    """
    Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).update(
        queue_name=queue_name
    )
    enqueue_job(
        get_redis(),
        queue_name,
        run_id,
        {"snapshot": snapshot, "declined_by": declined},
    )


def _no_runner_message(
    missing: list[ModelSource], declined: list[str], listing: list[str]
) -> str:
    files = "; ".join(
        f"model '{source.model_id}' needs the file {source.path} in "
        f"{describe_place(source.kind)}"
        for source in missing
    )
    if len(declined) == 1:
        lacking = f"Runner {declined[0]} lacks it"
    else:
        lacking = f"Runners {', '.join(declined)} lack it"
    if listing:
        others = f"live runners {', '.join(listing)} list it as missing"
    else:
        others = "no other runner is live"
    return (
        f"no live runner has the weights file to run this: {files}. "
        f"{lacking}, and {others}. Copy the file into that directory on "
        "every runner's machine and send the request again"
    )
