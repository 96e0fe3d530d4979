"""REST API for workflow definitions and for running them."""

import unicodedata
from urllib.parse import quote

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max
from django.urls import Resolver404, resolve
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response

from runner.estimate import estimate_run
from runner.models import Run
from runner.registry import resolve_model
from runner.responses import run_response
from runner.service import start_run
from webapp.api_views import StrictQueryAPIView
from webapp.errors import get_owned
from webapp.requests import (
    MalformedRequest,
    json_object,
    optional_bool,
    price_cap,
    reject_unknown_fields,
    version_number,
)
from workflows.blocks import BLOCKS
from workflows.blocks.base import shown
from workflows.compiler import plan_cache
from workflows.errors import (
    BlockError,
    DefinitionError,
    ModelNotFoundError,
    WorkflowError,
)
from workflows.inputs import (
    batch_size_of,
    input_mapping,
    read_parameters,
    reject_undeclared_inputs,
)
from workflows.models import Workflow, WorkflowVersion


class StrictCharField(serializers.CharField):
    """A CharField that rejects numbers and booleans instead of converting them."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


# Bidirectional-text controls, which can make a name read as another.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e") | {
    chr(code) for code in range(0x2066, 0x206A)
}


# Characters that Unicode counts as letters or symbols but that fonts draw
# as blank space: the Hangul fillers and the blank Braille pattern.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def reject_control_characters(value: str) -> None:
    """Raise ValidationError for a name with control or bidi-control characters,
    or with nothing visible.

    A name is one line of text shown in lists, pages and the CSV export:
    a newline, tab or escape in it would only garble those, a bidi override
    would make it read as another name, and a name of zero-width characters
    would show as a blank.
    """
    for position, character in enumerate(value):
        category = unicodedata.category(character)
        if category in ("Cc", "Zl", "Zp") or character in _BIDI_CONTROLS:
            raise serializers.ValidationError(
                f"may not contain control characters: U+{ord(character):04X} "
                f"at position {position}"
            )
    if all(
        unicodedata.category(c) in ("Cf", "Zs") or c in _BLANK_LETTERS for c in value
    ):
        raise serializers.ValidationError(
            "has no visible character, only spaces and characters drawn as "
            "blank, such as U+200B; give it a name that can be read"
        )


class WorkflowWriteSerializer(serializers.Serializer):
    name = StrictCharField(
        max_length=200, required=False, validators=[reject_control_characters]
    )
    description = StrictCharField(max_length=10_000, required=False, allow_blank=True)
    definition = serializers.JSONField(required=False)


# URL name of Roboflow's route for a stored workflow.
STORED_ROUTE_NAME = "roboflow-stored-workflow-run"


def roboflow_url(workspace: str, slug: str) -> str:
    """Return the Roboflow-compatible route that runs this stored workflow.

    ``/<workspace>/workflows/<slug>`` is the route Roboflow's client calls,
    but a user named like one of this site's own prefixes (``api``,
    ``admin``) cannot reach it there, so those get the ``/infer/`` form.
    """
    try:
        match = resolve(f"/{workspace}/workflows/{slug}")
    except Resolver404:
        match = None
    if match is None or match.url_name != STORED_ROUTE_NAME:
        return f"/infer/workflows/{quote(workspace)}/{slug}"
    return f"/{quote(workspace)}/workflows/{slug}"


def workflow_to_dict(
    workflow: Workflow,
    version: WorkflowVersion | None = None,
    include_definition: bool = True,
) -> dict:
    version = version or workflow.latest_version()
    body = {
        "id": workflow.id,
        "name": workflow.name,
        "slug": workflow.slug,
        "description": workflow.description,
        "version": version.number if version else None,
        "revision": workflow.revision,
        "created_at": workflow.created_at.isoformat(),
        "updated_at": workflow.updated_at.isoformat(),
        "run_url": f"/api/workflows/{workflow.id}/runs",
        "roboflow_url": roboflow_url(workflow.owner.username, workflow.slug),
    }
    if include_definition and version:
        body["definition"] = version.definition
    return body


def compile_or_raise(definition, owner_id: int) -> list[str]:
    """Compile ``definition`` and return its warnings, the models' included.

    Raises what compiling raises, and InvalidModelIdError for a model id
    written in a step that no model can have.
    """
    plan = plan_cache.compile(definition).plan
    try:
        return list(plan.warnings) + model_warnings(plan, owner_id)
    except ModelNotFoundError as error:
        body = invalid_model_id_body(plan, error)
        raise InvalidModelIdError(body, error.status) from error


class InvalidModelIdError(Exception):
    """A definition names a model id in a step that no upload or file can have."""

    def __init__(self, body: dict, status: int) -> None:
        super().__init__(body["message"])
        self.body = body
        self.status = status


class VersionConflict(WorkflowError):
    """A save based on a version that is no longer the workflow's latest."""

    code = "version_conflict"
    status = 409


