"""Prometheus metrics of runs, bills and the runner fleet, in the text format.

Every figure is read at scrape time from the database and from the runners'
heartbeats in Redis, not counted in the process that serves the scrape, so the web
server's workers and every machine's runners report as one. Totals over runs
and bills are counters: they only grow, unless runs are deleted with their
owner. Figures of a runner describe its current process, so its
``glassbox_runner_evictions_total`` and ``glassbox_runner_runs_total`` start
again from zero when it restarts, as a counter of a restarted process does.
"""

from collections.abc import Iterable

from django.db.models import BigIntegerField, Count, Q, Sum
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce
from rq import Queue

from billing.models import Bill
from billing.queries import LOAD_FAILED_CODE
from runner import fleet, keys
from runner.models import Run
from webapp.redis import get_redis
from workflows.timing import COMPONENTS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

US_PER_SECOND = 1_000_000


class Exposition:
    """Metric families written in Prometheus' text exposition format."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    pairs = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + pairs + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render_metrics() -> str:
    """Return the metrics text for one scrape."""
    exposition = Exposition()
    _run_metrics(exposition)
    _bill_metrics(exposition)
    _fleet_metrics(exposition)
    return exposition.text()


def _run_metrics(exposition: Exposition) -> None:
    finished = Q(status__in=(Run.Status.SUCCEEDED, Run.Status.FAILED))
    # A load that fails marks its model and run cold as it starts. Such a
    # run is not billed, and is counted apart, as the billing history's
    # "load failed" start counts it, even when an earlier model loaded.
    load_failed = Q(error__code=LOAD_FAILED_CODE)
    by_outcome = (
        Run.objects.filter(finished)
        .values("status", "source")
        .annotate(
            runs=Count("pk"),
            cold=Count("pk", filter=Q(cold=True) & ~load_failed),
            load_failed=Count("pk", filter=load_failed),
        )
        .order_by("status", "source")
    )
    rows = list(by_outcome)
    exposition.family(
        "glassbox_runs_total",
        "counter",
        "Finished runs, by status and by where they were sent from.",
        (({"status": r["status"], "source": r["source"]}, r["runs"]) for r in rows),
    )
    exposition.family(
        "glassbox_cold_runs_total",
        "counter",
        "Finished runs that loaded at least one model, without those that "
        "failed to load one.",
        (({"status": r["status"], "source": r["source"]}, r["cold"]) for r in rows),
    )
    exposition.family(
        "glassbox_load_failed_runs_total",
        "counter",
        "Finished runs that failed because a model could not be loaded.",
        (
            ({"source": r["source"]}, r["load_failed"])
            for r in rows
            if r["status"] == Run.Status.FAILED
        ),
    )
    unfinished = dict(
        Run.objects.filter(status__in=(Run.Status.QUEUED, Run.Status.RUNNING))
        .values_list("status")
        .annotate(Count("pk"))
    )
    exposition.family(
        "glassbox_runs_unfinished",
        "gauge",
        "Runs waiting for a runner or running now.",
        (
            ({"status": status}, unfinished.get(status, 0))
            for status in (Run.Status.QUEUED, Run.Status.RUNNING)
        ),
    )

    # Each component's total over finished runs with a breakdown: rate() of
    # these shows where the fleet's time goes.
    sums = Run.objects.filter(finished, breakdown__isnull=False).aggregate(
        **{name: _json_sum(f"breakdown__components__{name}") for name in COMPONENTS},
        total=Coalesce(Sum("total_us"), 0),
        runner_total=Coalesce(Sum("runner_total_us"), 0),
    )
    exposition.family(
        "glassbox_run_component_seconds_total",
        "counter",
        "Time of finished runs by breakdown component; the components add up "
        "to glassbox_run_seconds_total.",
        (({"component": name}, sums[name] / US_PER_SECOND) for name in COMPONENTS),
    )
    exposition.family(
        "glassbox_run_seconds_total",
        "counter",
        "Total time of finished runs, from request to result.",
        [({}, sums["total"] / US_PER_SECOND)],
    )
    exposition.family(
        "glassbox_runner_seconds_total",
        "counter",
        "Runner time of finished runs: the part that bills are computed from.",
        [({}, sums["runner_total"] / US_PER_SECOND)],
    )


def _json_sum(lookup: str):
    """Sum the JSON integers at ``lookup`` (a field and keys); 0 over no rows."""
    return Coalesce(Sum(Cast(KT(lookup), BigIntegerField())), 0)


def _bill_metrics(exposition: Exposition) -> None:
    rows = list(
        Bill.objects.values("billed")
        .annotate(
            bills=Count("pk"),
            amount=Coalesce(Sum("amount_microcredits"), 0),
            billed_ms=Coalesce(Sum("billed_ms"), 0),
        )
        .order_by("billed")
    )
    exposition.family(
        "glassbox_bills_total",
        "counter",
        'Bills, charged (billed="true") or waived because the platform failed.',
        (({"billed": str(r["billed"]).lower()}, r["bills"]) for r in rows),
    )
    charged = [r for r in rows if r["billed"]]
    exposition.family(
        "glassbox_billed_microcredits_total",
        "counter",
        "Amount charged, in micro-credits.",
        [({}, sum(r["amount"] for r in charged))],
    )
    exposition.family(
        "glassbox_billed_seconds_total",
        "counter",
        "Time charged, after the policy's rounding and minimum.",
        [({}, sum(r["billed_ms"] for r in charged) / 1000)],
    )


def _fleet_metrics(exposition: Exposition) -> None:
    runners = [state.data for state in fleet.live_runners()]
    names = [{"runner": runner["name"]} for runner in runners]

    def per_runner(field: str):
        return (
            (labels, runner.get(field) or 0)
            for labels, runner in zip(names, runners, strict=True)
        )

    exposition.family(
        "glassbox_runner_info",
        "gauge",
        "Live runners (1 each), with their host, device and eviction policy.",
        (
            (
                {
                    "runner": runner["name"],
                    "host": runner.get("host", ""),
                    "device": runner.get("device", ""),
                    "eviction_policy": runner.get("eviction_policy", ""),
                },
                1,
            )
            for runner in runners
        ),
    )
    # The busy marks, not the heartbeats, which lag up to a heartbeat
    # interval behind: routing reads the marks too.
    marks = (
        get_redis().mget([keys.current_run_key(r["name"]) for r in runners])
        if runners
        else []
    )
    exposition.family(
        "glassbox_runner_busy",
        "gauge",
        "1 while the runner executes a run, or routing has reserved it for one.",
        (
            (labels, 0 if mark is None else 1)
            for labels, mark in zip(names, marks, strict=True)
        ),
    )
    exposition.family(
        "glassbox_runner_stopping",
        "gauge",
        "1 from the runner's stop request until it exits; routing sends it no runs.",
        (
            (labels, 1 if runner.get("stopping") else 0)
            for labels, runner in zip(names, runners, strict=True)
        ),
    )
    exposition.family(
        "glassbox_runner_models_loaded",
        "gauge",
        "Models the runner holds loaded.",
        (
            (labels, len(runner.get("models", [])))
            for labels, runner in zip(names, runners, strict=True)
        ),
    )
    exposition.family(
        "glassbox_runner_memory_used_bytes",
        "gauge",
        "Measured memory of the runner's loaded models.",
        per_runner("used_bytes"),
    )
    exposition.family(
        "glassbox_runner_memory_budget_bytes",
        "gauge",
        "Memory the runner may fill with loaded models.",
        per_runner("budget_bytes"),
    )
    exposition.family(
        "glassbox_runner_queue_length",
        "gauge",
        "Jobs waiting in the runner's own queue.",
        per_runner("queue_length"),
    )
    exposition.family(
        "glassbox_runner_evictions_total",
        "counter",
        "Models the runner's eviction policy unloaded since the runner started.",
        per_runner("evictions"),
    )
    exposition.family(
        "glassbox_runner_runs_total",
        "counter",
        "Runs the runner took since it started.",
        per_runner("runs_done"),
    )
    shared = get_redis().llen(Queue.redis_queue_namespace_prefix + keys.SHARED_QUEUE)
    exposition.family(
        "glassbox_shared_queue_length",
        "gauge",
        "Jobs waiting in the shared queue, which every runner reads.",
        [({}, shared)],
    )
