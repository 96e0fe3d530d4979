"""The runner pool: runners dying mid-run, eviction under a memory budget."""

import base64
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import OperationalError, transaction
from django.db import connection as db_connection
from django.utils import timezone
from rq import Queue
from rq.job import Job

from billing.models import Bill
from runner import fleet, keys, reaper, recovery
from runner.dispatch import choose_queue, wait_for_result
from runner.ended import ended_runners
from runner.events import stored_events
from runner.model_cache import ModelCache
from runner.models import Run
from runner.openmp import DEFAULT_SPINCOUNT, SPINCOUNT_VARIABLE
from runner.presenters import run_to_dict
from runner.registry import ModelSource, resolve_model
from runner.runtime import RunnerRuntime
from runner.service import start_run
from tests.conftest import ROOT, image_bytes, registered_runner, start_cli_run
from tests.definitions import (
    compare,
    detection,
    detection_property,
    filtered_detection,
    image_height,
    keep_where,
    parameter,
)
from tests.proxy import ReplyDroppingProxy, close_both
from webapp.redis import get_redis
from workflows.blocks.detections_filter.geometry import MAX_ZONE_POINTS
from workflows.errors import ModelLoadError
from workflows.timing import RunTimer


def start(owner, model_id: str, runner_name: str, wait_s: float = 120):
    return start_cli_run(owner, detection(model_id), wait_s=wait_s, runner=runner_name)


def wait_for_status(run_id, wanted: str, timeout_s: float = 60) -> Run:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = Run.objects.get(pk=run_id)
        if run.status == wanted:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} is {run.status}, expected {wanted}")


def test_killed_runner_fails_its_run_without_bill(runner, extra_runners, alice):
    victim = extra_runners("victim")
    # A large untrained architecture keeps the runner busy in its cold load.
    outcome = start(alice, "yolov8x.yaml", "victim", wait_s=0)
    wait_for_status(outcome.run.id, Run.Status.RUNNING)
    victim.kill()

    run = wait_for_status(outcome.run.id, Run.Status.FAILED, timeout_s=30)
    assert "victim" in run.error["message"]
    bill = Bill.objects.get(run=run)
    assert bill.billed is False
    assert bill.amount_microcredits == 0
    # A waiting request reads such a run from the database, without breakdown.
    payload = wait_for_result(str(run.id), timeout_s=5)
    assert run_to_dict(outcome.run, payload=payload)["runner"] == "victim"


def test_runner_stopped_twice_fails_its_run_at_once(runner, extra_runners, alice):
    # The first SIGTERM makes the runner finish its run and stop. The second
    # ends the process in the middle of the run.
    victim = extra_runners("twice-stopped")
    outcome = start(alice, "yolov8x.yaml", "twice-stopped", wait_s=0)
    wait_for_status(outcome.run.id, Run.Status.RUNNING)
    victim.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    victim.process.send_signal(signal.SIGTERM)
    assert victim.process.wait(timeout=30) != 0

    run = Run.objects.get(pk=outcome.run.id)
    assert run.status == Run.Status.FAILED
    assert "twice-stopped was stopped during the run" in run.error["message"]
    assert Bill.objects.get(run=run).billed is False


def test_single_runner_takes_hot_runs_from_the_shared_queue(runner, alice):
    # On its own queue, a backlog would stay with this runner even after
    # another runner joined.
    first = start_cli_run(alice, detection("people-detector"), wait_s=60)
    assert first.payload["meta"]["status"] == "succeeded"
    deadline = time.monotonic() + 10
    while "people-detector" not in {m["model_id"] for m in runner.state()["models"]}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.6)  # past the half-second view of the fleet that submit reuses

    second = start_cli_run(alice, detection("people-detector"), wait_s=60)
    assert [r.name for r in fleet.live_runners()] == [runner.name]
    assert second.run.queue_name == keys.SHARED_QUEUE
    assert second.run.model_refs[0]["predicted_hot"] is True
    assert second.payload["meta"]["breakdown"]["models"][0]["cold"] is False


def test_runner_marked_for_a_routed_run_leaves_shared_jobs(runner, alice):
    # Routing has marked the runner busy for a run it sent to the runner's
    # own queue. A shared job queued earlier must not go first: it could
    # evict the model the routed run was predicted hot with.
    connection = get_redis()
    connection.set(keys.current_run_key(runner.name), "routed-run", ex=30)
    try:
        shared = start_cli_run(alice, image_height(), wait_s=0).run
        assert shared.queue_name == keys.SHARED_QUEUE
        time.sleep(2.5)
        assert Run.objects.get(pk=shared.pk).status == Run.Status.QUEUED
        assert connection.lpos(f"rq:queue:{keys.SHARED_QUEUE}", str(shared.pk)) == 0
    finally:
        connection.delete(keys.current_run_key(runner.name))
    assert wait_for_status(shared.pk, Run.Status.SUCCEEDED, timeout_s=30)


def test_mark_left_by_runners_own_last_job_reserves_nothing(runner, alice):
    # Delivering a result deletes the mark; when that failed, the mark still
    # names the runner's previous job, and shared jobs must not wait for it.
    previous = start_cli_run(alice, image_height(), wait_s=60, runner=runner.name)
    assert previous.payload["meta"]["status"] == "succeeded"
    connection = get_redis()
    connection.set(keys.current_run_key(runner.name), str(previous.run.pk), ex=30)
    try:
        shared = start_cli_run(alice, image_height(), wait_s=10)
        assert shared.run.queue_name == keys.SHARED_QUEUE
        assert shared.payload is not None
        assert shared.payload["meta"]["status"] == "succeeded"
    finally:
        connection.delete(keys.current_run_key(runner.name))


def test_killed_runner_queued_runs_move_on(runner, extra_runners, alice):
    victim = extra_runners("victim-2")
    busy = start(alice, "yolov8x.yaml", "victim-2", wait_s=0)
    waiting = start(alice, "people-detector", "victim-2", wait_s=0)
    wait_for_status(busy.run.id, Run.Status.RUNNING)
    victim.kill()

    moved = wait_for_status(waiting.run.id, Run.Status.SUCCEEDED, timeout_s=60)
    assert moved.runner_name == runner.name
    assert Bill.objects.filter(run=moved).count() == 1


def test_moved_jobs_keep_their_place_in_shared_queue(runner, extra_runners, alice):
    # A job moved off a dead runner's queue goes behind the shared jobs
    # queued before it and ahead of those queued after it.
    connection = get_redis()
    victim = extra_runners("victim-3")
    busy = start(alice, "yolov8x.yaml", "victim-3", wait_s=0)
    wait_for_status(busy.run.id, Run.Status.RUNNING)
    shared_key = f"{Queue.redis_queue_namespace_prefix}{keys.SHARED_QUEUE}"
    # Marked busy for a routed run, the session runner leaves shared jobs.
    connection.set(keys.current_run_key(runner.name), "routed-run", ex=120)
    try:
        early = start_cli_run(alice, image_height(), wait_s=0).run
        waiting = start_cli_run(alice, image_height(), wait_s=0, runner="victim-3").run
        later = start_cli_run(alice, image_height(), wait_s=0).run
        assert early.queue_name == keys.SHARED_QUEUE
        assert waiting.queue_name == keys.runner_queue("victim-3")
        assert later.queue_name == keys.SHARED_QUEUE
        victim.kill()

        expected = [str(early.pk), str(waiting.pk), str(later.pk)]
        deadline = time.monotonic() + 30
        order: list[str] = []
        # The session runner pops the front job now and then and puts it
        # back, so a read may miss it.
        while order != expected and time.monotonic() < deadline:
            time.sleep(0.1)
            order = [job.decode() for job in connection.lrange(shared_key, 0, -1)]
        assert order == expected
    finally:
        connection.delete(keys.current_run_key(runner.name))

    finished = [
        wait_for_status(run.pk, Run.Status.SUCCEEDED, timeout_s=60)
        for run in (early, waiting, later)
    ]
    assert [run.runner_name for run in finished] == [runner.name] * 3
    assert finished[0].started_at < finished[1].started_at < finished[2].started_at
    assert Bill.objects.filter(run_id__in=expected).count() == 3


def test_memory_budget_forces_eviction(runner, extra_runners, alice):
    # yolov8n (about 12.6 MB of float32 weights) and yolo11n (about 10.5 MB)
    # do not fit together in 20 MiB.
    small = extra_runners("small-1", budget_mb=20)
    other = extra_runners("small-2", budget_mb=20)

    first = start(alice, "yolov8n.yaml", "small-1").payload["meta"]["breakdown"]
    second = start(alice, "yolo11n.yaml", "small-1").payload["meta"]["breakdown"]
    again = start(alice, "yolov8n.yaml", "small-1").payload["meta"]["breakdown"]
    assert first["models"][0]["cold"] is True
    assert second["models"][0]["cold"] is True
    assert again["models"][0]["cold"] is True, "yolov8n should have been evicted"

    elsewhere = start(alice, "yolov8n.yaml", "small-2").payload["meta"]["breakdown"]
    hot = start(alice, "yolov8n.yaml", "small-2").payload["meta"]["breakdown"]
    assert elsewhere["models"][0]["cold"] is True
    assert hot["models"][0]["cold"] is False

    time.sleep(0.6)  # one heartbeat
    state = small.state()
    assert [m["model_id"] for m in state["models"]] == ["yolov8n.yaml"]
    assert state["used_bytes"] <= state["budget_bytes"]
    assert state["evictions"] == 2
    assert other.state()["evictions"] == 0