# The fields a workflow create or update reads; api_key is where clients may
# put the key.
CREATE_FIELDS = {"name", "description", "definition", "api_key"}
UPDATE_FIELDS = CREATE_FIELDS | {"base_version", "base_revision"}
# The fields that runs, estimates and validation read. Others are rejected:
# a misspelled "version" or "async" would run the latest version, or wait.
RUN_FIELDS = {
    "inputs",
    "version",
    "async",
    "source",
    "api_key",
    "max_price_microcredits",
    "priority",
}
ESTIMATE_FIELDS = {"inputs", "version", "api_key", "priority"}
INLINE_ESTIMATE_FIELDS = {"specification", "inputs", "api_key", "priority"}
VALIDATE_FIELDS = {"definition", "api_key"}


class WorkflowListView(StrictQueryAPIView):
    def get(self, request):
        workflows = (
            Workflow.objects.filter(owner=request.user)
            .select_related("owner")
            .annotate(latest=Max("versions__number"), run_count=Count("versions__runs"))
        )
        return Response(
            {
                "results": [
                    {
                        **workflow_to_dict(w, include_definition=False),
                        "version": w.latest,
                        "run_count": w.run_count,
                    }
                    for w in workflows
                ]
            }
        )

    def post(self, request):
        body = json_object(request)
        reject_unknown_fields(body, CREATE_FIELDS)
        serializer = WorkflowWriteSerializer(data=body)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if "definition" not in data or "name" not in data:
            raise MalformedRequest(
                "'name' and 'definition' are required", context="request_parsing"
            )
        try:
            warnings = compile_or_raise(data["definition"], request.user.id)
        except InvalidModelIdError as error:
            return Response(error.body, status=error.status)
        workflow = Workflow.create_with_version(
            request.user, data["name"], data["definition"]
        )
        if data.get("description"):
            workflow.description = data["description"]
            workflow.save(update_fields=["description"])
        return Response(
            {**workflow_to_dict(workflow), "warnings": warnings},
            status=status.HTTP_201_CREATED,
        )


class WorkflowDetailView(StrictQueryAPIView):
    def get_workflow(self, request, workflow_id) -> Workflow:
        return get_owned(
            Workflow.objects.select_related("owner"),
            f"workflow {workflow_id}",
            pk=workflow_id,
            owner=request.user,
        )

    def get(self, request, workflow_id):
        return Response(workflow_to_dict(self.get_workflow(request, workflow_id)))

    def put(self, request, workflow_id):
        """Rename, describe, or save a new version when the definition changes.

        With ``base_version``, the number of the version the client edited,
        nothing is saved unless that is still the latest version (409).
        ``base_revision`` does the same for the workflow's revision, which
        every saved change moves on, renames included.
        """
        workflow = self.get_workflow(request, workflow_id)
        body = json_object(request)
        reject_unknown_fields(body, UPDATE_FIELDS)
        serializer = WorkflowWriteSerializer(data=body)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        base_version = version_number(body, "base_version")
        base_revision = version_number(body, "base_revision")
        if not data:
            raise MalformedRequest(
                "nothing to update: send name, description or definition",
                context="request_parsing",
            )
        warnings: list[str] = []
        version = None
        if "definition" in data:
            try:
                warnings = compile_or_raise(data["definition"], request.user.id)
            except InvalidModelIdError as error:
                return Response(error.body, status=error.status)
        changed = [field for field in ("name", "description") if field in data]
        # Concurrent edits of one workflow wait for each other here, and each
        # reads the latest version and writes only the fields it changes, so
        # none undoes another's, and the same definition twice adds one version.
        with transaction.atomic():
            # Deleted since it was read: the same 404 as a missing workflow.
            workflow = get_owned(
                Workflow.objects.select_for_update(),
                f"workflow {workflow_id}",
                pk=workflow.pk,
            )
            latest = workflow.latest_version()
            latest_number = latest.number if latest else None
            if base_version is not None and base_version != latest_number:
                raise VersionConflict(
                    f"workflow {workflow.id} is at version {latest_number}, not at "
                    f"base_version {base_version}; nothing was saved",
                    context="workflow_save",
                    field_name="base_version",
                    hint="Read the latest version, apply your changes to it, and "
                    "save again with its number as base_version.",
                )
            if base_revision is not None and base_revision != workflow.revision:
                raise VersionConflict(
                    f"workflow {workflow.id} is at revision {workflow.revision}, "
                    f"not at base_revision {base_revision}: it was renamed, "
                    "described or saved since; nothing was saved",
                    context="workflow_save",
                    field_name="base_revision",
                    hint="Read the workflow again, apply your changes to it, and "
                    "save with its revision as base_revision.",
                )
            if "definition" in data:
                if latest is None or latest.definition != data["definition"]:
                    version = workflow.add_version(data["definition"])
            changed = [f for f in changed if getattr(workflow, f) != data[f]]
            for field in changed:
                setattr(workflow, field, data[field])
            # A save of what is already stored changes nothing, its time included.
            # A new version has moved the revision on already.
            if changed and version is None:
                workflow.revision += 1
            if changed or version is not None:
                workflow.save(update_fields=[*changed, "revision", "updated_at"])
        # The version this request stored, not the latest: a concurrent
        # request may have stored another since.
        body = workflow_to_dict(workflow, version)
        return Response({**body, "warnings": warnings})

    patch = put

    def delete(self, request, workflow_id):
        """Delete the workflow: it disappears, its runs and bills stay (204).

        Runs already queued still run the version they were sent with.
        """
        workflow = self.get_workflow(request, workflow_id)
        if not workflow.mark_deleted():
            raise exceptions.NotFound(f"workflow {workflow_id} not found among yours")
        return Response(status=204)


