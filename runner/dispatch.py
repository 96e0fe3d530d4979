"""Accept a run: resolve its models, store its inputs, queue it, wait for it.

Nothing is written unless every check passes: models resolve before the run
row exists, and the job is queued only after the row is committed. The input
images go to Redis in the same MULTI/EXEC transaction as the job, so a
runner never finds one without the other. If that transaction fails, the
run ends failed with a waived bill.
"""

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings
from django.db import connection, transaction
from rq import Queue

from runner import fleet, keys, sql
from runner.finish import bill_fields, fail_run, result_meta
from runner.models import Run
from runner.registry import resolve_model
from webapp.clock import clock
from webapp.redis import get_redis, restart_embedded_redis_if_down
from workflows.compiler.plan import ExecutionPlan
from workflows.errors import WorkflowError
from workflows.inputs import RunInputs

logger = logging.getLogger(__name__)

# Seconds between the web server's own clock samples while it queues runs.
# One TIME round trip a second costs little, and keeps the last
# webapp.clock.SAMPLES_KEPT samples within a few seconds of each other.
CLOCK_SAMPLE_INTERVAL_S = 1.0


class NoRunnerError(WorkflowError):
    code = "no_runner"
    status = 503
    user_error = False


@dataclass
class Submission:
    owner_id: int
    source: str
    plan: ExecutionPlan
    inputs: RunInputs
    request_started_ns: int
    workflow_version_id: int | None = None
    inline_definition: dict | None = None
    token_id: int | None = None
    # Pin the run to this runner's own queue instead of routing it.
    runner: str | None = None
    # The models resolve_models returned for this plan and these inputs,
    # where the caller resolved them already.
    models: list[dict] | None = None
    # The run's price cap in micro-credits, and the estimate that checked it.
    max_price_microcredits: int | None = None
    price_estimate: dict | None = None
    # A Run.Priority value: "economy" waits for a runner with the models loaded.
    priority: str = Run.Priority.STANDARD


def no_runner_error(source: str) -> NoRunnerError:
    """Return the error for a synchronous run that no runner is up to execute."""
    # Roboflow's routes always wait for the run, so they cannot queue it,
    # and runworkflow cannot either, but it can wait for a runner first.
    if source == "roboflow":
        alternative = ""
    elif source == "cli":
        alternative = ", or pass --wait-for-runner SECONDS to wait for one"
    else:
        alternative = (
            ", or send the run asynchronously to queue it until a runner starts"
        )
    return NoRunnerError(
        "no runner is up to execute this run",
        context="runner_pool",
        hint=f"Start one with 'python manage.py runner'{alternative}.",
    )


def model_call_order(
    plan: ExecutionPlan, parameters: dict, models: list[dict]
) -> list[str]:
    """Return the cache key of each model step, in execution order.

    ``models`` are ``resolve_models``'s references for the same parameters.
    """
    key_of = {model["model_id"]: model["cache_key"] for model in models}
    return [key_of[model_id] for _, model_id in plan.model_ids(parameters)]


def resolve_models(plan: ExecutionPlan, parameters: dict, owner_id: int) -> list[dict]:
    seen: dict[str, dict] = {}
    for step, model_id in plan.model_ids(parameters):
        if model_id in seen:
            continue
        source = resolve_model(model_id, owner_id, step=step)
        seen[model_id] = {
            "model_id": model_id,
            "cache_key": source.cache_key,
            "source": source.to_dict(),
        }
    return list(seen.values())


# Returns -2 if the fleet generation (the last key) is no longer ARGV[3].
# Otherwise marks the first idle runner of the other KEYS (triples of busy
# key, queue key and heartbeat key) busy with ARGV[1] for ARGV[2] seconds,
# and returns its index from 0, or -1. A runner without a heartbeat is
# skipped, and a queue key of the wrong type counts as busy.
_CLAIM_IDLE_RUNNER = """
if (redis.call('GET', KEYS[#KEYS]) or '') ~= ARGV[3] then
    return -2
end
for index = 1, #KEYS - 1, 3 do
    if redis.call('EXISTS', KEYS[index + 2]) == 1 then
        local queued = redis.pcall('LLEN', KEYS[index + 1])
        if redis.call('EXISTS', KEYS[index]) == 0 and queued == 0 then
            redis.call('SET', KEYS[index], ARGV[1], 'EX', ARGV[2])
            return (index - 1) / 3
        end
    end
end
return -1
"""
# The value _CLAIM_IDLE_RUNNER returns when the fleet changed since it was read.
_FLEET_CHANGED = -2


