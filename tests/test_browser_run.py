"""The run page in a real browser: live timeline, cold then hot, the bill."""

import re

from billing.models import Bill
from tests.conftest import ARTIFACTS
from tests.definitions import detection
from tests.test_estimate import wait_until_loaded
from workflows.models import Workflow


def sign_in(page, base_url: str, username: str, password: str) -> None:
    page.goto(f"{base_url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/workflows/$"))


def run_once(page, base_url: str, workflow_id: int) -> str:
    page.goto(f"{base_url}/workflows/{workflow_id}/run/")
    page.click("#run-button")
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )
    return page.url.rstrip("/").rsplit("/", 1)[-1]


def read_estimate(page, base_url: str, workflow_id: int) -> str:
    page.goto(f"{base_url}/workflows/{workflow_id}/run/")
    page.wait_for_function(
        "document.getElementById('estimate').textContent !== 'Estimating…'"
    )
    return page.locator("#estimate").text_content()


def test_run_page_shows_live_timeline(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "People", detection("people-detector-512")
    )
    sign_in(page, asgi_server, "alice", "alice-password")

    estimate = read_estimate(page, asgi_server, workflow.id)
    assert "cold: people-detector-512 to be loaded" in estimate
    assert "latency and price unknown" in estimate

    first_run = run_once(page, asgi_server, workflow.id)
    assert page.locator("#transport").text_content() == "live over websocket"
    assert page.locator("#timeline li[data-phase=cold_load]").count() == 1
    page.screenshot(path=str(ARTIFACTS / "run-page-cold.png"), full_page=True)

    shown = int(page.locator("#summary-amount").get_attribute("data-microcredits"))
    assert shown == Bill.objects.get(run_id=first_run).amount_microcredits

    wait_until_loaded(runner, "people-detector-512")
    estimate = read_estimate(page, asgi_server, workflow.id)
    assert f"hot on {runner.name}, about " in estimate
    assert "(medians of 1 earlier run)" in estimate

    run_once(page, asgi_server, workflow.id)
    assert page.locator("#timeline li[data-phase=cold_load]").count() == 0
    assert page.locator("#timeline li[data-phase=inference]").count() == 1
    page.screenshot(path=str(ARTIFACTS / "run-page-hot.png"), full_page=True)


def test_run_page_falls_back_to_polling(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Height", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    # Refuse the websocket, as a proxy without websocket support would.
    page.route("**/ws/**", lambda route: route.abort())
    page.add_init_script("window.WebSocket = function () { throw new Error('no'); };")
    run_once(page, asgi_server, workflow.id)
    assert "polling" in page.locator("#transport").text_content()
    assert page.locator("#summary-amount").get_attribute("data-microcredits")


def detection_with_parameters() -> dict:
    """Return a detection workflow with string, list, boolean and null defaults.

    The string "42" is the default of a parameter that no step reads, and the
    page must send it as a string even though it would parse as a number.
    """
    definition = detection()
    definition["inputs"] += [
        {
            "type": "WorkflowParameter",
            "name": "model",
            "default_value": "people-detector",
        },
        {"type": "WorkflowParameter", "name": "classes", "default_value": ["Normal"]},
        {"type": "WorkflowParameter", "name": "agnostic", "default_value": True},
        {"type": "WorkflowParameter", "name": "keep", "default_value": None},
        {"type": "WorkflowParameter", "name": "label", "default_value": "42"},
    ]
    people = definition["steps"][0]
    people["model_id"] = "$inputs.model"
    people["class_filter"] = "$inputs.classes"
    people["class_agnostic_nms"] = "$inputs.agnostic"
    definition["steps"].append(
        {
            "type": "roboflow_core/detections_filter@v1",
            "name": "kept",
            "predictions": "$steps.people.predictions",
            "class_names": "$inputs.keep",
        }
    )
    definition["outputs"].append(
        {"type": "JsonField", "name": "kept", "selector": "$steps.kept.predictions"}
    )
    return definition


def test_run_page_sends_parameter_defaults(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "Parameters", detection_with_parameters()
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")

    assert page.input_value("#param-model") == "people-detector"
    assert page.input_value("#param-classes") == '["Normal"]'
    assert page.input_value("#param-agnostic") == "true"
    assert page.input_value("#param-keep") == "null"
    assert page.input_value("#param-label") == '"42"'

    with page.expect_request(f"**/api/workflows/{workflow.id}/runs") as request:
        page.click("#run-button")
    inputs = dict(request.value.post_data_json["inputs"])
    assert inputs.pop("image")["type"] == "base64"
    assert inputs == {
        "model": "people-detector",
        "classes": ["Normal"],
        "agnostic": True,
        "keep": None,
        "label": "42",
    }
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )
    assert page.locator("#run-form-error").text_content() == ""
