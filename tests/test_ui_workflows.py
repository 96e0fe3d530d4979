"""Workflow pages: the list with its run summaries, and the builder page."""

import json
import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from runner.models import Run
from tests.definitions import detection, image_height
from workflows.models import Workflow
from workflows.ui import SPARKLINE_RUNS, build_sparkline

PAGES = ["/workflows/", "/workflows/new"]


@pytest.fixture
def alice_browser(client, alice):
    client.force_login(alice)
    return client


def add_runs(
    workflow: Workflow, totals_us: list[int | None], statuses: list[str] | None = None
) -> list[Run]:
    """Create finished runs of the latest version, oldest first, one minute apart."""
    version = workflow.latest_version()
    statuses = statuses or [Run.Status.SUCCEEDED] * len(totals_us)
    runs = Run.objects.bulk_create(
        [
            Run(
                owner=workflow.owner,
                workflow_version=version,
                definition_digest=version.digest,
                source=Run.Source.API,
                status=status,
                total_us=total,
            )
            for total, status in zip(totals_us, statuses, strict=True)
        ]
    )
    # created_at is auto_now_add, so distinct times are set afterwards.
    start = timezone.now() - timedelta(minutes=len(runs))
    for index, run in enumerate(runs):
        run.created_at = start + timedelta(minutes=index)
    Run.objects.bulk_update(runs, ["created_at"])
    return runs


def builder_config(response) -> dict:
    pattern = r'<script id="builder-config" type="application/json">(.*?)</script>'
    match = re.search(pattern, response.content.decode(), re.S)
    assert match, "the builder page embeds its configuration"
    return json.loads(match.group(1))


@pytest.mark.django_db
@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_anonymous_to_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


@pytest.mark.django_db
def test_edit_page_redirects_anonymous_to_login(client, alice):
    workflow = Workflow.create_with_version(alice, "heights", image_height())
    response = client.get(f"/workflows/{workflow.id}/edit")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


@pytest.mark.django_db
def test_edit_page_of_other_user_is_404(client, alice, bob):
    workflow = Workflow.create_with_version(alice, "heights", image_height())
    client.force_login(bob)
    assert client.get(f"/workflows/{workflow.id}/edit").status_code == 404


@pytest.mark.django_db
def test_edit_page_of_missing_workflow_is_404(alice_browser):
    assert alice_browser.get("/workflows/999999/edit").status_code == 404


@pytest.mark.django_db
def test_edit_page_embeds_latest_version(alice_browser, alice):
    workflow = Workflow.create_with_version(alice, "heights", image_height())
    workflow.add_version(detection())
    response = alice_browser.get(f"/workflows/{workflow.id}/edit")
    assert response.status_code == 200
    config = builder_config(response)
    assert config["workflow"]["id"] == workflow.id
    assert config["workflow"]["name"] == "heights"
    assert config["workflow"]["version"] == 2
    assert config["workflow"]["definition"] == detection()
    assert 'data-version="2"' in response.content.decode()


@pytest.mark.django_db
def test_pages_are_never_cached(alice_browser, alice):
    # A copy that Back shows would contain the workflow as it was: a deleted one
    # still listed, or a builder or run form that saves or runs an old version.
    workflow = Workflow.create_with_version(alice, "People", detection())
    paths = [
        *PAGES,
        f"/workflows/{workflow.id}/edit",
        f"/workflows/{workflow.id}/run/",
    ]
    for path in paths:
        response = alice_browser.get(path)
        assert response.status_code == 200, path
        assert "no-store" in response.get("Cache-Control", ""), path


@pytest.mark.django_db
def test_builder_page_has_stable_hooks(alice_browser):
    response = alice_browser.get("/workflows/new")
    assert response.status_code == 200
    html = response.content.decode()
    for element_id in (
        "builder",
        "tab-graph",
        "tab-json",
        "definition-json",
        "workflow-name",
        "save",
        "saved-version",
        "drawflow",
    ):
        assert f'id="{element_id}"' in html, element_id
    config = builder_config(response)
    assert config["workflow"] is None
    # model_id fields suggest what this user can run.
    assert {"id": "people-detector", "note": "model directory"} in config["models"]
    assert "vendor/drawflow/drawflow.min.js" in html
    assert "js/builder.js" in html
    # The builder's API calls need Django's CSRF cookie.
    assert "csrftoken" in response.cookies


@pytest.mark.django_db
def test_builder_static_files_are_served(alice_browser):
    for path in (
        "/static/js/builder.js",
        "/static/css/builder.css",
        "/static/vendor/drawflow/drawflow.min.js",
        "/static/vendor/drawflow/drawflow.min.css",
    ):
        response = alice_browser.get(path)
        assert response.status_code == 200, path


@pytest.mark.django_db
def test_list_shows_only_own_workflows(alice_browser, alice, bob):
    Workflow.create_with_version(alice, "alice flow", image_height())
    Workflow.create_with_version(bob, "bob flow", image_height())
    html = alice_browser.get("/workflows/").content.decode()
    assert "alice flow" in html
    assert "bob flow" not in html


