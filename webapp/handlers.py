"""Error pages: JSON for API clients, HTML for people."""

import functools

from django.conf import settings
from django.core.exceptions import (
    BadRequest,
    DisallowedHost,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.http import JsonResponse
from django.urls import Resolver404
from django.views.defaults import bad_request as html_bad_request
from django.views.defaults import page_not_found

from webapp.errors import json_error
from webapp.errors import not_found as json_not_found

# Path prefixes of Roboflow's server for what this one does not serve: its
# other tasks' inference, and the model routes other than /model/registry
# and /model/add, such as /model/remove.
ROBOFLOW_MODEL_PREFIXES = (
    "/model/",
    "/infer/object_detection/",
    "/infer/instance_segmentation",
    "/infer/classification",
    "/infer/keypoints_detection",
)


def _wants_json(request) -> bool:
    """Return whether an error should be JSON: any request but a browser's page."""
    accept = request.META.get("HTTP_ACCEPT", "")
    return (
        request.path.startswith("/api/")
        or request.method != "GET"
        or "text/html" not in accept
    )


class NulInQuery(BadRequest):
    """A query string with a NUL character, which PostgreSQL cannot store or match."""


def not_found(request, exception=None):
    if not _wants_json(request):
        return page_not_found(request, exception)
    if exception is None or isinstance(exception, Resolver404):
        message = f"no route for {request.method} {request.path}"
    else:
        # A view found the route but not the object, as get_object_or_404
        # does for someone else's workflow or run.
        message = (
            f"{request.path} not found: it names something that does not "
            "exist or is not yours"
        )
    if request.path.startswith(ROBOFLOW_MODEL_PREFIXES):
        return json_error(
            message,
            "not_found",
            404,
            error_type="NotFound",
            hint="Of Roboflow's model routes, this server runs object detection "
            "(POST /infer/object_detection, GET /model/registry, POST "
            "/model/add) and no other task. Runners evict models by their "
            "memory budget, so there is no /model/remove or /model/clear.",
        )
    return json_not_found(message)


def bad_request(request, exception=None):
    """Return the 400 for a request Django rejected before any view ran."""
    if not _wants_json(request):
        return html_bad_request(request, exception)
    if isinstance(exception, DisallowedHost):
        return json_error(
            "the request's Host header names a host this server does not serve; "
            "send it to one of the hosts in the server's ALLOWED_HOSTS setting, "
            "or add this host there",
            "disallowed_host",
            400,
            error_type="DisallowedHost",
            context="request.headers.host",
        )
    if isinstance(exception, NulInQuery):
        return json_error(
            "the query string has a NUL character (%00), which no parameter "
            "may contain",
            "malformed_request",
            400,
            error_type="MalformedRequest",
            context="request_parsing",
            hint="Remove the %00 from the URL.",
        )
    if isinstance(exception, TooManyFieldsSent | TooManyFilesSent):
        # Django's limits on form and query fields name no part of the
        # request, so the message names the limit that the request passed.
        if isinstance(exception, TooManyFieldsSent):
            what = f"{settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} query or form fields"
        else:
            what = f"{settings.DATA_UPLOAD_MAX_NUMBER_FILES} files"
        return json_error(
            f"the request has more than {what}, the maximum this server reads",
            "bad_request",
            400,
            error_type=type(exception).__name__,
            context="request_parsing",
            hint="Send fewer query parameters or form fields, or the data in a "
            "JSON body.",
        )
    return json_error(
        "the request was refused as malformed or unsafe; the reason is in the "
        "server log",
        "bad_request",
        400,
        error_type="BadRequest",
    )


def server_error(request):
    from django.views.defaults import server_error as html_server_error

    if _wants_json(request):
        return json_error(
            "internal server error; the error is in the server log",
            "server_error",
            500,
            error_type="ServerError",
        )
    return html_server_error(request)


def allow_methods(*methods: str, options: dict | None = None):
    """Serve only ``methods`` (GET brings HEAD), and return a JSON 405 for others.

    Plain Django views otherwise run for any method: a PUT to a page
    rendered it, and a POST to a JSON route was served like a GET. With
    ``options``, OPTIONS returns it as JSON, as the API's views return their
    metadata, and the ``Allow`` header lists OPTIONS. The 405's hint leaves
    OPTIONS out, as the API's does.
    """
    served = {method.upper() for method in methods}
    if "GET" in served:
        served.add("HEAD")
    hint = f"This route serves {', '.join(sorted(served))}."
    allowed = served | {"OPTIONS"} if options is not None else served
    allow_header = ", ".join(sorted(allowed))

    def decorator(view):
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method in served:
                return view(request, *args, **kwargs)
            if request.method == "OPTIONS" and options is not None:
                response = JsonResponse(options)
                response["Allow"] = allow_header
                return response
            response = json_error(
                f'Method "{request.method}" not allowed.',
                "method_not_allowed",
                405,
                error_type="MethodNotAllowed",
                hint=hint,
            )
            response["Allow"] = allow_header
            return response

        return wrapper

    return decorator
