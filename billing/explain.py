"""Data for the "explain this charge" page: one bill, step by step.

Every number comes from the stored bill (its components, billable time, rate
and minimum), not from the current settings, so an old bill is explained by
the policy that priced it.
"""

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from billing.models import Bill
from billing.policy import (
    POLICY_NAME,
    BillingPolicy,
    BillLine,
    amount_microcredits,
    evaluate_formula,
    rounded_ms,
    waive_reason,
)
from billing.queries import (
    COMPONENT_LABELS,
    LOAD_FAILED,
    format_us_as_ms,
    model_load_failed,
    model_used,
    run_components,
    start_kind,
    workflow_name,
)
from workflows.timing import COMPONENTS, RUNNER_COMPONENTS


@dataclass(frozen=True)
class ComponentShare:
    key: str
    label: str
    us: int
    ms: str
    # Share of the run's total time, in percent.
    percent: float
    billable: bool


@dataclass(frozen=True)
class FormulaStep:
    title: str
    expression: str
    result: str


@dataclass(frozen=True)
class HotComparison:
    """The same run priced without its cold load, by the bill's own policy."""

    cold_load_us: int
    line: BillLine
    # Stored billed time minus the hot billed time.
    billed_ms_difference: int
    # Stored amount minus the hot amount, in micro-credits.
    difference_microcredits: int
    # The same difference had the run no price cap. It is larger than
    # difference_microcredits when the cap lowered the bill more than it
    # would have lowered the hot price, so the platform absorbed the rest.
    uncapped_difference_microcredits: int


@dataclass(frozen=True)
class Explanation:
    bill: Bill
    workflow: str
    start: str
    components: list[ComponentShare]
    total_us: int
    models: list[dict[str, Any]]
    steps: list[FormulaStep]
    # None when the stored formula text cannot be evaluated.
    recomputed_microcredits: int | None
    hot: HotComparison | None
    waived_reason: str


def explain_bill(bill: Bill) -> Explanation:
    components = run_components(bill)
    breakdown = bill.run.breakdown or {}
    known_policy = bill.policy == POLICY_NAME
    return Explanation(
        bill=bill,
        workflow=workflow_name(bill),
        start=start_kind(bill.run),
        components=component_shares(components),
        total_us=sum(components.get(name, 0) for name in COMPONENTS),
        models=model_rows(breakdown.get("models", [])),
        steps=formula_steps(bill) if known_policy and bill.billed else [],
        recomputed_microcredits=_recompute(bill.formula),
        hot=hot_comparison(bill) if known_policy and bill.billed else None,
        waived_reason=_waived_reason(bill),
    )


def model_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the breakdown's models with their start and untrained mark.

    ``start`` is "cold", "hot", "load failed", or "not called" for a model
    the run set up but never called.
    """
    rows = []
    for model in models:
        if not model_used(model):
            start = "not called"
        elif model_load_failed(model):
            start = LOAD_FAILED
        else:
            start = "cold" if model.get("cold") else "hot"
        untrained = model.get("pretrained") is False
        rows.append({**model, "start": start, "untrained": untrained})
    return rows


def component_shares(components: dict[str, int]) -> list[ComponentShare]:
    total = sum(components.get(name, 0) for name in COMPONENTS)
    return [
        ComponentShare(
            key=name,
            label=COMPONENT_LABELS[name],
            us=components[name],
            ms=format_us_as_ms(components[name]),
            # Unrounded: the page rounds it once, to what it shows.
            percent=100 * components[name] / total if total else 0.0,
            billable=name in RUNNER_COMPONENTS,
        )
        for name in COMPONENTS
        if name in components
    ]


def formula_steps(bill: Bill) -> list[FormulaStep]:
    """Return the steps of policy ``runner-time-v1`` with the bill's numbers."""
    billable_us = bill.billable_us
    parts = [f"{bill.components.get(name, 0)}" for name in RUNNER_COMPONENTS]
    rounded = rounded_ms(billable_us)
    billed_ms = max(rounded, bill.minimum_ms)
    rate = bill.rate_microcredits_per_second
    exact_amount = Decimal(billed_ms * rate) / Decimal(1000)
    amount = amount_microcredits(billed_ms, rate)
    steps = [
        FormulaStep(
            "Billable time is the runner total: "
            + " + ".join(COMPONENT_LABELS[name].lower() for name in RUNNER_COMPONENTS),
            " + ".join(parts),
            f"{billable_us} µs",
        ),
        FormulaStep(
            "Round up to whole milliseconds",
            f"ceil({billable_us} / 1000)",
            f"{rounded} ms",
        ),
        FormulaStep(
            f"Apply the minimum of {bill.minimum_ms} ms",
            f"max({rounded}, {bill.minimum_ms})",
            f"{billed_ms} ms",
        ),
        FormulaStep(
            f"Multiply by the rate of {rate} µcr per second",
            f"{billed_ms} × {rate} / 1000",
            f"{exact_amount.normalize():f} µcr",
        ),
        FormulaStep(
            "Round up to whole micro-credits",
            f"ceil({exact_amount.normalize():f})",
            f"{amount} µcr",
        ),
    ]
    if bill.capped:
        cap = bill.run.max_price_microcredits
        steps.append(
            FormulaStep(
                f"Apply the run's price cap of {cap} µcr; the platform absorbs "
                f"the other {amount - bill.amount_microcredits} µcr",
                f"min({amount}, {cap})",
                f"{bill.amount_microcredits} µcr",
            )
        )
    return steps


def hot_comparison(bill: Bill) -> HotComparison:
    """Price the run as if it had been hot: runner total minus the cold load.

    The run's price cap applies to the hot price as it did to the bill.
    """
    cold_load_us = bill.components.get("cold_load", 0)
    policy = BillingPolicy(
        rate_microcredits_per_second=bill.rate_microcredits_per_second,
        minimum_ms=bill.minimum_ms,
    )
    hot_breakdown = {
        "components": {
            **dict.fromkeys(RUNNER_COMPONENTS, 0),
            **bill.components,
            "cold_load": 0,
        },
        "runner_total": bill.billable_us - cold_load_us,
    }
    line = policy.bill(hot_breakdown, bill.run.max_price_microcredits)
    return HotComparison(
        cold_load_us=cold_load_us,
        line=line,
        billed_ms_difference=bill.billed_ms - line.billed_ms,
        difference_microcredits=bill.amount_microcredits - line.amount_microcredits,
        uncapped_difference_microcredits=(
            amount_microcredits(bill.billed_ms, bill.rate_microcredits_per_second)
            - amount_microcredits(line.billed_ms, bill.rate_microcredits_per_second)
        ),
    )


def _recompute(formula: str) -> int | None:
    try:
        return evaluate_formula(formula)
    except ValueError:
        return None


def _waived_reason(bill: Bill) -> str:
    return "" if bill.billed else waive_reason(bill.formula)
