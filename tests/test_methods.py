"""Routes answer a method they do not serve with 405, and do nothing else."""

import uuid

import pytest
from django.test import Client

from tests.definitions import image_height
from webapp.models import ApiToken
from workflows.models import Workflow

SUMMARY = "/billing/summary.json"
EXPORT = "/billing/export.csv"


@pytest.fixture
def alice_browser(client, alice):
    client.force_login(alice)
    return client


@pytest.mark.django_db
@pytest.mark.parametrize("url", [SUMMARY, EXPORT])
@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_billing_data_with_key_refuses_other_methods(alice, url, method):
    # A key carries no CSRF token, so the CSRF check answered a POST with
    # its HTML 403 page before the view could say what was wrong.
    client = Client(enforce_csrf_checks=True)
    _, key = ApiToken.issue(alice, "billing")

    response = getattr(client, method)(url, HTTP_AUTHORIZATION=f"Bearer {key}")

    assert response.status_code == 405
    body = response.json()
    assert body["code"] == "method_not_allowed"
    assert body["message"] == f'Method "{method.upper()}" not allowed.'
    assert body["hint"] == "This route serves GET, HEAD."
    assert response["Allow"] == "GET, HEAD, OPTIONS"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "renders"), [(SUMMARY, "application/json"), (EXPORT, "text/csv")]
)
def test_billing_data_answers_options(alice, alice_browser, url, renders):
    # The API's routes return their metadata for OPTIONS, so these do too.
    _, key = ApiToken.issue(alice, "billing")
    api = Client().options("/api/runs/", HTTP_AUTHORIZATION=f"Bearer {key}")
    with_key = Client().options(url, HTTP_AUTHORIZATION=f"Bearer {key}")
    in_session = alice_browser.options(url)

    assert api.status_code == 200
    assert set(api.json()) == {"name", "description", "renders", "parses"}
    for response in (with_key, in_session):
        assert response.status_code == 200
        assert response["Allow"] == "GET, HEAD, OPTIONS"
        body = response.json()
        assert set(body) == set(api.json())
        assert body["renders"] == [renders]
        assert body["parses"] == []


@pytest.mark.django_db
@pytest.mark.parametrize("url", [SUMMARY, EXPORT])
def test_billing_data_in_session_refuses_post(alice_browser, url):
    # With the session and its CSRF token a POST was answered as a GET.
    response = alice_browser.post(url)
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


@pytest.mark.django_db
def test_billing_data_without_credentials_still_redirects(client):
    response = Client(enforce_csrf_checks=True).post(SUMMARY)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/tokens/",
        "/workflows/",
        "/workflows/new",
        "/workflows/{workflow}/edit",
        "/workflows/{workflow}/run/",
        "/models/",
        "/billing/",
        "/samples/bus.jpg",
    ],
)
def test_pages_refuse_methods_they_do_not_serve(alice, alice_browser, path):
    workflow = Workflow.create_with_version(alice, "Heights", image_height())
    url = path.format(workflow=workflow.id)

    response = alice_browser.put(url)

    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert "GET" in response["Allow"]
    assert Workflow.objects.filter(pk=workflow.pk).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/runs/{run}/", "/billing/runs/{run}/"])
def test_run_pages_refuse_post(alice_browser, path):
    # The method is checked before the run is looked up.
    response = alice_browser.post(path.format(run=uuid.uuid4()))
    assert response.status_code == 405


@pytest.mark.django_db
def test_token_page_post_with_unknown_action_is_400(alice, alice_browser):
    token, _ = ApiToken.issue(alice, "laptop")

    response = alice_browser.post("/tokens/", {"action": "destroy", "token": token.id})

    assert response.status_code == 400
    assert "Unknown action" in response.content.decode()
    token.refresh_from_db()
    assert token.revoked_at is None


@pytest.mark.django_db
def test_workflow_list_post_with_unknown_action_is_400(alice, alice_browser):
    workflow = Workflow.create_with_version(alice, "Heights", image_height())

    response = alice_browser.post(
        "/workflows/", {"action": "remove", "workflow": workflow.id}
    )

    assert response.status_code == 400
    assert "Unknown action" in response.content.decode()
    assert Workflow.objects.filter(pk=workflow.pk).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/accounts/login/", "GET, HEAD, POST"),
        ("/accounts/logout/", "POST"),
        ("/accounts/password_change/", "GET, HEAD, POST"),
        ("/accounts/password_change/done/", "GET, HEAD"),
    ],
)
@pytest.mark.parametrize("method", ["put", "patch", "delete", "options"])
def test_account_pages_refuse_other_methods(alice_browser, path, allowed, method):
    # Django's form views handled PUT like POST and returned an empty HTML
    # 405 for DELETE.
    response = getattr(alice_browser, method)(path)

    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert response["Allow"] == allowed


@pytest.mark.django_db
def test_login_page_still_signs_in(client, alice):
    alice.set_password("correct horse")
    alice.save()

    response = client.post(
        "/accounts/login/", {"username": alice.username, "password": "correct horse"}
    )

    assert response.status_code == 302
    assert client.session.get("_auth_user_id") == str(alice.pk)


@pytest.mark.django_db
def test_roboflow_url_names_post_for_get(alice, alice_key):
    # up prints the demo's Roboflow URL, which a person may open in a browser.
    workflow = Workflow.create_with_version(alice, "Heights", image_height())
    url = f"/{alice.username}/workflows/{workflow.slug}"

    response = Client().get(url, HTTP_AUTHORIZATION=f"Bearer {alice_key}")

    assert response.status_code == 405
    body = response.json()
    assert body["code"] == "method_not_allowed"
    assert body["hint"] == "This route serves POST."
