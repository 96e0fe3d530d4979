"""Routes that answer Roboflow's ``inference-sdk`` client unchanged.

``POST /{workspace}/workflows/{workflow_id}`` runs a stored workflow (the
workspace is the owner's username and the id is the workflow's slug);
``POST /workflows/run`` runs an inline ``specification``.  The legacy
``/infer/workflows/...`` paths do the same.  Responses are
``{"outputs": [...]}`` with our timing headers.
"""

from django.conf import settings
from rest_framework.response import Response
from rest_framework.views import APIView

from runner import dispatch
from runner.models import Run
from runner.presenters import timing_headers
from runner.responses import public_error, status_for
from runner.service import RunOutcome, start_run
from webapp.errors import error_body, not_found
from webapp.requests import (
    MalformedRequest,
    json_object,
    lax_bool,
    string_list,
    version_number,
)
from workflows.errors import DefinitionError
from workflows.models import Workflow


def unsucceeded_response(outcome: RunOutcome, started_ns: int) -> Response | None:
    """Return the response to a run that has not succeeded, None for one that has.

    A run still going gets ``not_finished_response``; a failed run, its error
    with the status the error carries and the timing headers.
    """
    if outcome.payload is None:
        return not_finished_response(outcome)
    meta = outcome.payload["meta"]
    if meta["status"] == "succeeded":
        return None
    return Response(
        public_error(meta["error"]),
        status=status_for(outcome.payload),
        headers=timing_headers(meta, started_ns),
    )


def outputs_response(
    outcome: RunOutcome, profiling: bool, excluded: list[str], started_ns: int
) -> Response:
    unsucceeded = unsucceeded_response(outcome, started_ns)
    if unsucceeded is not None:
        return unsucceeded
    meta = outcome.payload["meta"]
    headers = timing_headers(meta, started_ns)
    outputs = outcome.payload["outputs"]
    if excluded:
        outputs = [
            {k: v for k, v in item.items() if k not in excluded} for item in outputs
        ]
    response_body = {"outputs": outputs}
    if profiling:
        response_body["profiler_trace"] = profiler_trace(meta["breakdown"])
    return Response(response_body, headers=headers)


def not_finished_response(outcome: RunOutcome) -> Response:
    """Respond 500 with the id of a run still going after ROBOFLOW_SYNC_TIMEOUT_S.

    Roboflow's client reads ``outputs`` from any 2xx body, so our own
    route's 202 made it raise KeyError. It sends a request again after a
    429, 503 or 504, which would start the run again, so the run's id goes
    out with a status it raises at once, as HTTPCallErrorError.
    """
    run_id = str(outcome.run.id)
    url = f"/api/runs/{run_id}"
    if dispatch.stopping.is_set():
        when = "when this web server began to stop"
    else:
        when = f"after {settings.GLASSBOX['ROBOFLOW_SYNC_TIMEOUT_S']:g} s"
    # It may have finished since the wait ended, as pending_response checks.
    if Run.objects.filter(pk=run_id, finished_at__isnull=False).exists():
        message = (
            f"run {run_id} finished just after the wait for it ended "
            f"{when}; GET {url} returns its outputs, breakdown and bill"
        )
    else:
        message = (
            f"run {run_id} had not finished {when}; it goes on, and "
            f"GET {url} returns its outputs, breakdown and bill once it ends"
        )
    body = error_body(
        message,
        "run_not_finished",
        context="workflow_execution",
        error_type="RunNotFinished",
        run_id=run_id,
        url=url,
        hint="Raise ROBOFLOW_SYNC_TIMEOUT_S on the server to wait longer, or "
        'start long runs with POST /api/workflows/<id>/runs and "async": true.',
    )
    return Response(body, status=500, headers={"Location": url, "X-Run-Id": run_id})


def profiler_trace(breakdown: dict) -> list[dict]:
    """Return the breakdown as Chrome trace events laid end to end, in microseconds."""
    events, cursor = [], 0
    for name, duration in breakdown["components"].items():
        events.append(
            {
                "name": name,
                "ph": "X",
                "ts": cursor,
                "dur": duration,
                "cat": "glassbox",
                "pid": 1,
                "tid": 1,
                "args": {},
            }
        )
        cursor += duration
    return events


def _run(request, definition: dict, workflow_version_id: int | None, body: dict):
    started_ns = request._request.started_ns
    # Checked before the run starts, so a bad value stores no run.
    excluded = string_list(body, "excluded_fields")
    profiling = lax_bool(body, "enable_profiling")
    outcome = start_run(
        owner_id=request.user.id,
        source="roboflow",
        definition=definition,
        raw_inputs=body.get("inputs"),
        started_ns=started_ns,
        wait_s=settings.GLASSBOX["ROBOFLOW_SYNC_TIMEOUT_S"],
        workflow_version_id=workflow_version_id,
        token_id=getattr(request.auth, "id", None),
    )
    return outputs_response(outcome, profiling, excluded, started_ns)


class StoredWorkflowRunView(APIView):
    def post(self, request, workspace: str, workflow_id: str):
        body = json_object(request)
        workflow = (
            Workflow.objects.filter(owner=request.user, slug=workflow_id)
            .select_related("owner")
            .first()
        )
        if workflow is None or workspace != request.user.username:
            return not_found(
                f"workflow '{workflow_id}' not found in workspace '{workspace}'"
            )
        versions = workflow.versions.all()
        wanted = version_number(body, "workflow_version_id")
        version = versions.filter(number=wanted).first() if wanted else versions.first()
        if version is None and wanted is None:
            return not_found(f"workflow '{workflow_id}' has no saved version yet")
        if version is None:
            return not_found(f"workflow '{workflow_id}' has no version {wanted}")
        response = _run(request, version.definition, version.id, body)
        # Roboflow's server names the workflow that ran, as it does here.
        response["X-Workflow-Id"] = workflow.slug
        return response


class InlineWorkflowRunView(APIView):
    def post(self, request):
        body = json_object(request)
        specification = body.get("specification")
        if not isinstance(specification, dict):
            raise MalformedRequest(
                "'specification' must be a workflow definition object",
                context="request_parsing",
                field_name="specification",
            )
        try:
            return _run(request, specification, None, body)
        except DefinitionError as error:
            raise error.with_root("specification") from error.__cause__


class InfoView(APIView):
    permission_classes: list = []

    def get(self, request):
        return Response(
            {"name": "glassbox", "version": "0.1.0", "uuid": "glassbox-server"}
        )