class WorkflowVersionsView(StrictQueryAPIView):
    def get(self, request, workflow_id):
        workflow = get_owned(
            Workflow.objects,
            f"workflow {workflow_id}",
            pk=workflow_id,
            owner=request.user,
        )
        return Response(
            {
                "results": [
                    {
                        "version": v.number,
                        "digest": v.digest,
                        "created_at": v.created_at.isoformat(),
                        "definition": v.definition,
                    }
                    for v in workflow.versions.all()
                ]
            }
        )


class WorkflowRunView(StrictQueryAPIView):
    """POST inputs to run the latest (or a given) version.

    Waits up to SYNC_TIMEOUT_S for the result, then answers 202 with the run's
    URL; ``"async": true`` answers 202 at once.
    """

    def post(self, request, workflow_id):
        workflow = get_owned(
            Workflow.objects,
            f"workflow {workflow_id}",
            pk=workflow_id,
            owner=request.user,
        )
        body = json_object(request)
        reject_unknown_fields(body, RUN_FIELDS)
        version = requested_version(workflow, body)
        run_async = optional_bool(body, "async")
        # The browser's run page labels its runs; the command line does not
        # come through HTTP.
        source = body.get("source", "api")
        if source not in ("api", "ui"):
            raise MalformedRequest(
                f"'source' must be \"ui\" or left out, got {shown(source)}",
                context="request_parsing",
                field_name="source",
            )
        max_price = price_cap(body)
        priority = run_priority(body)
        wait_s = 0.0 if run_async else settings.GLASSBOX["SYNC_TIMEOUT_S"]
        outcome = start_run(
            owner_id=request.user.id,
            source=source,
            definition=version.definition,
            raw_inputs=body.get("inputs"),
            started_ns=request._request.started_ns,
            wait_s=wait_s,
            workflow_version_id=version.id,
            token_id=getattr(request.auth, "id", None),
            strict_inputs=True,
            max_price_microcredits=max_price,
            priority=priority,
        )
        return run_response(outcome, request._request.started_ns)


def run_priority(body: dict) -> str:
    """Read the optional ``priority`` field; a missing or null value is standard."""
    value = body.get("priority")
    if value is None:
        return Run.Priority.STANDARD
    if value not in Run.Priority.values:
        allowed = " or ".join(f'"{choice}"' for choice in Run.Priority.values)
        raise MalformedRequest(
            f"'priority' must be {allowed}, got {shown(value)}",
            context="request_parsing",
            field_name="priority",
            hint='Leave it out for "standard", or send "economy" to wait for a '
            "runner that holds the models instead of loading them cold.",
        )
    return value


def requested_version(workflow: Workflow, body: dict) -> WorkflowVersion:
    """Return the version ``body["version"]`` names, else the latest."""
    number = version_number(body, "version")
    versions = workflow.versions.all()
    version = (
        versions.filter(number=number).first()
        if number is not None
        else versions.first()
    )
    if version is None and number is None:
        raise exceptions.NotFound(
            f"workflow {workflow.id} has no saved version yet. Save a definition "
            f"first with PUT /api/workflows/{workflow.id}"
        )
    if version is None:
        raise exceptions.NotFound(f"workflow {workflow.id} has no version {number}")
    return version


