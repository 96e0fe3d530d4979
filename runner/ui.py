"""Browser pages for running a workflow, watching a run and managing models."""

import importlib.util
import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import ensure_csrf_cookie

from billing.policy import MAX_PRICE_MICROCREDITS
from runner.models import Run
from runner.views import model_listing
from webapp.handlers import allow_methods
from workflows.compiler.parse import IMAGE_INPUT_TYPES
from workflows.models import Workflow

SAMPLE_IMAGES = ("bus.jpg", "zidane.jpg")


def _page_settings() -> dict:
    return {
        "websocket_port": settings.GLASSBOX["WEBSOCKET_PORT"],
        # The page checks image sizes against the body limit before sending.
        "max_request_bytes": settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
        # The page checks the price cap field against the API's range.
        "max_price_microcredits": MAX_PRICE_MICROCREDITS,
    }


def parameter_field_text(parameter: dict[str, Any]) -> str:
    """Return the text of a parameter's field on the run page.

    The page's script sends ``JSON.parse(text)``, or the text itself when that
    fails, so the default is written as JSON. A string default is written
    bare unless it would parse as JSON (``"42"``, ``"true"``), because bare
    strings are easier to read and edit. A parameter without a default gets
    an empty field.
    """
    if "default_value" not in parameter:
        return ""
    value = parameter["default_value"]
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, ensure_ascii=False)


# never_cache: the form runs the version it was rendered with, so Back after
# a save in the builder must load the page again to run the new version.
@login_required
@allow_methods("GET")
@never_cache
def run_workflow_page(request, workflow_id: int):
    workflow = get_object_or_404(Workflow, pk=workflow_id, owner=request.user)
    version = workflow.latest_version()
    inputs = version.definition.get("inputs", []) if version else []
    image_inputs = [i["name"] for i in inputs if i.get("type") in IMAGE_INPUT_TYPES]
    parameters = [
        {
            "name": i["name"],
            "field_text": parameter_field_text(i),
            "has_default": i.get("default_value") is not None,
        }
        for i in inputs
        if i.get("type") in ("WorkflowParameter", "InferenceParameter")
    ]
    return render(
        request,
        "runner/run.html",
        {
            "workflow": workflow,
            "version": version,
            "image_inputs": image_inputs,
            "parameters": parameters,
            "samples": SAMPLE_IMAGES,
            "run": None,
            **_page_settings(),
        },
    )


@login_required
@allow_methods("GET")
def run_page(request, run_id):
    run = get_object_or_404(
        Run.objects.select_related("workflow_version__workflow"),
        pk=run_id,
        owner=request.user,
    )
    workflow = run.workflow_version.workflow if run.workflow_version_id else None
    return render(
        request,
        "runner/run.html",
        {
            "workflow": workflow,
            "version": run.workflow_version,
            "run": run,
            "image_inputs": [],
            "parameters": [],
            "samples": (),
            **_page_settings(),
        },
    )


@login_required
@allow_methods("GET")
def sample_image(request, name: str):
    if name not in SAMPLE_IMAGES:
        raise Http404(f"no sample image named {name}")
    # ultralytics ships these photos; find them without importing it (and torch).
    assets = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets"
    return FileResponse(open(assets / name, "rb"), content_type="image/jpeg")


# The page uploads and deletes through the JSON API with the session cookie,
# whose CSRF check reads the csrftoken cookie. never_cache stops browsers from
# reusing a stored copy of the page, whose list may predate a change.
@login_required
@allow_methods("GET")
@ensure_csrf_cookie
@never_cache
def models_page(request):
    """List the user's models, with a form that uploads weights through the API."""
    return render(
        request,
        "runner/models.html",
        {
            "listing": model_listing(request.user),
            "max_upload_text": f"{settings.GLASSBOX['MAX_UPLOAD_BYTES'] / 2**20:g} MiB",
        },
    )
