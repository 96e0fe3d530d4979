"""Filters, table rows and chart data for the billing pages.

The history table, its CSV export and the chart data all start from
``filtered_bills`` with the same filters, so they always cover the same bills.
Times are integer microseconds (µs) unless a name says ms, and the table and
CSV cells show them as milliseconds.
"""

import datetime
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django import forms
from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from billing.models import Bill
from billing.policy import waive_reason
from runner.models import Run
from webapp.models import ApiToken
from workflows.models import Workflow
from workflows.timing import COMPONENTS

ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# Filter values that are not database ids.
INLINE_WORKFLOW = "inline"
NO_TOKEN = "none"

INLINE_WORKFLOW_LABEL = "inline definition"

# The start of a run that loaded and called no model.
NO_MODEL = "no model"
# The start of a run that failed because a model's weights did not load.
LOAD_FAILED = "load failed"
LOAD_FAILED_CODE = "model_load_failed"
# Start kinds as keys of the chart data's "starts".
SUMMARY_START_KEYS = {
    "hot": "hot",
    "cold": "cold",
    NO_MODEL: "no_model",
    LOAD_FAILED: "load_failed",
}

COMPONENT_LABELS = {
    "request": "Request",
    "queue": "Queue",
    "compile": "Compile",
    "cold_load": "Cold load",
    "preprocess": "Preprocess",
    "inference": "Inference",
    "postprocess": "Postprocess",
    "blocks": "Blocks",
    "serialization": "Serialization",
    "overhead": "Overhead",
}

# The model-call components; the charts group them as "model steps".
MODEL_STEP_COMPONENTS = ("preprocess", "inference", "postprocess")

LATENCY_PERCENTILES = (50, 90, 99)


class IsoDateField(forms.DateField):
    """A date written exactly as YYYY-MM-DD, in ASCII digits.

    Django's default input formats also read 1/2/2026, as January 2nd, which
    a reader outside the US takes for February 1st. strptime alone accepts
    2026-1-2 and non-ASCII digits too.
    """

    input_formats = ["%Y-%m-%d"]

    def to_python(self, value):
        # One message for a wrong form and for a day that does not exist
        # (2026-13-45). It names the value because a browser's date input
        # shows an empty box for a value it cannot read.
        if isinstance(value, str) and value.strip():
            text = value.strip()
            if ISO_DATE.fullmatch(text):
                try:
                    return datetime.date.fromisoformat(text)
                except ValueError:
                    pass
            raise forms.ValidationError(
                f"Enter a valid date as YYYY-MM-DD, not {value!r}.", code="invalid"
            )
        return super().to_python(value)


class IsoDateInput(forms.DateInput):
    """An ``<input type="date">`` that renders only a value it can contain.

    Browsers show an empty box for any other value, and Chromium logs a
    console warning for it, so an invalid value is left out of the input
    and shown in the field's error instead.
    """

    input_type = "date"

    def format_value(self, value):
        text = super().format_value(value)
        if text is None or not ISO_DATE.fullmatch(text):
            return None
        try:
            datetime.date.fromisoformat(text)
        except ValueError:
            return None
        return text


class BillFilterForm(forms.Form):
    """History filters. The choices list only the user's own workflows and tokens."""

    date_from = IsoDateField(
        required=False,
        label="From (UTC)",
        widget=IsoDateInput(),
    )
    date_to = IsoDateField(
        required=False,
        label="To (UTC)",
        widget=IsoDateInput(),
    )
    workflow = forms.ChoiceField(required=False, label="Workflow")
    token = forms.ChoiceField(required=False, label="API token")

    def __init__(self, data, *, user) -> None:
        super().__init__(data)
        # Deleted workflows too: their bills stay in the history.
        workflows = (
            Workflow.all_objects.filter(owner=user)
            .order_by("name", "id")
            .values_list("id", "name", "slug", "deleted_at")
        )
        # Names need not be unique; slugs are, so they tell equal names apart.
        self.fields["workflow"].choices = [
            ("", "All workflows"),
            (INLINE_WORKFLOW, "Inline definitions"),
            *(
                (str(workflow_id), f"{name} ({slug}{', deleted' if deleted else ''})")
                for workflow_id, name, slug, deleted in workflows
            ),
        ]
        tokens = (
            ApiToken.objects.filter(user=user)
            .order_by("name", "id")
            .values_list("id", "name", "prefix", "revoked_at")
        )
        self.fields["token"].choices = [
            ("", "All tokens"),
            (NO_TOKEN, "No API token (browser, command line)"),
            *(
                (str(token_id), _token_label(name, prefix, revoked_at))
                for token_id, name, prefix, revoked_at in tokens
            ),
        ]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        # A form reads the last of repeated values; a filter that quietly
        # ignores the others would show another selection than was asked for.
        for name in self.fields:
            if hasattr(self.data, "getlist") and len(self.data.getlist(name)) > 1:
                self.add_error(
                    name, f"give {name} once; repeated values are not combined"
                )
        date_from, date_to = cleaned.get("date_from"), cleaned.get("date_to")
        if date_from and date_to and date_from > date_to:
            raise forms.ValidationError(
                f"The start date {date_from} is after the end date {date_to}. "
                "Swap the dates or clear one of them."
            )
        return cleaned


