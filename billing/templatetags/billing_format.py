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


# Soft hyphens (U+00AD) in the history table's longest header words. A
# header may then break inside them, which keeps those columns as narrow as
# their numbers.
HYPHENATED_WORDS = {
    "Preprocess": "Pre\u00adprocess",
    "Postprocess": "Post\u00adprocess",
    "Serialization": "Serial\u00adization",
}


@register.filter
def hyphenate(header: str) -> str:
    """Put soft hyphens into the long words of a table header."""
    for word, hyphenated in HYPHENATED_WORDS.items():
        header = header.replace(word, hyphenated)
    return header
