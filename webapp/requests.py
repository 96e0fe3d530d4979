"""Reading request bodies once, with errors in the API's shape."""

import json
from typing import Any

from workflows.errors import WorkflowError


class MalformedRequest(WorkflowError):
    code = "malformed_request"


def json_body(request) -> Any:
    """Parse the JSON body once per request (authentication may have done it)."""
    django_request = getattr(request, "_request", request)
    cached = getattr(django_request, "_json_body", None)
    if cached is not None:
        return cached
    raw = django_request.body
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedRequest(
            f"request body is not valid JSON: {error}", context="request_parsing",
            hint="Send a JSON object with Content-Type: application/json.",
        ) from None
    django_request._json_body = parsed
    return parsed


def json_object(request) -> dict[str, Any]:
    body = json_body(request)
    if not isinstance(body, dict):
        raise MalformedRequest("request body must be a JSON object",
                               context="request_parsing")
    return body