def _token_label(name: str, prefix: str, revoked_at) -> str:
    label = f"{name} ({prefix}…)"
    return f"{label}, revoked" if revoked_at else label


def _start_of_day(day: datetime.date) -> datetime.datetime:
    return timezone.make_aware(
        datetime.datetime.combine(day, datetime.time.min),
        timezone.get_current_timezone(),
    )


def filtered_bills(user, filters: dict[str, Any]) -> QuerySet[Bill]:
    """Return the user's bills that match cleaned ``BillFilterForm`` data, newest first.

    Dates are whole days in the current time zone, and both ends are included.
    """
    bills = Bill.objects.filter(owner=user)
    if filters.get("date_from"):
        bills = bills.filter(created_at__gte=_start_of_day(filters["date_from"]))
    # Python has no date after 9999-12-31 (date.max), and no stored time is
    # later than that day, so that end date sets no bound.
    date_to = filters.get("date_to")
    if date_to and date_to < datetime.date.max:
        next_day = date_to + datetime.timedelta(days=1)
        bills = bills.filter(created_at__lt=_start_of_day(next_day))

    workflow = filters.get("workflow")
    if workflow == INLINE_WORKFLOW:
        bills = bills.filter(run__workflow_version__isnull=True)
    elif workflow:
        bills = bills.filter(run__workflow_version__workflow_id=int(workflow))

    token = filters.get("token")
    if token == NO_TOKEN:
        bills = bills.filter(run__token__isnull=True)
    elif token:
        bills = bills.filter(run__token_id=int(token))

    return (
        bills.select_related("run__workflow_version__workflow")
        # Outputs and definitions can be large, and no billing page shows them.
        .defer(
            "run__outputs",
            "run__inline_definition",
            "run__parameters",
            "run__workflow_version__definition",
        )
        .order_by("-created_at", "-pk")
    )


# ---------------------------------------------------------------- table rows


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    numeric: bool = False
    # True for timing components, which the pages mark with their phase colour.
    phase: bool = False


def _columns() -> tuple[Column, ...]:
    components = tuple(
        Column(name, f"{COMPONENT_LABELS[name]} (ms)", numeric=True, phase=True)
        for name in COMPONENTS
    )
    return (
        Column("time", f"Time ({settings.TIME_ZONE})"),
        Column("workflow", "Workflow"),
        Column("run", "Run"),
        Column("start", "Start"),
        *components,
        Column("billed_ms", "Billed (ms)", numeric=True),
        Column("amount", "Amount (µcr)", numeric=True),
    )


COLUMNS = _columns()
# The CSV has the table's columns, then the run's status, why a waived bill
# was waived, and the price cap that lowered a capped amount. The table has
# no such columns and marks waived rows and capped amounts.
CSV_COLUMNS = (
    *COLUMNS,
    Column("status", "Status"),
    Column("waive_reason", "Waived (reason)"),
    Column("capped_at", "Capped at (µcr)", numeric=True),
)


@dataclass(frozen=True)
class BillRow:
    """One row of the history table or of the CSV export.

    ``cells`` pairs each column with the exact text that the table and the
    CSV show in it.
    """

    bill: Bill
    cells: tuple[tuple[Column, str], ...]
    # Ids of the run's models that are untrained architectures.
    untrained: tuple[str, ...] = ()
    # Empty for a billed bill.
    waive_reason: str = ""

    @property
    def values(self) -> list[str]:
        return [value for _, value in self.cells]


