"""REST API for runs, models and the runner fleet."""

import hashlib
import logging
import tempfile
import threading
import uuid
from pathlib import Path

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler
from django.db import IntegrityError, transaction
from django.db.models import OuterRef, Q, Subquery
from django.http import HttpResponse
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from runner import fleet
from runner.ended import ended_runners
from runner.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from runner.metrics import render_metrics
from runner.models import ModelUpload, Run
from runner.presenters import run_to_dict
from runner.registry import (
    SAFE_ID,
    describe_place,
    largest_image_size,
    model_dir,
    resolve_model,
    size_suffix,
    upload_source_path,
)
from runner.waiting import waiting_state
from runner.weights_check import (
    ActivationMemoryExceeded,
    WeightsRejected,
    check_weights,
)
from webapp.api_views import StrictQueryAPIView
from webapp.errors import get_owned
from webapp.requests import (
    MULTIPART_ALLOWANCE_BYTES,
    MalformedRequest,
    PayloadTooLarge,
    TooManyRequests,
    UnsupportedMediaType,
    reject_unknown_fields,
)
from workflows.errors import ModelNotFoundError, WorkflowError
from workflows.models import Workflow, WorkflowVersion

logger = logging.getLogger(__name__)

_weights_check_slot = threading.Lock()

RUN_STATUSES = {choice for choice, _ in Run.Status.choices}


# The run list's query parameters; api_key is where clients may put the key.
RUN_LIST_PARAMETERS = {"status", "workflow", "before", "limit", "offset", "api_key"}


class RunListView(APIView):
    def get(self, request):
        # A misspelled filter (?stauts=failed) would list every run.
        reject_unknown_fields(
            request.GET, RUN_LIST_PARAMETERS, "query parameters", "this route"
        )
        # The id breaks ties of created_at, so the order is total. Offsets
        # count from the newest run, so a run created between two pages
        # shifts the second by one; ``before`` pages by the last run seen.
        runs = (
            Run.objects.filter(owner=request.user)
            .select_related("workflow_version", "bill")
            .order_by("-created_at", "-pk")
        )
        status_filter = _query_value(request, "status")
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
            # Deleted workflows too: their runs stay listed.
            owned = Workflow.all_objects.filter(pk=workflow_id, owner=request.user)
            if not owned.exists():
                raise NotFound(
                    f"workflow {workflow_id} given as workflow not found among "
                    "your workflows; GET /api/workflows/ lists them"
                )
            runs = runs.filter(workflow_version__workflow_id=workflow_id)
        before = _before_run(request)
        if before is not None:
            runs = runs.filter(
                Q(created_at__lt=before.created_at)
                | Q(created_at=before.created_at, pk__lt=before.pk)
            )
        limit = min(_query_integer(request, "limit") or 50, MAX_RUNS_PER_PAGE)
        offset = _query_integer(request, "offset", minimum=0) or 0
        # One more than the page, to tell whether another page follows.
        page = list(runs[offset : offset + limit + 1])
        more = len(page) > limit
        page = page[:limit]
        return Response(
            {
                "results": [run_to_dict(run, include_outputs=False) for run in page],
                "next_offset": offset + limit if more else None,
                "next_before": str(page[-1].pk) if more else None,
            }
        )


MAX_RUNS_PER_PAGE = 500


def _before_run(request) -> Run | None:
    """Return the user's run named by the ``before`` query parameter, or None."""
    raw = _query_value(request, "before")
    if not raw:
        return None
    try:
        run_id = uuid.UUID(raw)
    except ValueError:
        raise MalformedRequest(
            f"before must be a run id, got {raw[:100]!r}",
            context="request_parsing",
            field_name="before",
        ) from None
    run = Run.objects.filter(pk=run_id, owner=request.user).only("created_at").first()
    if run is None:
        raise NotFound(f"run {run_id} given as before not found among your runs")
    return run


def _query_value(request, name: str) -> str:
    """Return query parameter ``name``, or "" if absent; raise if it is given twice."""
    values = request.GET.getlist(name)
    if len(values) > 1:
        raise MalformedRequest(
            f"{name} is given {len(values)} times; give it at most once",
            context="request_parsing",
            field_name=name,
        )
    return values[0] if values else ""