def model_sizes(runners: list[fleet.RunnerState]) -> dict[str, int]:
    """Return the bytes of each model the runners' heartbeats list, by cache key.

    A model no runner has loaded is missing, and routing counts it as zero
    bytes.
    """
    return {
        model["cache_key"]: model.get("memory_bytes") or 0
        for runner in runners
        for model in runner.data.get("models", [])
    }


def _useful_holders(
    call_order: list[str], runners: list[fleet.RunnerState], sizes: dict[str, int]
) -> list[tuple[int, int, fleet.RunnerState]]:
    """Return (loads saved, models held, runner) for each runner worth routing to.

    Left out are runners holding none of the models, and runners saving the
    run no load (``_loads_saved``). So are runners that are stopping, which
    take no more jobs, and runners whose heartbeat lists the weights file of
    one of the models as missing, which could not load that model.
    """
    needed = set(call_order)
    # A cache key is the file key followed by ":" and the input size.
    files = {key.rsplit(":", 1)[0] for key in needed}
    useful = []
    for runner in runners:
        if runner.stopping or files & runner.missing_files:
            continue
        held = len(needed & runner.loaded_models)
        if not held:
            continue
        saved = _loads_saved(call_order, runner, sizes)
        if saved:
            useful.append((saved, held, runner))
    return useful


def routing_order(
    call_order: list[str],
    runners: list[fleet.RunnerState],
    sizes: dict[str, int] | None = None,
) -> list[fleet.RunnerState]:
    """Return the runners on which the run loads fewer models than cold, best first.

    ``call_order`` is the cache key of each model step in execution order
    (``model_call_order``), and ``sizes`` the model sizes that
    ``model_sizes`` reads from the whole fleet's heartbeats (by default,
    from ``runners``). The runner saving most loads comes first, then the
    one holding most of the models, then the fleet's order. A runner whose
    budget cannot hold the run's models together and that holds only a
    model called after another saves no load, so it is left out, as are
    the runners ``_useful_holders`` skips.
    """
    if sizes is None:
        sizes = model_sizes(runners)
    useful = _useful_holders(call_order, runners, sizes)
    useful.sort(key=lambda entry: (-entry[0], -entry[1]))
    return [runner for _, _, runner in useful]


def choose_queue(
    call_order: list[str], view: fleet.FleetSnapshot, run_id: str
) -> tuple[str, fleet.FleetSnapshot]:
    """Return the queue of the first idle runner of ``routing_order``, else shared.

    ``call_order`` is the cache key of each model step in execution order.
    Heartbeats show which runners hold the models. A runner holding some of
    them loads only the rest, where the shared queue could hand the run to
    one that loads them all. Whether a runner is idle is read live, because
    a heartbeat can be a second old. The runner chosen is marked busy with
    ``run_id`` in the same script, so a burst of runs cannot all pick the
    same idle runner. The mark lasts ROUTING_CLAIM_TTL_S until queueing
    the run extends it, so a run that is never queued leaves the runner
    looking busy for seconds at most.

    ``view`` may be this process's cached read of the fleet. The script
    rejects it if any runner has joined, left, or loaded or evicted a model
    since, and the fleet is read again: a run sent right after another
    loaded its model goes where that model now is. Returns the queue and
    the view it was chosen from.
    """
    index = _FLEET_CHANGED
    # A fleet that changes again between the second read and its script is
    # left to the shared queue.
    for attempt in range(2):
        if attempt:
            view = fleet.fleet_snapshot()
        if not call_order or len(view.runners) <= 1:
            # A single runner takes jobs from both queues, so there is no
            # choice now. On the shared queue, a runner that joins later can
            # take the run if this one is still busy.
            return keys.SHARED_QUEUE, view
        # Read from the heartbeats in hand, so this costs no round trip.
        holders = routing_order(call_order, view.runners)
        index = _claim_idle_runner(holders, view.generation, run_id)
        if index != _FLEET_CHANGED:
            break
    if index < 0:
        return keys.SHARED_QUEUE, view
    return keys.runner_queue(holders[index].name), view


