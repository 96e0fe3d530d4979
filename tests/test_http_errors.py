"""Requests gunicorn rejects before Django runs still get the API's JSON error."""

import http.client
import json
import socket
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from webapp.gunicorn_worker import JsonErrorWorker


def raw_request(base_url: str, request: bytes) -> tuple[int, dict, dict]:
    """Send ``request`` bytes as they are; return the status, headers and JSON body."""
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = json.loads(response.read())
        return response.status, dict(response.getheaders()), body


@pytest.mark.parametrize(
    ("request_bytes", "status", "code", "hint"),
    [
        (
            b"GET /api/workflows/?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "uri_too_long",
            "Keep the request line under 4094 bytes",
        ),
        (
            b"GET /api/workflows/ HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"b" * 9000
            + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
            "each under 8190 bytes",
        ),
        (
            b"GET /api/workflows/ HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: 1\r\n" % i for i in range(120))
            + b"\r\n",
            431,
            "request_header_fields_too_large",
            "Send at most 100 header fields",
        ),
        (
            b"GET /api/workflows/ HTTP/9.9\r\nHost: x\r\n\r\n",
            400,
            "bad_request",
            "well-formed HTTP/1.1 request",
        ),
        (
            b"POST /api/workflows/ HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: br\r\nContent-Length: 0\r\n\r\n",
            501,
            "not_implemented",
            "Content-Length header and no Transfer-Encoding",
        ),
    ],
    ids=["long-line", "large-header", "many-headers", "bad-version", "coding"],
)
def test_rejected_request_json_error(wsgi_server, request_bytes, status, code, hint):
    returned, headers, body = raw_request(wsgi_server, request_bytes)
    assert returned == status
    assert headers["Content-Type"] == "application/json"
    assert body["code"] == code
    assert body["error_type"] == "RequestError"
    assert body["context"] == "http"
    assert body["message"]
    assert hint in body["hint"]


def test_unsupported_coding_status_line(wsgi_server):
    address = urlsplit(wsgi_server)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(
            b"POST /api/workflows/ HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: br\r\nContent-Length: 0\r\n\r\n"
        )
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 501
        assert response.reason == "Not Implemented"
        assert json.loads(response.read())["message"].startswith("Not Implemented")


def test_gunicorn_500_has_the_api_code():
    # gunicorn sends its own 500 when the application fails before responding,
    # which no request can cause on purpose, so the body is built directly.
    worker = SimpleNamespace(answering=threading.local())
    body = JsonErrorWorker.error_body(worker, 500, "Internal Server Error", "")
    assert body["code"] == "server_error"
    assert body["message"] == "Internal Server Error"


def test_unknown_host_gets_json_error_on_api_routes(wsgi_server):
    returned, headers, body = raw_request(
        wsgi_server,
        b"GET /api/workflows/ HTTP/1.1\r\nHost: elsewhere.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert returned == 400
    assert headers["Content-Type"] == "application/json"
    assert body["code"] == "disallowed_host"
    assert body["context"] == "request.headers.host"
    assert "ALLOWED_HOSTS" in body["message"]


def test_unknown_host_logged_in_one_line(wsgi_server):
    # A long header: the warning keeps its start only.
    host = f"host-{uuid.uuid4().hex}-{'x' * 3000}.example"
    raw_request(
        wsgi_server,
        f"GET /api/workflows/ HTTP/1.1\r\nHost: {host}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    log = Path(settings.DATA_DIR) / "gunicorn.log"
    deadline = time.monotonic() + 5
    while host[:40] not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the request was not logged"
        time.sleep(0.05)
    lines = log.read_text(errors="replace").splitlines()
    [index] = [i for i, line in enumerate(lines) if host[:40] in line]
    assert " WARNING django.security.DisallowedHost " in lines[index]
    assert len(lines[index]) < 500
    assert not lines[index + 1 :] or not lines[index + 1].startswith("Traceback")


def test_unknown_host_gets_html_page_in_the_browser(wsgi_server):
    address = urlsplit(wsgi_server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.request(
        "GET", "/", headers={"Host": "elsewhere.example", "Accept": "text/html"}
    )
    response = connection.getresponse()
    assert response.status == 400
    assert response.getheader("Content-Type").startswith("text/html")
    connection.close()


@pytest.mark.parametrize(
    "path, status",
    [("/accounts/login/", 200), ("/api/workflows/", 401), ("/api/no-such-route", 404)],
)
def test_head_response_has_no_body(wsgi_server, path, status):
    # gunicorn logged a warning for each HEAD response that carried a body.
    log = Path(settings.DATA_DIR) / "gunicorn.log"
    logged_before = log.stat().st_size
    address = urlsplit(wsgi_server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.request("GET", path)
    get_length = len(connection.getresponse().read())
    connection.request("HEAD", path)
    response = connection.getresponse()
    assert response.status == status
    assert response.read() == b""
    assert get_length > 0
    # The 404 message names the method, so only the others match the GET.
    if status != 404:
        assert response.getheader("Content-Length") == str(get_length)
    else:
        assert int(response.getheader("Content-Length")) > 0
    connection.close()
    with open(log, "rb") as logged:
        logged.seek(logged_before)
        assert b"no-body response" not in logged.read()
