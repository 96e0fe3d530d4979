import time

from django.core.handlers.wsgi import WSGIRequest

from webapp.errors import json_error
from webapp.handlers import NulInQuery


class RequestClockMiddleware:
    """Stamp each request with a monotonic start time for the timing breakdown.

    Listed first so the ``request`` component includes the other middleware.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.started_ns = time.perf_counter_ns()
        return self.get_response(request)


class HeadResponseMiddleware:
    """Send HEAD responses without their body, keeping the GET's Content-Length.

    Django's WSGI handler returns the body a GET would get. gunicorn drops
    it, as HTTP requires, but logs a warning for every such response, so
    each HEAD request added a line to the log.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if request.method != "HEAD":
            return response
        if response.streaming:
            # A FileResponse set Content-Length from the file, and its file
            # is still closed when the response closes.
            response.streaming_content = ()
        else:
            response["Content-Length"] = str(len(response.content))
            response.content = b""
        return response


class ChunkedBodyMiddleware:
    """Reject request bodies sent with ``Transfer-Encoding: chunked`` under WSGI.

    Django's WSGIRequest reads exactly ``CONTENT_LENGTH`` bytes of the body,
    and a chunked request has no Content-Length. Under gunicorn every view
    would see an empty body and return a misleading error, such as a missing
    input, or a 401 when the ``api_key`` is in the body, so such requests get
    a 411 instead. Under ASGI (daphne) the server decodes the chunks and
    Django reads the whole body, so chunked requests pass there.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if isinstance(request, WSGIRequest) and _is_chunked(request):
            return json_error(
                "request body was sent with Transfer-Encoding: chunked, which "
                "this server cannot read; send it with a Content-Length header",
                "length_required",
                411,
                context="request_parsing",
                error_type="LengthRequired",
                hint=(
                    "Pass the body as bytes or a string rather than a stream or "
                    "generator; HTTP clients then send its Content-Length."
                ),
            )
        return self.get_response(request)


def _is_chunked(request) -> bool:
    # gunicorn 27 itself rejects a Transfer-Encoding whose last coding is not
    # chunked, so a header that reaches Django names chunked somewhere.
    codings = request.META.get("HTTP_TRANSFER_ENCODING", "")
    return "chunked" in (coding.strip().lower() for coding in codings.split(","))


class NulQueryMiddleware:
    """Reject a query string with a NUL character (%00) with a 400.

    No parameter has a use for one, and PostgreSQL rejects a text value
    that contains one, so a view that passed such a value to a query, such
    as an admin list filter (``?status__exact=%00``), returned 500.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        query = request.META.get("QUERY_STRING", "")
        if "%00" in query or "\x00" in query:
            raise NulInQuery("the query string has a NUL character (%00)")
        return self.get_response(request)