def economy_holder(
    call_order: list[str],
    runners: list[fleet.RunnerState],
    backlogs: dict[str, int],
) -> fleet.RunnerState | None:
    """Return the runner an economy run would wait for, None if none would help.

    ``call_order`` is the cache key of each model step in execution order
    (``model_call_order``). Only the runners ``routing_order`` lists count,
    those on which the run would load its models fewer times than on a
    runner holding none of them. A runner whose budget cannot hold the
    run's models together evicts the model it holds to load one called
    before it, so holding only a later model saves no load
    (``estimate.predicted_loads``). The runner saving most loads comes
    first, then the one holding most of the models, then the one with the
    shortest backlog (see ``queue_backlogs``), then the fleet's order. Model
    sizes come from the heartbeats (``model_sizes``).

    A fleet of one runner has no holder to wait for: that runner takes
    every run, and the shared queue keeps the runs sent before this one
    ahead of it, where the runner's own queue would let it overtake them.
    A runner that is stopping takes no more runs, so it does not count.
    """
    if sum(not runner.stopping for runner in runners) <= 1:
        return None
    useful = _useful_holders(call_order, runners, model_sizes(runners))
    ranked = [
        ((-saved, -held, backlogs[runner.name]), runner)
        for saved, held, runner in useful
    ]
    if not ranked:
        return None
    return min(ranked, key=lambda pair: pair[0])[1]


def _loads_saved(
    call_order: list[str], runner: fleet.RunnerState, sizes: dict[str, int]
) -> int:
    """Return how many fewer model loads the run makes on ``runner`` than cold."""
    from runner.estimate import predicted_loads

    needed = set(call_order)
    loaded = runner.loaded_models
    budget = runner.data.get("budget_bytes")
    exceeds = budget is not None and sum(sizes.get(key, 0) for key in needed) > budget
    on_runner = predicted_loads(call_order, loaded, bool(needed - loaded) and exceeds)
    cold = predicted_loads(call_order, set(), exceeds)
    return sum(cold.values()) - sum(on_runner.values())


def choose_economy_queue(
    call_order: list[str], run_id: str
) -> tuple[str, fleet.FleetSnapshot]:
    """Return the own queue of a live runner holding the models, busy or not.

    ``call_order`` is the cache key of each model step in execution order.
    An economy run waits there instead of loading its models cold on an
    idle runner. The fleet is read afresh, since a run that may wait
    minutes should not follow a view a second old to a runner that has
    stopped. When no live runner would save the run a model load
    (``economy_holder``), the run is routed as a standard run
    (``choose_queue``), because waiting would gain nothing.

    An idle holder is marked busy with ``run_id``, as ``choose_queue`` does,
    so a standard run of the same burst goes elsewhere. A busy holder keeps
    the mark of the run it executes.

    The holder unloads the models of runs on its own queue only after any
    other model (``eviction.next_victim``). It may still evict one before
    it takes the run, when the run it executes needs the room and nothing
    else can go, and then loads it cold. If the holder dies first, a live
    runner moves its queued jobs to the shared queue
    (``reaper.move_queued_jobs``), and the run goes on as a standard run,
    cold wherever no runner has its models loaded.
    """
    view = fleet.fleet_snapshot()
    _, busy, own_lengths = read_queue_state(view.runners)
    holder = economy_holder(call_order, view.runners, queue_backlogs(busy, own_lengths))
    if holder is None:
        return choose_queue(call_order, view, run_id)
    if not busy[holder.name]:
        # Whether the mark is set changes nothing about where the run goes.
        _claim_idle_runner([holder], view.generation, run_id)
    return keys.runner_queue(holder.name), view


