"""Request bodies sent with ``Transfer-Encoding: chunked`` and no Content-Length.

Django's WSGI request reads only ``CONTENT_LENGTH`` bytes of the body, so under
gunicorn, the production HTTP server, such a body would read as empty. The site
returns 411 there instead. daphne decodes the chunks itself, so the same
requests work through it. Both servers run as real processes on the test
database.
"""

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.db import connection

from tests.conftest import ROOT, free_port, wait_until_serving
from tests.definitions import image_height
from webapp.models import ApiToken


@pytest.fixture(scope="module")
def wsgi_server(django_db_setup, django_db_blocker):
    """gunicorn with the worker class ``manage.py up`` uses, on the test database."""
    port = free_port()

    env = os.environ.copy()
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    with django_db_blocker.unblock():
        env["GLASSBOX_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    log_path = Path(settings.DATA_DIR) / "gunicorn.log"
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "webapp.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            "2",
            # The default control socket is one path per user, shared with
            # any other gunicorn on this machine.
            "--no-control-socket",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process, f"gunicorn did not start; see {log_path}")

    yield url
    process.terminate()
    process.wait(timeout=20)
    log.close()


def post(base_url: str, path: str, body: dict, headers: dict, *, chunked: bool):
    """POST ``body`` as JSON and return the status and the parsed JSON response.

    With ``chunked``, the body goes out as two chunks without a Content-Length.
    """
    raw = json.dumps(body).encode()
    address = urlsplit(base_url)
    http_connection = http.client.HTTPConnection(
        address.hostname, address.port, timeout=30
    )
    headers = {"Content-Type": "application/json", **headers}
    try:
        if chunked:
            middle = len(raw) // 2
            # http.client sends an iterable body with Transfer-Encoding: chunked.
            http_connection.request(
                "POST", path, body=iter([raw[:middle], raw[middle:]]), headers=headers
            )
        else:
            http_connection.request("POST", path, body=raw, headers=headers)
        response = http_connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        http_connection.close()


@pytest.fixture
def api_key(transactional_db, alice) -> str:
    _, key = ApiToken.issue(alice, "chunked-body tests")
    return key


def test_gunicorn_rejects_chunked_body(wsgi_server, api_key):
    status, response_json = post(
        wsgi_server,
        "/api/validate",
        {"definition": image_height()},
        {"Authorization": f"Bearer {api_key}"},
        chunked=True,
    )
    assert status == 411
    assert response_json["code"] == "length_required"
    assert response_json["error_type"] == "LengthRequired"
    assert response_json["context"] == "request_parsing"
    assert "Content-Length" in response_json["message"]
    assert "hint" in response_json


def test_gunicorn_rejects_chunked_api_key(wsgi_server, api_key):
    # Read as empty, this body would give 401 for a missing api_key.
    status, response_json = post(
        wsgi_server,
        "/workflows/run",
        {"api_key": api_key, "specification": image_height(), "inputs": {}},
        {},
        chunked=True,
    )
    assert status == 411
    assert response_json["code"] == "length_required"


def test_gunicorn_reads_body_with_length(wsgi_server, api_key):
    status, response_json = post(
        wsgi_server,
        "/api/validate",
        {"definition": image_height()},
        {"Authorization": f"Bearer {api_key}"},
        chunked=False,
    )
    assert status == 200
    assert response_json["valid"] is True


def test_daphne_reads_chunked_body(asgi_server, api_key):
    status, response_json = post(
        asgi_server,
        "/api/validate",
        {"definition": image_height()},
        {"Authorization": f"Bearer {api_key}"},
        chunked=True,
    )
    assert status == 200
    assert response_json["valid"] is True
