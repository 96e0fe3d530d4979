"""Predict a run before it runs: hot or cold, latency and price.

A prediction combines two sources. The first is the fleet. Heartbeats show
which runner has each model loaded, and busy marks and queue lengths, read
live, show where routing would send the run now (``predict_route``). From
these come whether the run would start hot, and on which runner. The
second is the owner's own recent succeeded runs, which give the times:

- request, queue, compile, blocks, serialization and overhead: the median
  over runs of the same definition, counting only runs that loaded no model
  when there are any, because a cold load also slows the runner's other
  work. Queue time counts only runs that found a runner free, when there
  are any. Blocks and serialization are scaled per image of the batch.
  Request, queue and overhead have a fixed part as well, so they come from
  runs of the same batch size, else from a line through the medians of
  other sizes, else from the one size there is, with a note;
- per model (by weights file and input size), the median time of one call
  in each stage (preprocess, inference, postprocess) and of one cold load.
  Call times come from runs of the same definition in which the model
  served the same steps, else from runs of any definition. A model called
  on each crop predicts on smaller images than one called on the whole
  image, and bench/estimate_accuracy.py measured about half the time per
  call on crops. Among those runs, runs on the device of the runner that would take the
  run are preferred, and among them calls made after the model was loaded.
  Cold loads come from runs of any definition;
- calls per model and image: the median over runs of the same definition
  of the calls its steps made, whichever model a step's id named then (it
  can come from a parameter). A model that runs on each crop, or not at
  all, is thus counted as it ran. A run in which one model served steps
  that now call different models is skipped, since its calls cannot be
  split by step. Without such runs, each model step counts one call.

Only the owner's runs are read, so other users' traffic changes no time or
price. Whether a model is hot is the fleet's state, read from heartbeats: a
shared model another user's run loaded is hot for everyone, as it would be
for the run itself. A busy runner also counts the models of the runs it
executes and has queued on its own queue, which it has loaded by the time
it takes the run (``held_when_free``). The predicted latency is the sum of those
medians, a typical figure rather than the median of past totals. Runs
waiting in the queues the run would join make its queue time unknown,
because the history it is predicted from did not wait behind them, and so
does a fleet whose every runner is busy or stopping. The
predicted price is the billing policy applied to the predicted runner
total. A part without history is unknown, and then so are the totals and
the price: an estimate never fills a gap with a guess.
"""

import statistics
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from rq import Queue

from billing.policy import BillingPolicy
from runner import fleet, keys
from runner.dispatch import (
    PredictedRoute,
    model_call_order,
    model_sizes,
    predict_route,
    resolve_models,
)
from runner.models import Run
from webapp.redis import get_redis
from workflows.compiler.plan import ExecutionPlan
from workflows.timing import COMPONENTS, RUNNER_COMPONENTS

# The owner's latest succeeded runs read: of the same definition, and of any
# definition for model times. Only the breakdown's components and models are
# loaded, not its per-step list.
WORKFLOW_HISTORY_RUNS = 50
MODEL_HISTORY_RUNS = 200

# Request, queue and overhead grow with the images a run sends, but not in
# proportion: each run also pays a fixed part.
BATCH_COMPONENTS = ("request", "queue", "overhead")
PER_IMAGE_COMPONENTS = ("blocks", "serialization")
STAGES = ("preprocess", "inference", "postprocess")