def queue_backlogs(
    busy: dict[str, bool], own_lengths: dict[str, int]
) -> dict[str, int]:
    """Return, per runner, its own queue's length, plus one when it is busy.

    Busy is as ``read_queue_state`` reads it: marked busy, or with jobs on
    its own queue. So a runner with queued jobs and no mark counts one job
    too many, which only breaks ties.
    """
    return {name: own_lengths[name] + (1 if busy[name] else 0) for name in busy}


def _claim_idle_runner(
    holders: list[fleet.RunnerState], generation: bytes, run_id: str
) -> int:
    script_keys = []
    for runner in holders:
        script_keys += [
            keys.current_run_key(runner.name),
            f"{Queue.redis_queue_namespace_prefix}{keys.runner_queue(runner.name)}",
            keys.heartbeat_key(runner.name),
        ]
    script_keys.append(keys.FLEET_GENERATION)
    return get_redis().eval(
        _CLAIM_IDLE_RUNNER,
        len(script_keys),
        *script_keys,
        run_id,
        keys.ROUTING_CLAIM_TTL_S,
        generation,
    )


@dataclass(frozen=True)
class PredictedRoute:
    """The queue a run sent now would join, and the runners that may take it.

    ``takers`` are the runners that may take it: the one whose own queue
    it joins, else the idle runners, else, when every runner is busy, all
    of them, since whichever finishes first takes it. A runner that is
    stopping takes no shared-queue run, so it is never one of several
    takers. ``queued_ahead``
    counts the jobs already waiting in the queues those runners read.
    ``waits_for_holder`` is set for an economy run routed to a busy runner
    that has its models loaded. ``all_busy`` is set when every runner that
    takes runs is busy. ``all_stopping`` is set when every live runner is
    stopping, so that no runner takes the run until one starts.
    """

    queue: str
    takers: list[fleet.RunnerState]
    queued_ahead: int
    all_busy: bool
    waits_for_holder: bool = False
    all_stopping: bool = False

    @property
    def runner(self) -> fleet.RunnerState | None:
        """The one runner that would take the run, None when several may."""
        return self.takers[0] if len(self.takers) == 1 else None


def read_queue_state(
    runners: list[fleet.RunnerState],
) -> tuple[int, dict[str, bool], dict[str, int]]:
    """Read the shared queue's length, and each runner's busy state and own queue.

    A runner is busy, as in ``choose_queue``, when it has a busy mark or
    jobs wait in its own queue. All are read live, in one round trip.
    """
    shared_key = f"{Queue.redis_queue_namespace_prefix}{keys.SHARED_QUEUE}"
    pipeline = get_redis().pipeline(transaction=False)
    pipeline.llen(shared_key)
    for runner in runners:
        pipeline.exists(keys.current_run_key(runner.name))
        pipeline.llen(
            f"{Queue.redis_queue_namespace_prefix}{keys.runner_queue(runner.name)}"
        )
    replies = pipeline.execute(raise_on_error=False)
    # A key of the wrong type reads as an error: an empty shared queue, and
    # a busy runner, as in choose_queue.
    shared_length = replies[0] if isinstance(replies[0], int) else 0
    busy = {}
    own_lengths = {}
    for i, runner in enumerate(runners):
        marked, queued = replies[1 + 2 * i], replies[2 + 2 * i]
        own_lengths[runner.name] = queued if isinstance(queued, int) else 0
        busy[runner.name] = marked != 0 or not isinstance(queued, int) or queued > 0
    return shared_length, busy, own_lengths