def estimate_definition(definition, body: dict, owner_id: int) -> dict:
    """Compile, read the parameters of ``body["inputs"]``, and predict a run."""
    plan = plan_cache.compile(definition).plan
    raw = input_mapping(body.get("inputs"))
    reject_undeclared_inputs(plan, raw)
    parameters = read_parameters(plan, raw)
    batch_size = batch_size_of(plan, raw, settings.GLASSBOX["MAX_RUN_IMAGES"])
    priority = run_priority(body)
    return estimate_run(plan, parameters, owner_id, batch_size, priority)


class WorkflowEstimateView(StrictQueryAPIView):
    """Predict a run of the latest (or a given) version without running it.

    ``inputs`` gives the parameters, and the batch size through the length of
    image lists; images may be left out, and are not decoded.
    """

    def post(self, request, workflow_id):
        workflow = get_owned(
            Workflow.objects,
            f"workflow {workflow_id}",
            pk=workflow_id,
            owner=request.user,
        )
        body = json_object(request)
        reject_unknown_fields(body, ESTIMATE_FIELDS)
        version = requested_version(workflow, body)
        return Response(estimate_definition(version.definition, body, request.user.id))


class EstimateView(StrictQueryAPIView):
    """Predict a run of an inline ``specification`` without running it."""

    def post(self, request):
        body = json_object(request)
        reject_unknown_fields(body, INLINE_ESTIMATE_FIELDS)
        if "specification" not in body:
            raise MalformedRequest(
                "'specification' is required",
                context="request_parsing",
                field_name="specification",
                hint="Send the workflow definition as 'specification'.",
            )
        try:
            estimate = estimate_definition(body["specification"], body, request.user.id)
        except DefinitionError as error:
            raise error.with_root("specification") from error.__cause__
        return Response(estimate)


class ValidateView(StrictQueryAPIView):
    """Compile a definition and report its problems, without storing anything."""

    def post(self, request):
        body = json_object(request)
        reject_unknown_fields(body, VALIDATE_FIELDS)
        if "definition" not in body:
            raise MalformedRequest(
                "'definition' is required",
                context="request_parsing",
                field_name="definition",
                hint="Send the workflow definition as 'definition'.",
            )
        try:
            warnings = compile_or_raise(body["definition"], request.user.id)
        except InvalidModelIdError as error:
            return Response(error.body, status=error.status)
        return Response({"valid": True, "warnings": warnings})


def invalid_model_id_body(plan, error: ModelNotFoundError) -> dict:
    """Return the error body of a run that fails on ``error``, with blocks_errors.

    The editor lists a definition's problems from blocks_errors, so the
    invalid id shows at its step there as a compile error would.
    """
    block_type = next(step.block.type for step in plan.steps if step.name == error.step)
    problem = BlockError(error.step, block_type, "model_id", error.message)
    return {**error.to_dict(), "blocks_errors": [problem.to_dict()]}


def model_warnings(plan, owner_id: int) -> list[str]:
    """Warn about model ids that resolve to nothing now or to random weights.

    Weights can be added after a workflow is saved, so a missing model is a
    warning and not an error. An untrained architecture (``yolov8n.yaml``)
    runs, but its detections are meaningless, so the builder warns before
    the first run does. An id that comes from a parameter is checked as its
    default; a run can send another.

    Raises ModelNotFoundError, the error a run returns, for an invalid id
    written in a step, because every run would fail with it.
    """
    warnings = []
    defaults = {spec.name: spec.default for spec in plan.parameter_inputs}
    # Without parameter values, only the ids written in steps are not None.
    written = set(plan.model_ids({}))
    for step, model_id in plan.model_ids(defaults):
        if model_id is None:
            continue
        try:
            source = resolve_model(model_id, owner_id, step=step)
        except ModelNotFoundError as error:
            if error.invalid_id and (step, model_id) in written:
                raise
            if error.invalid_id:
                ending = (
                    "It is a parameter's default, so runs fail unless they send "
                    "a valid model id."
                )
            else:
                ending = "Runs fail until it resolves."
            warnings.append(f"step '{step}': {error.message}. {ending}")
            continue
        if not source.pretrained:
            warnings.append(
                f"step '{step}': model '{model_id}' is an untrained architecture "
                "(random weights): timings are real, detections are meaningless."
            )
    return warnings


class BlocksView(StrictQueryAPIView):
    def get(self, request):
        return Response({"blocks": [block.manifest() for block in BLOCKS]})