def estimate_run(
    plan: ExecutionPlan,
    parameters: dict[str, Any],
    owner_id: int,
    batch_size: int = 1,
    priority: str = Run.Priority.STANDARD,
) -> dict[str, Any]:
    """Return the predicted route, breakdown and price of running ``plan`` now.

    ``priority`` is a Run.Priority value, routed as a run of it would be.
    Raises ModelNotFoundError as a run would, before reading any history.
    """
    models = resolve_models(plan, parameters, owner_id)
    runners = fleet.live_runners()
    workflow_runs = _history(owner_id, plan.digest, WORKFLOW_HISTORY_RUNS)
    model_runs = _history(owner_id, None, MODEL_HISTORY_RUNS)
    unknown: list[str] = []
    notes: list[str] = []

    components = _workflow_components(workflow_runs, batch_size, unknown, notes)
    if not runners:
        unknown.append(
            "no runner is up, so the queue time is unknown; a synchronous run "
            "would fail with no_runner"
        )
        components["queue"] = None

    cache_keys = {model["cache_key"] for model in models}
    call_order = model_call_order(plan, parameters, models)
    placement = _place_run(call_order, runners, priority, cache_keys, unknown, notes)
    if not placement.queue_known:
        components["queue"] = None
    forecasts = _forecast_models(
        plan,
        parameters,
        models,
        call_order,
        placement,
        runners,
        workflow_runs,
        model_runs,
        batch_size,
        unknown,
        notes,
    )

    components["cold_load"] = _cold_load(forecasts)
    for stage in STAGES:
        components[stage] = _sum_known(
            _stage_time(forecast, stage) for forecast in forecasts
        )
    components = {name: components[name] for name in COMPONENTS}

    runner_total = _sum_known(components[name] for name in RUNNER_COMPONENTS)
    total = (
        None
        if runner_total is None
        else _sum_known([components["request"], components["queue"], runner_total])
    )
    limit_note = _time_limit_note(components, runner_total)
    if limit_note:
        notes.append(limit_note)
    target = placement.route.runner
    return {
        "unit": "us",
        "hot": not any(forecast["would_load"] for forecast in forecasts),
        "runner": target.name if target else None,
        "priority": priority,
        "runners_up": len(runners),
        "queued_ahead": placement.route.queued_ahead,
        "batch_size": batch_size,
        "models": [_public(forecast) for forecast in forecasts],
        "components": components,
        "runner_total": runner_total,
        "total": total,
        "price": _price(components, runner_total),
        "basis": {
            "workflow_runs": len(workflow_runs),
            "history_runs": len(model_runs),
        },
        "unknown": unknown,
        "notes": notes,
    }


@dataclass(frozen=True)
class _Placement:
    """The route a run sent now would take, and the models loaded there.

    ``loaded`` contains the cache keys that every runner that may take the
    run has loaded when it does, and ``device`` is those runners' device
    when they share one. ``queue_known`` is False when a backlog or a busy
    fleet makes the queue time unknown.
    """

    route: PredictedRoute
    loaded: set[str]
    device: str | None
    queue_known: bool


def _place_run(
    call_order: list[str],
    runners: list[fleet.RunnerState],
    priority: str,
    cache_keys: set[str],
    unknown: list[str],
    notes: list[str],
) -> _Placement:
    """Predict the route of a run sent now and the models loaded where it goes.

    Appends to ``unknown`` the reason the queue time is unknown, if it is,
    and to ``notes`` when whether a model is hot depends on which busy
    runner is free first.
    """
    route = predict_route(call_order, runners, priority)
    takers = route.takers
    devices = {runner.data.get("device") for runner in takers}
    device = devices.pop() if len(devices) == 1 else None
    # A model is hot for certain only if every runner that may take the run
    # has it loaded when it does, as predict_hot decides when the run is
    # queued.
    held = held_when_free(takers)
    loaded = set.intersection(*held.values()) if held else set()
    cold_keys = cache_keys - loaded
    queued_ahead = route.queued_ahead
    queue_known = False
    if route.waits_for_holder:
        waiting = f", and {_runs_queued(queued_ahead)} on it" if queued_ahead else ""
        unknown.append(
            f"runner {route.takers[0].name} is busy with a run{waiting}, so the "
            "queue time is unknown: this economy run waits for it because it has "
            "the run's models loaded"
        )
    elif route.all_stopping:
        waiting = f", and {_runs_queued(queued_ahead)}" if queued_ahead else ""
        unknown.append(
            f"every runner is stopping{waiting}, so the queue time is unknown: "
            "a stopping runner finishes its current run and takes no more, so "
            "this run waits until a runner starts"
        )
    elif route.all_busy:
        waiting = f", and {_runs_queued(queued_ahead)}" if queued_ahead else ""
        unknown.append(
            f"every runner is busy with a run{waiting}, so the queue time is "
            "unknown: this run waits until a runner is free"
        )
        if cold_keys & set().union(*held.values()):
            ready = sum(cache_keys <= held_keys for held_keys in held.values())
            notes.append(
                "whether a model is hot depends on which runner is free first: "
                f"{ready} of {len(held)} runners would have every model of the "
                "run loaded"
            )
    elif queued_ahead:
        unknown.append(
            f"{_runs_queued(queued_ahead)} ahead of this one, so its queue time "
            "is unknown: the past runs it would be predicted from did not wait "
            "behind them"
        )
    else:
        queue_known = True
    return _Placement(route, loaded, device, queue_known)


