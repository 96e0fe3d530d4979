"""Prometheus metrics read from the stored runs, bills and runner heartbeats."""

import json
import random
import re
from pathlib import Path

import pytest
from django.db.models import Sum
from rest_framework.test import APIClient

from billing.models import Bill
from runner import keys
from runner.models import Run
from tests.conftest import registered_runner, start_cli_run
from tests.definitions import detection, image_height
from webapp.models import ApiToken
from webapp.redis import get_redis
from workflows.timing import COMPONENTS

SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?P<labels>\{[^}]*\})? (?P<value>\S+)$")


def scrape(client) -> dict[tuple[str, str], float]:
    """Return each sample's value by its name and label text."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.content.decode().splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        samples[(match["name"], match["labels"] or "")] = float(match["value"])
    return samples


@pytest.fixture
def staff_client(django_user_model):
    staff = django_user_model.objects.create_user("operator", is_staff=True)
    _, key = ApiToken.issue(staff, "prometheus")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def test_metrics_match_stored_runs_and_bills(runner, alice, staff_client):
    start_cli_run(alice, detection(), wait_s=120)
    start_cli_run(alice, image_height(), wait_s=120)
    samples = scrape(staff_client)

    succeeded = Run.objects.filter(status=Run.Status.SUCCEEDED, source="cli")
    key = ("glassbox_runs_total", '{status="succeeded",source="cli"}')
    assert samples[key] == succeeded.count()

    # The components add up to the total, as each run's breakdown does.
    components = sum(
        samples[("glassbox_run_component_seconds_total", f'{{component="{name}"}}')]
        for name in COMPONENTS
    )
    total = samples[("glassbox_run_seconds_total", "")]
    stored = Run.objects.aggregate(total=Sum("total_us"))["total"]
    assert total == pytest.approx(stored / 1e6)
    assert components == pytest.approx(total)

    charged = Bill.objects.filter(billed=True).aggregate(
        amount=Sum("amount_microcredits")
    )
    assert samples[("glassbox_billed_microcredits_total", "")] == charged["amount"]

    labels = [labels for name, labels in samples if name == "glassbox_runner_info"]
    assert any(f'runner="{runner.name}"' in text for text in labels)
    assert samples[("glassbox_runner_busy", f'{{runner="{runner.name}"}}')] == 0
    assert samples[("glassbox_shared_queue_length", "")] == 0


@pytest.mark.django_db
def test_metrics_are_staff_only(alice_client):
    assert APIClient().get("/metrics").status_code == 401
    assert alice_client.get("/metrics").status_code == 403


def test_failed_load_is_not_a_cold_run(runner, alice, staff_client, settings):
    # Random bytes in the model directory fail the load after it started,
    # which marks the run cold although no model loaded.
    weights = Path(settings.GLASSBOX["MODEL_DIR"]) / "metrics-random-bytes.pt"
    weights.write_bytes(random.Random(11).randbytes(4096))
    try:
        outcome = start_cli_run(alice, detection("metrics-random-bytes"), wait_s=60)
    finally:
        weights.unlink()
    assert outcome.payload["meta"]["error"]["code"] == "model_load_failed"
    outcome.run.refresh_from_db()
    assert outcome.run.cold is True

    samples = scrape(staff_client)

    failed = '{status="failed",source="cli"}'
    assert samples[("glassbox_runs_total", failed)] == 1
    assert samples[("glassbox_cold_runs_total", failed)] == 0
    assert samples[("glassbox_load_failed_runs_total", '{source="cli"}')] == 1


def test_metrics_show_stopping_runner(db, staff_client):
    with registered_runner("metrics-stopping"), registered_runner("metrics-live"):
        heartbeat = keys.heartbeat_key("metrics-stopping")
        beat = {"name": "metrics-stopping", "models": [], "stopping": True}
        get_redis().set(heartbeat, json.dumps(beat), px=300_000)
        samples = scrape(staff_client)

    stopping = samples[("glassbox_runner_stopping", '{runner="metrics-stopping"}')]
    live = samples[("glassbox_runner_stopping", '{runner="metrics-live"}')]
    assert stopping == 1
    assert live == 0
