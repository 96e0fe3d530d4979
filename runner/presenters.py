"""Presentation of runs, breakdowns and bills in API bodies and headers."""

import json
import time
from pathlib import PurePath
from typing import Any

from billing.models import Bill
from runner.finish import bill_fields
from runner.models import Run


def seconds(us: int) -> str:
    """Format microseconds as seconds with six decimals, so sums stay exact."""
    return f"{us / 1_000_000:.6f}"


def timing_headers(meta: dict[str, Any], started_ns: int) -> dict[str, str]:
    """Timing headers for a finished run; every figure derives from one breakdown.

    The server total is the stored breakdown's total plus ``handoff``: the time
    from the runner finishing until this response was built.
    """
    headers = {"X-Run-Id": meta["run_id"]}
    breakdown = meta.get("breakdown")
    server_total_us = (time.perf_counter_ns() - started_ns) // 1000
    if not breakdown:
        headers["X-Processing-Time"] = seconds(server_total_us)
        return headers
    components = breakdown["components"]
    handoff = max(0, server_total_us - breakdown["total"])
    total = breakdown["total"] + handoff
    cold = [m for m in breakdown["models"] if m["cold"]]
    remote = (
        components["preprocess"] + components["inference"] + components["postprocess"]
    )
    headers.update(
        {
            "X-Processing-Time": seconds(total),
            "X-Remote-Processing-Time": seconds(remote),
            "X-Model-Cold-Start": "true" if cold else "false",
            "X-Model-Cold-Start-Count": str(len(cold)),
            "X-Model-Load-Time": seconds(sum(m["cold_load"]["total"] for m in cold)),
            "X-Model-Load-Details": json.dumps(
                [
                    {"m": m["model_id"], "t": float(seconds(m["cold_load"]["total"]))}
                    for m in cold
                ],
                separators=(",", ":"),
            ),
            "X-Runner": breakdown.get("runner", ""),
        }
    )
    if breakdown["models"]:
        headers["X-Model-Id"] = ",".join(m["model_id"] for m in breakdown["models"])
    untrained = [m["model_id"] for m in breakdown["models"] if not m["pretrained"]]
    if untrained:
        headers["X-Model-Untrained"] = ",".join(untrained)
    bill = meta.get("bill")
    if bill:
        headers["X-Billed-Time"] = f"{bill['billed_ms'] / 1000:.3f}"
        headers["X-Billed-Amount-Microcredits"] = str(bill["amount_microcredits"])
    entries = [*components.items(), ("handoff", handoff), ("total", total)]
    headers["Server-Timing"] = ", ".join(
        f"{name};dur={us / 1000:.3f}" for name, us in entries
    )
    return headers


def bill_to_dict(bill: Bill | None) -> dict[str, Any] | None:
    return None if bill is None else bill_fields(bill)


def run_to_dict(
    run: Run, *, payload: dict[str, Any] | None = None, include_outputs: bool = True
) -> dict[str, Any]:
    """Represent a run; a fresh payload from the runner overrides stored fields."""
    meta = payload["meta"] if payload else None
    status = meta["status"] if meta else run.status
    bill = (
        meta["bill"]
        if meta
        else bill_to_dict(getattr(run, "bill", None) if run.is_finished else None)
    )
    body: dict[str, Any] = {
        "id": str(run.id),
        "url": f"/api/runs/{run.id}",
        "status": status,
        "source": run.source,
        "priority": run.priority,
        "workflow": _workflow_ref(run),
        "created_at": run.created_at.isoformat() if run.created_at else None,
        "runner": meta.get("runner") if meta else run.runner_name,
        "queue": (meta.get("queue") if meta else None) or run.queue_name,
        "models": [public_model_ref(ref) for ref in run.model_refs],
        "timing": meta["breakdown"] if meta else run.breakdown,
        "bill": bill,
        "error": meta["error"] if meta else run.error,
        # The runner adds what it found while running to the request's.
        "warnings": meta.get("warnings", run.warnings) if meta else run.warnings,
        "max_price_microcredits": run.max_price_microcredits,
        "price_estimate": run.price_estimate,
    }
    if include_outputs:
        body["outputs"] = payload["outputs"] if payload else run.outputs
    return body


def public_model_ref(ref: dict[str, Any]) -> dict[str, Any]:
    """Return a run's model reference with its weights file by name, not path.

    The path and the cache key, which contains it, show the server's layout.
    """
    source = {name: value for name, value in ref["source"].items() if name != "path"}
    source["file"] = PurePath(ref["source"]["path"]).name
    public = {name: value for name, value in ref.items() if name != "cache_key"}
    public["source"] = source
    return public


def _workflow_ref(run: Run) -> dict[str, Any] | None:
    if run.workflow_version_id is None:
        return None
    version = run.workflow_version
    return {"id": version.workflow_id, "version": version.number}