def test_load_spares_models_the_run_calls(runner, extra_runners, alice):
    # Each yolov8n takes about 12.6 MB, so 30 MiB has room for two, not three.
    spare = extra_runners("spare", budget_mb=30)
    start(alice, "yolov8n.yaml-480", "spare")
    start(alice, "yolov8n.yaml-512", "spare")
    time.sleep(0.6)  # one heartbeat, so routing sees both models loaded

    # The run calls a third model, then the least recently used one. The two
    # fit together, so loading the third evicts the model the run never calls.
    definition = detection("yolov8n.yaml-544")
    definition["steps"].append(
        {
            "type": "roboflow_core/roboflow_object_detection_model@v1",
            "name": "again",
            "images": "$inputs.image",
            "model_id": "yolov8n.yaml-480",
        }
    )
    outcome = start_cli_run(alice, definition, wait_s=120, runner="spare")
    breakdown = outcome.payload["meta"]["breakdown"]
    loads = {model["model_id"]: model["loads"] for model in breakdown["models"]}
    assert loads["yolov8n.yaml-544"] == 1
    assert loads["yolov8n.yaml-480"] == 0, "loading yolov8n-544 evicted yolov8n-480"
    predicted = {
        ref["model_id"]: ref["predicted_hot"] for ref in outcome.run.model_refs
    }
    assert predicted == {"yolov8n.yaml-544": False, "yolov8n.yaml-480": True}

    time.sleep(0.6)  # one heartbeat
    state = spare.state()
    held = sorted(model["model_id"] for model in state["models"])
    assert held == ["yolov8n.yaml-480", "yolov8n.yaml-544"]
    assert state["evictions"] == 1


def test_failed_load_publishes_its_evictions(tmp_path):
    # A budget of one byte holds one model at a time. The upload's size is
    # known from its first load, so loading it again evicts the other model
    # first, and then fails on a corrupted file. The cache must then list
    # neither model, and publish the change at once, as after a load.
    weights = tmp_path / "evicts-then-fails.pt"
    shutil.copy(ROOT / "var" / "models" / "people-detector.pt", weights)
    upload = ModelSource("evicts-then-fails", "upload", str(weights), True, 64)
    other = ModelSource("yolov8n.yaml", "architecture", "yolov8n.yaml", False, 64)
    cache = ModelCache(budget_bytes=1, device="cpu", warmup_size=64, torch_threads=1)
    changes = []
    cache.on_change = lambda: changes.append(cache.snapshot())
    cache.get(upload, RunTimer().model(upload.model_id))
    cache.get(other, RunTimer().model(other.model_id))
    assert [m["cache_key"] for m in cache.snapshot()] == [other.cache_key]
    weights.write_bytes(b"not a checkpoint" * 64)
    published = len(changes)

    with pytest.raises(ModelLoadError):
        cache.get(upload, RunTimer().model(upload.model_id))

    assert cache.snapshot() == []
    assert not cache.is_loaded(other)
    assert not cache.is_loaded(upload)
    assert cache.evictions == 2
    assert changes[published:] == [[]]


def test_model_memory_is_measured(runner, extra_runners, alice):
    breakdown = start(alice, "yolov8n.yaml", runner.name).payload["meta"]["breakdown"]
    memory = breakdown["models"][0]["memory_bytes"]
    # yolov8n has 3.15 million parameters, 4 bytes each, plus batch-norm buffers.
    assert 12_000_000 < memory < 14_000_000


def test_sigterm_finishes_current_run_then_hands_off(runner, extra_runners, alice):
    leaving = extra_runners("leaving")
    current = start(alice, "yolov8s.yaml", "leaving", wait_s=0)
    waiting = start(alice, "people-detector", "leaving", wait_s=0)
    wait_for_status(current.run.id, Run.Status.RUNNING)
    leaving.process.terminate()

    finished = wait_for_status(current.run.id, Run.Status.SUCCEEDED, timeout_s=120)
    assert finished.runner_name == "leaving"
    assert leaving.process.wait(timeout=60) == 0
    handed_off = wait_for_status(waiting.run.id, Run.Status.SUCCEEDED, timeout_s=60)
    assert handed_off.runner_name == runner.name


class PickleBomb:
    """Unpickling this creates ``path``: proof that job data ran as code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def push_poison_jobs(connection, queue_key: str, marker) -> list[bytes]:
    """Push jobs a runner must drop, and return their ids."""
    poison = {
        b"foreign-function": None,
        b"no-data-field": {"foo": "bar"},
        b"bad-status": {"data": b"[]", "status": "bogus-status"},
        b"bad-date": {"data": b"[]", "created_at": "not-a-date"},
        b"pickled": {"data": pickle.dumps(PickleBomb(str(marker)))},
        b"\xff\xfe-not-utf-8": None,
        b"never-stored": None,
    }
    for job_id, fields in poison.items():
        if fields:
            connection.hset(f"rq:job:{job_id.decode()}", mapping=fields)
    connection.set("rq:job:not-a-hash", "a string")
    poison[b"not-a-hash"] = None
    Job.create(
        func="os.getpid",
        id="foreign-function",
        connection=connection,
        serializer=keys.JOB_SERIALIZER,
    ).save()
    for job_id in poison:
        connection.rpush(queue_key, job_id)
    return list(poison)


def test_runner_drops_poison_jobs_and_goes_on(runner, alice, tmp_path):
    """Jobs that are foreign, corrupt or pickled are dropped unexecuted."""
    connection = get_redis()
    marker = tmp_path / "pickle-ran"
    queue_key = f"rq:queue:{keys.runner_queue(runner.name)}"
    poison = push_poison_jobs(connection, queue_key, marker)

    outcome = start(alice, "people-detector", runner.name)
    assert outcome.payload["meta"]["status"] == "succeeded"
    assert runner.process.poll() is None
    assert not marker.exists()
    assert connection.llen(queue_key) == 0
    for job_id in poison:
        if job_id.isascii():
            assert not connection.exists(f"rq:job:{job_id.decode()}")
    log = runner.log_path.read_text()
    assert "invalid job function 'os.getpid'" in log
    assert log.count("unreadable") >= 5


def test_finished_run_leaves_no_redis_keys(runner, alice):
    outcome = start(alice, "people-detector", runner.name)
    assert outcome.payload["meta"]["status"] == "succeeded"
    run_id = str(outcome.run.id)
    connection = get_redis()
    assert not connection.exists(Job.key_for(run_id))
    assert not connection.exists(keys.inputs_key(run_id))


def test_runner_reports_its_openmp_spin_setting(runner):
    expected = os.environ.get(SPINCOUNT_VARIABLE, DEFAULT_SPINCOUNT)
    assert runner.state()["omp_spincount"] == expected


@pytest.mark.parametrize(
    ("environment", "imports_torch_first", "expected"),
    [
        ({}, False, DEFAULT_SPINCOUNT),
        ({SPINCOUNT_VARIABLE: "500"}, False, "500"),
        ({}, True, None),
    ],
)
def test_spin_default_applies_only_before_torch(
    environment, imports_torch_first, expected
):
    code = (
        ("import torch\n" if imports_torch_first else "")
        + "from runner.openmp import apply_spin_default\n"
        + "print(repr(apply_spin_default()))"
    )
    env = {k: v for k, v in os.environ.items() if k != SPINCOUNT_VARIABLE}
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout.strip() == repr(expected)


def heartbeat_pid(name: str) -> int | None:
    beat = get_redis().get(keys.heartbeat_key(name))
    return json.loads(beat)["pid"] if beat else None


def test_runner_restarted_at_once_replaces_dead_one(runner, extra_runners, alice):
    first = extra_runners("phoenix")
    interrupted = start(alice, "yolov8x.yaml", "phoenix", wait_s=0)
    wait_for_status(interrupted.run.id, Run.Status.RUNNING)
    beat = get_redis().get(keys.heartbeat_key("phoenix"))
    first.kill()
    # Keep the dead runner's last heartbeat alive, as the production expiry
    # (5 s) does while a runner restarts (about 2 s).
    get_redis().set(keys.heartbeat_key("phoenix"), beat, px=60_000)

    second = extra_runners("phoenix")
    deadline = time.monotonic() + 60
    while heartbeat_pid("phoenix") != second.process.pid:
        assert second.process.poll() is None, second.log_path.read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    failed = wait_for_status(interrupted.run.id, Run.Status.FAILED)
    assert "restarted" in failed.error["message"]


def test_second_live_runner_with_same_name_is_rejected(runner):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    env["GLASSBOX_TEST_DB_NAME"] = str(db_connection.settings_dict["NAME"])
    completed = subprocess.run(
        [sys.executable, "manage.py", "runner", "--name", runner.name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode != 0
    assert f"a runner named '{runner.name}' is already running" in completed.stderr
    # The heartbeat names the live runner's process, and the check comes
    # before the seconds-long warm-up.
    holder = runner.state()
    assert f"process {holder['pid']} on host {holder['host']}" in completed.stderr
    assert "warmed up" not in completed.stdout + completed.stderr


def wait_for_final(run_id, timeout_s: float = 120) -> Run:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = Run.objects.get(pk=run_id)
        if run.is_finished:
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} is still {run.status}")


def test_name_reuse_spares_paused_runners_claim(runner, extra_runners, alice):
    # "reused" takes a job and is paused before its claim for longer than the
    # dead time. A new process starts under the name. The old one resumes,
    # claims and executes the run: the new one must not fail it as its own
    # abandoned run.
    if db_connection.vendor != "sqlite":
        pytest.skip(
            "PostgreSQL completes an UPDATE that waited for a lock on the "
            "server, while its client is still stopped"
        )
    connection = get_redis()
    old = extra_runners("reused")
    old_instance = old.state()["instance"]
    image = {"type": "base64", "value": base64.b64encode(image_bytes()).decode()}
    with registered_runner("parking") as parking:
        # yolov8x's cold load and prediction keep the old runner in its run
        # for seconds after it resumes.
        run_id = str(
            start_run(
                owner_id=alice.id,
                source="cli",
                definition=detection("yolov8x.yaml"),
                raw_inputs={"image": image},
                started_ns=time.perf_counter_ns(),
                wait_s=0,
                runner=parking,
            ).run.id
        )
        # Marked as taking the run, the session runner neither takes a
        # shared job nor lets the reap of "reused" queue the run again.
        connection.set(keys.current_run_key(runner.name), run_id, ex=300)
        try:
            with transaction.atomic():
                # The write lock held here stops the old runner in its claim.
                Run.objects.filter(pk=run_id).update(runner_name="")
                hand_to(old, run_id, keys.runner_queue(parking))
                deadline = time.monotonic() + 30
                while connection.get(keys.current_run_key("reused")) != run_id.encode():
                    assert time.monotonic() < deadline, "the job was never taken"
                    time.sleep(0.02)
                time.sleep(0.2)
                old.process.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while connection.sismember(keys.RUNNERS_SET, "reused"):
                assert time.monotonic() < deadline, "the paused runner was not reaped"
                time.sleep(0.1)
            new = extra_runners("reused")
            new_instance = new.state()["instance"]
            old.process.send_signal(signal.SIGCONT)
            claimed = wait_for_status(run_id, Run.Status.RUNNING, timeout_s=60)
            # The new process's check for abandoned runs comes round only
            # every RECONCILE_EVERY_BEATS heartbeats, so the same check is
            # made here, as the new process, while the old one executes.
            cache = ModelCache(
                budget_bytes=0, device="cpu", warmup_size=64, torch_threads=1
            )
            successor = RunnerRuntime(name="reused", device="cpu", cache=cache)
            successor.instance = new_instance
            failed_by_check = recovery.fail_abandoned_runs(successor)
            status_after_check = Run.objects.get(pk=run_id).status
            run = wait_for_final(run_id)
            assert old.process.wait(timeout=60) != 0
        finally:
            old.process.send_signal(signal.SIGCONT)
            connection.delete(keys.current_run_key(runner.name))

    assert claimed.runner_instance == old_instance
    assert failed_by_check == 0
    # Still running after the check, so the check saw the run.
    assert status_after_check == Run.Status.RUNNING
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.runner_name == "reused"
    assert run.runner_instance == old_instance
    assert Bill.objects.filter(run_id=run_id).count() == 1
    assert "another process took the runner name" in old.log_path.read_text()
    assert new.state()["instance"] == new_instance
    assert new_instance != old_instance


def test_expired_inputs_fail_run_unbilled_as_retryable(runner, extra_runners, alice):
    queued = start(alice, "people-detector", "late-runner", wait_s=0)
    get_redis().delete(keys.inputs_key(str(queued.run.id)))
    extra_runners("late-runner")

    failed = wait_for_status(queued.run.id, Run.Status.FAILED)
    assert failed.error["code"] == "inputs_expired"
    assert failed.error["status"] == 503
    bill = Bill.objects.get(run=failed)
    assert bill.billed is False
    assert bill.amount_microcredits == 0


def test_burst_is_spread_over_idle_hot_runners(runner, extra_runners, alice):
    """Routing reads busy runners live, not from a heartbeat up to 1 s old."""
    for name in ("burst-1", "burst-2"):
        extra_runners(name)
        warm = start(alice, "yolov8s.yaml", name)
        assert warm.payload["meta"]["status"] == "succeeded"
    time.sleep(1.0)  # heartbeats list the model, and dispatch's 0.5 s cache expires

    routed = []
    for _ in range(2):
        outcome = start_cli_run(alice, detection("yolov8s.yaml"), wait_s=0)
        routed.append(outcome.run.id)
    first, second = (wait_for_status(run_id, Run.Status.SUCCEEDED) for run_id in routed)
    assert first.queue_name == keys.runner_queue("burst-1")
    assert second.queue_name == keys.runner_queue("burst-2")
    # A runner clears its busy mark after the commit that the status shows.
    deadline = time.monotonic() + 10
    marks = [keys.current_run_key("burst-1"), keys.current_run_key("burst-2")]
    while get_redis().exists(*marks):
        assert time.monotonic() < deadline, "a busy mark outlived its run"
        time.sleep(0.05)


def tamper_with_job(run_id, change) -> None:
    """Rewrite a queued job's snapshot in Redis, as a writer to Redis could."""
    connection = get_redis()
    job_key = Job.key_for(str(run_id))
    data = json.loads(zlib.decompress(connection.hget(job_key, "data")))
    change(data[3]["snapshot"])
    connection.hset(job_key, "data", zlib.compress(json.dumps(data).encode()))