def predict_route(
    call_order: list[str],
    runners: list[fleet.RunnerState],
    priority: str = Run.Priority.STANDARD,
) -> PredictedRoute:
    """Return where a run of ``priority`` would be sent now, marking no runner.

    ``call_order`` is the cache key of each model step in execution order.
    Standard runs follow ``choose_queue``, economy runs
    ``choose_economy_queue``.
    """
    shared_length, busy, own_lengths = read_queue_state(runners)
    if priority == Run.Priority.ECONOMY:
        holder = economy_holder(call_order, runners, queue_backlogs(busy, own_lengths))
        if holder is not None:
            return PredictedRoute(
                keys.runner_queue(holder.name),
                [holder],
                own_lengths[holder.name],
                all_busy=False,
                waits_for_holder=busy[holder.name],
            )
    idle = [runner for runner in runners if not busy[runner.name]]
    if call_order and len(runners) > 1:
        # Sizes from the whole fleet, as choose_queue reads them.
        holders = routing_order(call_order, idle, model_sizes(runners))
        if holders:
            queue = keys.runner_queue(holders[0].name)
            return PredictedRoute(queue, [holders[0]], 0, all_busy=False)
    # A stopping runner takes no more jobs, from the shared queue either.
    accepting = [runner for runner in runners if not runner.stopping]
    idle_accepting = [runner for runner in idle if not runner.stopping]
    if idle_accepting:
        return PredictedRoute(
            keys.SHARED_QUEUE, idle_accepting, shared_length, all_busy=False
        )
    # A busy runner reads its own queue before the shared one. When every
    # runner is stopping, there is no taker: the run waits for a runner that
    # starts.
    ahead = shared_length + sum(own_lengths.values())
    return PredictedRoute(
        keys.SHARED_QUEUE,
        accepting,
        ahead,
        all_busy=bool(accepting),
        all_stopping=bool(runners) and not accepting,
    )


# Sets KEYS[1] to ARGV[1] for ARGV[2] seconds unless it names another run.
_MARK_UNLESS_BUSY = """
local marked = redis.call('GET', KEYS[1])
if not marked or marked == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 0
"""

# Deletes KEYS[1] if its value is ARGV[1].
_RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def release_claim(queue_name: str, run_id: str) -> None:
    """Undo routing's busy mark for ``run_id``, if it is still that run's."""
    runner_name = keys.runner_of_queue(queue_name)
    if runner_name is None:
        return
    try:
        get_redis().eval(_RELEASE_CLAIM, 1, keys.current_run_key(runner_name), run_id)
    except redis.RedisError:
        # The mark expires by itself within ROUTING_CLAIM_TTL_S.
        logger.warning("run %s: could not release the routing mark", run_id)


def predict_hot(
    models: list[dict],
    call_order: list[str],
    runners: list[fleet.RunnerState],
    queue_name: str,
    owner_id: int,
) -> None:
    """Set each model's ``predicted_hot`` by the estimate's rule.

    A model is hot if the runner the queue belongs to has it loaded when it
    takes the job. A shared-queue job goes to whichever runner is free, so
    then only if every runner has it loaded by then. A busy runner also has
    the models of the runs it executes and has queued before
    (``estimate.loaded_when_free``). If the run's models together exceed the
    memory budget of every runner that may take it, loading one evicts
    another, so only the first model the run calls can be hot
    (``estimate.predicted_loads``).
    ``call_order`` is the cache key of each model step in execution order.
    """
    from runner.estimate import (
        loaded_when_free,
        models_exceed_budgets,
        predicted_loads,
    )

    chosen = keys.runner_of_queue(queue_name)
    if chosen is None:
        # A stopping runner takes no more jobs from the shared queue.
        takers = [r for r in runners if not r.stopping]
    else:
        takers = [r for r in runners if r.name == chosen]
    cache_keys = {model["cache_key"] for model in models}
    loaded = loaded_when_free(takers, cache_keys)
    evicting = bool(cache_keys - loaded) and models_exceed_budgets(
        cache_keys, takers, owner_id
    )
    loads = predicted_loads(call_order, loaded, evicting)
    for model in models:
        model["predicted_hot"] = bool(takers) and loads.get(model["cache_key"]) == 0