def _forecast_models(
    plan: ExecutionPlan,
    parameters: dict[str, Any],
    models: list[dict[str, Any]],
    call_order: list[str],
    placement: _Placement,
    runners: list[fleet.RunnerState],
    workflow_runs: list[dict[str, Any]],
    model_runs: list[dict[str, Any]],
    batch_size: int,
    unknown: list[str],
    notes: list[str],
) -> list[dict[str, Any]]:
    """Forecast each model's calls, loads and stage times for the run."""
    loaded = placement.loaded
    steps_of_model: dict[str, set[str]] = defaultdict(set)
    for step, model_id in plan.model_ids(parameters):
        steps_of_model[model_id].add(step)
    calls = {
        model["model_id"]: _predicted_calls(
            workflow_runs, steps_of_model[model["model_id"]], batch_size
        )
        for model in models
    }
    # A model the run does not call (a model on each crop, with no crops)
    # takes no memory, so only called models count against the budget.
    called_keys = {model["cache_key"] for model in models if calls[model["model_id"]]}
    evicting = bool(called_keys - loaded) and _exceeds_budgets(
        called_keys, placement.route.takers, model_runs
    )
    if evicting:
        notes.append(
            "the run's models do not fit the memory budget of the runner that "
            "would take it, so loading one evicts another: only the first model "
            "the run calls can be hot, and a model is loaded again for each "
            "later step that needs it after another model"
        )
    loads = predicted_loads(call_order, loaded, evicting)
    return [
        _forecast_model(
            model,
            runners,
            model_runs,
            calls[model["model_id"]],
            placement.device,
            loads.get(model["cache_key"], 0),
            unknown,
            _same_steps_entries(
                workflow_runs, model["cache_key"], steps_of_model[model["model_id"]]
            ),
        )
        for model in models
    ]


def _workflow_components(
    workflow_runs: list[dict[str, Any]],
    batch_size: int,
    unknown: list[str],
    notes: list[str],
) -> dict[str, int | None]:
    if not workflow_runs:
        unknown.append(
            "this definition has no succeeded run yet, and runs of other "
            "definitions, such as the workflow's earlier versions, do not "
            "count, so its request, queue, compile, blocks, serialization and "
            "overhead times are unknown"
        )
    runs = [run for run in workflow_runs if not run["cold"]] or workflow_runs
    components: dict[str, int | None] = {
        "compile": _median([run["components"]["compile"] for run in runs])
    }
    # Queue time comes from runs that found a runner free. A run that waited
    # behind a backlog predicts nothing about an idle fleet, and the caller
    # checks for a backlog now itself.
    free = [run for run in runs if not run["waited"]]
    sizes_used: dict[str, tuple[int, ...]] = {}
    for name in BATCH_COMPONENTS:
        sample = free if name == "queue" and free else runs
        components[name], sizes = _median_for_batch(sample, name, batch_size)
        if sizes and sizes != (batch_size,):
            sizes_used[name] = sizes
    for name in PER_IMAGE_COMPONENTS:
        per_image = _median_float(
            [run["components"][name] / run["batch_size"] for run in runs]
        )
        components[name] = None if per_image is None else round(per_image * batch_size)

    for sizes in sorted(set(sizes_used.values())):
        names = _join(
            [name for name in BATCH_COMPONENTS if sizes_used.get(name) == sizes]
        )
        if len(sizes) == 1:
            notes.append(
                f"{names} times come from runs of {_images(sizes[0])} per input, "
                f"not {batch_size}, and they grow with the images sent"
            )
        else:
            inside = sizes[0] <= batch_size <= sizes[-1]
            notes.append(
                f"{names} times for {_images(batch_size)} per input are "
                f"{'interpolated' if inside else 'extrapolated'} along a line "
                "through the medians of runs of "
                f"{_join([str(size) for size in sizes])} images"
            )
    return components


