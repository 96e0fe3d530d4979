"""Plain-text tables of a breakdown and a bill, for the command line."""

from typing import Any


def _ms(us: int) -> str:
    return f"{us / 1000:10.3f}"


def breakdown_table(breakdown: dict[str, Any]) -> str:
    components = breakdown["components"]
    lines = ["timing breakdown (ms)", "-" * 34]
    for name, value in components.items():
        lines.append(f"{name:<16}{_ms(value)}")
    lines.append("-" * 34)
    lines.append(f"{'total':<16}{_ms(breakdown['total'])}")
    lines.append(f"{'runner total':<16}{_ms(breakdown['runner_total'])}")
    for model in breakdown["models"]:
        load = model["cold_load"]
        state = "cold" if model["cold"] else "hot"
        label = "" if model["pretrained"] else " [untrained architecture]"
        lines.append(
            f"model {model['model_id']}{label}: {state}, {model['calls']} call(s) on "
            f"{model['device']}; cold load {load['total'] / 1000:.1f} ms (read "
            f"{load['read'] / 1000:.1f}, to device {load['to_device'] / 1000:.1f}, "
            f"warm-up {load['warmup'] / 1000:.1f})"
        )
    compile_state = "cache hit" if breakdown["compile_cache_hit"] else "compiled"
    lines.append(f"compile: {compile_state}; runner {breakdown.get('runner', '?')}")
    return "\n".join(lines)


def bill_lines(bill: dict[str, Any]) -> list[str]:
    credits = bill["amount_microcredits"] / 1_000_000
    state = "billed" if bill["billed"] else "not billed"
    if bill.get("capped"):
        state += ", lowered to the run's price cap"
    return [
        f"bill ({bill['policy']}, {state}): "
        f"{bill['amount_microcredits']} micro-credits "
        f"({credits:.6f} credits) for {bill['billed_ms']} ms",
        f"formula: {bill['formula']}",
    ]
