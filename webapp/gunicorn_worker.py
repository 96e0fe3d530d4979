"""gunicorn's threaded worker, responding to malformed requests with a JSON error.

gunicorn rejects some requests before they reach Django: a request line over
``limit_request_line`` (414), too many or too large header fields (431), or
a request line or header it cannot parse (400), or a Transfer-Encoding it
does not support (501). Its own response is an HTML page, which API clients
cannot read as an error body. This worker writes the API's error body
instead, with the limit that was hit and how to stay under it. Status codes
stay gunicorn's, and so do reasons, except where gunicorn gives another
status the reason of a 400.
"""

import json
import threading
from http import HTTPStatus

from gunicorn import util
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers.gthread import ThreadWorker


class JsonErrorWorker(ThreadWorker):
    def init_process(self):
        # gunicorn's handle_error writes its response with util.write_error.
        # Replacing that function here affects only this worker process.
        util.write_error = self.write_json_error
        # The exception handle_error is responding to, per thread, because
        # requests run in a thread pool and write_error does not receive it.
        self.answering = threading.local()
        super().init_process()

    def handle_error(self, req, client, addr, exc):
        self.answering.error = exc
        try:
            super().handle_error(req, client, addr, exc)
        finally:
            self.answering.error = None

    def write_json_error(self, sock, status_int, reason, message):
        # gunicorn 27 keeps the reason "Bad Request" when it sets 501 for
        # an unsupported Transfer-Encoding or 500 for a configuration error.
        if status_int != 400 and reason == "Bad Request":
            reason = HTTPStatus(status_int).phrase
        body = json.dumps(self.error_body(status_int, reason, message)).encode()
        head = (
            f"HTTP/1.1 {status_int} {reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        util.write_nonblock(sock, head.encode("latin-1") + body)

    def error_body(self, status_int: int, reason: str, message: str) -> dict:
        """Return the API's error body for a request gunicorn rejected."""
        error = getattr(self.answering, "error", None)
        body = {
            "message": f"{reason}: {message}" if message else reason,
            "error_type": "RequestError",
            # Django's own 500 has the code server_error; gunicorn's the same.
            "code": (
                "server_error"
                if status_int == HTTPStatus.INTERNAL_SERVER_ERROR
                else reason.lower().replace(" ", "_")
            ),
            "context": "http",
        }
        if isinstance(error, LimitRequestLine):
            body["hint"] = (
                f"Keep the request line under {self.cfg.limit_request_line} "
                "bytes: send long data in the request body."
            )
        elif isinstance(error, LimitRequestHeaders):
            body["hint"] = (
                f"Send at most {self.cfg.limit_request_fields} header fields, "
                f"each under {self.cfg.limit_request_field_size} bytes."
            )
        elif status_int == HTTPStatus.NOT_IMPLEMENTED:
            body["hint"] = (
                "Send the body with a Content-Length header and no Transfer-Encoding."
            )
        elif status_int == 400:
            body["hint"] = "Send a well-formed HTTP/1.1 request."
        return body