def format_us_as_ms(us: int | None) -> str:
    """Format microseconds as milliseconds with three decimals, without floats."""
    if us is None:
        return ""
    sign = "-" if us < 0 else ""
    whole, fraction = divmod(abs(us), 1000)
    return f"{sign}{whole}.{fraction:03d}"


def workflow_label(name: str | None, slug: str | None) -> str:
    """Name a workflow as the filter does: names need not be unique, slugs are."""
    return f"{name} ({slug})" if slug is not None else INLINE_WORKFLOW_LABEL


def workflow_name(bill: Bill) -> str:
    version = bill.run.workflow_version
    if version is None:
        return INLINE_WORKFLOW_LABEL
    return workflow_label(version.workflow.name, version.workflow.slug)


def model_used(model: dict[str, Any]) -> bool:
    """Return whether the run loaded or called a model of its breakdown.

    A breakdown also lists a model the run set up but never called, because
    a crop step found nothing or the run failed before the model step.
    """
    return bool(model.get("calls") or model.get("cold"))


def model_load_failed(model: dict[str, Any]) -> bool:
    """Return whether a model of the breakdown failed its only load in the run.

    The runner counts a load in ``loads`` only once it succeeds, but marks the
    model cold as the load starts. Breakdowns older than ``loads`` lack it.
    """
    return bool(model.get("cold")) and model.get("loads") == 0


def untrained_models(models: list[dict[str, Any]]) -> tuple[str, ...]:
    """Return the ids of the breakdown models that are untrained architectures."""
    return tuple(
        model["model_id"] for model in models if model.get("pretrained") is False
    )


def _start_kind(
    cold: bool, models: list[dict[str, Any]], error_code: str | None
) -> str:
    if error_code == LOAD_FAILED_CODE:
        return LOAD_FAILED
    if cold:
        return "cold"
    return "hot" if any(model_used(model) for model in models) else NO_MODEL


def start_kind(run) -> str:
    """Return "cold", "hot", "no model" (NO_MODEL) or "load failed" for a run.

    Returns "" when the run ended before a runner timed it.
    """
    if run.total_us is None:
        return ""
    error_code = (run.error or {}).get("code")
    return _start_kind(run.cold, (run.breakdown or {}).get("models", []), error_code)


def run_components(bill: Bill) -> dict[str, int]:
    """Return every timing component of the bill's run, in µs.

    Request and queue come from the run's breakdown, because the bill stores
    only the runner components, the values the policy read.
    """
    breakdown = bill.run.breakdown or {}
    return {**breakdown.get("components", {}), **bill.components}


def bill_row(bill: Bill, columns: tuple[Column, ...] = COLUMNS) -> BillRow:
    components = run_components(bill)
    reason = "" if bill.billed else waive_reason(bill.formula)
    values = {
        "time": timezone.localtime(bill.created_at).strftime("%Y-%m-%d %H:%M:%S"),
        "workflow": workflow_name(bill),
        "run": str(bill.run_id),
        "start": start_kind(bill.run),
        **{name: format_us_as_ms(components.get(name)) for name in COMPONENTS},
        "billed_ms": str(bill.billed_ms),
        "amount": str(bill.amount_microcredits),
        "status": bill.run.status,
        "waive_reason": reason,
        "capped_at": str(bill.run.max_price_microcredits) if bill.capped else "",
    }
    return BillRow(
        bill=bill,
        cells=tuple((column, values[column.key]) for column in columns),
        untrained=untrained_models((bill.run.breakdown or {}).get("models", [])),
        waive_reason=reason,
    )


def bill_rows(
    bills: Iterable[Bill], columns: tuple[Column, ...] = COLUMNS
) -> Iterator[BillRow]:
    for bill in bills:
        yield bill_row(bill, columns)


# ---------------------------------------------------------------- chart data


