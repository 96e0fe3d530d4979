"""Deleting a workflow hides it everywhere, and keeps its runs and bills."""

import time

import pytest
import requests

from billing.models import Bill
from runner.models import Run
from runner.service import start_run
from tests.conftest import image_b64
from tests.definitions import image_height
from tests.test_browser_run import sign_in
from tests.test_runs import create_workflow, run_workflow
from workflows.errors import WorkflowDeletedError
from workflows.models import Workflow


def ran_and_deleted(client) -> tuple[int, str]:
    """Create a workflow, run it once, delete it; return its id and the run's."""
    workflow_id = create_workflow(client, image_height(), name="bus height")
    run = run_workflow(client, workflow_id)
    assert run.status_code == 200, run.json()
    assert client.delete(f"/api/workflows/{workflow_id}").status_code == 204
    return workflow_id, run.json()["id"]


def test_delete_hides_workflow(runner, alice_client):
    workflow_id, _ = ran_and_deleted(alice_client)
    assert alice_client.get(f"/api/workflows/{workflow_id}").status_code == 404
    listed = alice_client.get("/api/workflows/").json()["results"]
    assert workflow_id not in [workflow["id"] for workflow in listed]


def test_delete_keeps_runs_and_bills(runner, alice_client):
    _, run_id = ran_and_deleted(alice_client)
    stored = alice_client.get(f"/api/runs/{run_id}")
    assert stored.status_code == 200
    assert stored.json()["status"] == "succeeded"
    assert Bill.objects.filter(run_id=run_id).count() == 1


def test_run_page_of_deleted_workflow(alice, client):
    from tests.test_billing_pages import make_bill

    workflow = Workflow.create_with_version(alice, "bus height", image_height())
    run = make_bill(alice, version=workflow.latest_version()).run
    client.force_login(alice)
    assert f'href="/workflows/{workflow.id}/run/"' in (
        client.get(f"/runs/{run.id}/").content.decode()
    )
    workflow.mark_deleted()
    page = client.get(f"/runs/{run.id}/")
    assert page.status_code == 200
    html = page.content.decode()
    # The run stays readable, but nothing links to the deleted workflow's
    # run page, which is a 404.
    assert f"/workflows/{workflow.id}/run/" not in html
    assert 'id="workflow-deleted"' in html
    assert "The workflow was deleted, so it cannot run again." in html


def test_deleted_workflow_runs_no_more(runner, alice_client):
    workflow_id, _ = ran_and_deleted(alice_client)
    before = Run.objects.count()
    assert run_workflow(alice_client, workflow_id).status_code == 404
    estimate = alice_client.post(
        f"/api/workflows/{workflow_id}/estimate", {"inputs": {}}, format="json"
    )
    assert estimate.status_code == 404
    assert Run.objects.count() == before


def test_deleted_workflow_roboflow_route_404(runner, live_server, alice, alice_key):
    workflow = Workflow.create_with_version(alice, "bus height", image_height())
    workflow.mark_deleted()
    response = requests.post(
        f"{live_server.url}/alice/workflows/{workflow.slug}",
        json={
            "api_key": alice_key,
            "inputs": {"image": {"type": "base64", "value": image_b64()}},
        },
        timeout=60,
    )
    assert response.status_code == 404