def hand_to(runner, run_id, from_queue: str) -> None:
    connection = get_redis()
    prefix = Queue.redis_queue_namespace_prefix
    assert connection.lrem(f"{prefix}{from_queue}", 0, str(run_id)) == 1
    connection.rpush(f"{prefix}{keys.runner_queue(runner.name)}", str(run_id))


def test_job_with_unknown_snapshot_field_fails(runner, alice):
    # Registered, so that no runner moves the parked job to the shared queue.
    with registered_runner("parked"):
        outcome = start(alice, "people-detector", "parked", wait_s=0)
        tamper_with_job(outcome.run.id, lambda snapshot: snapshot.update(extra=1))
        hand_to(runner, outcome.run.id, keys.runner_queue("parked"))

    run = wait_for_status(outcome.run.id, Run.Status.FAILED)
    assert "TypeError" in run.error["message"]
    assert Bill.objects.get(run=run).billed is False
    assert get_redis().get(keys.current_run_key(runner.name)) is None


def test_job_with_model_path_elsewhere_fails(runner, alice, tmp_path):
    elsewhere = tmp_path / "weights.pt"
    elsewhere.write_bytes(b"not loaded")

    def move_weights(snapshot):
        snapshot["model_refs"][0]["source"]["path"] = str(elsewhere)

    with registered_runner("parked"):
        outcome = start(alice, "people-detector", "parked", wait_s=0)
        tamper_with_job(outcome.run.id, move_weights)
        hand_to(runner, outcome.run.id, keys.runner_queue("parked"))

    run = wait_for_status(outcome.run.id, Run.Status.FAILED)
    assert "ValueError" in run.error["message"]
    assert Bill.objects.get(run=run).billed is False
    state = runner.state()
    assert str(elsewhere) not in json.dumps(state)


def test_shared_job_with_missing_path_elsewhere_fails(runner, alice, tmp_path):
    # A shared job whose model path, edited in Redis, leads outside the
    # model directory fails for that path, and is not handed on as a file
    # the runner lacks.
    elsewhere = tmp_path / "absent.pt"

    def move_weights(snapshot):
        snapshot["model_refs"][0]["source"]["path"] = str(elsewhere)

    with registered_runner("parked"):
        outcome = start(alice, "people-detector", "parked", wait_s=0)
        tamper_with_job(outcome.run.id, move_weights)
        connection = get_redis()
        prefix = Queue.redis_queue_namespace_prefix
        parked_key = f"{prefix}{keys.runner_queue('parked')}"
        assert connection.lrem(parked_key, 0, str(outcome.run.id)) == 1
        connection.rpush(f"{prefix}{keys.SHARED_QUEUE}", str(outcome.run.id))

    run = wait_for_status(outcome.run.id, Run.Status.FAILED)
    assert "ValueError" in run.error["message"]
    time.sleep(0.6)  # a heartbeat after the failed run
    assert str(elsewhere) not in json.dumps(runner.state())


def test_heartbeat_lists_model_once_loaded(runner, extra_runners, alice, monkeypatch):
    # Periodic heartbeats 30 s apart, so only the one published at the load
    # can list the model.
    monkeypatch.setenv("RUNNER_HEARTBEAT_S", "30")
    monkeypatch.setenv("RUNNER_DEAD_AFTER_S", "120")
    slow = extra_runners("slow-beats")
    start(alice, "people-detector-800", slow.name)
    loaded = [model["model_id"] for model in slow.state()["models"]]
    assert "people-detector-800" in loaded


@contextmanager
def fleet_of(*runners: tuple[str, tuple[str, ...]]):
    """Register runners (name, cache keys) in Redis; yield a fresh snapshot of them.

    The snapshot contains only these runners, whatever else is live, and the
    busy marks routing leaves on them are deleted at the end.
    """
    with ExitStack() as stack:
        for name, cache_keys in runners:
            stack.enter_context(registered_runner(name, cache_keys))
        states = [
            fleet.RunnerState(name, {"models": [{"cache_key": k} for k in cache_keys]})
            for name, cache_keys in runners
        ]
        try:
            yield fleet.FleetSnapshot(states, fleet.fleet_snapshot().generation)
        finally:
            for name, _ in runners:
                get_redis().delete(keys.current_run_key(name))


def routed(cache_keys: list[str], snapshot, run_id: str) -> str:
    return choose_queue(cache_keys, snapshot, run_id)[0]


