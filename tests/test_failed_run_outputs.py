"""A failed run's ``outputs`` is null, whatever failed it.

Only a run that succeeded has outputs: a step's error fails the whole
batch, and the checks that fail a run for the platform (a runner that died,
a job Redis lost) write no outputs.
"""

from django.db import connection

from runner.models import Run
from tests.conftest import start_cli_run
from tests.definitions import (
    compare,
    detection_property,
    filtered_detection,
    keep_where,
    static,
)
from tests.test_recovery import lost_run, recover_until, wait_for_final
from tests.test_runner_pool import wait_for_status


def assert_outputs_null(run: Run, client) -> None:
    """Check the outputs of failed ``run`` in the model, the database and the API."""
    assert run.status == Run.Status.FAILED
    assert run.outputs is None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT outputs IS NULL FROM runner_run WHERE id = %s",
            [Run._meta.pk.get_db_prep_value(run.pk, connection)],
        )
        [stored_as_sql_null] = cursor.fetchone()
    assert stored_as_sql_null
    body = client.get(f"/api/runs/{run.pk}").json()
    assert body["status"] == "failed"
    assert body["outputs"] is None


def test_failed_step_leaves_outputs_null(runner, alice, alice_client):
    # Every detection's confidence is compared with a string, which fails.
    definition = filtered_detection(
        keep_where(
            compare(detection_property("confidence"), "(Number) >", static("high"))
        )
    )
    outcome = start_cli_run(alice, definition, wait_s=120)
    assert outcome.payload["meta"]["error"]["code"] == "step_rejected_input"
    assert outcome.payload["outputs"] is None
    assert_outputs_null(Run.objects.get(pk=outcome.run.pk), alice_client)


def test_reaped_run_outputs_null(runner, alice, alice_client):
    # A runner that Redis no longer lists held this run.
    run = Run.objects.create(
        owner=alice, source="api", status=Run.Status.RUNNING, runner_name="forgotten"
    )
    assert_outputs_null(wait_for_final(run), alice_client)


def test_lost_job_outputs_null(runner, alice, alice_client):
    run = lost_run(alice, with_inputs=False)
    assert_outputs_null(recover_until(run, Run.Status.FAILED), alice_client)


def test_abandoned_run_outputs_null(runner, alice, alice_client):
    # Running under the live runner, which executes nothing.
    run = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.RUNNING,
        runner_name=runner.name,
        runner_instance=runner.state()["instance"],
    )
    failed = wait_for_status(run.id, Run.Status.FAILED, timeout_s=30)
    assert_outputs_null(failed, alice_client)
