"""The websocket port (daphne) stops reading a request body over the limits.

daphne hands a body to Django only once all of it has arrived, so without
the cap any client could make it read and hold a body of any size.
"""

import http.client
import json
import socket

import pytest

from tests.conftest import daphne_server

# Small limits, so that a body over them is quick to send.
LIMITS = {
    "MAX_REQUEST_BYTES": str(1024 * 1024),
    "MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
}
REQUEST_LIMIT = 1024 * 1024
UPLOAD_CAP = 2 * 1024 * 1024 + 64 * 1024


@pytest.fixture(scope="module")
def limited_server(django_db_setup):
    with daphne_server(LIMITS, "daphne-limits.log") as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def declare_body(sock: socket.socket, path: str, length: int) -> None:
    """Send a request's head declaring ``length`` bytes, and one byte of body."""
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n{" % (path.encode(), length)
    )


@pytest.mark.parametrize(
    ("path", "limit"), [("/api/validate", REQUEST_LIMIT), ("/api/models/", UPLOAD_CAP)]
)
def test_declared_length_over_route_limit_rejected(limited_server, path, limit):
    with connect(limited_server) as sock:
        declare_body(sock, path, limit + 1)
        # Only one byte of the body was sent, so a response that waited for
        # the rest would never come.
        status, body = read_response(sock)
    assert status == 413
    assert body["code"] == "payload_too_large"
    assert body["error_type"] == "PayloadTooLarge"
    assert f"limit of {limit} bytes" in body["message"]
    assert "MAX_REQUEST_BYTES" in body["hint"]


def test_chunked_body_over_limit_stops_reading(limited_server):
    chunk = b"a" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with connect(limited_server) as sock:
        sock.sendall(
            b"POST /api/validate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        with pytest.raises(OSError):
            # The server closes the connection once the limit is passed, so
            # sending fails long before 64 MiB.
            while sent < 64 * 1024 * 1024:
                sock.sendall(frame)
                sent += len(chunk)
        assert REQUEST_LIMIT < sent < 64 * 1024 * 1024


def test_upload_route_reads_past_request_limit(limited_server):
    # Over MAX_REQUEST_BYTES but under the upload cap: daphne reads it all and
    # Django responds, here with 401 because no one signed in.
    payload = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="w.pt"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
        + b"x" * (REQUEST_LIMIT + 1024)
        + b"\r\n--b--\r\n"
    )
    with connect(limited_server) as sock:
        sock.sendall(
            b"POST /api/models/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        status, body = read_response(sock)
    assert status == 401
    assert body["code"] == "not_authenticated"