def _median_for_batch(
    runs: list[dict[str, Any]], name: str, batch_size: int
) -> tuple[int | None, tuple[int, ...]]:
    """Return component ``name``'s median for ``batch_size`` and the sizes used.

    Runs of that batch size give their median. Without them, runs of two or
    more other sizes give a least-squares line through each size's median,
    and runs of one other size give their median as it is.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    for run in runs:
        by_size[run["batch_size"]].append(run["components"][name])
    if batch_size in by_size:
        return _median(by_size[batch_size]), (batch_size,)
    if not by_size:
        return None, ()
    points = sorted(
        (size, statistics.median(values)) for size, values in by_size.items()
    )
    if len(points) == 1:
        return round(points[0][1]), (points[0][0],)
    slope, intercept = statistics.linear_regression(
        [size for size, _ in points], [value for _, value in points]
    )
    return max(0, round(intercept + slope * batch_size)), tuple(sorted(by_size))


def _join(words: list[str]) -> str:
    """Join words as a sentence lists them: "a", "a and b", "a, b and c"."""
    if len(words) < 2:
        return "".join(words)
    return f"{', '.join(words[:-1])} and {words[-1]}"


def _images(count: int) -> str:
    return "1 image" if count == 1 else f"{count} images"


def _predicted_calls(
    workflow_runs: list[dict[str, Any]], steps: set[str], batch_size: int
) -> float:
    """Return the calls ``steps`` would make for the batch: as in past runs,
    else one per step and image."""
    per_image = _calls_per_image(workflow_runs, steps)
    if per_image is None:
        return float(len(steps) * batch_size)
    return per_image * batch_size


def _forecast_model(
    model: dict[str, Any],
    runners: list[fleet.RunnerState],
    model_runs: list[dict[str, Any]],
    calls: float,
    device: str | None,
    loads: int,
    unknown: list[str],
    own_entries: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Forecast one model's load and call times.

    ``own_entries`` are the model's entries in runs of the same definition
    that served the same steps. Their call times come first: a step that
    runs on crops calls the model on smaller images than a step on the
    whole image, and ultralytics resizes a crop to fewer pixels.
    """
    key, model_id = model["cache_key"], model["model_id"]
    entries = [entry for run in model_runs for entry in _model_entries(run, key)]
    holders = sorted(r.name for r in runners if key in r.loaded_models)

    own_sample = _call_sample(own_entries or [], device)
    sample = own_sample or _call_sample(entries, device)
    per_call = None
    if sample:
        per_call = {
            stage: _median([entry[stage] / entry["calls"] for entry in sample])
            for stage in STAGES
        }
    elif calls:
        unknown.append(
            f"model '{model_id}' has no succeeded run, so its preprocess, "
            "inference and postprocess times are unknown"
        )

    # A model that is not called is not loaded either.
    would_load = loads > 0 and calls > 0
    cold_load: int | None = 0
    if would_load:
        # Per load: a past run that loaded the model twice, after an
        # eviction, counts half its cold load for each.
        per_load = _median(
            [
                entry["cold_load"]["total"] / (entry.get("loads") or 1)
                for entry in entries
                if entry["cold"]
            ]
        )
        cold_load = None if per_load is None else round(per_load * loads)
        if cold_load is None:
            unknown.append(
                f"model '{model_id}' would be loaded cold and has never been "
                "loaded in a succeeded run, so its cold load time is unknown"
            )
    return {
        "model_id": model_id,
        "cache_key": key,
        "pretrained": model["source"]["pretrained"],
        "hot": not would_load,
        "would_load": would_load,
        "loaded_on": holders,
        "loads": loads if would_load else 0,
        "cold_load_us": cold_load,
        "calls": round(calls, 2),
        "per_call_us": per_call,
        "samples": len(sample),
        # Whose runs the call times come from.
        "samples_from": "definition" if own_sample else "any",
    }