@pytest.mark.django_db
def test_list_tells_same_names_apart(alice_browser, alice):
    first = Workflow.create_with_version(alice, "People pipeline", image_height())
    second = Workflow.create_with_version(alice, "People pipeline", image_height())
    html = alice_browser.get("/workflows/").content.decode()
    rows = {}
    for workflow in (first, second):
        pattern = rf'<tr data-workflow-id="{workflow.id}">(.*?)</tr>'
        rows[workflow.slug] = re.search(pattern, html, re.S).group(1)
    assert set(rows) == {"people-pipeline", "people-pipeline-2"}
    for slug, row in rows.items():
        assert f'<code class="long-name">{slug}</code>' in row
        assert f"POST /alice/workflows/{slug}" in row


@pytest.mark.django_db
def test_list_shows_version_last_run_and_links(alice_browser, alice):
    workflow = Workflow.create_with_version(alice, "people", detection())
    workflow.add_version(detection(confidence=0.5))
    runs = add_runs(
        workflow,
        [1000, 2000, None],
        [Run.Status.SUCCEEDED, Run.Status.SUCCEEDED, Run.Status.FAILED],
    )
    html = alice_browser.get("/workflows/").content.decode()
    pattern = rf'<tr data-workflow-id="{workflow.id}">(.*?)</tr>'
    row = re.search(pattern, html, re.S).group(1)
    assert "v2" in row
    assert f"/runs/{runs[-1].id}/" in row
    assert "status-failed" in row
    assert f'href="/workflows/{workflow.id}/edit"' in row
    assert f'href="/workflows/{workflow.id}/run/"' in row
    assert 'href="/workflows/new"' in html


@pytest.mark.django_db
def test_list_query_count_is_bounded(
    alice_browser, alice, django_assert_max_num_queries
):
    for index in range(30):
        workflow = Workflow.create_with_version(alice, f"flow {index}", image_height())
        add_runs(workflow, [1000 * (run + 1) for run in range(10)])
    # Session, user, workflows, runs, and one spare.
    with django_assert_max_num_queries(5):
        response = alice_browser.get("/workflows/")
    html = response.content.decode()
    assert html.count('<svg class="sparkline"') == 30
    assert html.count("<tr data-workflow-id=") == 30


@pytest.mark.django_db
def test_list_sparkline_uses_latest_runs(alice_browser, alice):
    workflow = Workflow.create_with_version(alice, "busy", image_height())
    newest = [1000 * (n + 1) for n in range(SPARKLINE_RUNS)]
    add_runs(workflow, [5_000_000] * 5 + newest)
    html = alice_browser.get("/workflows/").content.decode()
    points = re.search(r'<polyline points="([^"]+)"', html).group(1).split()
    assert len(points) == SPARKLINE_RUNS
    # The five slow runs are older than the newest SPARKLINE_RUNS, so the
    # peak is the newest run, drawn at the top right.
    assert "max 20.0 ms" in html


def test_sparkline_empty_without_timed_runs():
    assert build_sparkline([]) is None
    assert build_sparkline([{"total_us": None, "status": "queued"}]) is None


def test_sparkline_scales_to_peak():
    # Newest first, as the list query returns runs.
    runs = [
        {"total_us": 2000, "status": "succeeded"},
        {"total_us": 1000, "status": "failed"},
        {"total_us": None, "status": "running"},
    ]
    line = build_sparkline(runs)
    first, last = line.points.split()
    assert float(first.split(",")[0]) < float(last.split(",")[0])
    # The peak touches the top padding, half the peak sits halfway down.
    assert float(last.split(",")[1]) == 3.0
    assert float(first.split(",")[1]) == pytest.approx(14.0)
    assert line.failed == ((float(first.split(",")[0]), float(first.split(",")[1])),)
    assert "min 1.0 ms" in line.summary


def test_sparkline_single_run_is_a_point():
    line = build_sparkline([{"total_us": 1500, "status": "succeeded"}])
    assert len(line.points.split()) == 1
    assert line.last_y == 3.0
    assert line.summary == "Last timed run: 1.5 ms"


@pytest.mark.django_db
def test_builder_csrf_cookie_authorizes_api_calls(alice):
    # The builder sends the csrftoken cookie's value in X-CSRFToken.
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    token = browser.get("/workflows/new").cookies["csrftoken"].value
    body = {"definition": image_height()}
    refused = browser.post("/api/validate", body, content_type="application/json")
    accepted = browser.post(
        "/api/validate",
        body,
        content_type="application/json",
        headers={"X-CSRFToken": token},
    )
    assert refused.status_code == 403
    assert accepted.status_code == 200
    assert accepted.json()["valid"] is True


def test_run_page_offers_batch_input_upload(alice_browser, alice):
    definition = image_height()
    definition["inputs"] = [
        {"type": "WorkflowBatchInput", "name": "photos", "kind": ["image"]}
    ]
    definition["steps"][0]["data"] = "$inputs.photos"
    workflow = Workflow.create_with_version(alice, "Batch heights", definition)
    page = alice_browser.get(f"/workflows/{workflow.id}/run/").content.decode()
    assert 'data-image-input="photos"' in page
    assert 'data-param="photos"' not in page
