"""Runs whose queued job Redis lost, and other edge inputs found by attacking."""

import datetime
import threading
import time

import pytest
from django.db import connection as db_connection
from django.test import override_settings
from django.utils import timezone
from rq import Queue
from rq.job import Job

from billing.models import Bill
from runner import finish, fleet, keys, reaper, recovery
from runner.dispatch import enqueue, enqueue_job, job_snapshot
from runner.model_cache import ModelCache
from runner.models import Run
from runner.presenters import run_to_dict
from runner.reaper import reap_runner
from runner.recovery import POPPED_AFTER_S, recover_lost_jobs
from runner.runtime import RunnerRuntime
from runner.worker import RunnerWorker
from tests.conftest import image_b64, image_bytes, registered_runner, start_cli_run
from tests.definitions import image_height
from tests.test_runner_pool import wait_for_status
from webapp.clock import clock
from webapp.redis import get_redis
from workflows.models import Workflow


def lost_run(owner, with_inputs: bool, queued_s_ago: float = 300) -> Run:
    """A queued run, by default old enough to count as lost, with no job in Redis."""
    workflow = Workflow.create_with_version(owner, "h", image_height())
    version = workflow.latest_version()
    run = Run.objects.create(
        owner=owner,
        workflow_version=version,
        definition_digest=version.digest,
        source="api",
        image_info={
            "image": [{"format": "JPEG", "width": 810, "height": 1080, "bytes": 1}]
        },
        queue_name="shared",
    )
    run.queued_at_ns = clock.now_ns() - int(queued_s_ago * 1e9)
    Run.objects.filter(pk=run.pk).update(queued_at_ns=run.queued_at_ns)
    connection = get_redis()
    connection.delete(f"{keys.PREFIX}:reconcile")
    if with_inputs:
        connection.hset(
            keys.inputs_key(str(run.id)), keys.input_field("image", 0), image_bytes()
        )
    return run


