"""A run's price cap: rejected when predicted over it, else billed at most it."""

import json

import pytest
from django.core.management import CommandError, call_command

from billing.models import Bill
from billing.policy import BillingPolicy, evaluate_formula
from runner import keys
from runner.models import Run
from tests.conftest import image_path
from tests.definitions import detection
from tests.test_billing import breakdown_with_runner_total
from tests.test_estimate import estimate, wait_until_loaded
from tests.test_priority import SLOW_MODEL
from tests.test_runner_pool import start, wait_for_status
from tests.test_runs import create_workflow, run_workflow
from webapp.redis import get_redis

# No other test uses this input size, so only the runner of the test that
# runs it has it loaded.
CAP_MODEL = "people-detector-896"


@pytest.mark.parametrize(
    "value",
    ["100", 0, -5, 1.5, 5.0, True, False, 10**15 + 1, 2**64, [100], {"n": 1}],
)
def test_run_rejects_invalid_cap(db, alice_client, value):
    workflow_id = create_workflow(alice_client, detection())
    response = run_workflow(alice_client, workflow_id, max_price_microcredits=value)
    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["code"] == "malformed_request"
    assert body["field"] == "max_price_microcredits"
    assert "must be an integer from 1 to" in body["message"]
    # The body echoes the value as sent, with its JSON type.
    assert body["max_price_microcredits"] == value
    assert type(body["max_price_microcredits"]) is type(value)
    assert Run.objects.count() == 0


@pytest.mark.parametrize(
    ("value", "got"),
    [(1.5, "got a number, 1.5"), ("abc", 'got a string, "abc"'), (0, "got 0")],
)
def test_invalid_cap_message_names_type(db, alice_client, value, got):
    workflow_id = create_workflow(alice_client, detection())
    response = run_workflow(alice_client, workflow_id, max_price_microcredits=value)
    assert response.status_code == 400, response.json()
    assert response.json()["message"].endswith(got)


def test_long_invalid_cap_not_echoed(db, alice_client):
    workflow_id = create_workflow(alice_client, detection())
    value = "9" * 1000
    response = run_workflow(alice_client, workflow_id, max_price_microcredits=value)
    assert response.status_code == 400, response.json()
    body = response.json()
    assert "max_price_microcredits" not in body
    assert body["field"] == "max_price_microcredits"
    assert len(body["message"]) < 200


def test_cap_below_known_price_rejected(runner, extra_runners, alice_client):
    workflow_id = create_workflow(alice_client, detection("people-detector-160"))
    for _ in range(2):
        assert run_workflow(alice_client, workflow_id).status_code == 200
    wait_until_loaded(runner, "people-detector-160")
    # With a second runner up, routing would send the run to the runner
    # holding the model and mark that runner busy.
    second = extra_runners("price-cap-second")
    predicted = estimate(alice_client, workflow_id)
    assert predicted["runner"] == runner.name
    price = predicted["price"]["amount_microcredits"]
    runs_before = Run.objects.count()
    bills_before = Bill.objects.count()

    response = run_workflow(alice_client, workflow_id, max_price_microcredits=price - 1)

    assert response.status_code == 409, response.json()
    body = response.json()
    assert body["code"] == "price_cap_exceeded"
    assert body["field"] == "max_price_microcredits"
    assert body["max_price_microcredits"] == price - 1
    assert body["predicted_price_microcredits"] == price
    assert body["predicted_hot"] is True
    assert "hot" in body["message"]
    assert "Raise max_price_microcredits" in body["hint"]
    assert Run.objects.count() == runs_before
    assert Bill.objects.count() == bills_before
    assert get_redis().get(keys.current_run_key(runner.name)) is None
    assert get_redis().get(keys.current_run_key(second.name)) is None