def submit(submission: Submission, *, require_runner: bool) -> Run:
    """Queue a run; raise NoRunnerError before writing anything if none is up."""
    models = submission.models
    if models is None:
        models = resolve_models(
            submission.plan, submission.inputs.parameters, submission.owner_id
        )
    # A half-second-old view saves two round trips; choose_queue reads the
    # fleet again if it changed since.
    view = fleet.fleet_snapshot(max_age_s=0.5)
    if not view.runners:
        view = fleet.fleet_snapshot()
    runners = view.runners
    if require_runner and not runners:
        raise no_runner_error(submission.source)
    call_order = model_call_order(submission.plan, submission.inputs.parameters, models)
    run_id = uuid.uuid4()
    if submission.runner:
        queue_name = keys.runner_queue(submission.runner)
    elif submission.priority == Run.Priority.ECONOMY:
        queue_name, view = choose_economy_queue(call_order, str(run_id))
    else:
        queue_name, view = choose_queue(call_order, view, str(run_id))
    predict_hot(models, call_order, view.runners, queue_name, submission.owner_id)

    run = Run(
        id=run_id,
        owner_id=submission.owner_id,
        workflow_version_id=submission.workflow_version_id,
        inline_definition=submission.inline_definition,
        definition_digest=submission.plan.digest,
        token_id=submission.token_id,
        source=submission.source,
        priority=submission.priority,
        parameters=submission.inputs.parameters,
        image_info=submission.inputs.image_info,
        batch_size=submission.inputs.batch_size,
        model_refs=models,
        queue_name=queue_name,
        warnings=list(submission.plan.warnings) + _untrained_warnings(models),
        max_price_microcredits=submission.max_price_microcredits,
        price_estimate=submission.price_estimate,
    )
    # A job queued with its images takes no clock sample, so without this a
    # web server whose runs all carry images would stamp them from a single
    # sample up to MAX_SAMPLE_AGE_S old.
    clock.sync_if_older(CLOCK_SAMPLE_INTERVAL_S)
    run.request_us = (time.perf_counter_ns() - submission.request_started_ns) // 1000
    # On Redis's clock, as is the runner's start that it is subtracted from.
    run.queued_at_ns = clock.now_ns()
    # A single INSERT commits by itself in autocommit mode, so an inline
    # definition without uploads needs no atomic block, which would add a
    # BEGIN and a COMMIT round trip. The locks are taken right before the
    # INSERT, after routing's Redis calls, so that no transaction is held
    # open across them. on_commit then queues the job at once, or after the
    # caller's transaction commits if there is one.
    uses_uploads = any(m["source"]["kind"] == "upload" for m in models)
    try:
        if uses_uploads or submission.workflow_version_id is not None:
            with transaction.atomic():
                if submission.workflow_version_id is not None:
                    lock_live_workflow(submission.workflow_version_id)
                if uses_uploads:
                    _lock_uploads(models, submission.owner_id)
                sql.insert(run)
        else:
            sql.insert(run)
    except Exception:
        release_claim(queue_name, str(run_id))
        raise
    transaction.on_commit(lambda: enqueue(run, submission.inputs.images))
    return run


def lock_live_workflow(workflow_version_id: int) -> None:
    """Lock the version's workflow until the run row commits; raise if it is deleted.

    The request read the workflow before checking the inputs, which can
    take a while. If a delete committed meanwhile, this raises
    WorkflowDeletedError (404), so nothing is stored. A delete that comes
    later waits until the run is stored, so no run is stored after its
    workflow's delete returned.

    On PostgreSQL the lock is FOR KEY SHARE, which conflicts with the FOR
    UPDATE that a delete takes (``Workflow.mark_deleted``) but not with
    itself, so runs of one workflow are stored side by side. SQLite has
    no row locks: its writes take turns for the whole database.
    """
    from workflows.errors import WorkflowDeletedError
    from workflows.models import Workflow, WorkflowVersion

    if connection.vendor == "postgresql":
        # Django's select_for_update has no FOR KEY SHARE. The identifiers
        # come from the models, quoted as Django quotes them.
        quote = connection.ops.quote_name
        workflows = quote(Workflow._meta.db_table)
        versions = quote(WorkflowVersion._meta.db_table)
        workflow_id = quote(WorkflowVersion._meta.get_field("workflow").column)
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT workflow.id FROM {workflows} workflow "
                f"JOIN {versions} version ON version.{workflow_id} = workflow.id "
                "WHERE version.id = %s AND workflow.deleted_at IS NULL "
                "FOR KEY SHARE OF workflow",
                [workflow_version_id],
            )
            found = cursor.fetchone() is not None
    else:
        found = Workflow.objects.filter(versions__pk=workflow_version_id).exists()
    if not found:
        raise WorkflowDeletedError(workflow_version_id)