def _call_sample(entries: list[dict[str, Any]], device: str | None) -> list:
    """Return the entries to time calls from: on ``device`` if any, and hot if any."""
    on_device = [entry for entry in entries if entry.get("device") == device]
    called = [entry for entry in (on_device or entries) if entry["calls"]]
    # The first call after a cold load can be slower than later ones.
    return [entry for entry in called if not entry["cold"]] or called


def _same_steps_entries(
    workflow_runs: list[dict[str, Any]], cache_key: str, steps: set[str]
) -> list[dict[str, Any]]:
    """Return the model's entries in the definition's runs that served only ``steps``.

    A run whose entry also served a step that now calls another model is
    left out, as in ``_calls_per_image``, and so is an entry that names no
    step.
    """
    return [
        entry
        for run in workflow_runs
        for entry in _model_entries(run, cache_key)
        if (served := set(entry.get("steps") or ())) and served <= steps
    ]


# How many jobs at the end of a runner's own queue ``held_when_free`` reads.
OWN_QUEUE_READ = 50


def held_when_free(runners: list[fleet.RunnerState]) -> dict[str, set[str]]:
    """Return, per runner, the cache keys it will have loaded when it is free.

    A runner is free to take a shared-queue job once it has finished the
    run it is executing and the jobs queued on its own queue. It then has
    those runs' models loaded, as well as the ones its heartbeat lists.
    If all of them together pass its memory budget, only the models of its
    last run count, since making room for them evicted others. Runs are
    read from the busy mark and the own queue, live, and their models from
    the database.

    NOTE: a model whose size no heartbeat shows counts as zero bytes, and
    a run that fails before it loads its models leaves them unloaded. Only
    the last OWN_QUEUE_READ jobs of an own queue are read, since economy
    runs can make it long; the models of earlier ones are left out.
    """
    if not runners:
        return {}
    pipeline = get_redis().pipeline(transaction=False)
    for runner in runners:
        pipeline.get(keys.current_run_key(runner.name))
        pipeline.lrange(
            f"{Queue.redis_queue_namespace_prefix}{keys.runner_queue(runner.name)}",
            -OWN_QUEUE_READ,
            -1,
        )
    replies = pipeline.execute(raise_on_error=False)
    run_ids: dict[str, list[str]] = {}
    for index, runner in enumerate(runners):
        current, queued = replies[2 * index], replies[2 * index + 1]
        ids = [current] if isinstance(current, bytes) else []
        if isinstance(queued, list):
            ids += queued
        run_ids[runner.name] = [_run_id(value) for value in ids]
    keys_of_run = _run_cache_keys({i for ids in run_ids.values() for i in ids if i})

    sizes = model_sizes(runners)
    held = {}
    for runner in runners:
        runs = [keys_of_run[i] for i in run_ids[runner.name] if i in keys_of_run]
        models = set(runner.loaded_models).union(*runs)
        budget = runner.data.get("budget_bytes")
        if runs and budget is not None:
            if sum(sizes.get(key, 0) for key in models) > budget:
                models = set(runs[-1])
        held[runner.name] = models
    return held


def loaded_when_free(runners: list[fleet.RunnerState], cache_keys: set[str]) -> set:
    """Return the cache keys every one of ``runners`` will have loaded when free.

    Busy marks and queues are read only when a model in ``cache_keys`` is
    missing from a heartbeat, so a run whose models are all loaded pays no
    round trip for it. Such a run counts them as held, although a busy
    runner's queued runs may evict them first (``held_when_free``).
    """
    if not runners:
        return set()
    loaded = set.intersection(*(set(runner.loaded_models) for runner in runners))
    if cache_keys <= loaded:
        return loaded
    return set.intersection(*held_when_free(runners).values())


