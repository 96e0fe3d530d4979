"""Roboflow's single-model routes, so ``InferenceHTTPClient.infer`` works unchanged.

Before ``infer(image, model_id=...)``, the client reads ``GET /model/registry``
and, for a model not listed there, calls ``POST /model/add``; it then sends
the image to ``POST /infer/object_detection``. Here the registry lists the
models that can be enumerated (the model directory and the caller's
uploads), and adding a model checks that its id resolves, without loading
it: the first run loads it, and reports that as a cold load.

An inference request runs a one-step detection workflow through the same
runner pool as every other run, so it gets a stored run, a timing breakdown,
a bill and the same timing headers. The request's options are the
workflow's parameters under their own names, so a bad value is reported
against the request field that carries it.
"""

from typing import Any

from django.conf import settings
from rest_framework.response import Response
from rest_framework.views import APIView

from runner.presenters import timing_headers
from runner.registry import resolve_model
from runner.service import RunOutcome, start_run
from runner.views import model_listing
from webapp.requests import MalformedRequest, json_object
from webapp.roboflow import unsucceeded_response

TASK_TYPE = "object-detection"

# Options of Roboflow's object-detection request that a detection step takes,
# with the step's defaults (which are Roboflow's). class_filter's null keeps
# every class.
DETECTION_OPTIONS: dict[str, Any] = {
    "confidence": 0.4,
    "iou_threshold": 0.3,
    "max_detections": 300,
    "class_filter": None,
    "class_agnostic_nms": False,
}

# The request fields an inference cannot do without, with how to send each.
REQUIRED_FIELDS = {
    "image": 'Send "image": {"type": "base64", "value": "<base64 image>"}, '
    "or a list of those.",
    "model_id": "Name a model: GET /model/registry lists the model directory "
    "and your uploads.",
}

DETECTION_STEP = "detection"

DETECTION_WORKFLOW: dict[str, Any] = {
    "version": "1.0",
    "inputs": [
        {"type": "WorkflowImage", "name": "image"},
        {"type": "WorkflowParameter", "name": "model_id"},
        *(
            {"type": "WorkflowParameter", "name": name, "default_value": default}
            for name, default in DETECTION_OPTIONS.items()
        ),
    ],
    "steps": [
        {
            "type": "roboflow_core/roboflow_object_detection_model@v1",
            "name": DETECTION_STEP,
            "images": "$inputs.image",
            "model_id": "$inputs.model_id",
            **{name: f"$inputs.{name}" for name in DETECTION_OPTIONS},
        }
    ],
    "outputs": [
        {
            "type": "JsonField",
            "name": "predictions",
            "selector": f"$steps.{DETECTION_STEP}.predictions",
        },
        {
            "type": "JsonField",
            "name": "inference_id",
            "selector": f"$steps.{DETECTION_STEP}.inference_id",
        },
    ],
}


def model_description(model_id: str, image_size: int) -> dict[str, Any]:
    """Describe a model as Roboflow's registry does, input ``image_size`` square."""
    return {
        "model_id": model_id,
        "task_type": TASK_TYPE,
        "batch_size": "batch",
        "input_height": image_size,
        "input_width": image_size,
    }


def registered_models(owner) -> list[dict[str, Any]]:
    """Describe the models in the model directory and ``owner``'s uploads."""
    size = settings.GLASSBOX["WARMUP_IMAGE_SIZE"]
    listing = model_listing(owner)
    names = {model["model_id"] for model in listing["model_dir"]}
    names |= {upload["model_id"] for upload in listing["uploads"]}
    return [model_description(name, size) for name in sorted(names)]


class ModelRegistryView(APIView):
    def get(self, request):
        return Response({"models": registered_models(request.user)})


class ModelAddView(APIView):
    """Check that a model id resolves, and return the registry with it listed."""

    def post(self, request):
        body = json_object(request)
        model_id = body.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            raise MalformedRequest(
                "'model_id' must be a non-empty string naming a model",
                context="request_parsing",
                field_name="model_id",
                hint="GET /model/registry lists the model directory and your "
                "uploads; ultralytics architectures such as yolov8n.yaml work too.",
            )
        # Raises ModelNotFoundError, naming where it looked, for an unknown id.
        source = resolve_model(model_id, request.user.id)
        models = registered_models(request.user)
        if all(model["model_id"] != model_id for model in models):
            models.append(model_description(model_id, source.image_size))
        return Response({"models": models})


class ObjectDetectionView(APIView):
    """Run one detection model on one image, or on each image of a list."""

    def post(self, request):
        started_ns = request._request.started_ns
        body = json_object(request)

        # The workflow's own messages would point at "inputs.image" and at
        # a parameter without a default.
        for name, hint in REQUIRED_FIELDS.items():
            if body.get(name) is None:
                raise MalformedRequest(
                    f"'{name}' is missing",
                    context="request_parsing",
                    field_name=name,
                    hint=hint,
                )

        # Roboflow's request has more options (preprocessing switches,
        # visualization, active learning), which this server ignores.
        raw_inputs = {
            name: body[name]
            for name in ("image", "model_id", *DETECTION_OPTIONS)
            if body.get(name) is not None
        }
        outcome = start_run(
            owner_id=request.user.id,
            source="roboflow",
            definition=DETECTION_WORKFLOW,
            raw_inputs=raw_inputs,
            started_ns=started_ns,
            wait_s=settings.GLASSBOX["ROBOFLOW_SYNC_TIMEOUT_S"],
            token_id=getattr(request.auth, "id", None),
        )

        # One response for one image and a list for a list, as Roboflow's
        # server returns them.
        single = not isinstance(body.get("image"), list)
        return detection_response(outcome, single, started_ns)


def detection_response(outcome: RunOutcome, single: bool, started_ns: int) -> Response:
    unsucceeded = unsucceeded_response(outcome, started_ns)
    if unsucceeded is not None:
        return unsucceeded
    headers = timing_headers(outcome.payload["meta"], started_ns)

    model_seconds = float(headers["X-Remote-Processing-Time"])
    answers = [
        {
            "inference_id": item["inference_id"],
            "time": model_seconds,
            "image": item["predictions"]["image"],
            "predictions": item["predictions"]["predictions"],
        }
        for item in outcome.payload["outputs"]
    ]
    return Response(answers[0] if single else answers, headers=headers)
