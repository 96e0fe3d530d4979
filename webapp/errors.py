"""One error body for every API route.

``{"message", "error_type", "code", "context", ...}``: the fields of
Roboflow's error body (its client reads ``message`` and
``inner_error_message``) plus a stable ``code`` and, where known, the
``step``, ``field`` and a ``hint``.
"""

import logging
from typing import Any

import redis
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from webapp.authentication import INVALID_KEY_HINT, InvalidApiKey
from webapp.redis import restart_embedded_redis_if_down
from workflows.errors import WorkflowError

logger = logging.getLogger(__name__)


def error_body(
    message: str,
    code: str,
    *,
    context: str = "request",
    error_type: str = "RequestError",
    **extra: Any,
) -> dict[str, Any]:
    body = {
        "message": message,
        "error_type": error_type,
        "code": code,
        "context": context,
    }
    body.update({key: value for key, value in extra.items() if value is not None})
    return body


def workflow_error_response(error: WorkflowError) -> Response:
    headers = getattr(error, "headers", None)
    return Response(error.to_dict(), status=error.status, headers=headers)


NOT_AUTHENTICATED_HINT = (
    "Send an API key as 'Authorization: Bearer <key>', as an api_key query "
    "parameter, or as the api_key field of a JSON body. The api_key field of "
    "a multipart form (a model upload) is not read."
)


def api_exception_handler(exc, context):
    if isinstance(exc, WorkflowError):
        return workflow_error_response(exc)
    if isinstance(exc, redis.ConnectionError):
        return _redis_unavailable(exc, context)
    # DRF's handler turns Django's own exceptions (get_object_or_404 raises
    # Http404) into a bare {"detail": ...} body, so convert them to DRF's
    # exceptions first and they get the error body below.
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    elif isinstance(exc, exceptions.ParseError):
        # Only the model upload's multipart parser raises it: the JSON
        # routes parse with StrictJSONParser, which raises MalformedRequest.
        return _multipart_parse_error(exc)
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        response.data = error_body(
            "Invalid request: " + _flatten(exc.detail),
            "invalid_request",
            error_type="ValidationError",
            fields=exc.detail,
        )
    elif isinstance(exc, exceptions.APIException):
        response.data = error_body(
            str(exc.detail),
            exc.get_codes() if isinstance(exc.get_codes(), str) else "error",
            error_type=_error_type(exc),
            hint=_authentication_hint(exc) or _method_hint(exc, context),
        )
    return response


def _method_hint(exc: exceptions.APIException, context) -> str | None:
    """Name the methods a route serves, for a request made with another one.

    A person who opens a POST route such as a workflow's Roboflow URL in a
    browser would otherwise learn only that GET is not allowed.
    """
    view = context.get("view")
    if not isinstance(exc, exceptions.MethodNotAllowed) or view is None:
        return None
    methods = [method for method in view.allowed_methods if method != "OPTIONS"]
    return f"This route serves {', '.join(methods)}." if methods else None


def _error_type(exc: exceptions.APIException) -> str:
    # An invalid key keeps the error_type that clients already read.
    if isinstance(exc, InvalidApiKey):
        return "AuthenticationFailed"
    return type(exc).__name__


def _authentication_hint(exc: exceptions.APIException) -> str | None:
    if isinstance(exc, exceptions.NotAuthenticated):
        return NOT_AUTHENTICATED_HINT
    if isinstance(exc, InvalidApiKey):
        return INVALID_KEY_HINT
    return None


# Django's multipart parser rejects a part whose headers are over 1,024
# bytes (MAX_TOTAL_HEADER_SIZE in django/http/multipartparser.py).
MULTIPART_HEADER_LIMIT_BYTES = 1024


def _multipart_parse_error(error: exceptions.ParseError) -> Response:
    detail = str(error.detail)
    hint = "Send multipart form data with a model_id field and a file part."
    if "header size exceeded" in detail:
        detail = (
            "the multipart body could not be parsed: the headers of one part "
            f"are over {MULTIPART_HEADER_LIMIT_BYTES} bytes, usually because "
            "of a long filename"
        )
        hint = "Send the file under a shorter filename."
    body = error_body(
        detail,
        "malformed_request",
        context="request_parsing",
        error_type="MalformedRequest",
        hint=hint,
    )
    return Response(body, status=status.HTTP_400_BAD_REQUEST)


def _redis_unavailable(error: redis.ConnectionError, context) -> Response:
    restarted = restart_embedded_redis_if_down()
    logger.error(
        "%s %s: Redis unreachable (%s)%s",
        context["request"].method,
        context["request"].path,
        error,
        "; embedded Redis started again" if restarted else "",
    )
    body = error_body(
        "the queue server (Redis) is unreachable",
        "redis_unavailable",
        error_type="ConnectionError",
        hint="Send the request again shortly. A run this request queued, if "
        "any, is listed at GET /api/runs/.",
    )
    return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE)


def _flatten(detail: Any, prefix: str = "") -> str:
    if isinstance(detail, dict):
        return "; ".join(
            _flatten(value, f"{prefix}{key}: ") for key, value in detail.items()
        )
    if isinstance(detail, list):
        return "; ".join(_flatten(item, prefix) for item in detail)
    return f"{prefix}{detail}"


def not_found(message: str) -> JsonResponse:
    return JsonResponse(
        error_body(message, "not_found", error_type="NotFound"),
        status=status.HTTP_404_NOT_FOUND,
    )


def json_error(message: str, code: str, status_code: int, **extra: Any) -> JsonResponse:
    return JsonResponse(error_body(message, code, **extra), status=status_code)


def get_owned(queryset, description: str, **lookup):
    """Return the one object of ``queryset`` matching ``lookup``, else raise NotFound.

    ``description`` names what was looked for, as "workflow 5". Someone
    else's object is not found either, with the same message.
    """
    try:
        return queryset.get(**lookup)
    except ObjectDoesNotExist:
        raise exceptions.NotFound(f"{description} not found among yours") from None
