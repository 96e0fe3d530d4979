"""Turn a run outcome into an HTTP response with timing headers."""

from rest_framework.response import Response

from runner.models import Run
from runner.presenters import run_to_dict, timing_headers
from runner.service import RunOutcome


def status_for(payload: dict) -> int:
    meta = payload["meta"]
    if meta["status"] == "succeeded":
        return 200
    error = meta.get("error") or {}
    return int(error.get("status", 500))


def public_error(error: dict) -> dict:
    """Return a failed run's error without its HTTP status, which the response has."""
    return {name: value for name, value in error.items() if name != "status"}


def pending_response(outcome: RunOutcome) -> Response:
    run = outcome.run
    # The run may have started, or even finished, since it was stored: a
    # synchronous request gets here after its wait.
    status = (
        Run.objects.filter(pk=run.pk).values_list("status", flat=True).first()
        or run.status
    )
    finished = status in (Run.Status.SUCCEEDED, Run.Status.FAILED)
    body = {
        "id": str(run.id),
        "status": status,
        "url": f"/api/runs/{run.id}",
        "message": (
            "The run has finished; GET its url for the result."
            if finished
            else "The run had not finished when this response was built; "
            "GET its url for the result."
        ),
    }
    return Response(
        body, status=202, headers={"Location": body["url"], "X-Run-Id": str(run.id)}
    )


def run_response(outcome: RunOutcome, started_ns: int) -> Response:
    """Our own API's body: the whole run, outputs included."""
    if outcome.payload is None:
        return pending_response(outcome)
    body = run_to_dict(outcome.run, payload=outcome.payload)
    error = outcome.payload["meta"].get("error")
    if error:
        # Every error body has message, code and context at the top level; a
        # failed run's body is the run, with its error's fields added there.
        body = {**public_error(error), **body}
    headers = timing_headers(outcome.payload["meta"], started_ns)
    return Response(body, status=status_for(outcome.payload), headers=headers)