def test_routing_treats_unreadable_queue_as_busy(db):
    prefix = Queue.redis_queue_namespace_prefix
    with fleet_of(("route-a", ("k",)), ("route-b", ("k",))) as snapshot:
        get_redis().set(f"{prefix}{keys.runner_queue('route-a')}", "not a list")
        try:
            assert routed(["k"], snapshot, "run-1") == keys.runner_queue("route-b")
        finally:
            get_redis().delete(f"{prefix}{keys.runner_queue('route-a')}")


def test_routing_prefers_runner_holding_most_models(db):
    # Each run claims the idle runner it picks. The next run then finds the
    # runner holding both models busy and takes the one holding one.
    with fleet_of(
        ("most-none", ("other",)), ("most-one", ("k1",)), ("most-both", ("k1", "k2"))
    ) as snapshot:
        chosen = [routed(["k1", "k2"], snapshot, f"run-{i}") for i in range(3)]
    assert chosen == [
        keys.runner_queue("most-both"),
        keys.runner_queue("most-one"),
        keys.SHARED_QUEUE,
    ]


def test_routing_burst_takes_each_idle_runner_once(db):
    # Three runs routed before any of them is queued: each claims the idle
    # runner it picks at once, so the second and third cannot pick it too.
    with fleet_of(("burst-a", ("k",)), ("burst-b", ("k",))) as snapshot:
        chosen = [routed(["k"], snapshot, f"run-{i}") for i in range(3)]
        assert chosen == [
            keys.runner_queue("burst-a"),
            keys.runner_queue("burst-b"),
            keys.SHARED_QUEUE,
        ]
        assert get_redis().get(keys.current_run_key("burst-a")) == b"run-0"
        # Until the run is queued, the mark is short-lived.
        assert (
            0
            < get_redis().ttl(keys.current_run_key("burst-a"))
            <= (keys.ROUTING_CLAIM_TTL_S)
        )


def test_routing_skips_expired_holder(db):
    with fleet_of(("gone-a", ("k",)), ("gone-b", ("k",))) as snapshot:
        get_redis().delete(keys.heartbeat_key("gone-a"))
        assert routed(["k"], snapshot, "run-1") == keys.runner_queue("gone-b")


def test_routing_rereads_fleet_after_load(runner, extra_runners, alice):
    # The web server reuses its read of the fleet for half a second. A run
    # sent just after another loaded its model must still go where the
    # model now is, not cold to another runner. No other test uses this size.
    extra_runners("reread-a")
    extra_runners("reread-b")
    before_load = fleet.fleet_snapshot()
    model = "people-detector-224"
    cache_key = resolve_model(model, owner_id=alice.id).cache_key
    assert not any(cache_key in r.loaded_models for r in before_load.runners)
    first = start_cli_run(alice, detection(model), wait_s=120)
    holder = first.payload["meta"]["breakdown"]["runner"]
    try:
        queue, snapshot = choose_queue([cache_key], before_load, "probe-run")
        assert queue == keys.runner_queue(holder)
        assert any(cache_key in r.loaded_models for r in snapshot.runners)
    finally:
        get_redis().delete(keys.current_run_key(holder))


def test_run_that_fails_to_insert_leaves_no_runner_marked_busy(transactional_db):
    # Two idle runners hold the model, so routing marks one busy for the run.
    # The insert then fails (no such owner), and the mark must go with it.
    model = "yolov9t.yaml"
    cache_key = resolve_model(model, owner_id=None).cache_key
    names = ("insert-fails-a", "insert-fails-b")
    with (
        registered_runner(names[0], (cache_key,)),
        registered_runner(names[1], (cache_key,)),
    ):
        fleet.live_runners()  # refresh this process's view of the fleet
        with pytest.raises(Exception, match="(?i)foreign key"):
            start_run(
                owner_id=2**31 - 1,
                source="cli",
                definition=detection(model),
                raw_inputs={},
                uploads={"image": image_bytes()},
                started_ns=time.perf_counter_ns(),
                wait_s=5,
            )
        assert not Run.objects.exists()
        for name in names:
            assert get_redis().get(keys.current_run_key(name)) is None


def test_queue_time_ignores_runner_clock_offset(runner, extra_runners, alice):
    ahead = extra_runners("clock-ahead", clock_offset_s=30)
    started = time.monotonic()
    outcome = start_cli_run(alice, image_height(), wait_s=60, runner="clock-ahead")
    elapsed_us = (time.monotonic() - started) * 1e6

    meta = outcome.payload["meta"]
    assert meta["status"] == "succeeded"
    assert meta["breakdown"]["runner"] == "clock-ahead"
    assert meta["breakdown"]["components"]["queue"] < elapsed_us
    run = Run.objects.get(pk=outcome.run.pk)
    assert run.started_at <= run.finished_at
    assert abs((run.finished_at - timezone.now()).total_seconds()) < 5
    assert abs(ahead.state()["beat_at"] - time.time()) < 5


def test_predicted_hot_only_where_the_queue_leads(runner, extra_runners, alice):
    start(alice, "yolov8s.yaml", runner.name)
    extra_runners("no-models")
    # Heartbeats of both runners, the first listing yolov8s, newer than the
    # half-second view of the fleet that submit reuses.
    time.sleep(0.6)

    idle = start_cli_run(alice, detection("yolov8s.yaml"), wait_s=60).run
    # Busy, as far as routing can tell, so the next run takes the shared queue.
    get_redis().set(keys.current_run_key(runner.name), "another run", ex=30)
    try:
        shared = start_cli_run(alice, detection("yolov8s.yaml"), wait_s=60).run
    finally:
        get_redis().delete(keys.current_run_key(runner.name))

    assert idle.queue_name == keys.runner_queue(runner.name)
    assert idle.model_refs[0]["predicted_hot"] is True
    assert shared.queue_name == keys.SHARED_QUEUE
    assert shared.model_refs[0]["predicted_hot"] is False


def test_runner_with_its_own_model_directory(runner, extra_runners, alice, tmp_path):
    # A runner on another machine has its model directory elsewhere. With a
    # copy of the file there, it runs the model; without one, the run fails
    # unbilled and says which file is missing, not where the web server
    # keeps it.
    copies = tmp_path / "models-copy"
    copies.mkdir()
    shutil.copy(resolve_model("people-detector").local_path(), copies)
    extra_runners("other-machine", env_overrides={"MODEL_DIR": str(copies)})
    ran = start(alice, "people-detector", "other-machine", wait_s=120)
    assert ran.payload["meta"]["status"] == "succeeded"

    # The bare runner's budget fits one model. It has loaded the detector
    # once, so its size is recorded, and then the file is deleted. The
    # failed load must not evict the model loaded now.
    empty = tmp_path / "models-empty"
    empty.mkdir()
    shutil.copy(resolve_model("people-detector").local_path(), empty)
    bare = extra_runners(
        "bare-machine", budget_mb=20, env_overrides={"MODEL_DIR": str(empty)}
    )
    oversized = start(alice, "people-detector", "bare-machine", wait_s=120)
    assert any(
        "over this runner's memory budget" in warning
        for warning in oversized.payload["meta"]["warnings"]
    )
    start(alice, "yolov8n.yaml", "bare-machine", wait_s=120)
    (empty / "people-detector.pt").unlink()
    evictions = bare.state()["evictions"]
    failed = start(alice, "people-detector", "bare-machine", wait_s=120)
    error = failed.payload["meta"]["error"]
    assert error["code"] == "model_load_failed"
    assert error["status"] == 503
    # The directory is named as in other messages to users: plain words,
    # then the setting in brackets.
    assert (
        "no file people-detector.pt in the server's model directory (MODEL_DIR)"
        in error["message"]
    )
    assert str(empty) not in error["message"]
    assert Bill.objects.get(run_id=failed.run.id).billed is False
    time.sleep(0.6)  # a heartbeat after the failed run
    state = bare.state()
    assert [model["model_id"] for model in state["models"]] == ["yolov8n.yaml"]
    assert state["evictions"] == evictions


def test_runner_lacking_weights_hands_shared_job_on(
    runner, extra_runners, alice, tmp_path
):
    # A runner whose MODEL_DIR lacks the file hands a shared job to a live
    # runner that has it instead of failing the run.
    empty = tmp_path / "no-models"
    empty.mkdir()
    lacking = extra_runners("lacks-weights", env_overrides={"MODEL_DIR": str(empty)})
    connection = get_redis()
    # Marked busy for a routed run, the session runner leaves shared jobs,
    # so the runner without the file takes this one.
    connection.set(keys.current_run_key(runner.name), "routed-run", ex=60)
    try:
        outcome = start_cli_run(alice, detection("people-detector"), wait_s=0)
        assert outcome.run.queue_name == keys.SHARED_QUEUE
        run = wait_for_final(outcome.run.id, timeout_s=60)
    finally:
        connection.delete(keys.current_run_key(runner.name))
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.runner_name == runner.name
    assert run.queue_name == keys.runner_queue(runner.name)
    assert Bill.objects.get(run=run).billed is True
    assert "model_dir:people-detector.pt" in lacking.state()["missing_files"]


