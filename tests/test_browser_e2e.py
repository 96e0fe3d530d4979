"""A person's whole path in a real browser: build, validate, save, run, bill."""

import re

from tests.conftest import ARTIFACTS
from tests.test_browser_run import run_once, sign_in

DETECTION = "roboflow_core/roboflow_object_detection_model@v1"
PROPERTY = "roboflow_core/property_definition@v1"


def build_two_step_workflow(page) -> None:
    page.wait_for_selector("#builder[data-ready='true']")
    page.evaluate(
        """async ([detection, property]) => {
            const b = window.glassboxBuilder;
            await b.ready;
            b.addStep(detection, "people");
            b.addStep(property, "count");
            b.addStep("JsonField", "people_count");
            b.connect("image", null, "people", "images");
            b.connect("people", "predictions", "count", "data");
            b.connect("count", "output", "people_count", null);
            b.setField("count", "operations", [{type: "SequenceLength"}]);
        }""",
        [DETECTION, PROPERTY],
    )


def test_build_run_and_explain_bill(runner, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/new")
    build_two_step_workflow(page)

    # The detection step has no model yet: the server's compiler says so on
    # that node and field.
    page.click("[data-step-name='people']")
    error = page.locator("#node-panel .field-error")
    error.first.wait_for()
    assert "model_id" in error.first.text_content()
    assert page.locator("[data-step-name='people'].has-error").count() == 1

    page.fill("#node-panel [data-field='model_id']", "people-detector-544")
    page.wait_for_selector("#validation-status[data-state='valid']")
    assert page.locator(".field-error").count() == 0

    page.fill("#workflow-name", "People in the browser")
    page.click("#save")
    page.wait_for_selector("#saved-version[data-version='1']")
    page.screenshot(path=str(ARTIFACTS / "builder.png"))
    workflow_id = int(re.search(r"/workflows/(\d+)/edit", page.url)[1])

    first_run = run_once(page, asgi_server, workflow_id)
    assert page.locator("#timeline li[data-phase=cold_load]").count() == 1
    second_run = run_once(page, asgi_server, workflow_id)
    assert page.locator("#timeline li[data-phase=cold_load]").count() == 0
    page.screenshot(path=str(ARTIFACTS / "run-page.png"), full_page=True)
    assert first_run != second_run

    api_bill = page.request.get(f"{asgi_server}/api/runs/{second_run}").json()["bill"]
    page.click("#bill-link")
    page.wait_for_selector("#bill-amount")
    shown = int(page.locator("#bill-amount").text_content().strip())
    assert shown == api_bill["amount_microcredits"]
    page.screenshot(path=str(ARTIFACTS / "bill-explain.png"), full_page=True)

    page.goto(f"{asgi_server}/billing/")
    assert page.locator("#bill-table tbody tr").count() == 2
    page.screenshot(path=str(ARTIFACTS / "billing.png"), full_page=True)

    # A finished run opened later has no input image to draw on.
    page.goto(f"{asgi_server}/runs/{second_run}/")
    page.wait_for_function(
        "document.getElementById('result-json').textContent.length > 0"
    )
    assert page.locator("#result-canvas").is_hidden()


def test_builder_reports_unreadable_json(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/new")
    build_two_step_workflow(page)
    page.click("#tab-json")
    page.fill("#definition-json", '{"version": "1.0", "steps": [')
    page.wait_for_selector("#json-error:not([hidden])")
    status = page.locator("#validation-status")
    assert status.get_attribute("data-state") == "invalid"
    assert status.text_content() == "Invalid JSON"

    page.fill("#workflow-name", "Broken")
    page.click("#save")
    page.wait_for_selector("#save-message:not([hidden])")
    assert "JSON has an error" in page.locator("#save-message").text_content()
