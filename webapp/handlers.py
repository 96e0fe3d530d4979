"""Error pages: JSON for API clients, HTML for people."""

from django.views.defaults import page_not_found

from webapp.errors import json_error
from webapp.errors import not_found as json_not_found


def _wants_json(request) -> bool:
    accept = request.META.get("HTTP_ACCEPT", "")
    return (
        request.path.startswith("/api/")
        or request.method != "GET"
        or "application/json" in accept
    )


def not_found(request, exception=None):
    if _wants_json(request):
        return json_not_found(f"no route for {request.method} {request.path}")
    return page_not_found(request, exception)


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