def test_delete_twice_404(alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    assert alice_client.delete(f"/api/workflows/{workflow_id}").status_code == 204
    assert alice_client.delete(f"/api/workflows/{workflow_id}").status_code == 404


def test_delete_someone_elses_404(alice_client, bob_client):
    workflow_id = create_workflow(bob_client, image_height())
    assert alice_client.delete(f"/api/workflows/{workflow_id}").status_code == 404
    assert bob_client.get(f"/api/workflows/{workflow_id}").status_code == 200


def test_update_deleted_workflow_404(alice_client):
    workflow_id = create_workflow(alice_client, image_height())
    alice_client.delete(f"/api/workflows/{workflow_id}")
    response = alice_client.put(
        f"/api/workflows/{workflow_id}", {"name": "renamed"}, format="json"
    )
    assert response.status_code == 404


def test_deleted_slug_not_reused(alice_client):
    first = create_workflow(alice_client, image_height(), name="bus height")
    slug = alice_client.get(f"/api/workflows/{first}").json()["slug"]
    alice_client.delete(f"/api/workflows/{first}")
    second = create_workflow(alice_client, image_height(), name="bus height")
    assert alice_client.get(f"/api/workflows/{second}").json()["slug"] != slug


def test_billing_filter_keeps_deleted_workflow(runner, alice, alice_client, client):
    workflow_id, _ = ran_and_deleted(alice_client)
    client.force_login(alice)
    summary = client.get("/billing/summary.json", {"workflow": workflow_id})
    assert summary.status_code == 200
    assert summary.json()["totals"]["runs"] == 1


# The list page in the browser, and its form posts


def test_list_page_deletes_after_confirming(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "bus height", image_height())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/")
    page.get_by_role("button", name="Delete workflow “bus height”…").click()
    confirm = page.locator("#delete-confirm")
    assert "Delete workflow “bus height”?" in confirm.text_content()
    workflow.refresh_from_db()
    assert workflow.deleted_at is None

    page.click("#delete-confirm-button")
    page.wait_for_selector("text=Workflow “bus height” deleted.")
    assert page.locator(f'tr[data-workflow-id="{workflow.id}"]').count() == 0
    workflow.refresh_from_db()
    assert workflow.deleted_at is not None


def test_list_page_escape_cancels_delete(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "bus height", image_height())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/")
    page.get_by_role("button", name="Delete workflow “bus height”…").click()
    confirm = page.locator("#delete-confirm")
    confirm.wait_for()
    assert page.evaluate("document.activeElement.id") == "delete-confirm"

    page.keyboard.press("Escape")
    page.wait_for_url(f"{asgi_server}/workflows/")
    assert confirm.count() == 0
    assert page.locator(f'tr[data-workflow-id="{workflow.id}"]').count() == 1
    # Focus returns to the Delete button that opened the question.
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == (
        "Delete workflow “bus height”…"
    )
    workflow.refresh_from_db()
    assert workflow.deleted_at is None


def test_list_page_cancel_refocuses_delete(transactional_db, asgi_server, page, alice):
    Workflow.create_with_version(alice, "bus height", image_height())
    other = Workflow.create_with_version(alice, "bus width", image_height())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/")
    page.get_by_role("button", name="Delete workflow “bus width”…").click()
    confirm = page.locator("#delete-confirm")
    confirm.wait_for()

    page.click("#delete-cancel")
    page.wait_for_url(f"{asgi_server}/workflows/")
    assert confirm.count() == 0
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == (
        "Delete workflow “bus width”…"
    )

    # Enter on the focused button opens the same question again.
    page.keyboard.press("Enter")
    page.wait_for_url(f"{asgi_server}/workflows/?delete={other.id}")
    assert "Delete workflow “bus width”?" in confirm.text_content()
    other.refresh_from_db()
    assert other.deleted_at is None


def test_list_page_delete_of_someone_elses_404(client, alice, bob):
    workflow = Workflow.create_with_version(bob, "bobs height", image_height())
    client.force_login(alice)
    response = client.post(
        "/workflows/", {"action": "delete", "workflow": str(workflow.id)}
    )
    assert response.status_code == 404
    workflow.refresh_from_db()
    assert workflow.deleted_at is None


def test_list_page_delete_with_bad_id_400(client, alice):
    client.force_login(alice)
    response = client.get("/workflows/", {"delete": "1; drop"})
    assert response.status_code == 400


def run_deleted_workflow(owner, wait_s: float):
    """Delete a new workflow of ``owner``, then send a run of the version read before.

    Returns the version, and the WorkflowDeletedError that the run raised.
    """
    workflow = Workflow.create_with_version(owner, "bus height", image_height())
    version = workflow.latest_version()
    assert workflow.mark_deleted()
    with pytest.raises(WorkflowDeletedError) as raised:
        start_run(
            owner_id=owner.id,
            source="api",
            definition=version.definition,
            raw_inputs={"image": {"type": "base64", "value": image_b64()}},
            started_ns=time.perf_counter_ns(),
            wait_s=wait_s,
            workflow_version_id=version.id,
        )
    return version, raised.value


def test_run_after_delete_not_stored(db, alice):
    """A delete that commits while a run request checks its inputs wins.

    The request read the workflow and its version before the delete. The
    run is rejected when it is about to be stored, so no run of the workflow
    is stored after the delete returned 204.
    """
    version, error = run_deleted_workflow(alice, wait_s=0)

    assert error.to_dict()["code"] == "not_found"
    assert error.status == 404
    assert not Run.objects.filter(workflow_version=version).exists()


def test_waiting_run_after_delete_not_stored(runner, alice):
    # A run that waits for its result locks the workflow in its own
    # transaction, right before storing the run.
    version, _ = run_deleted_workflow(alice, wait_s=5)

    assert not Run.objects.filter(workflow_version=version).exists()