def recover_until(run: Run, wanted: str, timeout_s: float = 30) -> Run:
    """Call the recovery until the run reaches ``wanted``.

    The live runner's heartbeat thread runs the same recovery and may hold
    its lock, so either side may be the one that acts.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        recover_lost_jobs()
        run.refresh_from_db()
        if run.status == wanted:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run.id} is {run.status}, expected {wanted}")


def test_lost_job_with_inputs_runs_again(runner, alice):
    run = lost_run(alice, with_inputs=True)
    finished = recover_until(run, Run.Status.SUCCEEDED)
    assert finished.queue_name == keys.SHARED_QUEUE
    assert finished.outputs == [{"height": 1080}]


def test_popped_unread_job_runs_again(runner, alice):
    # A runner popped the job id and died before reading the job hash: the
    # hash remains, in no queue.
    run = lost_run(alice, with_inputs=True)
    run.queue_name = keys.runner_queue("gone")
    Run.objects.filter(pk=run.pk).update(queue_name=run.queue_name)
    enqueue(run)
    connection = get_redis()
    queue_key = f"{Queue.redis_queue_namespace_prefix}{run.queue_name}"
    assert connection.lrem(queue_key, 0, str(run.id)) == 1
    assert connection.exists(Job.key_for(str(run.id)))

    finished = recover_until(run, Run.Status.SUCCEEDED)
    assert finished.queue_name == keys.SHARED_QUEUE
    assert finished.outputs == [{"height": 1080}]


def test_lost_job_without_inputs_fails_unbilled(runner, alice):
    run = lost_run(alice, with_inputs=False)
    run = recover_until(run, Run.Status.FAILED)
    assert "lost" in run.error["message"]
    assert Bill.objects.get(run=run).amount_microcredits == 0


def wait_for_final(run: Run, timeout_s: float = 30) -> Run:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.is_finished:
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run.id} is still {run.status}")


def test_job_on_stopped_runners_queue_runs(runner, alice):
    # A runner that stopped cleanly has no heartbeat and no registration, but
    # a run routed to it from a heartbeat read just before the stop still
    # reaches its queue.
    run = start_cli_run(alice, image_height(), wait_s=0, runner="stopped").run
    finished = wait_for_final(run)
    assert finished.status == Run.Status.SUCCEEDED
    assert finished.outputs == [{"height": 1080}]


def test_run_of_forgotten_runner_fails_unbilled(runner, alice):
    # A Redis server that restarted empty no longer lists the runner that
    # died holding this run.
    run = Run.objects.create(
        owner=alice, source="api", status=Run.Status.RUNNING, runner_name="forgotten"
    )
    finished = wait_for_final(run)
    assert finished.status == Run.Status.FAILED
    assert "Redis lost its registration" in finished.error["message"]
    assert Bill.objects.get(run=run).billed is False


def test_lost_check_ignores_web_clock(alice):
    # The web server's clock is five minutes behind the Redis server's, so
    # the run looks old by created_at. On the Redis clock it was queued just
    # now, and its job may still be on its way.
    run = lost_run(alice, with_inputs=False, queued_s_ago=0)
    Run.objects.filter(pk=run.pk).update(
        created_at=timezone.now() - datetime.timedelta(minutes=5)
    )
    recover_lost_jobs()
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED
    assert not Bill.objects.filter(run=run).exists()


def test_async_flag_must_be_boolean(alice_client, alice):
    workflow = Workflow.create_with_version(alice, "h", image_height())
    response = alice_client.post(
        f"/api/workflows/{workflow.id}/runs",
        {"inputs": {"image": image_b64()}, "async": "false"},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["field"] == "async"
    assert Run.objects.count() == 0


def test_fleet_is_staff_only(alice_client):
    assert alice_client.get("/api/fleet").status_code == 403


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
def test_oversized_body_gets_json_413(alice_client, alice):
    workflow = Workflow.create_with_version(alice, "h", image_height())
    response = alice_client.post(
        f"/api/workflows/{workflow.id}/runs",
        {"inputs": {"image": image_b64()}},
        format="json",
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


@pytest.mark.parametrize("extra", [b"x" * 100_000, b"\x00" * 10])
def test_jpeg_with_data_after_end_marker_is_accepted(extra):
    from workflows.images import inspect_image

    info = inspect_image(image_bytes() + extra, input_name="image", max_pixels=10**8)
    assert (info.width, info.height) == (810, 1080)


def test_jpeg_without_scan_is_rejected():
    from workflows.errors import InputError
    from workflows.images import inspect_image

    data = image_bytes()
    headers_only = data[: data.find(b"\xff\xda")] + b"\xff\xd9"
    with pytest.raises(InputError):
        inspect_image(headers_only, input_name="image", max_pixels=10**8)


def test_image_side_limit():
    import io

    from PIL import Image

    from workflows.errors import InputError
    from workflows.images import inspect_image

    buffer = io.BytesIO()
    Image.new("L", (1, 70_000)).save(buffer, format="PNG")
    with pytest.raises(InputError) as caught:
        inspect_image(buffer.getvalue(), input_name="image", max_pixels=10**9)
    assert "side" in caught.value.message


def test_lost_check_skips_a_run_a_live_runner_is_taking(alice):
    # The runner has read and deleted the job hash, and not yet claimed the
    # run: the run is queued with no job, as a lost one would be.
    run = lost_run(alice, with_inputs=True)
    with registered_runner("taking") as name:
        get_redis().set(keys.current_run_key(name), str(run.id), ex=30)
        try:
            assert recover_lost_jobs() == 0
        finally:
            get_redis().delete(keys.current_run_key(name))
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED
    assert run.queue_name == "shared"
    assert not Job.exists(str(run.id), connection=get_redis())


def test_runner_dying_twice_is_reaped_twice(alice):
    # The same name, restarted and dead again within seconds of the first
    # reap: its new run must not wait for the first reap's lock to expire.
    for _ in range(2):
        run = Run.objects.create(
            owner=alice, source="api", status=Run.Status.RUNNING, runner_name="twice"
        )
        assert reap_runner("twice", "runner twice stopped sending heartbeats") == 1
        run.refresh_from_db()
        assert run.status == Run.Status.FAILED
        assert Bill.objects.get(run=run).billed is False
        assert Bill.objects.get(run=run).created_at == run.finished_at


def test_reap_fails_run_of_last_heartbeat_instance(alice):
    # A claim sets the process's instance key again, so a runner killed
    # right after a claim leaves the key alive after its last heartbeat has
    # expired. Spared, the run waited for the check for runners that Redis
    # forgot, which failed it as lost by Redis.
    name = "killed-after-claim"
    fleet.publish_heartbeat(name, {"name": name, "instance": "claimed", "models": []})
    connection = get_redis()
    connection.delete(keys.heartbeat_key(name))
    connection.set(keys.instance_key("claimed"), name, ex=60)
    run = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.RUNNING,
        runner_name=name,
        runner_instance="claimed",
    )
    reason = f"runner {name} stopped sending heartbeats"
    try:
        failed = reap_runner(name, reason)
    finally:
        connection.delete(keys.instance_key("claimed"))
        connection.hdel(keys.RUNNERS_ENDED, name)
        connection.hdel(keys.RUNNERS_INSTANCE, name)
        connection.zrem(keys.RUNNERS_SEEN, name)

    assert failed == 1
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error["message"] == reason
    assert Bill.objects.get(run=run).billed is False


def test_reap_spares_run_of_other_live_instance(alice):
    # A process that lost the name to a newer one, which then died, is
    # still finishing its run: only the newer process is dead.
    name = "lost-name-then-reaped"
    fleet.publish_heartbeat(name, {"name": name, "instance": "older", "models": []})
    connection = get_redis()
    connection.delete(keys.heartbeat_key(name))
    fleet.publish_heartbeat(name, {"name": name, "instance": "newer", "models": []})
    connection.delete(keys.heartbeat_key(name))
    connection.set(keys.instance_key("older"), name, ex=60)
    run = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.RUNNING,
        runner_name=name,
        runner_instance="older",
    )
    try:
        failed = reap_runner(name, f"runner {name} stopped sending heartbeats")
    finally:
        for instance in ("older", "newer"):
            connection.delete(keys.instance_key(instance))
        connection.hdel(keys.RUNNERS_ENDED, name)
        connection.hdel(keys.RUNNERS_INSTANCE, name)
        connection.zrem(keys.RUNNERS_SEEN, name)

    assert failed == 0
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING


def test_runner_never_reaps_itself(alice):
    # Right after a pause longer than the dead time, a runner's own
    # heartbeat has expired, and its fleet checks may run before its
    # heartbeat thread beats again.
    name = "resumed-self"
    run = Run.objects.create(
        owner=alice, source="api", status=Run.Status.RUNNING, runner_name=name
    )
    long_ago_ms = clock.now_ns() // 1_000_000 - 60_000
    get_redis().sadd(keys.RUNNERS_SET, name)
    get_redis().zadd(keys.RUNNERS_SEEN, {name: long_ago_ms})
    try:
        reaper.reap_dead_runners(own_name=name)
        run.refresh_from_db()
        assert run.status == Run.Status.RUNNING
        assert get_redis().sismember(keys.RUNNERS_SET, name)

        # Any other runner reaps it.
        reaper.reap_dead_runners(own_name="someone-else")
        run.refresh_from_db()
        assert run.status == Run.Status.FAILED
        assert Bill.objects.get(run=run).billed is False
    finally:
        get_redis().srem(keys.RUNNERS_SET, name)
        get_redis().zrem(keys.RUNNERS_SEEN, name)


def test_slow_fleet_read_reaps_nobody(alice, settings, monkeypatch):
    # A Redis server that stalls longer than the dead time expires every
    # heartbeat. The runners' heartbeats then queue behind the reaper's read,
    # so a read that waited out the stall must not reap them.
    name = "stalled-peer"
    run = Run.objects.create(
        owner=alice, source="api", status=Run.Status.RUNNING, runner_name=name
    )
    long_ago_ms = clock.now_ns() // 1_000_000 - 60_000
    get_redis().sadd(keys.RUNNERS_SET, name)
    get_redis().zadd(keys.RUNNERS_SEEN, {name: long_ago_ms})
    read_heartbeats = reaper.read_heartbeats

    def stalled_read():
        time.sleep(settings.GLASSBOX["RUNNER_HEARTBEAT_S"] + 0.2)
        return read_heartbeats()

    try:
        monkeypatch.setattr(reaper, "read_heartbeats", stalled_read)
        assert reaper.reap_dead_runners(own_name="reaper") is False
        run.refresh_from_db()
        assert run.status == Run.Status.RUNNING
        assert get_redis().sismember(keys.RUNNERS_SET, name)

        # Read without a stall, the same silence is a dead runner.
        monkeypatch.setattr(reaper, "read_heartbeats", read_heartbeats)
        assert reaper.reap_dead_runners(own_name="reaper") is True
        run.refresh_from_db()
        assert run.status == Run.Status.FAILED
        assert Bill.objects.get(run=run).billed is False
    finally:
        get_redis().srem(keys.RUNNERS_SET, name)
        get_redis().zrem(keys.RUNNERS_SEEN, name)


def test_reaping_an_idle_runner_is_logged(db, caplog):
    # The fleet keeps one end per name, so the log is the only record of
    # every reap, also of a runner that held nothing.
    with caplog.at_level("WARNING", logger="runner.reaper"):
        assert reap_runner("idle-reaped", "runner idle-reaped went quiet") == 0
    assert (
        "reaped runner idle-reaped: 0 running runs failed, 0 queued jobs moved "
        "to the shared queue (runner idle-reaped went quiet)"
    ) in caplog.text


def test_reap_spares_a_runner_that_started_again(alice):
    run = Run.objects.create(
        owner=alice, source="api", status=Run.Status.RUNNING, runner_name="back"
    )
    with registered_runner("back"):
        assert reap_runner("back", "stale view of the fleet") == 0
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    Run.objects.filter(pk=run.pk).delete()


def test_reap_requeues_popped_routed_run(runner, alice):
    # "frozen" popped the job id of the run routing reserved it for, and
    # stopped before taking the job: the id is in no queue any more.
    with registered_runner("frozen") as name:
        outcome = start_cli_run(alice, image_height(), wait_s=0, runner=name)
        run_id = str(outcome.run.id)
        popped = get_redis().lpop(f"rq:queue:{keys.runner_queue(name)}")
        assert popped.decode() == run_id
        get_redis().set(keys.current_run_key(name), run_id, ex=3600)

    reap_runner(name, "runner frozen stopped sending heartbeats")

    # A runner that comes back is not held by the mark of a run it lost.
    assert get_redis().get(keys.current_run_key(name)) is None
    # The lost-run check would queue it again only after LOST_AFTER_S.
    run = wait_for_status(run_id, Run.Status.SUCCEEDED, timeout_s=20)
    assert run.runner_name == runner.name
    assert run.breakdown["components"]["queue"] < 25_000_000


def test_reap_runs_a_moved_marked_job_once(runner, alice):
    # The mark names a run still in the dead runner's own queue: moving the
    # queue requeues it, and the mark must not queue it a second time.
    with registered_runner("moved") as name:
        outcome = start_cli_run(alice, image_height(), wait_s=0, runner=name)
        run_id = str(outcome.run.id)
        get_redis().set(keys.current_run_key(name), run_id, ex=3600)

    reap_runner(name, "runner moved stopped sending heartbeats")

    assert get_redis().get(keys.current_run_key(name)) is None
    run = wait_for_status(run_id, Run.Status.SUCCEEDED)
    assert run.runner_name == runner.name
    assert run.queue_name == keys.SHARED_QUEUE
    time.sleep(0.5)  # a second copy of the job would be taken by now
    shared = get_redis().lrange(f"rq:queue:{keys.SHARED_QUEUE}", 0, -1)
    assert run_id.encode() not in shared
    assert not Job.exists(run_id, connection=get_redis())
    assert Bill.objects.filter(run_id=run_id).count() == 1


def test_sync_reply_names_queue_after_move(runner, alice):
    # A synchronous request waits on a run routed to "moved-sync", which is
    # reaped before it takes the job: the run goes to the shared queue, and
    # the reply must name that queue, as GET /api/runs/<id> does.
    replies = []

    def wait_for_run():
        try:
            replies.append(
                start_cli_run(alice, image_height(), wait_s=30, runner="moved-sync")
            )
        finally:
            db_connection.close()

    with registered_runner("moved-sync") as name:
        waiting = threading.Thread(target=wait_for_run)
        waiting.start()
        deadline = time.monotonic() + 10
        while not Run.objects.filter(queue_name=keys.runner_queue(name)).exists():
            assert time.monotonic() < deadline, "the run was never queued"
            time.sleep(0.02)
    reap_runner(name, "runner moved-sync stopped sending heartbeats")
    waiting.join(30)

    [outcome] = replies
    assert outcome.payload["meta"]["runner"] == runner.name
    # The runner names the queue it took the job from, in the reply and
    # in the row.
    assert outcome.payload["meta"]["queue"] == keys.SHARED_QUEUE
    body = run_to_dict(outcome.run, payload=outcome.payload)
    assert body["queue"] == keys.SHARED_QUEUE
    outcome.run.refresh_from_db()
    assert outcome.run.queue_name == keys.SHARED_QUEUE


def test_reap_queues_again_a_job_popped_without_mark(runner, alice):
    # "popper" popped a job id and stopped before taking the job, and no
    # mark names the job, as after a pop from the shared queue. The reap
    # still finds it, without the lost-run check's wait of LOST_AFTER_S.
    with registered_runner("popper") as name:
        outcome = start_cli_run(alice, image_height(), wait_s=0, runner=name)
        run_id = str(outcome.run.id)
        assert get_redis().lpop(f"rq:queue:{keys.runner_queue(name)}") is not None
        get_redis().delete(keys.current_run_key(name))
        time.sleep(POPPED_AFTER_S + 0.2)

    reap_runner(name, "runner popper stopped sending heartbeats")

    run = wait_for_status(run_id, Run.Status.SUCCEEDED, timeout_s=20)
    assert run.runner_name == runner.name
    assert Bill.objects.filter(run_id=run_id).count() == 1


def test_live_runner_fails_run_it_abandoned(runner, alice):
    # As a run whose finish and whose failure the database both rejected:
    # running under this live runner, which executes something else.
    run = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.RUNNING,
        runner_name=runner.name,
        runner_instance=runner.state()["instance"],
    )
    failed = wait_for_status(run.id, Run.Status.FAILED, timeout_s=30)
    assert f"runner {runner.name} could not finish the run" in failed.error["message"]
    bill = Bill.objects.get(run_id=run.id)
    assert bill.amount_microcredits == 0


def test_abandoned_run_check_spares_live_earlier_process(alice):
    # Runs under this name that earlier processes claimed: one that is still
    # alive (paused, then found its name taken) finishes its run itself.
    cache = ModelCache(budget_bytes=0, device="cpu", warmup_size=64, torch_threads=1)
    runtime = RunnerRuntime(name="successor", device="cpu", cache=cache)
    alive, dead, legacy = (
        Run.objects.create(
            owner=alice,
            source="api",
            status=Run.Status.RUNNING,
            runner_name="successor",
            runner_instance=instance,
        )
        for instance in ("alive-process", "dead-process", "")
    )
    fleet.refresh_instance("successor", "alive-process")
    try:
        assert recovery.fail_abandoned_runs(runtime) == 2
    finally:
        fleet.remove_instance("alive-process")
    for run in (alive, dead, legacy):
        run.refresh_from_db()
    assert alive.status == Run.Status.RUNNING
    assert dead.status == Run.Status.FAILED
    assert "runner successor restarted" in dead.error["message"]
    assert legacy.status == Run.Status.FAILED
    assert Bill.objects.get(run=dead).billed is False


def test_reap_spares_run_of_live_process(alice):
    # The name's heartbeat is gone, but the process that claimed one of its
    # runs lives on, finishing that run after another process took the name.
    alive, dead = (
        Run.objects.create(
            owner=alice,
            source="api",
            status=Run.Status.RUNNING,
            runner_name="lost-name",
            runner_instance=instance,
        )
        for instance in ("finishing-process", "dead-process")
    )
    fleet.refresh_instance("lost-name", "finishing-process")
    try:
        assert reap_runner("lost-name", "runner lost-name went quiet") == 1
    finally:
        fleet.remove_instance("finishing-process")
    alive.refresh_from_db()
    dead.refresh_from_db()
    assert alive.status == Run.Status.RUNNING
    assert dead.status == Run.Status.FAILED
    Run.objects.filter(pk=alive.pk).delete()


def test_failing_a_run_keeps_mark_of_another_run(alice):
    # The busy mark of a name taken over by a new process names that
    # process's run; the old process's run ending must not clear it.
    run = Run.objects.create(
        owner=alice, source="api", status=Run.Status.RUNNING, runner_name="marked"
    )
    mark = keys.current_run_key("marked")
    get_redis().set(mark, "run-of-the-new-process", ex=30)
    try:
        assert finish.fail_run(
            run.id, "test", expected_status=Run.Status.RUNNING, expected_runner="marked"
        )
        assert get_redis().get(mark) == b"run-of-the-new-process"
    finally:
        get_redis().delete(mark)


def test_abandoned_run_check_spares_current_run(alice):
    cache = ModelCache(budget_bytes=0, device="cpu", warmup_size=64, torch_threads=1)
    runtime = RunnerRuntime(name="checking", device="cpu", cache=cache)
    current, abandoned = (
        Run.objects.create(
            owner=alice,
            source="api",
            status=Run.Status.RUNNING,
            runner_name="checking",
            runner_instance=runtime.instance,
        )
        for _ in range(2)
    )
    runtime.current_run = str(current.id)
    assert recovery.fail_abandoned_runs(runtime) == 1
    current.refresh_from_db()
    abandoned.refresh_from_db()
    assert current.status == Run.Status.RUNNING
    assert abandoned.status == Run.Status.FAILED


def test_unreadable_job_keeps_routing_mark(runner):
    # Routing marked the runner busy for a run on its own queue, and the job
    # ahead of that run's job cannot be read. Dropping it must leave the
    # mark, or routing would send the runner more runs meanwhile.
    connection = get_redis()
    queue_key = f"{Queue.redis_queue_namespace_prefix}{keys.runner_queue(runner.name)}"
    mark = keys.current_run_key(runner.name)
    # A job hash of the wrong type fails the HGETALL of the runner's take.
    connection.set(Job.key_for("unreadable-job"), "not a hash")
    connection.set(mark, "routed-run", ex=60)
    try:
        connection.rpush(queue_key, "unreadable-job")
        deadline = time.monotonic() + 30
        while "unreadable-job" not in runner.log_path.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert connection.get(mark) == b"routed-run"
    finally:
        connection.delete(mark, Job.key_for("unreadable-job"))


def test_unreadable_mark_does_not_stop_dequeueing(runner):
    # A take whose reply was lost leaves its run id to clear before the next
    # dequeue. A mark key of another type than a string fails that clear; it
    # must not fail every later dequeue with it.
    connection = get_redis()
    mark = keys.current_run_key("unreadable-mark-runner")
    worker = RunnerWorker(
        [Queue(keys.runner_queue("unreadable-mark-runner"), connection=connection)],
        connection,
        "unreadable-mark-runner",
    )
    worker.unconfirmed_take = "lost-take-run"
    connection.hset(mark, "field", "not a run id")
    try:
        worker.clear_unconfirmed_take()
        assert connection.exists(mark) == 0
        assert worker.unconfirmed_take == ""
    finally:
        connection.delete(mark)


def test_moving_copy_keeps_finished_runs_queue(runner, alice):
    # A run that the session runner finished still has a copy of its job
    # on the queue of a runner that is reaped. Moving the copy leaves the
    # queue recorded on the finished run as it was.
    connection = get_redis()
    with registered_runner("copy-holder") as name:
        run = start_cli_run(alice, image_height(), wait_s=0, runner=name).run
        own_queue = keys.runner_queue(runner.name)
        connection.rpush(
            f"{Queue.redis_queue_namespace_prefix}{own_queue}", str(run.id)
        )
        finished = wait_for_final(run)
        assert finished.status == Run.Status.SUCCEEDED
        assert finished.queue_name == own_queue
        # Finishing the run deleted its job hash, so the copy is queued
        # again as a whole job, in place of the bare id left on the queue.
        connection.delete(
            f"{Queue.redis_queue_namespace_prefix}{keys.runner_queue(name)}"
        )
        enqueue_job(
            connection,
            keys.runner_queue(name),
            str(run.id),
            {"snapshot": job_snapshot(finished)},
        )

        assert reaper.move_queued_jobs(name) == [str(run.id)]

    finished.refresh_from_db()
    assert finished.queue_name == own_queue
    assert finished.status == Run.Status.SUCCEEDED
    assert Bill.objects.filter(run_id=run.id).count() == 1
