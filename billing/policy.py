"""The billing policy: how a run's timing breakdown becomes an amount.

Policy ``runner-time-v1``: the billable time is the runner total (compile,
cold load, model and block time, serialization and runner overhead; not the
queue, not the web server's own work), rounded up to whole milliseconds, with
a minimum.  The amount is that time multiplied by a rate per second, rounded
up to whole micro-credits.  Every bill stores its formula with the numbers
filled in; ``evaluate_formula`` recomputes the amount from that text alone.

A run may carry a price cap: its bill is then the policy's amount or the cap,
whichever is lower, and the platform absorbs the difference. A bill that the
cap lowered wraps the formula in ``min(..., cap)``, so the stored formula
still recomputes the stored amount.
"""

import ast
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from django.conf import settings

POLICY_NAME = "runner-time-v1"
# The largest price cap a run accepts, in micro-credits (a billion credits).
# It stays below 2**53, so a browser's JavaScript numbers carry it exactly.
MAX_PRICE_MICROCREDITS = 10**15
# Precedes the reason in a waived bill's formula; the run page reads it too.
WAIVE_MARKER = "# not billed:"


def rounded_ms(billable_us: int) -> int:
    """Return ``billable_us`` rounded up to whole milliseconds."""
    return -(-billable_us // 1000)


def amount_microcredits(billed_ms: int, rate_microcredits_per_second: int) -> int:
    """Return the price of ``billed_ms``, rounded up to whole micro-credits."""
    return -(-billed_ms * rate_microcredits_per_second // 1000)


@dataclass(frozen=True)
class BillLine:
    billed: bool
    components: dict[str, int]
    billable_us: int
    billed_ms: int
    rate_microcredits_per_second: int
    minimum_ms: int
    amount_microcredits: int
    policy: str
    formula: str
    # True when the run's price cap lowered the amount to the cap.
    capped: bool = False


@dataclass(frozen=True)
class BillingPolicy:
    rate_microcredits_per_second: int
    minimum_ms: int
    name: str = POLICY_NAME

    @classmethod
    def from_settings(cls) -> "BillingPolicy":
        return cls(
            rate_microcredits_per_second=settings.BILLING[
                "RATE_MICROCREDITS_PER_SECOND"
            ],
            minimum_ms=settings.BILLING["MINIMUM_MS"],
        )

    def billable_components(self, breakdown: dict[str, Any]) -> dict[str, int]:
        from workflows.timing import RUNNER_COMPONENTS

        return {name: breakdown["components"][name] for name in RUNNER_COMPONENTS}

    def bill(
        self, breakdown: dict[str, Any], max_price_microcredits: int | None = None
    ) -> BillLine:
        """Price a run from its breakdown, at most ``max_price_microcredits``.

        ``billed_ms`` stays the time the policy counted when the cap lowers
        the amount.
        """
        components = self.billable_components(breakdown)
        billable_us = breakdown["runner_total"]
        billed_ms = max(rounded_ms(billable_us), self.minimum_ms)
        amount = amount_microcredits(billed_ms, self.rate_microcredits_per_second)
        expression = (
            f"ceil(max(ceil({billable_us} / 1000), "
            f"{self.minimum_ms}) * {self.rate_microcredits_per_second} / 1000)"
        )
        capped = max_price_microcredits is not None and amount > max_price_microcredits
        if capped:
            amount = max_price_microcredits
            expression = f"min({expression}, {max_price_microcredits})"
        return BillLine(
            billed=True,
            components=components,
            billable_us=billable_us,
            billed_ms=billed_ms,
            rate_microcredits_per_second=self.rate_microcredits_per_second,
            minimum_ms=self.minimum_ms,
            amount_microcredits=amount,
            policy=self.name,
            formula=f"amount_microcredits = {expression}",
            capped=capped,
        )

    def waive(self, breakdown: dict[str, Any] | None, reason: str) -> BillLine:
        """Return a zero bill for an unbilled run, with the reason in its formula."""
        components = self.billable_components(breakdown) if breakdown else {}
        return BillLine(
            billed=False,
            components=components,
            billable_us=breakdown["runner_total"] if breakdown else 0,
            billed_ms=0,
            rate_microcredits_per_second=self.rate_microcredits_per_second,
            minimum_ms=self.minimum_ms,
            amount_microcredits=0,
            policy=f"{self.name} (waived)",
            formula=f"amount_microcredits = 0  {WAIVE_MARKER} {reason}",
        )


def waive_reason(formula: str) -> str:
    """Return the reason ``BillingPolicy.waive`` wrote into a waived bill's formula."""
    _, _, reason = formula.partition(WAIVE_MARKER)
    return reason.strip() or "the run failed because of the platform"


# Each function a formula may call, with its minimum and maximum number of
# arguments. min is the price cap of a capped bill.
_ALLOWED_CALLS = {
    "ceil": (math.ceil, 1, 1),
    "max": (max, 2, None),
    "min": (min, 2, None),
}


def evaluate_formula(formula: str) -> int:
    """Recompute the amount from a bill's formula text, with exact arithmetic.

    Raises ValueError for any text that is not a formula of the kind this
    policy writes. That includes text without ``=``, invalid syntax, any
    constant but a whole number, an unknown name or operator, and a call
    with the wrong number of arguments. It also includes a division by zero,
    nesting too deep to evaluate, and a result that is not a whole number
    of micro-credits, which the policy's rounding up never leaves.
    """
    _, equals, right_side = formula.partition("=")
    if not equals:
        raise ValueError(f"billing formula has no '=': {formula!r}")
    expression = right_side.split("#", 1)[0].strip()
    try:
        tree = ast.parse(expression, mode="eval")
        amount = _evaluate(tree.body)
    except SyntaxError as error:
        raise ValueError(
            f"billing formula is not a valid expression: {expression!r}"
        ) from error
    except RecursionError as error:
        raise ValueError("billing formula nests too deeply to evaluate") from error
    if amount.denominator != 1:
        raise ValueError(
            f"billing formula gives {amount}, not a whole number: {expression!r}"
        )
    return int(amount)


def _evaluate(node: ast.AST) -> Fraction:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int)
        and not isinstance(node.value, bool)
    ):
        return Fraction(node.value)
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        operations = {
            ast.Add: left + right,
            ast.Sub: left - right,
            ast.Mult: left * right,
        }
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise ValueError(
                    f"billing formula divides by zero: {ast.unparse(node)}"
                )
            return left / right
        if type(node.op) in operations:
            return operations[type(node.op)]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _ALLOWED_CALLS
        and not node.keywords
    ):
        function, min_arguments, max_arguments = _ALLOWED_CALLS[node.func.id]
        count = len(node.args)
        if count < min_arguments or (
            max_arguments is not None and count > max_arguments
        ):
            raise ValueError(
                f"billing formula calls {node.func.id} with {count} arguments: "
                f"{ast.unparse(node)}"
            )
        arguments = [_evaluate(argument) for argument in node.args]
        return Fraction(function(*arguments))
    raise ValueError(f"unsupported element in billing formula: {ast.dump(node)}")