def _lock_uploads(models: list[dict], owner_id: int) -> None:
    """Lock the owner's uploads until the run row commits; raise if one is gone.

    Deleting an upload locks its row before it looks for unfinished runs
    that use it (runner.views). So either the delete finds this run and is
    rejected, or this run finds the upload gone and is not stored.
    """
    from runner.models import ModelUpload
    from runner.registry import upload_source_path
    from workflows.errors import ModelNotFoundError

    # All of the owner's uploads (a handful), in one order, so that two
    # runs being accepted at once take the locks in the same order.
    stored = {
        upload_source_path(path)
        for path in ModelUpload.objects.select_for_update()
        .filter(owner_id=owner_id)
        .order_by("pk")
        .values_list("path", flat=True)
    }
    for model in models:
        source = model["source"]
        if source["kind"] == "upload" and source["path"] not in stored:
            raise ModelNotFoundError(
                model["model_id"],
                [],
                reason="its upload was deleted while this run was being accepted",
            )


def _untrained_warnings(models: list[dict]) -> list[str]:
    return [
        f"model '{m['model_id']}' is an untrained architecture (random weights): "
        "timings are real, detections are meaningless"
        for m in models
        if not m["source"]["pretrained"]
    ]


def _store_images(pipeline, run_id: str, images: dict[str, list[bytes]]) -> None:
    fields = {
        keys.input_field(name, index): blob
        for name, blobs in images.items()
        for index, blob in enumerate(blobs)
    }
    if fields:
        pipeline.hset(keys.inputs_key(run_id), mapping=fields)
        pipeline.expire(keys.inputs_key(run_id), settings.GLASSBOX["INPUT_TTL_S"])


def job_snapshot(run: Run) -> dict[str, Any]:
    """Return the fields of the run a runner needs, carried in the job.

    With them the runner reads no row. All are small: the definition stays in
    the database and is read only when the runner has no plan cached for its
    digest.
    """
    return {
        "owner_id": run.owner_id,
        "workflow_version_id": run.workflow_version_id,
        "definition_digest": run.definition_digest,
        "parameters": run.parameters,
        "image_info": run.image_info,
        "batch_size": run.batch_size,
        "model_refs": run.model_refs,
        "queued_at_ns": run.queued_at_ns,
        "request_us": run.request_us,
        # The queue routing chose. A runner that takes the job from another
        # queue can tell that the run was moved off that runner.
        "queue_name": run.queue_name,
        "warnings": run.warnings,
        # The runner bills at most this much.
        "max_price_microcredits": run.max_price_microcredits,
    }


def enqueue_job(
    connection, queue_name: str, run_id: str, job_kwargs: dict, pipeline=None
) -> None:
    """Queue the RQ job that executes run ``run_id`` on ``queue_name``.

    ``job_kwargs`` go to the job function (the run's snapshot, and the
    runners that handed it on). Given a ``pipeline``, RQ adds the queue
    registration, the job hash and the push to its MULTI/EXEC transaction.
    """
    Queue(
        queue_name, connection=connection, serializer=keys.JOB_SERIALIZER
    ).enqueue_call(
        func=keys.RUN_JOB,
        args=(run_id,),
        kwargs=job_kwargs,
        job_id=run_id,
        timeout=-1,
        result_ttl=0,
        failure_ttl=3600,
        pipeline=pipeline,
    )