def _run_id(value: bytes) -> str | None:
    """Return the run id a busy mark or job id names, None if it is no run id."""
    try:
        return str(uuid.UUID(value.decode()))
    except (UnicodeDecodeError, ValueError):
        return None


def _run_cache_keys(run_ids: set[str]) -> dict[str, set[str]]:
    rows = Run.objects.filter(pk__in=run_ids).values_list("pk", "model_refs")
    return {
        str(pk): {ref["cache_key"] for ref in refs or () if "cache_key" in ref}
        for pk, refs in rows
    }


def predicted_loads(
    call_order: list[str], loaded: set[str], evicting: bool
) -> dict[str, int]:
    """Return how many times a run would load each model, by cache key.

    ``call_order`` is the cache key of each model step in the order the steps
    run, and ``loaded`` the keys that every runner that may take the run has
    loaded. A model not in ``loaded`` loads once. With ``evicting`` (the
    models do not fit the runner's memory budget together), loading a model
    evicts the one before, so a model loads once for each stretch of
    consecutive steps that use it, except that a first stretch whose model
    the runner has loaded already starts hot.

    NOTE: with three or more models, a runner that can hold two of them
    evicts less often than this assumes.
    """
    loads: dict[str, int] = {}
    previous = None
    for key in call_order:
        if key == previous:
            continue
        starts_hot = key in loaded and (previous is None or not evicting)
        if evicting:
            loads[key] = loads.get(key, 0) + (0 if starts_hot else 1)
        else:
            loads[key] = 0 if starts_hot else 1
        previous = key
    return loads


def _calls_per_image(
    workflow_runs: list[dict[str, Any]], steps: set[str]
) -> float | None:
    """Return the median calls per image that ``steps`` made in the workflow's runs.

    How often the workflow calls the model depends on its steps, not on the
    model a step's id named then, so entries count by the steps they served.
    A step that was never called has no entry. A breakdown counts calls per
    model, not per step, so a run whose entry also served steps that now
    call another model cannot be split, and is skipped. Returns None when
    no run is left.
    """
    per_image = []
    for run in workflow_runs:
        served = [e for e in run["models"] if steps & set(e.get("steps") or ())]
        if any(not set(e["steps"]) <= steps for e in served):
            continue
        per_image.append(sum(e["calls"] for e in served) / run["batch_size"])
    return _median_float(per_image)


def _public(forecast: dict[str, Any]) -> dict[str, Any]:
    """Drop the fields only the estimate itself uses."""
    hidden = ("cache_key", "would_load")
    return {name: value for name, value in forecast.items() if name not in hidden}


def models_exceed_budgets(
    cache_keys: set[str], runners: list[fleet.RunnerState], owner_id: int
) -> bool:
    """Return whether no runner in ``runners`` can hold these models together.

    The owner's runs are read only for sizes no heartbeat shows.
    """
    if len(cache_keys) < 2 or not runners:
        return False
    measured = {
        model["cache_key"]
        for runner in runners
        for model in runner.data.get("models", [])
    }
    history = (
        [] if cache_keys <= measured else _history(owner_id, None, MODEL_HISTORY_RUNS)
    )
    return _exceeds_budgets(cache_keys, runners, history)


def _exceeds_budgets(
    cache_keys: set[str],
    runners: list[fleet.RunnerState],
    model_runs: list[dict[str, Any]],
) -> bool:
    """Return whether the models' measured sizes add up to more than every budget.

    Sizes come from the heartbeats of runners that have a model loaded, else
    from the owner's runs; a model measured nowhere counts as zero bytes.
    """
    if len(cache_keys) < 2 or not runners:
        return False
    sizes: dict[str, int] = {}
    for runner in runners:
        for model in runner.data.get("models", []):
            sizes[model["cache_key"]] = model["memory_bytes"]
    for run in model_runs:
        for key in cache_keys - sizes.keys():
            for entry in _model_entries(run, key):
                if entry.get("memory_bytes"):
                    sizes[key] = entry["memory_bytes"]
    needed = sum(sizes.get(key, 0) for key in cache_keys)
    return all(needed > runner.data.get("budget_bytes", needed) for runner in runners)