def test_handed_on_jobs_spread_over_idle_runners(
    runner, extra_runners, alice, tmp_path
):
    # A runner without the weights file takes a burst of shared jobs faster
    # than a heartbeat, which still shows each taker idle with an empty
    # queue. It must read the takers' queues live and spread the burst,
    # not queue every job on the same runner while the others stay idle.
    empty = tmp_path / "no-models"
    empty.mkdir()
    extra_runners("lacks-for-burst", env_overrides={"MODEL_DIR": str(empty)})

    connection = get_redis()
    # Marked busy, the session runner leaves shared jobs to the runner
    # without the file and is the last choice to hand one to.
    connection.set(keys.current_run_key(runner.name), "routed-run", ex=60)
    prefix = Queue.redis_queue_namespace_prefix
    takers = ("burst-taker-a", "burst-taker-b")
    try:
        with ExitStack() as stack:
            for name in takers:
                stack.enter_context(registered_runner(name))
            # No runner has the model loaded at this size.
            outcomes = [
                start_cli_run(alice, detection("people-detector-352"), wait_s=0)
                for _ in takers
            ]
            assert {o.run.queue_name for o in outcomes} == {keys.SHARED_QUEUE}

            ids = [outcome.run.id for outcome in outcomes]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                queues = set(
                    Run.objects.filter(pk__in=ids).values_list("queue_name", flat=True)
                )
                if keys.SHARED_QUEUE not in queues:
                    break
                time.sleep(0.1)

            for name in takers:
                connection.delete(f"{prefix}{keys.runner_queue(name)}")
    finally:
        connection.delete(keys.current_run_key(runner.name))
    assert queues == {keys.runner_queue(name) for name in takers}


@contextmanager
def shared_run_of_copied_weights(runner, alice, name: str):
    """Queue a shared run of a copy of the people detector, then delete the copy.

    The copy, ``name``.pt in the model directory, exists when the run is
    accepted. ``runner`` is marked busy meanwhile, so routing sends the run
    to the shared queue. Yields the run's outcome.
    """
    source = resolve_model("people-detector").local_path()
    copy = source.replace("people-detector.pt", f"{name}.pt")
    shutil.copy(source, copy)
    connection = get_redis()
    connection.set(keys.current_run_key(runner.name), "routed-run", ex=60)
    try:
        outcome = start_cli_run(alice, detection(name), wait_s=0)
        os.unlink(copy)
        yield outcome
    finally:
        connection.delete(keys.current_run_key(runner.name))
        if os.path.exists(copy):
            os.unlink(copy)


def test_run_fails_when_no_runner_has_weights(runner, extra_runners, alice, tmp_path):
    # The file is there when the run is accepted and gone from every runner
    # when it runs: the run fails once, naming the model, after each live
    # runner has looked for the file.
    with shared_run_of_copied_weights(runner, alice, "ghost-detector") as outcome:
        extra_runners("lacks-ghost", env_overrides={"MODEL_DIR": str(tmp_path)})
        run = wait_for_final(outcome.run.id, timeout_s=60)
    assert run.status == Run.Status.FAILED
    assert run.error["code"] == "model_load_failed"
    assert run.error["status"] == 503
    message = run.error["message"]
    assert "no live runner has the weights file" in message
    assert (
        "model 'ghost-detector' needs the file ghost-detector.pt in the server's "
        "model directory (MODEL_DIR)"
    ) in message
    assert f"lacks-ghost, {runner.name} lack it" in message
    assert Bill.objects.get(run=run).billed is False
    time.sleep(0.6)  # a heartbeat after the failed run
    assert "model_dir:ghost-detector.pt" in runner.state()["missing_files"]


def test_returned_job_names_each_runner_once(runner, alice):
    # A job handed to a runner that died comes back through the shared
    # queue, and can reach a runner it already names. The failure names
    # that runner once.
    connection = get_redis()
    with shared_run_of_copied_weights(runner, alice, "twice-detector") as outcome:
        job_key = Job.key_for(str(outcome.run.id))
        data = json.loads(zlib.decompress(connection.hget(job_key, "data")))
        data[3]["declined_by"] = [runner.name]
        connection.hset(job_key, "data", zlib.compress(json.dumps(data).encode()))
    run = wait_for_final(outcome.run.id, timeout_s=60)
    assert run.status == Run.Status.FAILED
    message = run.error["message"]
    assert f"Runner {runner.name} lacks it" in message
    assert f"{runner.name}, {runner.name}" not in message


def test_routing_skips_runner_lacking_a_file(db):
    # Holding one of the run's models does not make a runner the choice
    # when its heartbeat lists the other model's file as missing.
    with fleet_of(("lacks-k2", ("model_dir:a.pt:640",)), ("empty", ())) as snapshot:
        snapshot.runners[0].data["missing_files"] = ["model_dir:b.pt"]
        cache_keys = ["model_dir:a.pt:640", "model_dir:b.pt:640"]
        assert routed(cache_keys, snapshot, "run-1") == keys.SHARED_QUEUE


def cold_loads(run_id: str) -> list[dict]:
    return [event for event in stored_events(run_id) if event["phase"] == "cold_load"]


def test_models_over_budget_load_once_per_step(runner, extra_runners, alice):
    # yolov8n and yolo11n each fit a 20 MiB budget alone, not together.
    extra_runners("evicts-mid-run", budget_mb=20)
    second_model = {
        "type": "roboflow_core/roboflow_object_detection_model@v1",
        "images": "$inputs.image",
        "model_id": "yolo11n.yaml",
    }
    image = {"type": "base64", "value": base64.b64encode(image_bytes()).decode()}

    def run(definition: dict, images: list[dict]):
        outcome = start_run(
            owner_id=alice.id,
            source="cli",
            definition=definition,
            raw_inputs={"image": images},
            started_ns=time.perf_counter_ns(),
            wait_s=120,
            runner="evicts-mid-run",
        )
        assert outcome.payload["meta"]["status"] == "succeeded"
        return outcome.payload["meta"]["breakdown"], cold_loads(str(outcome.run.id))

    # A batch runs each step on every image before the next step, so each
    # model loads once, not once per image.
    two_models = detection("yolov8n.yaml")
    two_models["steps"].insert(1, {**second_model, "name": "second"})
    breakdown, loads = run(two_models, [image, image, image])
    assert [load["model_id"] for load in loads] == ["yolov8n.yaml", "yolo11n.yaml"]
    assert [model["loads"] for model in breakdown["models"]] == [1, 1]

    # A model that a later step needs again after another evicted it loads
    # twice, and the breakdown counts and sums both loads.
    first_again = {**second_model, "name": "third", "model_id": "yolov8n.yaml"}
    two_models["steps"].insert(2, first_again)
    breakdown, loads = run(two_models, [image])
    assert [load["model_id"] for load in loads] == [
        "yolov8n.yaml",
        "yolo11n.yaml",
        "yolov8n.yaml",
    ]
    assert sum(load["total"] for load in loads) == breakdown["components"]["cold_load"]
    for model in breakdown["models"]:
        own = [load["total"] for load in loads if load["model_id"] == model["model_id"]]
        assert model["cold_load"]["total"] == sum(own)
        assert model["loads"] == len(own)
    assert {m["model_id"]: m["loads"] for m in breakdown["models"]} == {
        "yolov8n.yaml": 2,
        "yolo11n.yaml": 1,
    }


def test_database_stall_keeps_heartbeats(runner):
    # Reaping and the lost-run check read runs. While a lock blocks those
    # reads, the runner must keep beating, or the fleet looks down.
    if db_connection.vendor != "postgresql":
        pytest.skip("SQLite in WAL mode lets reads pass a writer's lock")
    missing = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if not get_redis().exists(keys.heartbeat_key(runner.name)):
                missing.append(time.monotonic())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with transaction.atomic(), db_connection.cursor() as cursor:
            cursor.execute("LOCK TABLE runner_run IN ACCESS EXCLUSIVE MODE")
            # Longer than RUNNER_DEAD_AFTER_S plus the 3 s between reaps.
            time.sleep(10)
    finally:
        done.set()
        watcher.join()
    assert missing == []


def test_new_runner_logs_no_stall(runner, extra_runners):
    # Its process warm-up takes longer than this dead time, before the
    # heartbeat thread starts.
    fresh = extra_runners(
        "fresh-start",
        env_overrides={"RUNNER_HEARTBEAT_S": "0.1", "RUNNER_DEAD_AFTER_S": "0.5"},
    )
    time.sleep(1)  # several heartbeats after it went live
    log = fresh.log_path.read_text()
    assert "runner fresh-start started" in log
    # Where it found Redis and the database, to catch a forgotten URL.
    assert "runner fresh-start: Redis " in log
    assert ", database " in log
    assert "no heartbeat for" not in log


def end_database_sessions(application_name: str) -> int:
    """End the PostgreSQL sessions opened under ``application_name``."""
    with db_connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            [application_name],
        )
        return cursor.fetchone()[0]


def test_runner_claims_after_its_session_ended(runner, extra_runners, alice):
    # A database restart or failover ends the session that the runner's job
    # thread keeps between jobs. The next claim must not drop the job.
    if db_connection.vendor != "postgresql":
        pytest.skip("SQLite has no server that ends sessions")
    # libpq names the runner's sessions after PGAPPNAME.
    reconnecting = extra_runners(
        "reconnecting", env_overrides={"PGAPPNAME": "glassbox-reconnecting"}
    )
    first = start(alice, "yolov8n.yaml", reconnecting.name).run
    first.refresh_from_db()
    assert first.status == Run.Status.SUCCEEDED, first.error
    assert end_database_sessions("glassbox-reconnecting") > 0

    # The lost-run check would queue a dropped job again only after 30 s.
    second = start(alice, "yolov8n.yaml", reconnecting.name, wait_s=20).run
    second.refresh_from_db()
    assert second.status == Run.Status.SUCCEEDED, second.error
    assert Bill.objects.filter(run_id=second.id).count() == 1
    log = reconnecting.log_path.read_text()
    assert f"claiming run {second.id}: the database connection was lost" in log