def test_cap_with_unknown_price_bills_the_cap(runner, alice_client):
    # alice has no runs, so the price is unknown and the run goes ahead. Its
    # bill is at least the 100 ms minimum, 200 micro-credits, hot or cold.
    workflow_id = create_workflow(alice_client, detection("people-detector-160"))
    predicted = estimate(alice_client, workflow_id)
    assert predicted["price"] is None

    response = run_workflow(alice_client, workflow_id, max_price_microcredits=150)

    assert response.status_code == 200, response.json()
    body = response.json()
    bill = body["bill"]
    assert bill["amount_microcredits"] == 150
    assert bill["capped"] is True
    assert bill["formula"].startswith("amount_microcredits = min(")
    assert evaluate_formula(bill["formula"]) == 150
    assert response.headers["X-Billed-Amount-Microcredits"] == "150"
    assert response.headers["X-Billed-Time"] == f"{bill['billed_ms'] / 1000:.3f}"
    assert body["max_price_microcredits"] == 150
    assert body["price_estimate"]["amount_microcredits"] is None
    assert body["price_estimate"]["hot"] is predicted["hot"]
    stored = Bill.objects.get(run_id=body["id"])
    assert stored.amount_microcredits == 150
    assert stored.capped is True
    assert evaluate_formula(stored.formula) == 150
    run = Run.objects.get(pk=body["id"])
    assert run.max_price_microcredits == 150
    assert run.price_estimate["amount_microcredits"] is None


def test_cap_above_price_changes_nothing(runner, alice_client):
    workflow_id = create_workflow(alice_client, detection("people-detector-160"))
    assert run_workflow(alice_client, workflow_id).status_code == 200
    wait_until_loaded(runner, "people-detector-160")
    price = estimate(alice_client, workflow_id)["price"]["amount_microcredits"]

    response = run_workflow(alice_client, workflow_id, max_price_microcredits=10**12)

    assert response.status_code == 200, response.json()
    body = response.json()
    bill = body["bill"]
    uncapped = BillingPolicy.from_settings().bill(
        breakdown_with_runner_total(bill["billable_us"])
    )
    assert bill["amount_microcredits"] == uncapped.amount_microcredits
    assert bill["formula"] == uncapped.formula
    assert bill["capped"] is False
    assert evaluate_formula(bill["formula"]) == bill["amount_microcredits"]
    assert body["price_estimate"]["amount_microcredits"] == price
    assert body["price_estimate"]["hot"] is True


def test_run_without_cap_stores_no_estimate(runner, alice_client):
    workflow_id = create_workflow(alice_client, detection("people-detector-160"))
    body = run_workflow(alice_client, workflow_id).json()
    assert body["max_price_microcredits"] is None
    assert body["price_estimate"] is None
    assert body["bill"]["capped"] is False


def test_runworkflow_max_price_caps_the_bill(runner, capsys):
    call_command(
        "runworkflow",
        "examples/people-count.json",
        "--image",
        str(image_path()),
        "--user",
        "price-cap-cli",
        "--max-price",
        "120",
    )
    output = capsys.readouterr().out
    run = Run.objects.get(owner__username="price-cap-cli")
    assert run.max_price_microcredits == 120
    assert run.bill.amount_microcredits == 120
    assert run.bill.capped is True
    assert "120 micro-credits" in output
    assert "lowered to the run's price cap" in output
    assert "min(" in output


def test_runworkflow_rejection_names_option(runner, alice, tmp_path):
    # Two runs make the price known, and the model stays loaded, so a cap of
    # 1 micro-credit is below the predicted price.
    model_id = "people-detector-160"
    for _ in range(2):
        start(alice, model_id, runner.name)
    wait_until_loaded(runner, model_id)
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(detection(model_id)))
    runs_before = Run.objects.count()

    with pytest.raises(CommandError) as cli_error:
        call_command(
            "runworkflow",
            str(path),
            "--image",
            str(image_path()),
            "--user",
            alice.username,
            "--max-price",
            "1",
        )

    body = json.loads(str(cli_error.value))
    assert body["code"] == "price_cap_exceeded"
    assert body["field"] == "--max-price"
    assert "is over its --max-price, 1;" in body["message"]
    assert "max_price_microcredits" not in body["message"]
    assert "--max-price" in body["hint"]
    assert "max_price_microcredits" not in body["hint"]
    assert Run.objects.count() == runs_before


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "abc", str(10**15 + 1)])
def test_runworkflow_rejects_invalid_max_price(db, value):
    with pytest.raises(CommandError, match="micro-credits from 1 to"):
        call_command("runworkflow", "examples/people-count.json", "--max-price", value)


