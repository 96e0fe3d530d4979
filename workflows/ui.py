"""Browser pages for workflows: the list and the builder."""

from dataclasses import dataclass
from statistics import median

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import F, Max, Window
from django.db.models.functions import RowNumber
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import ensure_csrf_cookie

from runner.models import Run
from runner.views import model_listing
from webapp.handlers import allow_methods
from workflows.models import Workflow
from workflows.views import roboflow_url

# How many of a workflow's most recent runs the list page's sparkline shows.
SPARKLINE_RUNS = 20
SPARKLINE_WIDTH = 120
SPARKLINE_HEIGHT = 28
# Space kept free around the line so the end dots are not clipped.
SPARKLINE_PADDING = 3


@dataclass(frozen=True)
class Sparkline:
    """An inline SVG polyline of run times, oldest run on the left."""

    points: str
    last_x: float
    last_y: float
    failed: tuple[tuple[float, float], ...]
    summary: str
    width: int = SPARKLINE_WIDTH
    height: int = SPARKLINE_HEIGHT


@dataclass(frozen=True)
class WorkflowRow:
    workflow: Workflow
    latest_version: int | None
    last_run: dict | None
    sparkline: Sparkline | None
    # Shown under the name, because names need not be unique and the slug is.
    roboflow_url: str


def build_sparkline(runs: list[dict]) -> Sparkline | None:
    """Scale the runs' ``total_us`` into SVG coordinates.

    ``runs`` is newest first, as the list query returns them.  Runs without
    ``total_us`` (queued, running, or failed before timing) are skipped.  The
    y axis starts at zero, so the line's height is proportional to run time.
    """
    timed = [run for run in reversed(runs) if run["total_us"] is not None]
    if not timed:
        return None
    peak = max(run["total_us"] for run in timed) or 1
    inner_width = SPARKLINE_WIDTH - 2 * SPARKLINE_PADDING
    inner_height = SPARKLINE_HEIGHT - 2 * SPARKLINE_PADDING
    step = inner_width / (len(timed) - 1) if len(timed) > 1 else 0
    coordinates = []
    failed = []
    for index, run in enumerate(timed):
        x = SPARKLINE_PADDING + (index * step if len(timed) > 1 else inner_width)
        y = SPARKLINE_PADDING + inner_height * (1 - run["total_us"] / peak)
        coordinates.append((round(x, 1), round(y, 1)))
        if run["status"] == Run.Status.FAILED:
            failed.append(coordinates[-1])
    totals_ms = [run["total_us"] / 1000 for run in timed]
    if len(timed) == 1:
        summary = f"Last timed run: {totals_ms[0]:.1f} ms"
    else:
        summary = (
            f"Last {len(timed)} timed runs: min {min(totals_ms):.1f} ms, "
            f"median {median(totals_ms):.1f} ms, max {max(totals_ms):.1f} ms"
        )
    return Sparkline(
        points=" ".join(f"{x},{y}" for x, y in coordinates),
        last_x=coordinates[-1][0],
        last_y=coordinates[-1][1],
        failed=tuple(failed),
        summary=summary,
    )


def recent_runs_by_workflow(owner, limit: int) -> dict[int, list[dict]]:
    """Return up to ``limit`` runs per workflow of ``owner``, newest first.

    One query for all workflows: a window function numbers each workflow's
    runs and the outer query keeps the first ``limit``.
    """
    # NOTE: the database still reads every run of the owner's workflows to
    # number them, so this query slows down as the run history grows.
    workflow = F("workflow_version__workflow_id")
    runs = (
        Run.objects.filter(workflow_version__workflow__owner=owner)
        .annotate(
            workflow_pk=workflow,
            position=Window(
                RowNumber(), partition_by=[workflow], order_by=F("created_at").desc()
            ),
        )
        .filter(position__lte=limit)
        .order_by("workflow_pk", "position")
        .values("id", "workflow_pk", "status", "created_at", "total_us")
    )
    by_workflow: dict[int, list[dict]] = {}
    for run in runs:
        by_workflow.setdefault(run["workflow_pk"], []).append(run)
    return by_workflow