def nearest_rank_percentile(sorted_values: list[int], percentile: int) -> int:
    """Return the nearest-rank percentile: the smallest value with at least
    ``percentile`` % of the values at or below it."""
    rank = max(1, math.ceil(percentile / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _day_labels(days: Iterable[datetime.date]) -> list[datetime.date]:
    """Return every day from the first to the last, so gaps show as zeros."""
    days = sorted(days)
    if not days:
        return []
    count = (days[-1] - days[0]).days + 1
    return [days[0] + datetime.timedelta(days=offset) for offset in range(count)]


@dataclass
class _DayTotals:
    runs: int = 0
    amount_microcredits: int = 0
    cold_load_us: int = 0
    model_steps_us: int = 0
    other_us: int = 0
    rounding_us: int = 0


def summarize(bills: QuerySet[Bill]) -> dict[str, Any]:
    """Aggregate the bills for the charts in one query.

    Billed time is split into cold load, model steps (preprocess, inference
    and postprocess), other runner time (billable time minus those two), and the
    time that minimum and rounding up to whole milliseconds added.  For each
    billed bill the four parts add up to ``billed_ms * 1000`` exactly.  Waived
    bills have ``billed_ms == 0`` and add nothing to the split.
    """
    # NOTE: this reads one small row per bill into Python. That is fine for
    # thousands of bills per filter (an estimate, not measured at scale), but
    # millions would need the sums and percentiles computed in SQL.
    records = (
        bills.order_by()
        .values_list(
            "created_at",
            "billed",
            "billed_ms",
            "billable_us",
            "amount_microcredits",
            "components",
            "run__cold",
            "run__status",
            "run__total_us",
            "run__breakdown__models",
            "run__error__code",
            "run__workflow_version__workflow_id",
            "run__workflow_version__workflow__name",
            "run__workflow_version__workflow__slug",
        )
        .iterator(chunk_size=2000)
    )

    per_day: dict[datetime.date, _DayTotals] = defaultdict(_DayTotals)
    starts = {
        kind: {"runs": 0, "amount_microcredits": 0}
        for kind in (*SUMMARY_START_KEYS.values(), "no_timing")
    }
    latencies: dict[Any, list[int]] = defaultdict(list)
    workflow_names: dict[Any, str] = {}
    totals = {
        "runs": 0,
        "amount_microcredits": 0,
        "billed_ms": 0,
        "billable_us": 0,
        "waived_runs": 0,
    }

    for (
        created_at,
        billed,
        billed_ms,
        billable_us,
        amount,
        components,
        cold,
        status,
        total_us,
        models,
        error_code,
        workflow_id,
        name,
        slug,
    ) in records:
        day = per_day[timezone.localtime(created_at).date()]
        day.runs += 1
        day.amount_microcredits += amount
        totals["runs"] += 1
        totals["amount_microcredits"] += amount
        totals["billed_ms"] += billed_ms

        if billed:
            # A waived bill keeps its run's time, but none of it is billed.
            totals["billable_us"] += billable_us
            cold_load = components.get("cold_load", 0)
            model_steps = sum(components.get(part, 0) for part in MODEL_STEP_COMPONENTS)
            day.cold_load_us += cold_load
            day.model_steps_us += model_steps
            day.other_us += billable_us - cold_load - model_steps
            day.rounding_us += billed_ms * 1000 - billable_us
        else:
            totals["waived_runs"] += 1

        if total_us is None:
            kind = "no_timing"
        else:
            kind = SUMMARY_START_KEYS[_start_kind(cold, models or [], error_code)]
        # A failed run's total stops where it failed, so it is no latency.
        if total_us is not None and status == Run.Status.SUCCEEDED:
            latencies[workflow_id].append(total_us)
            workflow_names[workflow_id] = workflow_label(name, slug)
        starts[kind]["runs"] += 1
        starts[kind]["amount_microcredits"] += amount

    labels = _day_labels(per_day)
    daily = [per_day.get(day, _DayTotals()) for day in labels]
    days = {
        "labels": [day.isoformat() for day in labels],
        "runs": [day.runs for day in daily],
        "amount_microcredits": [day.amount_microcredits for day in daily],
        "cold_load_us": [day.cold_load_us for day in daily],
        "model_steps_us": [day.model_steps_us for day in daily],
        "other_us": [day.other_us for day in daily],
        "rounding_us": [day.rounding_us for day in daily],
    }
    billed_time = {
        part: sum(days[part])
        for part in ("cold_load_us", "model_steps_us", "other_us", "rounding_us")
    }
    billed_time["total_us"] = sum(billed_time.values())

    latency = []
    for workflow_id, values in latencies.items():
        values.sort()
        entry = {"workflow": workflow_names[workflow_id], "runs": len(values)}
        for percentile in LATENCY_PERCENTILES:
            entry[f"p{percentile}_us"] = nearest_rank_percentile(values, percentile)
        latency.append(entry)
    latency.sort(key=lambda entry: (-entry["runs"], entry["workflow"]))

    return {
        "totals": totals,
        "days": days,
        "billed_time": billed_time,
        "latency": latency,
        "starts": starts,
    }
