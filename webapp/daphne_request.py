"""daphne's HTTP request with a cap on the body it reads before the app runs.

daphne spools a whole request body and then hands all of it to the
application at once, so Django's size checks (MAX_REQUEST_BYTES,
MAX_UPLOAD_BYTES) run only after the body is in memory. A client could make
the websocket server read a body of any size, without signing in. This
request stops reading once the body is over its route's limit
(MAX_UPLOAD_BYTES for model uploads, MAX_REQUEST_BYTES elsewhere), by its
Content-Length or, for a chunked body, as the bytes arrive. It responds 413
with the API's error body and closes the connection. A server that carries
only websockets (WEBSOCKETS_ONLY) reads no body at all, and responds 404 as
to any HTTP request there.
"""

import json

from daphne.http_protocol import WebRequest
from django.conf import settings

from webapp.requests import MULTIPART_ALLOWANCE_BYTES

# The one route that takes bodies up to MAX_UPLOAD_BYTES.
UPLOAD_PATH = b"/api/models/"


def body_limit(path: bytes) -> int:
    """Return the most bytes the route at ``path`` accepts in a request body."""
    if settings.GLASSBOX["WEBSOCKETS_ONLY"]:
        return 0
    if path.split(b"?", 1)[0] == UPLOAD_PATH:
        return max(
            settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
            settings.GLASSBOX["MAX_UPLOAD_BYTES"] + MULTIPART_ALLOWANCE_BYTES,
        )
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


class LimitedWebRequest(WebRequest):
    def gotLength(self, length):
        self.body_bytes = 0
        self.body_rejected = False
        # twisted sets the request's own path only once the body has been
        # read; its channel keeps the request line's target until then.
        self.body_limit = body_limit(getattr(self.channel, "_path", b""))
        super().gotLength(length)
        if length is not None and length > self.body_limit:
            self.reject_body(length)

    def handleContentChunk(self, data):
        if self.body_rejected:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self.body_limit:
            self.reject_body(None)
            return
        super().handleContentChunk(data)

    def process(self):
        # The channel still calls process when the rest of a rejected body
        # arrives before the connection closes.
        if self.body_rejected:
            return None
        return super().process()

    def reject_body(self, length: int | None) -> None:
        """Respond and close the connection without reading further.

        The response is 413, or on a server that carries only websockets the
        404 that any HTTP request gets there.
        """
        # Imported here because it needs Django set up, which daphne's
        # command line does only after this module is imported.
        from webapp.errors import error_body

        self.body_rejected = True
        if settings.GLASSBOX["WEBSOCKETS_ONLY"]:
            path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
            status = "404 Not Found"
            body = not_served_body(path.decode("latin-1"))
        else:
            limit = self.body_limit
            size = f" ({length} bytes)" if length is not None else ""
            status = "413 Payload Too Large"
            body = error_body(
                f"request body{size} is larger than the limit of {limit} bytes",
                "payload_too_large",
                context="request_parsing",
                error_type="PayloadTooLarge",
                hint="Send smaller images, or raise MAX_REQUEST_BYTES "
                "(MAX_UPLOAD_BYTES for model uploads) on the server.",
            )
        content = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(content)}\r\n"
            "Connection: close\r\n\r\n"
        )
        transport = self.channel.transport
        transport.write(head.encode("latin-1") + content)
        transport.loseConnection()


def not_served_body(path: str) -> dict:
    """Return the 404 body for an HTTP request to a websockets-only server."""
    from webapp.errors import error_body

    port = settings.GLASSBOX["WEB_SERVER_PORT"]
    where = f"port {port}" if port else "the web server"
    return error_body(
        f"{path} is not served on this port",
        "not_found",
        error_type="NotFound",
        hint=f"Send HTTP requests to {where}; this port serves /ws/runs/<id>/ only.",
    )