def _query_integer(request, name: str, minimum: int = 1) -> int | None:
    """Read an integer query parameter of at least ``minimum``, None if it is absent."""
    raw = _query_value(request, name)
    if not raw:
        return None
    # Database integer keys are at most 2**63 - 1: 18 digits always fit.
    if raw.isascii() and raw.isdigit() and len(raw) > 18:
        raise MalformedRequest(
            f"{name} must have at most 18 digits, got {len(raw)}",
            context="request_parsing",
            field_name=name,
        )
    if not (raw.isascii() and raw.isdigit()) or int(raw) < minimum:
        kind = (
            "a positive integer"
            if minimum == 1
            else f"an integer of at least {minimum}"
        )
        raise MalformedRequest(
            f"{name} must be {kind}, got {raw!r}",
            context="request_parsing",
            field_name=name,
        )
    return int(raw)


class RunDetailView(StrictQueryAPIView):
    def get(self, request, run_id):
        run = get_owned(
            Run.objects.select_related("workflow_version", "bill"),
            f"run {run_id}",
            pk=run_id,
            owner=request.user,
        )
        body = run_to_dict(run)
        if run.status == Run.Status.QUEUED:
            body["waiting"] = waiting_state(run)
        return Response(body)


UNFINISHED_STATUSES = (Run.Status.QUEUED, Run.Status.RUNNING)


class UploadInUse(WorkflowError):
    """An upload that unfinished runs still need."""

    code = "model_in_use"
    status = 409


def upload_to_dict(upload: ModelUpload) -> dict:
    return {
        "model_id": upload.model_id,
        "size_bytes": upload.size_bytes,
        "sha256": upload.sha256,
        "class_names": upload.class_names,
        "task": upload.task,
        "pretrained": upload.trained,
        "created_at": upload.created_at.isoformat(),
    }


def model_listing(owner) -> dict:
    """Return the model directory's files and the uploads of ``owner``.

    It is the body of ``GET /api/models/``, and the models page shows the same data.
    """
    files = sorted(path.stem for path in model_dir().glob("*.pt"))
    uploads = ModelUpload.objects.filter(owner=owner).order_by("model_id")
    naming = workflows_by_model_id(owner)
    return {
        "model_dir": [{"model_id": name, "pretrained": True} for name in files],
        "uploads": [
            {**upload_to_dict(upload), "workflows": naming.get(upload.model_id, [])}
            for upload in uploads
        ],
        "architectures": "any ultralytics model YAML, e.g. yolov8n.yaml "
        "(untrained: random weights, for timing only)",
    }


def workflows_by_model_id(owner) -> dict[str, list[dict]]:
    """Map each model id that ``owner``'s workflows name to those workflows.

    Reads the latest version of each workflow that is not deleted. An id with
    a size suffix (``my-model-640``) counts for the id without it too. Each
    workflow is a dict with ``id``, ``name`` and ``slug``.
    """
    latest = WorkflowVersion.objects.filter(workflow=OuterRef("workflow")).order_by(
        "-number"
    )
    versions = (
        WorkflowVersion.objects.filter(
            workflow__in=Workflow.objects.filter(owner=owner)
        )
        .filter(number=Subquery(latest.values("number")[:1]))
        .select_related("workflow")
        .order_by("workflow__name", "workflow__id")
    )
    naming: dict[str, list[dict]] = {}
    for version in versions:
        workflow = version.workflow
        shown = {"id": workflow.id, "name": workflow.name, "slug": workflow.slug}
        for model_id in named_model_ids(version.definition):
            naming.setdefault(model_id, []).append(shown)
    return naming


def named_model_ids(definition: dict) -> set[str]:
    """Return the model ids that a workflow definition names.

    An id is a step's ``model_id`` string, or the string default of the
    input that a ``$inputs.<name>`` selector there points to. An id with a
    size suffix adds the id without it.
    """
    defaults = {
        item.get("name"): item.get("default_value")
        for item in definition.get("inputs", [])
        if isinstance(item, dict)
    }
    found: set[str] = set()
    for value in _model_id_values(definition.get("steps", [])):
        if value.startswith("$inputs."):
            value = defaults.get(value.removeprefix("$inputs."))
            if not isinstance(value, str):
                continue
        found.add(value)
        suffix = size_suffix(value)
        if suffix is not None:
            found.add(suffix["name"])
    return found


def _model_id_values(node) -> list[str]:
    """Return every string under a ``model_id`` key in ``node``, at any depth."""
    if isinstance(node, list):
        return [value for item in node for value in _model_id_values(item)]
    if not isinstance(node, dict):
        return []
    values = []
    for key, value in node.items():
        if key == "model_id" and isinstance(value, str):
            values.append(value)
        else:
            values.extend(_model_id_values(value))
    return values