def test_runner_finishes_after_its_session_ended(runner, extra_runners, alice):
    # The session ends while the run executes: the result must still be
    # stored, not thrown away as a platform failure.
    if db_connection.vendor != "postgresql":
        pytest.skip("SQLite has no server that ends sessions")
    reconnecting = extra_runners(
        "reconnecting", env_overrides={"PGAPPNAME": "glassbox-reconnecting"}
    )
    image = {"type": "base64", "value": base64.b64encode(image_bytes()).decode()}
    run_id = start_run(
        owner_id=alice.id,
        source="cli",
        definition=detection("yolov8n.yaml"),
        raw_inputs={"image": [image] * 20},
        started_ns=time.perf_counter_ns(),
        wait_s=0,
        runner=reconnecting.name,
    ).run.id
    wait_for_status(run_id, Run.Status.RUNNING)
    assert end_database_sessions("glassbox-reconnecting") > 0

    run = wait_for_final(run_id)
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.bill.billed
    assert Bill.objects.filter(run_id=run_id).count() == 1
    log = reconnecting.log_path.read_text()
    assert f"finishing run {run_id}: the database connection was lost" in log


class PostgresReplyDroppingProxy(ReplyDroppingProxy):
    """A TCP proxy to the test's PostgreSQL server that can lose one reply.

    Once armed, it looks for messages that contain each of ``markers`` in
    turn, on one connection. The message with the last marker goes to the
    server, which executes it. The proxy then reads the reply up to
    ReadyForQuery and closes the client's connection instead of passing it
    on, as a network failure at that moment would.
    """

    # PostgreSQL's ReadyForQuery message, which ends every reply.
    READY_FOR_QUERY = b"Z\x00\x00\x00\x05"

    def __init__(self, upstream: tuple[str, int], *markers: bytes) -> None:
        self.upstream = upstream
        self.markers = markers
        super().__init__()

    def connect(self) -> socket.socket:
        return socket.create_connection(self.upstream)

    def new_state(self) -> dict:
        return {"drop": False, "found": 0}

    def _pass_requests(self, client, server, state) -> None:
        try:
            while chunk := client.recv(65536):
                if self.armed.is_set() and self.markers[state["found"]] in chunk:
                    state["found"] += 1
                    if state["found"] == len(self.markers):
                        self.armed.clear()
                        state["drop"] = True
                server.sendall(chunk)
        except OSError:
            pass
        finally:
            close_both(client, server)

    def _pass_replies(self, client, server, state) -> None:
        dropped = b""
        try:
            while chunk := server.recv(65536):
                if not state["drop"]:
                    client.sendall(chunk)
                    continue
                dropped += chunk
                if self.READY_FOR_QUERY in dropped:
                    self.dropped.set()
                    return
        except OSError:
            pass
        finally:
            close_both(client, server)


def test_runner_claims_when_claim_reply_lost(runner, extra_runners, alice):
    # The claim commits, and the connection breaks before its reply comes.
    # The runner claims again on a new connection, finds the run already
    # claimed by its own process, and runs it.
    if db_connection.vendor != "postgresql":
        pytest.skip("the proxy speaks to a PostgreSQL server")
    lossy, proxy = lossy_runner(
        extra_runners, "lost-reply", b'SET "status" = \'running\', "runner_name" = '
    )
    try:
        proxy.armed.set()
        run_id = start(alice, "yolov8n.yaml", lossy.name, wait_s=0).run.id
        run = wait_for_final(run_id)
    finally:
        proxy.close()
    log = lossy.log_path.read_text()
    assert proxy.dropped.is_set()
    assert f"claiming run {run_id}: the database connection was lost" in log
    assert run.status == Run.Status.SUCCEEDED, (run.error, log[-3000:])
    assert Bill.objects.filter(run_id=run_id).count() == 1


def lossy_runner(extra_runners, name: str, *markers: bytes):
    """Start runner ``name``, its PostgreSQL connection through a proxy."""
    params = db_connection.settings_dict
    proxy = PostgresReplyDroppingProxy(
        (params["HOST"] or "127.0.0.1", int(params["PORT"] or 5432)), *markers
    )
    user = params["USER"] or "postgres"
    password = f":{params['PASSWORD']}" if params["PASSWORD"] else ""
    url = f"postgres://{user}{password}@127.0.0.1:{proxy.port}/{params['NAME']}"
    try:
        return extra_runners(name, env_overrides={"DATABASE_URL": url}), proxy
    except BaseException:
        proxy.close()
        raise


def test_runner_delivers_result_when_commit_reply_lost(runner, extra_runners, alice):
    # The transaction that finishes the run commits, and the connection
    # breaks before the reply to its COMMIT comes. The runner writes the
    # result again on a new connection, finds it stored by its own attempt,
    # and delivers it.
    if db_connection.vendor != "postgresql":
        pytest.skip("the proxy speaks to a PostgreSQL server")
    lossy, proxy = lossy_runner(
        extra_runners,
        "lost-commit",
        b'SET "status" = \'succeeded\', "finished_at" = ',
        b"COMMIT",
    )
    try:
        proxy.armed.set()
        run_id = start(alice, "yolov8n.yaml", lossy.name, wait_s=0).run.id
        run = wait_for_final(run_id)
        deadline = time.monotonic() + 30
        while not get_redis().exists(keys.done_key(str(run_id))):
            assert time.monotonic() < deadline, lossy.log_path.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        proxy.close()
    log = lossy.log_path.read_text()
    assert proxy.dropped.is_set()
    assert f"finishing run {run_id}: the database connection was lost" in log
    assert "result dropped" not in log
    assert run.status == Run.Status.SUCCEEDED, (run.error, log[-3000:])
    assert Bill.objects.filter(run_id=run_id).count() == 1
    assert get_redis().get(keys.current_run_key(lossy.name)) is None


# Two requests as a web server process handles them, with the production
# settings, and the session of the first ended by the server in between.
REQUEST_AFTER_SESSION_ENDED = """
import django
import psycopg
from django.core.signals import request_finished, request_started
from django.db import connection

django.setup()
from django.contrib.auth.models import User


def request():
    request_started.send(sender=None)
    try:
        return User.objects.count()
    finally:
        request_finished.send(sender=None)


request()
with psycopg.connect(**connection.get_connection_params()) as other:
    other.execute(
        "SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid]
    )
print("users:", request())
"""