def enqueue(run: Run, images: dict[str, list[bytes]] | None = None) -> None:
    """Queue the run's job, storing ``images`` with it (None: already stored)."""
    try:
        connection = get_redis()
        # The job and the images go in one MULTI/EXEC transaction, sent in
        # one round trip.
        with connection.pipeline() as pipeline:
            enqueue_job(
                connection,
                run.queue_name,
                str(run.id),
                {"snapshot": job_snapshot(run)},
                pipeline=pipeline,
            )
            # RQ has opened the transaction (MULTI), so these join it.
            if images:
                _store_images(pipeline, str(run.id), images)
            runner_name = keys.runner_of_queue(run.queue_name)
            if runner_name is not None:
                # Busy from now on, so the next run of a burst goes elsewhere
                # even before this runner has taken the job. A runner busy
                # with another run keeps that run's mark.
                pipeline.eval(
                    _MARK_UNLESS_BUSY,
                    1,
                    keys.current_run_key(runner_name),
                    str(run.id),
                    keys.CURRENT_RUN_TTL_S,
                )
            # Free in this round trip: a sample for the clock that queued_at_ns
            # and the runner's start are on. Redis runs TIME at EXEC, once the
            # whole transaction has arrived. With images in it, the reply
            # comes from the end of a long round trip, not its middle: 8 MB
            # of images put the offset about 10 ms off on a 2-core machine.
            # Such a round trip takes no sample, and the clock takes one of
            # its own when it has none younger than MAX_SAMPLE_AGE_S.
            sample_clock = not images
            if sample_clock:
                pipeline.time()
            sent_ns = time.time_ns()
            replies = pipeline.execute()
            if sample_clock:
                clock.observe(sent_ns, replies[-1], time.time_ns())
    except Exception as error:
        logger.exception("run %s could not be queued on %s", run.id, run.queue_name)
        fail_run(
            run.id,
            f"could not queue the run: {type(error).__name__}",
            expected_status=Run.Status.QUEUED,
        )


# How long a blocking wait for the result lasts before the database is
# checked, and how long after the run's end its pushed result may still be
# on its way.
RESULT_WAIT_SLICE_S = 1.0
RESULT_GRACE_S = 2.0

# Set when this web server process is stopping. Waiting requests then stop
# waiting within a slice and respond with the run's result or URL
# (webapp/wsgi.py).
stopping = threading.Event()


def wait_for_result(run_id: str, timeout_s: float) -> dict[str, Any] | None:
    """Block until the run finishes; return its payload, or None on timeout.

    The runner pushes the payload to Redis after committing the run. If
    that push never comes (Redis lost it, or the runner died between the
    commit and the push), the payload is built from the database once the
    run has been finished for RESULT_GRACE_S.
    """
    if timeout_s <= 0:
        return None
    connection = get_redis()
    deadline = time.monotonic() + timeout_s
    while True:
        if stopping.is_set():
            # A run that finished meanwhile gets its result, not a 202.
            return _payload_from_database(run_id, grace_s=0, push_missed=False)
        slice_s = min(RESULT_WAIT_SLICE_S, deadline - time.monotonic())
        if slice_s <= 0:
            return None
        try:
            # A BLPOP timeout of 0 means no timeout, so the last slice waits
            # at least 10 ms.
            popped = connection.blpop(
                [keys.done_key(run_id)], timeout=max(slice_s, 0.01)
            )
        except redis.ConnectionError as error:
            # A runner commits the finished run even while Redis is away, but
            # the result cannot come through Redis now, so the database is
            # read instead.
            logger.warning(
                "run %s: Redis unreachable while waiting (%s)", run_id, error
            )
            restart_embedded_redis_if_down()
            time.sleep(slice_s)
            stored = _payload_from_database(run_id, grace_s=0)
            if stored is not None:
                return stored
            continue
        if popped is not None:
            return json.loads(popped[1])
        stored = _payload_from_database(run_id)
        if stored is not None:
            return stored


def _payload_from_database(
    run_id: str, grace_s: float = RESULT_GRACE_S, push_missed: bool = True
) -> dict[str, Any] | None:
    """Return the payload of a run finished over ``grace_s`` ago, else None.

    ``push_missed`` means the runner's push of the result did not arrive,
    which is then logged.
    """
    run = Run.objects.select_related("bill").filter(pk=run_id).first()
    if run is None or not run.is_finished or run.finished_at is None:
        return None
    if (clock.now() - run.finished_at).total_seconds() < grace_s:
        return None
    bill = getattr(run, "bill", None)
    if push_missed:
        logger.warning(
            "run %s: result not delivered through Redis; read from the DB", run_id
        )
    meta = result_meta(
        run.pk,
        run.status,
        run.breakdown,
        run.error,
        bill_fields(bill) if bill else None,
        run.warnings,
        run.runner_name,
        queue=run.queue_name,
    )
    return {"outputs": run.outputs, "meta": meta}
