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
    assert "cold: people-detector-512 loaded on no runner" in estimate
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