class ModelDetailView(StrictQueryAPIView):
    """One of the user's uploads: read it, or delete it and its file."""

    def get(self, request, model_id):
        return Response(upload_to_dict(self.get_upload(request, model_id)))

    def delete(self, request, model_id):
        """Delete the upload, unless a run waiting or running uses it (409).

        Finished runs keep their record of the weights they ran. No run
        resolves to the file any more, since a new upload under the id gets a
        new file, and runners that have it loaded unload it between jobs.
        """
        with transaction.atomic():
            # Accepting a run that uses the upload locks this row too
            # (dispatch._lock_uploads), so a run being accepted now is
            # either seen below or finds the upload gone.
            upload = self.get_upload(request, model_id, lock=True)
            stored = upload_source_path(upload.path)
            busy = [
                str(run.pk)
                for run in Run.objects.select_for_update()
                .filter(owner=request.user, status__in=UNFINISHED_STATUSES)
                .only("model_refs")
                if any(
                    ref["source"]["kind"] == "upload"
                    and ref["source"]["path"] == stored
                    for ref in run.model_refs
                )
            ]
            if busy:
                raise UploadInUse(
                    f"model '{model_id}' is used by {len(busy)} run(s) that have "
                    f"not finished: {', '.join(busy[:5])}",
                    context="model_upload",
                    field_name="model_id",
                    hint="Delete it once those runs have finished.",
                )
            # Its file goes once the deletion commits (runner.models).
            upload.delete()
        logger.info("upload %r of user %s deleted", model_id, request.user.id)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def get_upload(self, request, model_id, lock: bool = False) -> ModelUpload:
        if not SAFE_ID.fullmatch(model_id):
            # No upload has such an id, and PostgreSQL rejects a query with a
            # NUL character, which the path may carry as %00.
            raise NotFound(f"model upload {model_id!r} not found among yours")
        return get_owned(
            ModelUpload.objects.select_for_update() if lock else ModelUpload.objects,
            f"model upload '{model_id}'",
            owner=request.user,
            model_id=model_id,
        )


