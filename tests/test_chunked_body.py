"""Request bodies sent with ``Transfer-Encoding: chunked`` and no Content-Length.

Django's WSGI request reads only ``CONTENT_LENGTH`` bytes of the body, so under
gunicorn, the production HTTP server, such a body would read as empty. The site
returns 411 there instead. daphne decodes the chunks itself, so the same
requests work through it. Both servers run as real processes on the test
database.
"""

import http.client
import json
from urllib.parse import urlsplit

import pytest

from tests.definitions import image_height
from webapp.models import ApiToken


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
