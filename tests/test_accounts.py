"""Sign-in, API tokens: shown once, listed by prefix, revoked at once."""

import io
import os
import re
import subprocess
import sys

import pytest
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from tests.conftest import ROOT
from tests.definitions import image_height
from webapp.models import ApiToken, hash_token
from webapp.sessions import SessionStore
from workflows.models import Workflow


@pytest.mark.parametrize("path", ["/workflows/", "/tokens/", "/billing/"])
def test_pages_require_sign_in(client, db, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response.url.startswith("/accounts/login/")


def test_session_cookie_with_nul_is_ignored(client, db):
    # Django unquotes the cookie value's octal escape \000 to a NUL, which
    # PostgreSQL rejects in a query.
    assert SessionStore("\x00abcdefghijk").session_key is None
    cookie = 'sessionid="\\000abcdefghijk"'
    response = client.get("/workflows/", HTTP_ACCEPT="text/html", HTTP_COOKIE=cookie)
    assert response.status_code == 302
    assert response.url.startswith("/accounts/login/")
    api = client.get("/api/workflows/", HTTP_COOKIE=cookie)
    assert api.status_code == 401


def test_sign_in_lands_on_workflows(client, alice):
    response = client.post(
        "/accounts/login/", {"username": "alice", "password": "alice-password"}
    )
    assert response.status_code == 302
    assert client.get(response.url, follow=True).request["PATH_INFO"] == "/workflows/"


def test_sign_out_stays_on_this_site(client, alice):
    # Signing out from the site's own header lands on the site's page, not
    # on the Django admin's "Logged out" page.
    client.force_login(alice)
    response = client.post("/accounts/logout/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "Signed out · Glassbox" in page
    assert 'href="/accounts/login/"' in page
    assert "Django site admin" not in page
    assert client.get("/workflows/").status_code == 302


@pytest.mark.parametrize(
    "query", ["?next=https://evil.example/", "?next=//evil.example/", "?ref=header"]
)
def test_sign_out_ignores_unsafe_next(client, alice, query):
    # Django's LogoutView redirected such a request to the bare logout path,
    # which responds 405 to GET.
    client.force_login(alice)
    response = client.post(f"/accounts/logout/{query}")
    assert response.status_code == 200
    assert "Signed out · Glassbox" in response.content.decode()
    assert client.get("/workflows/").status_code == 302


def test_sign_out_follows_safe_next(client, alice):
    client.force_login(alice)
    response = client.post("/accounts/logout/?next=/billing/")
    assert response.status_code == 302
    assert response.url == "/billing/"


@pytest.mark.parametrize(
    "path",
    [
        "/accounts/password_reset/",
        "/accounts/password_reset/done/",
        "/accounts/reset/MQ/set-password/",
        "/accounts/reset/done/",
    ],
)
def test_password_reset_routes_absent(client, db, path):
    assert client.get(path).status_code == 404
    assert client.post(path, {"email": "alice@example.com"}).status_code == 404


def test_password_change_for_signed_in_user(client, alice):
    client.force_login(alice)
    response = client.post(
        "/accounts/password_change/",
        {
            "old_password": "alice-password",
            "new_password1": "a-new-long-password-42",
            "new_password2": "a-new-long-password-42",
        },
    )
    assert response.status_code == 302
    assert response.url == "/accounts/password_change/done/"
    alice.refresh_from_db()
    assert alice.check_password("a-new-long-password-42")


def test_admin_sign_out_answers(client, django_user_model):
    staff = django_user_model.objects.create_user(
        "staff", password="staff-password", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    response = client.post("/admin/logout/")
    assert response.status_code == 200
    assert "Signed out · Glassbox" in response.content.decode()


def test_token_created_is_shown_once(client, alice):
    client.force_login(alice)
    created = client.post("/tokens/", {"action": "create", "name": "laptop"})
    assert created.status_code == 302
    assert created.url == "/tokens/"
    assert "new-token-key" not in created.content.decode()

    shown = client.get(created.url)
    assert "no-store" in shown["Cache-Control"]
    key = re.search(r'id="new-token-key">([^<]+)<', shown.content.decode())[1]
    token = ApiToken.objects.get(user=alice)
    assert token.name == "laptop"
    assert key.startswith(token.prefix)
    assert token.key_hash != key

    assert key not in client.get("/tokens/").content.decode()
    assert ApiToken.objects.filter(user=alice).count() == 1


def test_new_token_key_not_stored(client, alice):
    client.force_login(alice)
    created = client.post("/tokens/", {"action": "create", "name": "laptop"})
    cookie = created.cookies["new_api_token"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict"
    assert cookie["path"] == "/tokens/"

    key = re.search(
        r'id="new-token-key">([^<]+)<', client.get("/tokens/").content.decode()
    )[1]
    for session in Session.objects.all():
        assert key not in repr(session.get_decoded())
    assert ApiToken.objects.get(user=alice).key_hash == hash_token(key)


def test_new_token_cookie_shows_only_own_active_token(client, alice, bob):
    client.force_login(alice)
    created = client.post("/tokens/", {"action": "create", "name": "laptop"})
    cookie = created.cookies["new_api_token"].value

    client.force_login(bob)
    client.cookies["new_api_token"] = cookie
    assert "new-token-key" not in client.get("/tokens/").content.decode()

    client.force_login(alice)
    client.cookies["new_api_token"] = cookie
    assert "new-token-key" in client.get("/tokens/").content.decode()
    # Shown once: the same cookie sent again shows nothing.
    client.cookies["new_api_token"] = cookie
    assert "new-token-key" not in client.get("/tokens/").content.decode()

    # A token revoked before its key was shown is not shown either.
    client.post("/tokens/", {"action": "create", "name": "desktop"})
    ApiToken.objects.get(user=alice, name="desktop").revoke()
    assert "new-token-key" not in client.get("/tokens/").content.decode()


def test_token_without_name_redirects_with_error(client, alice):
    client.force_login(alice)
    response = client.post("/tokens/", {"action": "create", "name": "\x00 "})
    assert response.status_code == 302
    page = client.get(response.url).content.decode()
    assert "A token needs a name." in page
    assert not ApiToken.objects.filter(user=alice).exists()


def test_token_authenticates_api(alice):
    _, key = ApiToken.issue(alice, "script")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert api.get("/api/workflows/").status_code == 200


def test_revoked_token_stops_at_once(client, alice):
    token, key = ApiToken.issue(alice, "script")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert api.get("/api/workflows/").status_code == 200

    client.force_login(alice)
    client.post("/tokens/", {"action": "revoke", "token": token.id})
    response = api.get("/api/workflows/")
    assert response.status_code == 401
    assert "revoked" in response.json()["message"]


def test_cannot_revoke_other_users_token(client, alice, bob):
    token, _ = ApiToken.issue(bob, "bob's")
    client.force_login(alice)
    response = client.post("/tokens/", {"action": "revoke", "token": token.id})
    assert response.status_code == 404
    assert f"Token {token.id} not found among your tokens." in response.content.decode()
    token.refresh_from_db()
    assert token.revoked_at is None


@pytest.mark.parametrize("token_id", ["999999", "9" * 40])
def test_revoke_missing_token_is_404(client, alice, token_id):
    own, _ = ApiToken.issue(alice, "laptop")
    client.force_login(alice)
    response = client.post("/tokens/", {"action": "revoke", "token": token_id})
    assert response.status_code == 404
    page = response.content.decode()
    assert f"Token {token_id} not found among your tokens." in page
    assert "laptop" in page
    own.refresh_from_db()
    assert own.revoked_at is None


@pytest.mark.parametrize("token_id", ["abc", "", "1.5", "-1", " 1", "\u0661"])
def test_revoke_non_numeric_id_is_400(client, alice, token_id):
    own, _ = ApiToken.issue(alice, "laptop")
    client.force_login(alice)
    response = client.post("/tokens/", {"action": "revoke", "token": token_id})
    assert response.status_code == 400
    assert "is invalid: it must be a number." in response.content.decode()
    own.refresh_from_db()
    assert own.revoked_at is None


def test_revoke_without_id_is_400(client, alice):
    client.force_login(alice)
    response = client.post("/tokens/", {"action": "revoke"})
    assert response.status_code == 400


def test_token_list_shows_only_own_tokens(client, alice, bob):
    ApiToken.issue(bob, "bob-secret-name")
    ApiToken.issue(alice, "alice-token")
    client.force_login(alice)
    page = client.get("/tokens/").content.decode()
    assert "alice-token" in page
    assert "bob-secret-name" not in page


def test_token_use_is_recorded(alice):
    token, key = ApiToken.issue(alice, "script")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    api.get("/api/workflows/")
    token.refresh_from_db()
    assert token.last_used_at is not None


def test_unknown_api_route_answers_json(alice_client):
    response = alice_client.post("/api/nothing-here", {}, format="json")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


BROWSER_ACCEPT = "text/html,application/xhtml+xml,*/*;q=0.8"


def test_unknown_page_answers_html(client, db):
    response = client.get("/no/such/page", headers={"Accept": BROWSER_ACCEPT})
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_unknown_path_answers_json_to_programs(client, db):
    # What requests and curl send: a program gets an error it can read.
    response = client.get("/no/such/page", headers={"Accept": "*/*"})
    assert response.status_code == 404
    assert response.json()["message"] == "no route for GET /no/such/page"


def test_missing_object_page_is_not_a_missing_route(client, alice):
    client.force_login(alice)
    response = client.get("/workflows/999999/run/", headers={"Accept": "*/*"})
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert response.json()["message"] == (
        "/workflows/999999/run/ not found: it names something that does not "
        "exist or is not yours"
    )


def test_roboflow_model_route_names_what_is_served(client, db):
    # inference-sdk's unload_model() posts to /model/remove.
    response = client.post("/model/remove", headers={"Accept": "*/*"})
    assert response.status_code == 404
    assert "POST /infer/object_detection" in response.json()["hint"]


def test_createtoken_prints_a_working_key(alice):
    out = io.StringIO()
    call_command("createtoken", "alice", "--name", "ci", stdout=out)
    key = out.getvalue().strip()
    token = ApiToken.objects.get(user=alice, name="ci")
    assert key.startswith(token.prefix)

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/workflows/").status_code == 200


def test_createtoken_rejects_unprintable_name(alice):
    with pytest.raises(CommandError, match="U\\+000A at position 2"):
        call_command("createtoken", "alice", "--name", "ci\nbot")
    assert ApiToken.objects.count() == 0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "--name is empty or only spaces"),
        ("   ", "--name is empty or only spaces"),
        ("n" * 101, "--name is 101 characters long; the limit is 100"),
        # The form in which Python passes the argument byte 0xFF.
        ("a\udcffb", "--name is not UTF-8 text"),
    ],
    ids=["empty", "spaces", "long", "not-utf8"],
)
def test_createtoken_rejects_bad_name(alice, name, message):
    with pytest.raises(CommandError, match=message):
        call_command("createtoken", "alice", "--name", name)
    assert ApiToken.objects.count() == 0


def test_createtoken_unknown_user(db):
    with pytest.raises(CommandError, match="user 'nobody' not found"):
        call_command("createtoken", "nobody")
    assert ApiToken.objects.count() == 0


def test_missing_page_has_site_header(client, alice):
    client.force_login(alice)
    response = client.get("/workflows/999999/run/", headers={"Accept": BROWSER_ACCEPT})
    assert response.status_code == 404
    page = response.content.decode()
    assert "Page not found" in page
    assert 'class="brand"' in page
    assert 'href="/workflows/"' in page
    assert "/workflows/999999/run/" in page


def test_staff_header_links_fleet_page(client, django_user_model):
    staff = django_user_model.objects.create_user(
        "operator", password="operator-password", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    page = client.get("/workflows/").content.decode()
    assert 'href="/admin/runner/run/fleet/"' in page
    assert client.get("/admin/runner/run/fleet/").status_code == 200


def test_admin_pages_link_fleet_and_need_no_favicon(client, django_user_model):
    # The fleet page is an admin page that no model list links to, and
    # browsers ask for /favicon.ico, a 404, where a page names no icon.
    staff = django_user_model.objects.create_user(
        "staff", password="staff-password", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    for path in ("/admin/", "/admin/runner/run/", "/admin/runner/run/fleet/"):
        page = client.get(path).content.decode()
        assert '<a href="/admin/runner/run/fleet/">Runner fleet</a>' in page, path
        assert '<link rel="icon" href="data:,">' in page, path


def test_non_staff_header_has_no_fleet_link(client, alice):
    client.force_login(alice)
    assert "/admin/runner/run/fleet/" not in client.get("/workflows/").content.decode()


def test_admin_adds_no_workflow_or_version(client, django_user_model, alice):
    staff = django_user_model.objects.create_user(
        "editor", password="editor-password", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    workflow = Workflow.create_with_version(alice, "Heights", image_height())
    page = client.get(f"/admin/workflows/workflow/{workflow.id}/change/")
    assert page.status_code == 200
    # The admin's script offers "Add another" only below the form maximum.
    assert 'name="versions-MAX_NUM_FORMS" value="0"' in page.content.decode()
    assert client.get("/admin/workflows/workflow/add/").status_code == 403


def admin_workflow_form(workflow, **fields) -> dict:
    """Return the admin change form's POST data for ``workflow``."""
    return {
        "name": workflow.name,
        "slug": workflow.slug,
        "description": workflow.description,
        "loaded_revision": str(workflow.revision),
        "versions-TOTAL_FORMS": "1",
        "versions-INITIAL_FORMS": "1",
        "versions-MIN_NUM_FORMS": "0",
        "versions-MAX_NUM_FORMS": "0",
        "versions-0-id": str(workflow.latest_version().pk),
        "versions-0-workflow": str(workflow.pk),
        **fields,
    }


def test_admin_rename_moves_workflow_revision(client, django_user_model, alice):
    # An editor page loaded before the rename must not save the old name back.
    staff = django_user_model.objects.create_user(
        "renamer", password="renamer-password", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    workflow = Workflow.create_with_version(alice, "Heights", image_height())
    url = f"/admin/workflows/workflow/{workflow.id}/change/"
    assert 'name="loaded_revision" value="1"' in client.get(url).content.decode()
    response = client.post(url, admin_workflow_form(workflow, name="Widths"))
    assert response.status_code == 302
    workflow.refresh_from_db()
    assert (workflow.name, workflow.revision) == ("Widths", 2)


def test_admin_save_from_stale_page_is_refused(client, django_user_model, alice):
    staff = django_user_model.objects.create_user(
        "stale", password="stale-password", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    workflow = Workflow.create_with_version(alice, "Heights", image_height())
    form = admin_workflow_form(workflow, description="from the admin")
    # The builder renames it after the admin page was loaded.
    Workflow.objects.filter(pk=workflow.pk).update(name="Renamed", revision=2)
    response = client.post(f"/admin/workflows/workflow/{workflow.id}/change/", form)
    assert response.status_code == 200
    assert "changed elsewhere (revision 2) since this page was loaded (revision 1)" in (
        response.content.decode()
    )
    workflow.refresh_from_db()
    assert (workflow.name, workflow.description, workflow.revision) == (
        "Renamed",
        "",
        2,
    )


@pytest.mark.parametrize("deleted", [False, True])
def test_admin_slug_taken_is_form_error(client, django_user_model, alice, deleted):
    staff = django_user_model.objects.create_user(
        "slugger", password="slugger-password", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    workflow = Workflow.create_with_version(alice, "Heights", image_height())
    other = Workflow.create_with_version(alice, "Widths", image_height())
    if deleted:
        other.mark_deleted()
    form = admin_workflow_form(workflow, slug=other.slug)
    response = client.post(f"/admin/workflows/workflow/{workflow.id}/change/", form)
    assert response.status_code == 200
    assert "slug &#x27;widths&#x27; is already used by another workflow of" in (
        response.content.decode()
    )
    workflow.refresh_from_db()
    assert workflow.slug == "heights"


def test_admin_run_list_reads_plainly(client, django_user_model, alice):
    from tests.test_billing_pages import make_bill

    staff = django_user_model.objects.create_user(
        "reader", password="reader-password", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    bill = make_bill(alice)
    bill.run.source = "ui"
    bill.run.save(update_fields=["source"])
    page = client.get("/admin/runner/run/").content.decode()
    assert "Total (ms)" in page
    assert "Total us" not in page
    assert '<td class="field-source">Browser</td>' in page
    assert f"{bill.run.total_us / 1000:.1f}" in page


def test_admin_adds_no_api_token(client, django_user_model, alice):
    # An added row would have no key: nothing could use it.
    staff = django_user_model.objects.create_superuser("editor", password="editor-pw")
    client.force_login(staff)
    assert client.get("/admin/webapp/apitoken/add/").status_code == 403
    response = client.post(
        "/admin/webapp/apitoken/add/", {"user": alice.pk, "name": "from admin"}
    )
    assert response.status_code == 403
    assert not ApiToken.objects.filter(name="from admin").exists()


def test_admin_revoke_needs_change_permission(client, django_user_model, alice):
    from django.contrib.auth.models import Permission

    token, _ = ApiToken.issue(alice, "laptop")
    viewer = django_user_model.objects.create_user(
        "viewer", password="viewer-password", is_staff=True
    )
    viewer.user_permissions.add(Permission.objects.get(codename="view_apitoken"))
    client.force_login(viewer)
    page = client.get("/admin/webapp/apitoken/").content.decode()
    assert "laptop" in page
    assert 'value="revoke"' not in page
    client.post(
        "/admin/webapp/apitoken/",
        {"action": "revoke", "_selected_action": [token.pk]},
    )
    token.refresh_from_db()
    assert token.revoked_at is None

    editor = django_user_model.objects.create_user(
        "editor", password="editor-password", is_staff=True
    )
    editor.user_permissions.add(Permission.objects.get(codename="change_apitoken"))
    client.force_login(editor)
    client.post(
        "/admin/webapp/apitoken/",
        {"action": "revoke", "_selected_action": [token.pk]},
    )
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_rq_pages_need_superuser(client, django_user_model, db):
    import django_rq

    queue = django_rq.get_queue("shared", commit_mode="auto")
    job = queue.enqueue_call("builtins.len", args=([],))
    try:
        staff = django_user_model.objects.create_user(
            "operator", password="operator-password", is_staff=True
        )
        client.force_login(staff)
        assert client.get("/admin/django-rq/").status_code == 403
        assert client.get("/admin/django-rq/queues/0/").status_code == 403
        response = client.post("/admin/django-rq/queues/0/empty/", {"post": "yes"})
        assert response.status_code == 403
        assert job.id in queue.job_ids
        # django-rq's own copy of the pages in the admin, open to all staff.
        assert client.get("/admin/django_rq/dashboard/").status_code == 404

        client.logout()
        response = client.get("/admin/django-rq/")
        assert response.status_code == 302
        assert response.url.startswith("/admin/login/")

        root = django_user_model.objects.create_superuser("root", password="root-pw")
        client.force_login(root)
        assert client.get("/admin/django-rq/").status_code == 200
        assert client.get("/admin/django-rq/queues/0/").status_code == 200
    finally:
        job.delete()


def test_revoke_confirmation_checks_token(client, alice, bob):
    own, _ = ApiToken.issue(alice, "laptop")
    others, _ = ApiToken.issue(bob, "bob's")
    client.force_login(alice)

    response = client.get("/tokens/", {"revoke": own.id})
    assert response.status_code == 200
    assert "Revoke token “laptop”" in response.content.decode()
    assert client.get("/tokens/", {"revoke": others.id}).status_code == 404
    assert client.get("/tokens/", {"revoke": "abc"}).status_code == 400

    own.revoke()
    page = client.get("/tokens/", {"revoke": own.id}).content.decode()
    assert "Token “laptop” is already revoked." in page
    assert 'id="revoke-confirm"' not in page
    for token in (own, others):
        token.refresh_from_db()
    assert others.revoked_at is None


def test_secure_cookies_setting_marks_cookies(client, alice, settings):
    # Behind a proxy that terminates HTTPS, requests reach Django as HTTP.
    settings.SESSION_COOKIE_SECURE = True
    settings.CSRF_COOKIE_SECURE = True
    signed_in = client.post(
        "/accounts/login/", {"username": "alice", "password": "alice-password"}
    )
    assert signed_in.cookies["sessionid"]["secure"]

    created = client.post("/tokens/", {"action": "create", "name": "laptop"})
    assert created.cookies["new_api_token"]["secure"]


def test_secure_cookies_read_from_environment():
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "SECURE_COOKIES": "true",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from django.conf import settings; "
            "print(settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