def test_web_request_after_session_ended(transactional_db, alice):
    # A web server process keeps its connections between requests. One that
    # the database server ended must not fail the next request.
    if db_connection.vendor != "postgresql":
        pytest.skip("SQLite has no server that ends sessions")
    params = db_connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "DATABASE_URL": (
            f"postgres://{params['USER']}@{params['HOST']}:{params['PORT']}"
            f"/{params['NAME']}"
        ),
    }
    if params["PASSWORD"]:
        env["PGPASSWORD"] = params["PASSWORD"]
    result = subprocess.run(
        [sys.executable, "-c", REQUEST_AFTER_SESSION_ENDED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "users: 1"


def test_moving_jobs_keeps_job_when_database_fails(runner, alice):
    # A reap whose database session was ended must leave the dead runner's
    # jobs in its queue for the next reap, not drop them.
    if db_connection.vendor != "postgresql":
        pytest.skip("SQLite has no server that ends sessions")
    connection = get_redis()
    queue_key = f"{Queue.redis_queue_namespace_prefix}" + keys.runner_queue(
        "parked-for-move"
    )
    # Registered, the runner is live, so the session runner's reaps leave its
    # queue to the moves of this test.
    with registered_runner("parked-for-move"):
        run_id = str(start(alice, "people-detector", "parked-for-move", 0).run.id)
        assert connection.lrange(queue_key, 0, -1) == [run_id.encode()]
        pid = db_connection.connection.info.backend_pid
        with psycopg.connect(**db_connection.get_connection_params()) as other:
            other.execute("SELECT pg_terminate_backend(%s)", [pid])

        try:
            with pytest.raises(OperationalError):
                reaper.move_queued_jobs("parked-for-move")
        finally:
            db_connection.close()

        assert connection.lrange(queue_key, 0, -1) == [run_id.encode()]
        assert reaper.move_queued_jobs("parked-for-move") == [run_id]
    assert wait_for_final(run_id).status == Run.Status.SUCCEEDED


def test_moving_jobs_reads_shared_queue_once(runner, alice):
    # Each moved job goes in front of the shared jobs queued after it, and
    # the move reads the shared queue once for all its jobs.
    connection = get_redis()
    shared_key = f"{Queue.redis_queue_namespace_prefix}{keys.SHARED_QUEUE}"
    # Marked busy for a routed run, the session runner leaves shared jobs.
    connection.set(keys.current_run_key(runner.name), "routed-run", ex=120)
    try:
        # Registered, the runner is live, so no reap moves its jobs first.
        with registered_runner("parked-several"):
            early = start_cli_run(alice, image_height(), wait_s=0).run
            parked = [
                start_cli_run(alice, image_height(), wait_s=0, runner="parked-several")
                for _ in range(3)
            ]
            later = start_cli_run(alice, image_height(), wait_s=0).run
            connection.config_resetstat()
            moved = reaper.move_queued_jobs("parked-several")
            stats = connection.info("commandstats")
        expected = [str(early.pk), *[str(o.run.pk) for o in parked], str(later.pk)]
        deadline = time.monotonic() + 30
        order: list[str] = []
        # The session runner pops the front job now and then and puts it
        # back, so a read may miss it.
        while order != expected and time.monotonic() < deadline:
            order = [job.decode() for job in connection.lrange(shared_key, 0, -1)]
            time.sleep(0.1)
    finally:
        connection.delete(keys.current_run_key(runner.name))
    assert moved == [str(o.run.pk) for o in parked]
    assert order == expected
    assert stats["cmdstat_lrange"]["calls"] == 1
    for run_id in expected:
        assert wait_for_status(run_id, Run.Status.SUCCEEDED).runner_name == runner.name


def test_vanished_heartbeat_of_live_runner_not_reaped(runner):
    # The key can go before its expiry (an operator, a Redis server evicting
    # keys). The runner beat less than a second ago, so it is not dead.
    def recorded_end():
        ended = {entry["name"]: entry for entry in ended_runners()}
        return ended.get(runner.name)

    before = recorded_end()
    get_redis().delete(keys.heartbeat_key(runner.name))
    reaper.reap_dead_runners()
    assert get_redis().sismember(keys.RUNNERS_SET, runner.name)
    assert recorded_end() == before


def test_ended_runner_keeps_last_heartbeat(db):
    # A runner started again under the name beats on, and its heartbeats
    # are not the ended process's.
    name = "ends-then-starts"
    fleet.publish_heartbeat(name, {"name": name, "instance": "first", "models": []})
    fleet.remove_heartbeat(name)
    time.sleep(0.05)
    fleet.publish_heartbeat(name, {"name": name, "instance": "second", "models": []})
    try:
        ended = {entry["name"]: entry for entry in ended_runners()}[name]
        assert ended["reason"] == "stopped"
        assert ended["last_heartbeat_at"] is not None
        assert ended["last_heartbeat_at"] <= ended["ended_at"]
    finally:
        fleet.remove_heartbeat(name)


def test_fleet_lists_restarted_runner_apart(client, django_user_model):
    # manage.py up run twice: the first runner-1 stopped, a second one is live.
    name = "restarted-runner"
    fleet.publish_heartbeat(name, {"name": name, "instance": "first", "models": []})
    fleet.remove_heartbeat(name)
    fleet.publish_heartbeat(name, {"name": name, "instance": "second", "models": []})
    staff = django_user_model.objects.create_user(
        "fleet-viewer", password="viewer-password", is_staff=True
    )
    client.force_login(staff)
    try:
        page = client.get("/admin/runner/run/fleet/").content.decode()
        listed = client.get("/api/fleet").json()["ended"]
    finally:
        fleet.remove_heartbeat(name)

    live_table = page.split('id="live-runners"')[1].split("</table>")[0]
    assert f"<td>{name}</td>" in live_table
    if 'id="ended-runners"' in page:
        ended_table = page.split('id="ended-runners"')[1].split("</table>")[0]
        assert name not in ended_table
    restarted = page.split('id="restarted-runners"')[1].split("</details>")[0]
    assert f"<td>{name}</td>" in restarted
    assert "<td>stopped</td>" in restarted
    entry = next(entry for entry in listed if entry["name"] == name)
    assert entry["live_again"] is True
    assert entry["reason"] == "stopped"

    after = {entry["name"]: entry for entry in ended_runners()}[name]
    assert after["live_again"] is False


def test_replaced_dead_runner_not_listed_stopped(db):
    # A runner that died and was started again under its name at once (as
    # manage.py up does) did not stop: the fleet must not say it did.
    from runner.management.commands.runner import Command as RunnerCommand

    name = "replaced-after-crash"
    exited = subprocess.Popen(["true"])
    exited.wait()
    state = {
        "name": name,
        "instance": "crashed",
        "host": socket.gethostname(),
        "pid": exited.pid,
        "models": [],
    }
    fleet.publish_heartbeat(name, state)

    RunnerCommand()._fail_own_stale_runs(name)

    ended = {entry["name"]: entry for entry in ended_runners()}[name]
    assert ended["reason"] != "stopped"
    assert f"process {exited.pid}" in ended["reason"]
    assert not get_redis().sismember(keys.RUNNERS_SET, name)


def test_replaced_runner_fails_run_despite_instance_key(db, alice):
    # The replaced process's instance key lives for RUNNER_DEAD_AFTER_S after
    # its last heartbeat, but its process id shows that it has exited.
    from runner.management.commands.runner import Command as RunnerCommand

    name = "replaced-mid-run"
    exited = subprocess.Popen(["true"])
    exited.wait()
    state = {
        "name": name,
        "instance": "crashed-mid-run",
        "host": socket.gethostname(),
        "pid": exited.pid,
        "models": [],
    }
    fleet.publish_heartbeat(name, state)
    run = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.RUNNING,
        runner_name=name,
        runner_instance="crashed-mid-run",
    )

    try:
        RunnerCommand()._fail_own_stale_runs(name)
    finally:
        get_redis().delete(keys.instance_key("crashed-mid-run"))

    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error["message"] == f"runner {name} restarted while running this run"
    assert Bill.objects.get(run=run).billed is False


def test_resumed_runner_not_listed_as_earlier_process(
    runner, extra_runners, client, django_user_model
):
    # A runner paused past RUNNER_DEAD_AFTER_S is reaped and then resumes as
    # the same process. No other process ran under its name, so its end is
    # not an earlier process's.
    paused = extra_runners("paused-then-resumed")
    instance = paused.state()["instance"]
    paused.process.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while paused.name not in {entry["name"] for entry in ended_runners()}:
            assert time.monotonic() < deadline, "the paused runner was never reaped"
            time.sleep(0.2)
    finally:
        paused.process.send_signal(signal.SIGCONT)
    paused.wait_until_live()
    assert paused.state()["instance"] == instance

    entry = {entry["name"]: entry for entry in ended_runners()}[paused.name]
    assert entry["reason"].startswith(f"runner {paused.name} stopped sending")
    assert entry["live_again"] is False
    assert entry["resumed"] is True

    staff = django_user_model.objects.create_user(
        "fleet-watcher", password="watcher-password", is_staff=True
    )
    client.force_login(staff)
    page = client.get("/admin/runner/run/fleet/").content.decode()
    listed = client.get("/api/fleet").json()["ended"]
    if 'id="restarted-runners"' in page:
        restarted = page.split('id="restarted-runners"')[1].split("</details>")[0]
        assert paused.name not in restarted
    resumed = page.split('id="resumed-runners"')[1].split("</details>")[0]
    assert f"<td>{paused.name}</td>" in resumed
    api_entry = next(entry for entry in listed if entry["name"] == paused.name)
    assert api_entry["live_again"] is False
    assert api_entry["resumed"] is True


def test_fleet_lists_runners_that_ended(
    runner, extra_runners, client, django_user_model
):
    stopped = extra_runners("ends-stopped")
    killed = extra_runners("ends-killed")
    stopped.stop()
    killed.kill()
    # The session runner reaps the killed one once it has been silent for
    # RUNNER_DEAD_AFTER_S (2 s in tests).
    deadline = time.monotonic() + 30
    while "ends-killed" not in {entry["name"] for entry in ended_runners()}:
        assert time.monotonic() < deadline, "the killed runner was never reaped"
        time.sleep(0.2)

    ended = {entry["name"]: entry for entry in ended_runners()}
    assert ended["ends-stopped"]["reason"] == "stopped"
    reason = ended["ends-killed"]["reason"]
    assert reason.startswith("runner ends-killed stopped sending heartbeats (none for")
    silence_s = float(reason.split("none for ")[1].split(" s")[0])
    assert silence_s >= settings.GLASSBOX["RUNNER_DEAD_AFTER_S"]
    killed_entry = ended["ends-killed"]
    assert killed_entry["last_heartbeat_at"] < killed_entry["ended_at"]

    staff = django_user_model.objects.create_user(
        "fleet-operator", password="operator-password", is_staff=True
    )
    client.force_login(staff)
    page = client.get("/admin/runner/run/fleet/").content.decode()
    assert "ends-stopped" in page
    assert "ends-killed stopped sending heartbeats" in page
    listed = client.get("/api/fleet").json()["ended"]
    assert {"ends-stopped", "ends-killed"} <= {entry["name"] for entry in listed}

    # A runner started again under the name keeps its last end listed.
    state = {"name": "ends-killed", "instance": "again", "models": []}
    fleet.publish_heartbeat("ends-killed", state)
    try:
        ended = {entry["name"]: entry for entry in ended_runners()}
        assert ended["ends-killed"]["reason"] == reason
    finally:
        fleet.remove_heartbeat("ends-killed")


def test_run_over_time_limit_fails_billed(runner, extra_runners, alice):
    # The detection's cold load alone takes longer than the limit, so the run
    # stops before it counts the people.
    # NOTE: the runner must also reach the detection's first call within 1 ms
    # of starting the limit's clock. That takes microseconds, but a runner
    # descheduled in between stops before step 'people' instead.
    name = extra_runners("hurried", env_overrides={"RUN_TIME_LIMIT_S": "0.001"}).name
    definition = detection("people-detector-832")
    run = start_cli_run(alice, definition, wait_s=60, runner=name).run
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error["code"] == "step_rejected_input"
    assert run.error["step"] == "count"
    assert "took longer than RUN_TIME_LIMIT_S (0.001 s)" in run.error["message"]
    # The runner's time was spent on the user's definition, so it is billed.
    assert run.bill.billed


# Images in the batch of test_time_limit_stops_mid_step. By estimate, its
# 40 model calls at 832 px take several times its 50 ms limit even on a GPU,
# at a few milliseconds per call with the image's preprocessing.
MID_STEP_BATCH = 40


def test_time_limit_stops_mid_step(runner, extra_runners, alice):
    # The limit passes during one of the step's calls, so the runner stops
    # before the next one, not after the batch's last. The check sits at
    # each call of a block, so crops stop the same way. On a CPU, the first
    # call's cold load alone takes longer than the limit.
    # NOTE: the runner must reach the first call within 50 ms of starting the
    # limit's clock. That takes microseconds unless the runner is descheduled.
    env = {"RUN_TIME_LIMIT_S": "0.05"}
    name = extra_runners("hurried-batch", env_overrides=env).name

    image = {"type": "base64", "value": base64.b64encode(image_bytes()).decode()}
    outcome = start_run(
        owner_id=alice.id,
        source="cli",
        definition=detection("people-detector-832"),
        raw_inputs={"image": [image] * MID_STEP_BATCH},
        started_ns=time.perf_counter_ns(),
        wait_s=60,
        runner=name,
    )

    run = outcome.run
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error["code"] == "step_rejected_input"
    assert run.error["step"] == "people"
    stopped = re.search(
        r"stopped before call (\d+) of step 'people'", run.error["message"]
    )
    assert stopped, run.error["message"]
    next_call = int(stopped.group(1))
    assert 2 <= next_call <= MID_STEP_BATCH
    [model] = run.breakdown["models"]
    assert model["calls"] == next_call - 1
    assert run.bill.billed


def zone_of(points: int) -> list[list[float]]:
    """Return a polygon of ``points`` vertices around most of bus.jpg (810x1080)."""
    return [
        [
            405 + 400 * math.cos(2 * math.pi * index / points),
            540 + 530 * math.sin(2 * math.pi * index / points),
        ]
        for index in range(points)
    ]


# Statements of test_time_limit_stops_inside_filter, about 230 KB of the
# 256 KB that a definition may take. Each tests a detection's centre against
# a zone of MAX_ZONE_POINTS points, which took about 6 ms in CPython 3.11 on
# a 2-core AMD EPYC VM. bus.jpg has at least 2 people (test_runs checks
# it), so without checks inside it the filter's single call takes about
# 10 s or more, several times the limit of the test.
ZONE_STATEMENTS = 800


def test_time_limit_stops_inside_filter(runner, extra_runners, alice):
    # The limit passes during the filter's only call, which the check before
    # each call cannot stop. The filter's statements check it, so the run
    # fails with the same error, naming the statement it stopped at.
    env = {"RUN_TIME_LIMIT_S": "3"}
    name = extra_runners("hurried-filter", env_overrides=env).name
    image = {"type": "base64", "value": base64.b64encode(image_bytes()).decode()}
    # A first run loads the model, so that the timed run's detection, a hot
    # call, ends well within the limit and the run reaches the filter.
    warm = start_run(
        owner_id=alice.id,
        source="cli",
        definition=detection("people-detector"),
        raw_inputs={"image": image},
        started_ns=time.perf_counter_ns(),
        wait_s=60,
        runner=name,
    ).run
    warm.refresh_from_db()
    assert warm.status == Run.Status.SUCCEEDED, warm.error

    in_zone = compare(
        detection_property("center"), "(Detection) in zone", parameter("zone")
    )
    definition = filtered_detection(
        keep_where(*[in_zone] * ZONE_STATEMENTS), {"zone": "$inputs.zone"}
    )
    definition["inputs"].append({"type": "WorkflowParameter", "name": "zone"})
    outcome = start_run(
        owner_id=alice.id,
        source="cli",
        definition=definition,
        raw_inputs={"image": image, "zone": zone_of(MAX_ZONE_POINTS)},
        started_ns=time.perf_counter_ns(),
        wait_s=60,
        runner=name,
    )

    run = outcome.run
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED, run.error
    assert run.error["code"] == "step_rejected_input"
    assert run.error["step"] == "filter"
    message = run.error["message"]
    assert "took longer than RUN_TIME_LIMIT_S (3 s)" in message
    assert re.search(
        r"stopped during call 1 of step 'filter', at statement "
        r"operations\[0\]\.filter_operation\.statements\[\d+\] on detection \d+",
        message,
    ), message
    # The runner's time went to the user's definition, so the run is billed,
    # as one stopped between calls is.
    assert run.bill.billed
    # The call ran, so its time is the filter's, not overhead.
    [filter_step] = [
        step for step in run.breakdown["steps"] if step["name"] == "filter"
    ]
    assert filter_step["duration"] > 0


def test_queueing_images_takes_no_clock_sample(monkeypatch):
    # Redis runs a transaction's TIME only once all of it has arrived, so a
    # sample taken while 16 MB of images travel to Redis reads the server's
    # clock near the end of the round trip, not in its middle. Queue times
    # computed with that offset were about 10 ms short.
    from runner import dispatch
    from webapp.clock import RedisClock

    sampled = RedisClock()
    monkeypatch.setattr(dispatch, "clock", sampled)
    run = Run(
        id=uuid.uuid4(),
        owner_id=1,
        queue_name=keys.runner_queue("clock-sample"),
        parameters={},
        image_info={},
        batch_size=1,
        model_refs=[],
        warnings=[],
    )
    run.queued_at_ns = 0
    run.request_us = 0
    connection = get_redis()
    try:
        dispatch.enqueue(run, {"image": [bytes(16_000_000)]})
    finally:
        for key in (
            Job.key_for(str(run.id)),
            keys.inputs_key(str(run.id)),
            f"{Queue.redis_queue_namespace_prefix}{run.queue_name}",
            keys.current_run_key("clock-sample"),
        ):
            connection.delete(key)

    # Sampled with the images, the offset was 24 ms off on a 2-core machine.
    # Each clock's own sample is off by at most half a TIME round trip,
    # which a loaded machine can stretch to a few milliseconds.
    reference = RedisClock()
    error_ns = abs(sampled.offset_ns() - reference.offset_ns())
    assert error_ns < 5_000_000


def test_queue_time_after_slow_clock_sample(runner, alice, monkeypatch):
    # A web server thread that waits for the GIL between sending a TIME and
    # reading its reply takes a sample whose offset is half that wait off.
    # A run queued with images takes no sample in its transaction, so unless
    # the web server samples the clock itself, it stamps the run from that
    # one sample, for up to 30 s, and the queue time counts the error.
    from runner import dispatch
    from webapp.clock import RedisClock

    skewed = RedisClock()
    sent_ns = time.time_ns()
    reply = get_redis().time()
    skewed.observe(sent_ns, reply, time.time_ns() + 400_000_000)
    monkeypatch.setattr(dispatch, "clock", skewed)
    time.sleep(dispatch.CLOCK_SAMPLE_INTERVAL_S + 0.1)

    outcome = start_cli_run(alice, image_height(), wait_s=60)

    assert outcome.payload["meta"]["status"] == "succeeded"
    # The skewed sample alone stamped queued_at 200 ms early, and the queue
    # time counted those 200 ms. A sample taken with no thread in the way is
    # off by half a round trip: under a millisecond on an idle machine. Two
    # samples are compared, each allowed 50 ms on a busy one, which still
    # separates them from the skewed one.
    reference = RedisClock()
    error_ns = abs(skewed.offset_ns() - reference.offset_ns())
    assert error_ns < 100_000_000


# Runs manage.py with time.time and time.time_ns moved forward by the
# seconds in its first argument each time the process receives SIGUSR1, as
# on a machine whose clock is stepped.
STEPPED_CLOCK_MAIN = """
import runpy, signal, sys, time
step_ns = int(float(sys.argv.pop(1)) * 1e9)
offset_ns = 0
local_time_ns = time.time_ns


def step(signum, frame):
    global offset_ns
    offset_ns += step_ns


signal.signal(signal.SIGUSR1, step)
time.time_ns = lambda: local_time_ns() + offset_ns
time.time = lambda: time.time_ns() / 1e9
sys.argv[0] = "manage.py"
runpy.run_path("manage.py", run_name="__main__")
"""


def test_clock_step_leaves_queue_time(runner, alice):
    # The runner's clock steps an hour ahead right before it takes a run.
    # The clock samples taken before the step must not date the run's start
    # an hour late, which would count that hour as queue time.
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    env["GLASSBOX_TEST_DB_NAME"] = str(db_connection.settings_dict["NAME"])
    log_path = Path(settings.DATA_DIR) / "stepped.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", STEPPED_CLOCK_MAIN, "3600"]
            + ["runner", "--name", "stepped"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not any(state.name == "stepped" for state in fleet.live_runners()):
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1)  # heartbeats, each of which takes a clock sample
        process.send_signal(signal.SIGUSR1)
        run = start(alice, "people-detector", "stepped", wait_s=60).run
    finally:
        process.terminate()
        process.wait(timeout=30)
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, run.error
    queue_s = run.breakdown["components"]["queue"] / 1e6
    assert queue_s < 60, log_path.read_text()[-3000:]


def test_model_directory_symlink_to_weights_elsewhere(
    runner, extra_runners, alice, tmp_path
):
    # An operator may keep weights elsewhere and link them into MODEL_DIR.
    linked = tmp_path / "models-linked"
    linked.mkdir()
    weights = resolve_model("people-detector").local_path()
    (linked / "people-detector.pt").symlink_to(weights)
    extra_runners("linked-machine", env_overrides={"MODEL_DIR": str(linked)})
    ran = start(alice, "people-detector", "linked-machine", wait_s=120)
    assert ran.payload["meta"]["status"] == "succeeded", ran.payload["meta"]["error"]
