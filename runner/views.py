"""REST API for runs, models and the runner fleet."""

import hashlib
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.shortcuts import get_object_or_404
from rest_framework import status
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from runner import fleet
from runner.models import ModelUpload, Run
from runner.presenters import run_to_dict
from runner.registry import SAFE_ID, model_dir
from webapp.requests import MalformedRequest

RUN_STATUSES = {choice for choice, _ in Run.Status.choices}


class RunListView(APIView):
    def get(self, request):
        runs = Run.objects.filter(owner=request.user).select_related(
            "workflow_version", "bill"
        )
        status_filter = request.GET.get("status")
        if status_filter:
            if status_filter not in RUN_STATUSES:
                raise MalformedRequest(
                    f"status must be one of {', '.join(sorted(RUN_STATUSES))}",
                    context="request_parsing",
                    field_name="status",
                )
            runs = runs.filter(status=status_filter)
        workflow_id = _query_integer(request, "workflow")
        if workflow_id is not None:
            runs = runs.filter(workflow_version__workflow_id=workflow_id)
        limit = min(_query_integer(request, "limit") or 50, 500)
        return Response(
            {
                "results": [
                    run_to_dict(run, include_outputs=False) for run in runs[:limit]
                ]
            }
        )


def _query_integer(request, name: str) -> int | None:
    """Read a positive integer query parameter; None when it is missing or empty."""
    raw = request.GET.get(name, "")
    if not raw:
        return None
    # Database integer keys are at most 2**63 - 1: 18 digits always fit.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < 1:
        raise MalformedRequest(
            f"{name} must be a positive integer, got {raw!r}",
            context="request_parsing",
            field_name=name,
        )
    return int(raw)


class RunDetailView(APIView):
    def get(self, request, run_id):
        run = get_object_or_404(
            Run.objects.select_related("workflow_version", "bill"),
            pk=run_id,
            owner=request.user,
        )
        return Response(run_to_dict(run))


class ModelListView(APIView):
    parser_classes = [MultiPartParser]

    def get(self, request):
        files = sorted(p.stem for p in model_dir().glob("*.pt"))
        uploads = ModelUpload.objects.filter(owner=request.user)
        return Response(
            {
                "model_dir": [{"model_id": name, "pretrained": True} for name in files],
                "uploads": [
                    {
                        "model_id": u.model_id,
                        "size_bytes": u.size_bytes,
                        "class_names": u.class_names,
                        "task": u.task,
                    }
                    for u in uploads
                ],
                "architectures": "any ultralytics model YAML, e.g. yolov8n.yaml "
                "(untrained: random weights, for timing only)",
            }
        )

    def post(self, request):
        """Upload weights as ``file`` under ``model_id``; they must load in ultralytics.

        Loading unpickles only ultralytics' layer classes (``open_weights``), so
        a file that names any other callable is rejected before it runs.
        """
        model_id = request.data.get("model_id", "")
        upload = request.FILES.get("file")
        if not SAFE_ID.fullmatch(model_id or "") or ".." in model_id:
            raise MalformedRequest(
                "model_id must start with a letter or digit and contain only letters, "
                "digits, '.', '_', '-' and '/'",
                context="request_parsing",
                field_name="model_id",
            )
        if upload is None:
            raise MalformedRequest(
                "a weights file is required in the 'file' field",
                context="request_parsing",
                field_name="file",
            )
        if ModelUpload.objects.filter(owner=request.user, model_id=model_id).exists():
            raise MalformedRequest(
                f"you already have a model '{model_id}'",
                context="request_parsing",
                field_name="model_id",
            )
        stored = _store_upload(request.user.id, upload)
        try:
            names, task = _check_weights(stored)
        except Exception as error:
            stored.unlink(missing_ok=True)
            # ultralytics names the file it read: the stored copy, whose path
            # is the server's business.
            reason = str(error).replace(str(stored), upload.name)
            reason = reason.removeprefix("ERROR ❌️ ").strip()
            raise MalformedRequest(
                f"'{upload.name}' is not an ultralytics model: {type(error).__name__}: "
                f"{reason}",
                context="model_upload",
                field_name="file",
                hint="Upload a .pt file saved by ultralytics (YOLOv8 or later).",
            ) from None
        try:
            with transaction.atomic():
                record = ModelUpload.objects.create(
                    owner=request.user,
                    model_id=model_id,
                    path=str(stored),
                    size_bytes=stored.stat().st_size,
                    sha256=_sha256(stored),
                    task=task,
                    class_names=names,
                )
        except IntegrityError:
            # Another upload with this id won the race since the check above.
            stored.unlink(missing_ok=True)
            raise MalformedRequest(
                f"you already have a model '{model_id}'",
                context="request_parsing",
                field_name="model_id",
            ) from None
        return Response(
            {
                "model_id": record.model_id,
                "task": task,
                "class_names": names,
                "size_bytes": record.size_bytes,
            },
            status=status.HTTP_201_CREATED,
        )


def _store_upload(owner_id: int, upload) -> Path:
    directory = Path(settings.GLASSBOX["UPLOAD_DIR"]) / str(owner_id)
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(suffix=".pt", dir=directory)
    with open(handle, "wb") as out:
        for chunk in upload.chunks():
            out.write(chunk)
    return Path(name)


def _check_weights(path: Path) -> tuple[list[str], str]:
    # Imported here: it imports torch, which the web server otherwise never needs.
    from runner.model_cache import open_weights

    model = open_weights(str(path))
    if model.task != "detect":
        raise ValueError(f"the model's task is '{model.task}', only 'detect' runs here")
    return [model.names[i] for i in sorted(model.names)], model.task


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class FleetView(APIView):
    """Every runner's state; staff only, since it names other users' models."""

    permission_classes = [IsAdminUser]

    def get(self, request):
        return Response({"runners": [state.data for state in fleet.live_runners()]})