def test_capped_bill_marked_on_pages(runner, alice, alice_client, client):
    # alice has no runs, so the price is unknown and the cap applies in the bill.
    workflow_id = create_workflow(alice_client, detection("people-detector-160"))
    response = run_workflow(alice_client, workflow_id, max_price_microcredits=1)
    assert response.status_code == 200, response.json()
    run_id = response.json()["id"]
    client.force_login(alice)

    explain = client.get(f"/billing/runs/{run_id}/").content.decode()
    assert 'id="bill-capped"' in explain
    assert "capped at 1 µcr" in explain
    assert "Apply the run&#x27;s price cap of 1 µcr" in explain
    assert (
        "Evaluating the stored formula gives 1 µcr, the amount on the bill" in explain
    )

    history = client.get("/billing/").content.decode()
    assert 'class="badge capped"' in history

    export = client.get("/billing/export.csv").content.decode().splitlines()
    header = export[0].split(",")
    row = export[1].split(",")
    assert row[header.index("Capped at (µcr)")] == "1"


def test_rejection_hint_offers_economy(
    runner, extra_runners, alice, alice_client, tmp_path
):
    # "cap-holder" has the model loaded and is busy, so a standard run would
    # load it cold on the idle session runner, and an economy run would wait
    # for the holder and start hot, for less.
    holder = extra_runners("cap-holder")
    definition = detection(CAP_MODEL)
    for _ in range(2):
        start(alice, CAP_MODEL, holder.name)
    wait_until_loaded(holder, CAP_MODEL)
    client = alice_client
    workflow_id = create_workflow(client, definition)
    busy = start(alice, SLOW_MODEL, holder.name, wait_s=0)
    wait_for_status(busy.run.id, Run.Status.RUNNING)
    standard = estimate(client, workflow_id)
    economy = estimate(client, workflow_id, {"priority": "economy"})
    assert standard["hot"] is False
    assert economy["runner"] == holder.name
    assert economy["hot"] is True
    cold_price = standard["price"]["amount_microcredits"]
    hot_price = economy["price"]["amount_microcredits"]
    assert hot_price < cold_price
    runs_before = Run.objects.count()

    rejected = run_workflow(client, workflow_id, max_price_microcredits=hot_price)
    economy_rejected = run_workflow(
        client, workflow_id, priority="economy", max_price_microcredits=hot_price - 1
    )
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(definition))
    with pytest.raises(CommandError) as cli_error:
        call_command(
            "runworkflow",
            str(path),
            "--image",
            str(image_path()),
            "--user",
            alice.username,
            "--max-price",
            str(hot_price),
        )

    assert rejected.status_code == 409, rejected.json()
    body = rejected.json()
    assert body["hint"] == (
        f"Send the run with priority economy: it then waits for runner "
        f"{holder.name}, which has its models loaded, and is predicted to cost "
        f"{hot_price} micro-credits. Or raise max_price_microcredits to at least "
        f"{cold_price}."
    )
    assert body["economy_estimate"]["runner"] == holder.name
    assert body["economy_estimate"]["amount_microcredits"] == hot_price
    assert economy_rejected.status_code == 409, economy_rejected.json()
    economy_body = economy_rejected.json()
    # Already an economy run predicted hot: only a higher cap helps.
    assert economy_body["hint"] == (
        f"Raise max_price_microcredits to at least {hot_price}."
    )
    assert economy_body["economy_estimate"] is None
    cli_body = json.loads(str(cli_error.value))
    assert "--priority economy" in cli_body["hint"]
    assert f"raise --max-price to at least {cold_price}" in cli_body["hint"]
    assert Run.objects.count() == runs_before
