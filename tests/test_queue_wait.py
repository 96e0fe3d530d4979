"""A queued run's ``waiting`` object explains why it has not started."""

import signal
import time

from runner import keys
from runner.finish import fail_run
from runner.models import Run
from tests.conftest import registered_runner, start_cli_run
from tests.definitions import detection
from tests.test_runs import create_workflow, run_workflow
from webapp.clock import clock
from webapp.redis import get_redis


def read_run(client, run_id: str) -> dict:
    response = client.get(f"/api/runs/{run_id}")
    assert response.status_code == 200, response.json()
    return response.json()


def wait_for_waiting(client, run_id: str, condition, timeout_s: float = 30) -> dict:
    """Read the run until its ``waiting`` object meets ``condition``; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_run(client, run_id)
        assert run["status"] == "queued", run
        if condition(run["waiting"]):
            return run["waiting"]
        assert time.monotonic() < deadline, run["waiting"]
        time.sleep(0.2)


def wait_for_finish(client, run_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_run(client, run_id)
        if run["status"] in ("succeeded", "failed"):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)


def test_paused_runner_explains_wait(runner, alice_client, bob_client):
    workflow_id = create_workflow(alice_client, detection())
    runner.process.send_signal(signal.SIGSTOP)
    try:
        response = run_workflow(alice_client, workflow_id, **{"async": True})
        assert response.status_code == 202, response.json()
        run_id = response.json()["id"]

        # Stopped, the runner first misses heartbeats while its key lives.
        stalled = wait_for_waiting(alice_client, run_id, lambda w: w["silent_runners"])
        assert stalled["queue"] == keys.SHARED_QUEUE
        assert stalled["runner"] is None
        assert [r["name"] for r in stalled["silent_runners"]] == [runner.name]
        # Stopped while blocked in BLPOP, the runner still gets the job from
        # Redis; stopped elsewhere in its loop, it leaves the job queued.
        if stalled["queued_ahead"] is None:
            assert stalled["reason"].startswith(
                "The run has left its queue, probably taken by runner "
                f"{runner.name}, which has sent no heartbeat for "
            )
        else:
            assert stalled["queued_ahead"] == 0
            assert stalled["reason"].startswith(
                f"No runner is responding: runner {runner.name} has sent no "
                "heartbeat for "
            )

        # Then its heartbeat expires (RUNNER_DEAD_AFTER_S is 2 s in tests),
        # and no runner is live.
        expired = wait_for_waiting(
            alice_client, run_id, lambda w: w["live_runners"] == 0
        )
        assert expired["busy_runners"] == 0
        assert expired["silent_runners"][0]["live"] is False
        assert expired["silent_runners"][0]["last_heartbeat_s"] >= 2
        assert f"runner {runner.name}" in expired["reason"]
        assert expired["reason"].endswith(
            " resumes or starts."
            if expired["queued_ahead"] == 0
            else f"and it starts when {runner.name} resumes, or when another "
            "runner starts and queues it again."
        )

        # Another user's run is not found, as if it did not exist.
        assert bob_client.get(f"/api/runs/{run_id}").status_code == 404
    finally:
        runner.process.send_signal(signal.SIGCONT)

    finished = wait_for_finish(alice_client, run_id)
    assert finished["status"] == "succeeded", finished
    assert "waiting" not in finished


def test_routed_runner_silence_is_named(runner, alice, alice_client):
    # "parked" has a live heartbeat key, but its last heartbeat was 10 s ago,
    # as for a runner stopped just after routing chose it.
    connection = get_redis()
    with registered_runner("parked") as parked:
        seen_ms = clock.now_ns() // 1_000_000 - 10_000
        connection.zadd(keys.RUNNERS_SEEN, {parked: seen_ms})
        try:
            run = start_cli_run(alice, detection(), wait_s=0, runner=parked).run
            waiting = read_run(alice_client, str(run.id))["waiting"]
        finally:
            connection.delete(f"rq:queue:{keys.runner_queue(parked)}")
            connection.zrem(keys.RUNNERS_SEEN, parked)
            fail_run(run.id, "test ended", expected_status=Run.Status.QUEUED)

    assert waiting["queue"] == keys.runner_queue(parked)
    assert waiting["queued_ahead"] == 0
    assert waiting["runner"]["name"] == parked
    assert waiting["runner"]["live"] is True
    assert waiting["runner"]["last_heartbeat_s"] >= 10
    assert waiting["live_runners"] == 2
    assert waiting["reason"].startswith(
        f"This run waits in the queue of runner {parked}, which has sent no "
        "heartbeat for 10 s, and a live runner moves the run to the shared "
        f"queue once {parked}'s heartbeat expires."
    )
