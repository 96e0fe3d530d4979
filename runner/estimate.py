"""Predict a run before it runs: hot or cold, latency and price.

A prediction combines two sources. The live runners' heartbeats show which
runner has each model loaded, so whether the run would start hot and where.
Recent succeeded runs give the times:

- request, queue, compile, blocks, serialization and overhead: the median
  over this owner's runs of the same definition;
- per model, the median time of one call in each stage (preprocess,
  inference, postprocess) and of one cold load, over every owner's runs,
  because all owners share the runners. For call times, runs on the device
  of the runner that would take the run are preferred, and among them runs
  where the model was already loaded;
- calls per model: the median over this owner's runs of the same
  definition, else one per model step (a model that runs on each crop is
  then undercounted).

The predicted latency is the sum of those medians, a typical figure rather
than the median of past totals. The predicted price is the billing policy
applied to the predicted runner total. A part without history is unknown,
and then so are the totals and the price: an estimate never fills a gap
with a guess.
"""

import statistics
from collections import Counter
from typing import Any

from billing.policy import BillingPolicy
from runner import fleet
from runner.dispatch import resolve_models
from runner.models import Run
from workflows.compiler.plan import ExecutionPlan
from workflows.timing import COMPONENTS, RUNNER_COMPONENTS

# How many of the most recent succeeded runs an estimate reads.
HISTORY_RUNS = 500

WORKFLOW_COMPONENTS = (
    "request",
    "queue",
    "compile",
    "blocks",
    "serialization",
    "overhead",
)
STAGES = ("preprocess", "inference", "postprocess")


def estimate_run(
    plan: ExecutionPlan, parameters: dict[str, Any], owner_id: int
) -> dict[str, Any]:
    """Return the predicted route, breakdown and price of running ``plan`` now.

    Raises ModelNotFoundError as a run would, before reading any history.
    """
    models = resolve_models(plan, parameters, owner_id)
    runners = fleet.live_runners()
    history = _recent_runs()
    same_workflow = [
        run
        for run in history
        if run["owner_id"] == owner_id and run["definition_digest"] == plan.digest
    ]
    unknown: list[str] = []

    components: dict[str, int | None] = {
        name: _median([run["breakdown"]["components"][name] for run in same_workflow])
        for name in WORKFLOW_COMPONENTS
    }
    if not same_workflow:
        unknown.append(
            "this workflow has no succeeded run yet, so its request, queue, "
            "compile, blocks, serialization and overhead times are unknown"
        )

    if not runners:
        unknown.append(
            "no runner is up, so the queue time is unknown; a synchronous run "
            "would fail with no_runner"
        )
        components["queue"] = None
    cache_keys = {model["cache_key"] for model in models}
    hot_runners = [r for r in runners if cache_keys and cache_keys <= r.loaded_models]
    device = hot_runners[0].data.get("device") if hot_runners else None
    cold_keys = _cold_keys(cache_keys, runners, hot_runners)
    steps_per_model = Counter(model_id for _, model_id in plan.model_ids(parameters))
    forecasts = [
        _forecast_model(
            model,
            runners,
            history,
            same_workflow,
            steps_per_model[model["model_id"]],
            device,
            model["cache_key"] in cold_keys,
            unknown,
        )
        for model in models
    ]

    components["cold_load"] = _sum_known(
        forecast["cold_load_us"] for forecast in forecasts
    )
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
    return {
        "unit": "us",
        "hot": not cold_keys,
        "runner": hot_runners[0].name if hot_runners else None,
        "runners_up": len(runners),
        "models": forecasts,
        "components": components,
        "runner_total": runner_total,
        "total": total,
        "price": _price(components, runner_total),
        "basis": {
            "workflow_runs": len(same_workflow),
            "history_runs": len(history),
        },
        "unknown": unknown,
    }


def _forecast_model(
    model: dict[str, Any],
    runners: list[fleet.RunnerState],
    history: list[dict[str, Any]],
    same_workflow: list[dict[str, Any]],
    steps: int,
    device: str | None,
    cold: bool,
    unknown: list[str],
) -> dict[str, Any]:
    key, model_id = model["cache_key"], model["model_id"]
    entries = [entry for run in history for entry in _model_entries(run, key)]
    holders = sorted(r.name for r in runners if key in r.loaded_models)

    calls_seen = [
        entry["calls"] for run in same_workflow for entry in _model_entries(run, key)
    ]
    calls = _median(calls_seen) if calls_seen else steps

    on_device = [entry for entry in entries if entry.get("device") == device]
    called = [entry for entry in (on_device or entries) if entry["calls"]]
    # The first call after a cold load can be slower than later ones.
    sample = [entry for entry in called if not entry["cold"]] or called
    per_call = None
    if sample:
        per_call = {
            stage: _median([entry[stage] / entry["calls"] for entry in sample])
            for stage in STAGES
        }
    else:
        unknown.append(
            f"model '{model_id}' has no succeeded run, so its call time is unknown"
        )

    cold_loads = [entry["cold_load"]["total"] for entry in entries if entry["cold"]]
    cold_load: int | None = 0
    if cold:
        cold_load = _median(cold_loads)
        if cold_load is None:
            unknown.append(
                f"model '{model_id}' would be loaded cold and has never been "
                "loaded in a succeeded run, so its cold load time is unknown"
            )
    return {
        "model_id": model_id,
        "pretrained": model["source"]["pretrained"],
        "hot": not cold,
        "loaded_on": holders,
        "cold_load_us": cold_load,
        "calls": calls,
        "per_call_us": per_call,
        "samples": len(sample),
    }


def _cold_keys(
    cache_keys: set[str],
    runners: list[fleet.RunnerState],
    hot_runners: list[fleet.RunnerState],
) -> set[str]:
    """Return the cache keys of the models the run would load cold.

    With a runner holding every model, the router sends the run there and
    nothing is cold. Otherwise the run goes to the shared queue, where any
    runner may take it, so a model is hot only if every live runner has it.
    """
    if hot_runners:
        return set()
    return {
        key
        for key in cache_keys
        if not runners or not all(key in r.loaded_models for r in runners)
    }


def _stage_time(forecast: dict[str, Any], stage: str) -> float | None:
    if forecast["per_call_us"] is None:
        return None
    return forecast["calls"] * forecast["per_call_us"][stage]


def _recent_runs() -> list[dict[str, Any]]:
    return list(
        Run.objects.filter(status=Run.Status.SUCCEEDED, breakdown__isnull=False)
        .order_by("-created_at")
        .values("owner_id", "definition_digest", "model_refs", "breakdown")[
            :HISTORY_RUNS
        ]
    )


def _model_entries(run: dict[str, Any], cache_key: str) -> list[dict[str, Any]]:
    """Return the run's breakdown entries for the model cached under ``cache_key``.

    A breakdown names models by id, and the run's model references map each
    id to the cache key it resolved to then.
    """
    ids = {
        ref["model_id"] for ref in run["model_refs"] if ref["cache_key"] == cache_key
    }
    return [entry for entry in run["breakdown"]["models"] if entry["model_id"] in ids]


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


def _sum_known(values) -> int | None:
    """Return the sum, or None when any value is unknown."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return round(total)