class ModelListView(StrictQueryAPIView):
    parser_classes = [MultiPartParser]

    def initial(self, request, *args, **kwargs):
        if request.method == "POST":
            # Before authentication, because SessionAuthentication's CSRF
            # check reads request.POST, which parses the whole body.
            _check_upload_length(request)
            self.file_parts = _FilePartRecorder()
            request.upload_handlers.insert(0, self.file_parts)
        super().initial(request, *args, **kwargs)

    def get(self, request):
        return Response(model_listing(request.user))

    def post(self, request):
        """Upload weights as ``file`` under ``model_id``; they must load in ultralytics.

        The file is loaded in a child process (``runner.weights_check``) with
        ultralytics' restricted unpickler, so a file that names any other
        callable is rejected before it runs.
        """
        _check_upload_media_type(request)
        reject_unknown_fields(request.data, UPLOAD_FIELDS)
        for name in ("model_id", "file"):
            if len(request.data.getlist(name)) > 1:
                raise MalformedRequest(
                    f"'{name}' is sent more than once; send one",
                    context="request_parsing",
                    field_name=name,
                )
        model_id = request.data.get("model_id", "")
        upload = request.FILES.get("file")
        if "model_id" in request.FILES:
            raise MalformedRequest(
                "model_id is sent as a file part; send it as a text form field",
                context="request_parsing",
                field_name="model_id",
            )
        if upload is None and "file" in request.data:
            raise MalformedRequest(
                "'file' is sent as a text form field; send the weights as a file "
                "part, with a filename",
                context="request_parsing",
                field_name="file",
            )
        if not model_id:
            raise MalformedRequest(
                "model_id is missing: send it as a form field next to the file",
                context="request_parsing",
                field_name="model_id",
            )
        if (
            not SAFE_ID.fullmatch(model_id)
            or ".." in model_id
            # URL parsers drop "." segments, so DELETE /api/models/a/./b
            # would reach the upload "a/b".
            or any(segment in ("", ".") for segment in model_id.split("/"))
        ):
            length = f"; got {len(model_id)} characters" if len(model_id) > 200 else ""
            raise MalformedRequest(
                "model_id must be 1 to 200 characters, start with a letter or "
                "digit and contain only letters, digits, '.', '_', '-' and '/', "
                f"with no empty, '.' or '..' segment{length}",
                context="request_parsing",
                field_name="model_id",
            )
        if model_id.lower().endswith((".yaml", ".yml")) or size_suffix(model_id):
            raise MalformedRequest(
                f"model_id '{model_id}' would read as an architecture name or a "
                "size suffix (a name ending in '-' and a number of 32 or more)",
                context="request_parsing",
                field_name="model_id",
                hint="Pick an id that ends in neither; a size suffix can still be "
                "added to it in a workflow.",
            )
        shadowed = _shared_model(model_id)
        if shadowed is not None:
            raise MalformedRequest(
                f"model_id '{model_id}' already names {shadowed}, which your "
                "upload would hide from your workflows",
                context="request_parsing",
                field_name="model_id",
                hint="Pick another id for your weights.",
            )
        if upload is None and "file" in self.file_parts.started:
            raise MalformedRequest(
                "the 'file' part has no end: the multipart body stops before "
                "the boundary that closes it, so the upload was cut short",
                context="request_parsing",
                field_name="file",
                hint="Send the whole file; clients write the closing boundary "
                "after the last part.",
            )
        if upload is None:
            raise MalformedRequest(
                "a weights file is required in the 'file' field",
                context="request_parsing",
                field_name="file",
            )
        _check_file_size(upload)
        if ModelUpload.objects.filter(owner=request.user, model_id=model_id).exists():
            raise MalformedRequest(
                f"you already have a model '{model_id}'",
                context="request_parsing",
                field_name="model_id",
                hint=DUPLICATE_UPLOAD_HINT,
            )
        # A check takes up to WEIGHTS_CHECK_MEMORY_MB and CHILD_TIMEOUT_S in
        # its child process, so each web server process runs one at a time.
        if not _weights_check_slot.acquire(blocking=False):
            raise TooManyRequests(
                "another weights file is being checked on this server process",
                context="model_upload",
                hint="Send the upload again in a few seconds.",
            )
        stored = None
        try:
            stored = _store_upload(request.user.id, upload)
            checked = check_weights(
                stored,
                upload.name,
                settings.GLASSBOX["WEIGHTS_CHECK_MEMORY_MB"],
                settings.GLASSBOX["MODEL_ACTIVATION_MEMORY_MB"],
                largest_image_size(),
            )
        except Exception as error:
            # Nothing is kept of an upload that was not accepted.
            if stored is not None:
                stored.unlink(missing_ok=True)
            if not isinstance(error, WeightsRejected):
                raise
            logger.info(
                "upload %r by user %s rejected: %s", model_id, request.user.id, error
            )
            if isinstance(error, ActivationMemoryExceeded):
                raise MalformedRequest(
                    f"'{upload.name}' needs too much memory to run: {error}",
                    context="model_upload",
                    field_name="file",
                    hint=ACTIVATION_HINT,
                ) from None
            raise MalformedRequest(
                f"'{upload.name}' is not an ultralytics model: {error}",
                context="model_upload",
                field_name="file",
                hint="Upload a .pt file saved by ultralytics (YOLOv8 or later).",
            ) from None
        finally:
            _weights_check_slot.release()
        logger.info(
            "upload %r by user %s: a prediction at %d px raised the check "
            "process's peak memory by %d MiB",
            model_id,
            request.user.id,
            checked.image_size,
            checked.activation_mb,
        )
        try:
            with transaction.atomic():
                record = ModelUpload.objects.create(
                    owner=request.user,
                    model_id=model_id,
                    path=str(stored),
                    size_bytes=stored.stat().st_size,
                    sha256=_sha256(stored),
                    task=checked.task,
                    class_names=checked.names,
                    trained=checked.trained,
                )
        except IntegrityError:
            # Another upload with this id won the race since the check above.
            stored.unlink(missing_ok=True)
            raise MalformedRequest(
                f"you already have a model '{model_id}'",
                context="request_parsing",
                field_name="model_id",
                hint=DUPLICATE_UPLOAD_HINT,
            ) from None
        return Response(upload_to_dict(record), status=status.HTTP_201_CREATED)


def _store_upload(owner_id: int, upload) -> Path:
    directory = Path(settings.GLASSBOX["UPLOAD_DIR"]) / str(owner_id)
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(suffix=".pt", dir=directory)
    with open(handle, "wb") as out:
        for chunk in upload.chunks():
            out.write(chunk)
    return Path(name)


