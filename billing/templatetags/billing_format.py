"""Template filters for the billing pages' units."""

from decimal import Decimal

from django import template

from billing.queries import format_us_as_ms

register = template.Library()


@register.filter
def ms(us: int | None) -> str:
    """Format microseconds as milliseconds with three decimals."""
    return format_us_as_ms(us)


@register.filter
def credits(microcredits: int) -> str:
    """Format micro-credits as credits with six decimals (1 credit = 10⁶ µcr)."""
    return f"{Decimal(microcredits) / Decimal(1_000_000):.6f}"