# never_cache: after a delete or a save, Back must not show the list as it was.
@login_required
@allow_methods("GET", "POST")
@never_cache
def workflow_list(request):
    """List the user's workflows; POST deletes one, then redirects.

    GET with ``?delete=<id>`` shows the list with a confirmation for
    deleting that workflow. Its button sends the POST that deletes it.
    """
    if request.method == "POST":
        if request.POST.get("action") != "delete":
            messages.error(request, "Unknown action: send “delete”.")
            return _list_page(request, {}, status=400)
        workflow, error = _own_workflow(request, request.POST.get("workflow", ""))
        if error:
            return error
        if workflow.mark_deleted():
            messages.success(
                request,
                f"Workflow “{workflow.name}” deleted. Its runs and bills are kept.",
            )
        return redirect("workflow-list")
    context = {}
    if "delete" in request.GET:
        workflow, error = _own_workflow(request, request.GET["delete"])
        if error:
            return error
        context["delete_workflow"] = workflow
        context["delete_run_count"] = Run.objects.filter(
            workflow_version__workflow=workflow
        ).count()
    return _list_page(request, context)


def _own_workflow(request, workflow_id: str):
    """Return the user's workflow with this id, or the list with a 400 or 404 error.

    Another user's workflow gets the same 404 as a missing one.
    """
    if not (workflow_id.isascii() and workflow_id.isdigit()):
        messages.error(
            request, f"Workflow id “{workflow_id}” is invalid: it must be a number."
        )
        return None, _list_page(request, {}, status=400)
    workflow = Workflow.objects.filter(pk=int(workflow_id), owner=request.user).first()
    if workflow is None:
        messages.error(request, f"Workflow {workflow_id} not found among yours.")
        return None, _list_page(request, {}, status=404)
    return workflow, None


def _list_page(request, context: dict, status: int = 200):
    workflows = Workflow.objects.filter(owner=request.user).annotate(
        latest=Max("versions__number")
    )
    runs = recent_runs_by_workflow(request.user, SPARKLINE_RUNS)
    rows = []
    for workflow in workflows:
        workflow_runs = runs.get(workflow.id, [])
        rows.append(
            WorkflowRow(
                workflow=workflow,
                latest_version=workflow.latest,
                last_run=workflow_runs[0] if workflow_runs else None,
                sparkline=build_sparkline(workflow_runs),
                roboflow_url=roboflow_url(request.user.username, workflow.slug),
            )
        )
    return render(
        request, "workflows/list.html", {"rows": rows, **context}, status=status
    )


# Untrained architectures the builder suggests besides the user's models.
SUGGESTED_ARCHITECTURES = ("yolov8n.yaml", "yolo11n.yaml")


def model_suggestions(user) -> list[dict[str, str]]:
    """List the model ids a model_id field suggests, each with where it comes from."""
    listing = model_listing(user)
    return [
        *(
            {"id": m["model_id"], "note": "model directory"}
            for m in listing["model_dir"]
        ),
        *({"id": u["model_id"], "note": "your upload"} for u in listing["uploads"]),
        *(
            {"id": name, "note": "untrained architecture, for timing"}
            for name in SUGGESTED_ARCHITECTURES
        ),
    ]


def _builder_page(request, workflow: Workflow | None):
    version = workflow.latest_version() if workflow else None
    config = {
        "workflow": None
        if workflow is None
        else {
            "id": workflow.id,
            "name": workflow.name,
            "version": version.number if version else None,
            "revision": workflow.revision,
            "definition": version.definition if version else None,
        },
        "models": model_suggestions(request.user),
    }
    return render(
        request,
        "workflows/builder.html",
        {"workflow": workflow, "version": version, "config": config},
    )


# The builder calls the JSON API with the session cookie, and Django's CSRF
# check needs the csrftoken cookie, which these pages do not set by themselves
# because they contain no form. never_cache makes Back load the page again:
# a stored copy would contain the version it was rendered with, and its next
# save would be rejected as a version conflict.
@login_required
@allow_methods("GET")
@ensure_csrf_cookie
@never_cache
def workflow_new(request):
    return _builder_page(request, None)


@login_required
@allow_methods("GET")
@ensure_csrf_cookie
@never_cache
def workflow_edit(request, workflow_id: int):
    workflow = get_object_or_404(Workflow, pk=workflow_id, owner=request.user)
    return _builder_page(request, workflow)