def _runs_queued(count: int) -> str:
    return f"{count} run is queued" if count == 1 else f"{count} runs are queued"


def _cold_load(forecasts: list[dict[str, Any]]) -> int | None:
    """Sum the cold loads, once per weights file: ids that share one load once.

    An id that the run would not call forecasts no load, but the file still
    loads for another id that shares it, so each file counts its largest.
    """
    loads: dict[str, list[int | None]] = defaultdict(list)
    for forecast in forecasts:
        loads[forecast["cache_key"]].append(forecast["cold_load_us"])
    per_file = [None if None in values else max(values) for values in loads.values()]
    return _sum_known(per_file)


def _stage_time(forecast: dict[str, Any], stage: str) -> float | None:
    if not forecast["calls"]:
        return 0
    if forecast["per_call_us"] is None:
        return None
    return forecast["calls"] * forecast["per_call_us"][stage]


def _history(owner_id: int, digest: str | None, limit: int) -> list[dict[str, Any]]:
    runs = Run.objects.filter(
        owner_id=owner_id, status=Run.Status.SUCCEEDED, breakdown__isnull=False
    )
    if digest is not None:
        runs = runs.filter(definition_digest=digest)
    rows = runs.order_by("-created_at").values(
        "cold",
        "batch_size",
        "model_refs",
        "breakdown__components",
        "breakdown__models",
        "breakdown__waited_for_runner",
    )[:limit]
    return [
        {
            "cold": row["cold"],
            "batch_size": row["batch_size"] or 1,
            "model_refs": row["model_refs"],
            "components": row["breakdown__components"],
            "models": row["breakdown__models"],
            # Runs stored before runners recorded it count as not waiting.
            "waited": bool(row["breakdown__waited_for_runner"]),
        }
        for row in rows
    ]


def _model_entries(run: dict[str, Any], cache_key: str) -> list[dict[str, Any]]:
    """Return the run's breakdown entries for the model cached under ``cache_key``.

    A breakdown names models by id, and the run's model references map each
    id to the cache key it resolved to then.
    """
    ids = {
        ref["model_id"] for ref in run["model_refs"] if ref["cache_key"] == cache_key
    }
    return [entry for entry in run["models"] if entry["model_id"] in ids]


def _time_limit_note(
    components: dict[str, int | None], runner_total: int | None
) -> str | None:
    """Return a note when the predicted runner time passes RUN_TIME_LIMIT_S.

    With a component unknown, the known ones are a lower bound. A workflow
    whose every run timed out has no succeeded run to predict the others
    from, but its model calls alone may already pass the limit.
    """
    limit_s = settings.GLASSBOX["RUN_TIME_LIMIT_S"]
    advice = (
        "the runner would stop the run near the limit, failed, and bill the "
        "time it used; send fewer images per run"
    )
    if runner_total is not None:
        if runner_total > limit_s * 1_000_000:
            return (
                f"the predicted runner time, {runner_total / 1e6:,.0f} s, is over "
                f"RUN_TIME_LIMIT_S ({limit_s:g} s): {advice}"
            )
        return None
    known = sum(
        components[name] for name in RUNNER_COMPONENTS if components[name] is not None
    )
    if known > limit_s * 1_000_000:
        return (
            f"the runner time is unknown, but its known parts alone take "
            f"{known / 1e6:,.0f} s, over RUN_TIME_LIMIT_S ({limit_s:g} s): {advice}"
        )
    return None


def _price(components: dict[str, int | None], runner_total: int | None):
    if runner_total is None:
        return None
    line = BillingPolicy.from_settings().bill(
        {"components": components, "runner_total": runner_total}
    )
    return {
        "billed_ms": line.billed_ms,
        "amount_microcredits": line.amount_microcredits,
        "policy": line.policy,
        "formula": line.formula,
    }


def _median(values: list[float]) -> int | None:
    return round(statistics.median(values)) if values else None


def _median_float(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _sum_known(values) -> int | None:
    """Return the sum, or None when any value is unknown."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return round(total)