def _shared_model(model_id: str) -> str | None:
    """Describe the shared model ``model_id`` resolves to without uploads, or None.

    Uploads come first when an id resolves, so an upload under such an id
    would silently replace that model in every workflow of its owner.
    """
    try:
        source = resolve_model(model_id, owner_id=None)
    except ModelNotFoundError:
        return None
    return f"a file in {describe_place(source.kind)}"


ACTIVATION_HINT = (
    "Upload a detector that keeps ultralytics' strides, whose feature maps are "
    "8 to 32 times smaller than the image, or ask the server's operator to "
    "raise MODEL_ACTIVATION_MEMORY_MB if runners have memory to spare."
)
DUPLICATE_UPLOAD_HINT = (
    "Choose another model_id, or delete the existing model first "
    "(DELETE /api/models/<model_id>, or Delete on the Models page) to "
    "replace it."
)
# The form fields an upload reads; api_key is where clients may put the key.
UPLOAD_FIELDS = {"model_id", "file", "api_key"}
UPLOAD_TOO_LARGE_HINT = (
    "Upload a smaller weights file, or raise MAX_UPLOAD_BYTES on the server."
)


class _FilePartRecorder(FileUploadHandler):
    """Record the field names of the file parts that a multipart body starts.

    Django's parser completes a file part only at the next boundary, so it
    drops a last part whose body stops before the closing boundary without
    an error. The recorder passes the data on to the next handler.
    """

    def __init__(self, request=None):
        super().__init__(request)
        self.started: list[str] = []

    def new_file(self, field_name, *args, **kwargs):
        self.started.append(field_name)

    def receive_data_chunk(self, raw_data, start):
        return raw_data

    def file_complete(self, file_size):
        return None


def _check_upload_media_type(request) -> None:
    """Raise UnsupportedMediaType for an upload not sent as multipart form data.

    DRF rejects such a body only when it has bytes to parse, and gives an
    empty one an empty dict, which has no ``getlist``.
    """
    if request.content_type.startswith("multipart/form-data"):
        return
    sent = f"'{request.content_type[:80]}'" if request.content_type else "none"
    raise UnsupportedMediaType(
        f"a model upload is sent as multipart form data; this request's "
        f"Content-Type is {sent}",
        context="request_parsing",
        hint="Send model_id and the weights file as form parts, as "
        "'curl -F model_id=ID -F file=@weights.pt' does.",
    )


def _check_upload_length(request) -> None:
    """Raise PayloadTooLarge before a body too large for MAX_UPLOAD_BYTES is read.

    Django's request size limit does not apply to the files of a multipart body.
    """
    limit = settings.GLASSBOX["MAX_UPLOAD_BYTES"]
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit + MULTIPART_ALLOWANCE_BYTES:
        raise PayloadTooLarge(
            f"the upload is {length} bytes, over the limit of {limit} bytes "
            f"for the file and {MULTIPART_ALLOWANCE_BYTES} for the form around it",
            context="model_upload",
            hint=UPLOAD_TOO_LARGE_HINT,
        )


def _check_file_size(upload) -> None:
    """Raise PayloadTooLarge for a file over MAX_UPLOAD_BYTES itself."""
    limit = settings.GLASSBOX["MAX_UPLOAD_BYTES"]
    if upload.size > limit:
        raise PayloadTooLarge(
            f"the file is {upload.size} bytes, over the limit of {limit} bytes",
            context="model_upload",
            hint=UPLOAD_TOO_LARGE_HINT,
        )


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class MetricsView(APIView):
    """Prometheus metrics; staff only, like the fleet, whose runners they name."""

    permission_classes = [IsAdminUser]

    def get(self, request):
        return HttpResponse(render_metrics(), content_type=METRICS_CONTENT_TYPE)


class FleetView(StrictQueryAPIView):
    """Every runner's state; staff only, since it names other users' models."""

    permission_classes = [IsAdminUser]

    def get(self, request):
        ended = [
            {
                **entry,
                "ended_at": entry["ended_at"].isoformat(),
                "last_heartbeat_at": entry["last_heartbeat_at"]
                and entry["last_heartbeat_at"].isoformat(),
            }
            for entry in ended_runners()
        ]
        return Response(
            {
                "runners": [state.data for state in fleet.live_runners()],
                "ended": ended,
            }
        )
