"""Eviction settings set in the admin, applied by runners between jobs."""

import time
import uuid

import pytest
from rq import Queue

from runner import keys
from runner.dispatch import enqueue_job
from runner.model_cache import ModelCache, ModelProvider
from runner.models import FleetSettings, Run
from runner.registry import resolve_model
from runner.runtime import RunnerRuntime, queued_model_keys
from tests.conftest import image_bytes, start_cli_run
from tests.definitions import detection
from tests.test_runner_pool import start, wait_for_status
from webapp.redis import get_redis
from workflows.compiler import build_plan, definition_digest
from workflows.executor import execute_plan
from workflows.images import WorkflowImage
from workflows.timing import RunTimer

MIB = 1024 * 1024


def new_cache(budget_mb: int) -> ModelCache:
    return ModelCache(
        budget_bytes=budget_mb * MIB, device="cpu", warmup_size=64, torch_threads=1
    )


def load(cache: ModelCache, model_id: str, owner_id: int) -> str:
    """Load ``model_id`` into ``cache`` as a run would; return its cache key."""
    source = resolve_model(model_id, owner_id)
    cache.get(source, RunTimer().model(model_id))
    return source.cache_key


def wait_for_state(process, check, timeout_s: float = 15) -> dict:
    """Wait until the runner's heartbeat passes ``check``; return the heartbeat."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = process.state()
        if state is not None and check(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"runner {process.name}'s heartbeat is still {state}")


@pytest.mark.django_db
def test_lowered_budget_evicts_at_once(alice):
    # Each yolov8n takes about 12.6 MB, so 20 MiB has room for one of them.
    cache = new_cache(4096)
    first = load(cache, "yolov8n.yaml-320", alice.id)
    second = load(cache, "yolov8n.yaml-352", alice.id)

    assert cache.configure(20 * MIB, "lru") is True
    assert [model["cache_key"] for model in cache.snapshot()] == [second]
    assert cache.evictions == 1
    assert first != second
    # The same settings again change nothing.
    assert cache.configure(20 * MIB, "lru") is False

    # As at a load, the model used last stays, alone over a budget too
    # small for it.
    assert cache.configure(1 * MIB, "lru") is True
    assert [model["cache_key"] for model in cache.snapshot()] == [second]
    assert cache.evictions == 1


@pytest.mark.django_db
def test_lfu_evicts_the_least_called_model(alice):
    cache = new_cache(30)
    cache.configure(30 * MIB, "lfu")
    often = load(cache, "yolov8n.yaml-320", alice.id)
    for _ in range(2):
        load(cache, "yolov8n.yaml-320", alice.id)
    load(cache, "yolov8n.yaml-352", alice.id)

    # 30 MiB has room for two: the third load evicts the model called once, where
    # the least recently used would be the one called three times.
    latest = load(cache, "yolov8n.yaml-384", alice.id)
    assert {model["cache_key"] for model in cache.snapshot()} == {often, latest}


@pytest.fixture
def own_queue():
    """A runner's own queue in the session's Redis, emptied after the test."""
    queue = Queue(
        keys.runner_queue("awaited-models"),
        connection=get_redis(),
        serializer=keys.JOB_SERIALIZER,
    )
    yield queue
    queue.empty()


def queue_run_calling(queue: Queue, model_id: str, cache_key: str) -> None:
    """Queue the job of a run that routing sent to ``queue``'s runner.

    Routing sends a run there because the runner has the run's model loaded. The
    job is the one dispatch queues, with only the model in its snapshot.
    """
    snapshot = {"model_refs": [{"model_id": model_id, "cache_key": cache_key}]}
    enqueue_job(queue.connection, queue.name, str(uuid.uuid4()), {"snapshot": snapshot})


@pytest.mark.django_db
def test_models_of_queued_runs_are_unloaded_last(alice, own_queue):
    # 45 MiB has room for three yolov8n, not four.
    cache = new_cache(45)
    cache.awaited_keys = lambda: queued_model_keys(own_queue)
    awaited = load(cache, "yolov8n.yaml-416", alice.id)
    load(cache, "yolov8n.yaml-448", alice.id)
    latest = load(cache, "yolov8n.yaml-480", alice.id)
    queue_run_calling(own_queue, "yolov8n.yaml-416", awaited)

    incoming = load(cache, "yolov8n.yaml-512", alice.id)

    # The least recently used model stays, as the queued run calls it.
    assert {model["cache_key"] for model in cache.snapshot()} == {
        awaited,
        latest,
        incoming,
    }
    assert cache.evictions == 1


@pytest.mark.django_db
def test_models_of_queued_runs_do_not_expire(alice, own_queue):
    cache = new_cache(4096)
    cache.configure(4096 * MIB, "ttl", keep_alive_s=0.05)
    cache.awaited_keys = lambda: queued_model_keys(own_queue)
    awaited = load(cache, "yolov8n.yaml-416", alice.id)
    load(cache, "yolov8n.yaml-448", alice.id)
    queue_run_calling(own_queue, "yolov8n.yaml-416", awaited)
    time.sleep(0.2)

    assert cache.expire_idle() == 1
    assert [model["cache_key"] for model in cache.snapshot()] == [awaited]


@pytest.mark.django_db
def test_runtime_follows_stored_settings():
    runtime = RunnerRuntime(name="tuned", device="cpu", cache=new_cache(64))

    FleetSettings.objects.create(memory_budget_mb=20, eviction_policy="lfu")
    runtime.read_fleet_settings()
    runtime.apply_fleet_settings()
    assert runtime.cache.budget_bytes == 20 * MIB
    assert runtime.cache.policy.name == "lfu"

    # A blank budget gives the runner its start-up budget back.
    FleetSettings.objects.update(memory_budget_mb=None, eviction_policy="lru")
    runtime.read_fleet_settings()
    runtime.apply_fleet_settings()
    assert runtime.cache.budget_bytes == 64 * MIB
    assert runtime.cache.policy.name == "lru"


def test_live_runners_apply_settings(runner, extra_runners, alice):
    # A budget above every runner's own, so that no test's models go.
    FleetSettings.objects.create(memory_budget_mb=5000, eviction_policy="lfu")
    state = wait_for_state(runner, lambda state: state["eviction_policy"] == "lfu")
    assert state["budget_bytes"] == 5000 * MIB

    FleetSettings.objects.update(memory_budget_mb=None)
    state = wait_for_state(runner, lambda state: state["budget_bytes"] != 5000 * MIB)
    assert state["budget_bytes"] == 4096 * MIB

    # A runner started later applies them before its first job: with the
    # budget its own, least frequently used goes first.
    small = extra_runners("lfu-small", budget_mb=30)
    for _ in range(3):
        start(alice, "yolov8n.yaml-416", "lfu-small")
    start(alice, "yolov8n.yaml-448", "lfu-small")
    start(alice, "yolov8n.yaml-480", "lfu-small")
    state = wait_for_state(small, lambda state: state["evictions"] == 1)
    assert state["eviction_policy"] == "lfu"
    assert sorted(model["model_id"] for model in state["models"]) == [
        "yolov8n.yaml-416",
        "yolov8n.yaml-480",
    ]
    FleetSettings.objects.all().delete()
    wait_for_state(runner, lambda state: state["eviction_policy"] == "lru")


def test_fleet_settings_admin(client, django_user_model):
    staff = django_user_model.objects.create_superuser(
        "fleet-admin", password="admin-password"
    )
    client.force_login(staff)

    listing = client.get("/admin/runner/fleetsettings/")
    assert listing.status_code == 302
    assert listing["Location"] == "/admin/runner/fleetsettings/1/change/"
    saved = client.post(
        "/admin/runner/fleetsettings/1/change/",
        {"memory_budget_mb": "2048", "eviction_policy": "lfu"},
    )
    assert saved.status_code == 302
    stored = FleetSettings.current()
    assert (stored.memory_budget_mb, stored.eviction_policy) == (2048, "lfu")

    page = client.get("/admin/runner/run/fleet/").content.decode()
    assert "2048 MiB on every runner" in page
    assert "least frequently used" in page
    assert client.get("/admin/runner/fleetsettings/1/delete/").status_code == 403

    rejected = client.post(
        "/admin/runner/fleetsettings/1/change/",
        {"memory_budget_mb": "0", "eviction_policy": "lfu"},
    )
    assert rejected.status_code == 200
    assert FleetSettings.current().memory_budget_mb == 2048


def test_fleet_settings_budget_minimum_is_one(client, django_user_model):
    # 0 is rejected too, so the form states 1 as the minimum for every
    # value below it, and the browser's number field starts there.
    staff = django_user_model.objects.create_superuser(
        "fleet-admin", password="admin-password"
    )
    client.force_login(staff)
    # The list creates the row and redirects to its form.
    form = client.get("/admin/runner/fleetsettings/", follow=True).content.decode()
    assert 'min="1"' in form
    for value in ("-5", "0"):
        rejected = client.post(
            "/admin/runner/fleetsettings/1/change/",
            {"memory_budget_mb": value, "eviction_policy": "lru"},
        )
        assert rejected.status_code == 200, value
        errors = rejected.context["adminform"].form.errors["memory_budget_mb"]
        assert errors == ["Ensure this value is greater than or equal to 1."], value


def test_fleet_settings_have_maximums(client, django_user_model):
    staff = django_user_model.objects.create_superuser(
        "fleet-admin", password="admin-password"
    )
    client.force_login(staff)
    client.get("/admin/runner/fleetsettings/", follow=True)
    rejected = client.post(
        "/admin/runner/fleetsettings/1/change/",
        {
            "memory_budget_mb": "9223372036854775807",
            "eviction_policy": "ttl",
            "keep_alive_s": "9223372036854775807",
        },
    )

    assert rejected.status_code == 200
    errors = rejected.context["adminform"].form.errors
    assert errors["memory_budget_mb"] == [
        "Ensure this value is less than or equal to 16777216."
    ]
    assert errors["keep_alive_s"] == [
        "Ensure this value is less than or equal to 2592000."
    ]
    assert FleetSettings.objects.get().memory_budget_mb is None


def test_fleet_page_words_eviction_alike(client, django_user_model):
    from runner import fleet

    FleetSettings(eviction_policy="ttl", keep_alive_s=60).save()
    name = "keep-alive-60"
    fleet.publish_heartbeat(
        name,
        {
            "name": name,
            "instance": "only",
            "models": [],
            "eviction_policy": "ttl",
            "keep_alive_s": 60.0,
            "evictions": 2,
        },
    )
    staff = django_user_model.objects.create_user(
        "fleet-viewer", password="viewer-password", is_staff=True
    )
    client.force_login(staff)
    try:
        page = client.get("/admin/runner/run/fleet/").content.decode()
    finally:
        fleet.remove_heartbeat(name)

    words = "keep-alive (TTL), then least recently used; keep-alive 60 s"
    settings_line = page.split('id="fleet-settings"')[1].split("</p>")[0]
    assert f"eviction {words}." in settings_line
    live_table = page.split('id="live-runners"')[1].split("</table>")[0]
    assert f"<td>{words} (2 so far)</td>" in live_table
    assert "60.0" not in live_table


def test_fleet_settings_updated_at_in_utc(client, django_user_model):
    FleetSettings(eviction_policy="lru").save()
    updated = FleetSettings.current().updated_at
    staff = django_user_model.objects.create_superuser(
        "fleet-admin", password="admin-password"
    )
    client.force_login(staff)
    form = client.get("/admin/runner/fleetsettings/1/change/").content.decode()
    assert "Updated at (UTC)" in form
    assert f"{updated:%Y-%m-%d %H:%M:%S} UTC" in form


@pytest.mark.django_db
def test_unknown_stored_policy_keeps_current(caplog):
    # A row written outside the admin (SQL, or a newer release with more
    # policies) can contain a name that is not one of this runner's policies.
    runtime = RunnerRuntime(name="unknown-policy", device="cpu", cache=new_cache(64))
    FleetSettings.objects.create(memory_budget_mb=20, eviction_policy="lfu")
    FleetSettings.objects.update(eviction_policy="fifo")

    for _ in range(3):
        runtime.read_fleet_settings()
        runtime.apply_fleet_settings()
    assert runtime.cache.budget_bytes == 20 * MIB
    assert runtime.cache.policy.name == "lru"
    warnings = [r for r in caplog.records if "fifo" in r.getMessage()]
    assert len(warnings) == 1


def test_fleet_settings_added_after_delete(client, django_user_model):
    # The admin offers "Add" while the table is empty, as after a row was
    # deleted outside it. The database gives the new row a new id.
    staff = django_user_model.objects.create_superuser(
        "fleet-adder", password="admin-password"
    )
    client.force_login(staff)
    FleetSettings.objects.create(memory_budget_mb=100)
    FleetSettings.objects.all().delete()

    added = client.post(
        "/admin/runner/fleetsettings/add/",
        {"memory_budget_mb": "2048", "eviction_policy": "lfu"},
    )
    assert added.status_code == 302
    stored = FleetSettings.current()
    assert stored.memory_budget_mb == 2048
    assert stored.eviction_policy == "lfu"
    assert FleetSettings.objects.count() == 1


@pytest.mark.django_db
def test_runtime_expires_idle_models_with_ttl(alice):
    runtime = RunnerRuntime(name="keep-alive", device="cpu", cache=new_cache(64))
    FleetSettings.objects.create(eviction_policy="ttl", keep_alive_s=1)
    runtime.read_fleet_settings()
    runtime.apply_fleet_settings()
    assert runtime.cache.policy.name == "ttl"
    assert runtime.cache.policy.keep_alive_s == 1

    key = load(runtime.cache, "yolov8n.yaml-320", alice.id)
    runtime.apply_fleet_settings()
    assert [model["cache_key"] for model in runtime.cache.snapshot()] == [key]
    time.sleep(1.2)
    # Idle past the keep-alive and with the budget far from full, it goes
    # at the next pause between jobs.
    runtime.apply_fleet_settings()
    assert runtime.cache.snapshot() == []
    assert runtime.cache.evictions == 1

    # A new keep-alive for the same policy keeps the policy and its state.
    policy = runtime.cache.policy
    FleetSettings.objects.update(keep_alive_s=600)
    runtime.read_fleet_settings()
    runtime.apply_fleet_settings()
    assert runtime.cache.policy is policy
    assert policy.keep_alive_s == 600


@pytest.mark.django_db
def test_runtime_blank_keep_alive_is_default():
    runtime = RunnerRuntime(name="histogram", device="cpu", cache=new_cache(64))
    FleetSettings.objects.create(eviction_policy="histogram")
    runtime.read_fleet_settings()
    runtime.apply_fleet_settings()
    assert runtime.cache.policy.name == "histogram"
    assert runtime.cache.policy.keep_alive_s == 300


def test_live_runner_applies_gdsf_then_ttl(runner, extra_runners, alice):
    FleetSettings.objects.create(eviction_policy="gdsf")
    idle = extra_runners("keep-alive")
    state = wait_for_state(idle, lambda state: state["eviction_policy"] == "gdsf")
    assert state["keep_alive_s"] is None
    start(alice, "yolov8n.yaml-320", "keep-alive")
    state = wait_for_state(idle, lambda state: len(state["models"]) == 1)
    assert state["evictions"] == 0

    # The session's runner applies the keep-alive too, and unloads its idle
    # models: later tests find them cold, as after a restart.
    FleetSettings.objects.update(eviction_policy="ttl", keep_alive_s=2)
    state = wait_for_state(
        idle,
        lambda state: state["eviction_policy"] == "ttl" and not state["models"],
    )
    assert state["keep_alive_s"] == 2
    assert state["evictions"] == 1
    FleetSettings.objects.all().delete()
    wait_for_state(runner, lambda state: state["eviction_policy"] == "lru")


def test_ttl_keeps_model_of_next_job(runner, extra_runners, alice):
    # Three runs wait on one runner's own queue with a keep-alive of 1 s: a
    # small model, a large one whose cold load and prediction take seconds,
    # and the small one again. The small model is idle past its keep-alive
    # when the large run ends, but the next job calls it, so it stays.
    FleetSettings.objects.create(eviction_policy="ttl", keep_alive_s=1)
    try:
        busy = extra_runners("keep-next")
        wait_for_state(busy, lambda state: state["keep_alive_s"] == 1)
        small, large = "yolov8n.yaml-320", "yolov8x.yaml"
        runs = [
            start(alice, model_id, "keep-next", wait_s=0).run
            for model_id in (small, large, small)
        ]
        for run in runs:
            wait_for_status(run.id, Run.Status.SUCCEEDED, timeout_s=120)
        models = [Run.objects.get(pk=run.id).breakdown["models"][0] for run in runs]
    finally:
        FleetSettings.objects.all().delete()

    assert models[1]["model_id"] == large
    assert models[1]["cold"] is True
    # The large run took longer than the keep-alive after the small one.
    assert models[1]["cold_load"]["total"] > 1_000_000
    assert models[2]["model_id"] == small
    assert models[2]["cold"] is False
    wait_for_state(runner, lambda state: state["eviction_policy"] == "lru")


def test_ttl_keeps_model_of_routed_run(runner, extra_runners, alice):
    # With a keep-alive of 1 s, a runner ends a long run of a large model
    # while routing has marked it busy for a run of the small model it
    # holds, and a shared job waits. The runner puts the shared job back
    # and waits for the routed run, which must find the small model loaded
    # although it comes seconds later.
    FleetSettings.objects.create(eviction_policy="ttl", keep_alive_s=1)
    connection = get_redis()
    session_mark = keys.current_run_key(runner.name)
    # Marked busy, the session runner leaves the shared job too.
    connection.set(session_mark, "run-elsewhere", ex=120)
    try:
        busy = extra_runners("keep-routed")
        wait_for_state(busy, lambda state: state["keep_alive_s"] == 1)
        small, large = "yolov8n.yaml-320", "yolov8x.yaml"
        start(alice, small, "keep-routed", wait_s=0)
        long_run = start(alice, large, "keep-routed", wait_s=0).run
        wait_for_status(long_run.id, Run.Status.RUNNING, timeout_s=60)
        shared = start_cli_run(alice, detection(small), wait_s=0).run
        assert shared.queue_name == keys.SHARED_QUEUE
        connection.set(keys.current_run_key("keep-routed"), "routed-run", ex=60)
        wait_for_status(long_run.id, Run.Status.SUCCEEDED, timeout_s=120)
        # The routed run comes after a few dequeue timeouts (1 s each).
        time.sleep(3)
        routed = start(alice, small, "keep-routed", wait_s=0).run
        routed = wait_for_status(routed.id, Run.Status.SUCCEEDED, timeout_s=60)
    finally:
        connection.delete(session_mark)
        FleetSettings.objects.all().delete()
    wait_for_status(shared.id, Run.Status.SUCCEEDED, timeout_s=60)

    model = routed.breakdown["models"][0]
    assert model["model_id"] == small
    assert model["cold"] is False
    wait_for_state(runner, lambda state: state["eviction_policy"] == "lru")


def test_fleet_settings_admin_keep_alive(client, django_user_model):
    staff = django_user_model.objects.create_superuser(
        "keep-alive-admin", password="admin-password"
    )
    client.force_login(staff)
    form = client.get("/admin/runner/fleetsettings/", follow=True).content.decode()
    assert "Keep-alive (seconds)" in form

    saved = client.post(
        "/admin/runner/fleetsettings/1/change/",
        {"eviction_policy": "ttl", "keep_alive_s": "30"},
    )
    assert saved.status_code == 302
    stored = FleetSettings.current()
    assert stored.eviction_policy == "ttl"
    assert stored.keep_alive_s == 30
    page = client.get("/admin/runner/run/fleet/").content.decode()
    assert "keep-alive 30 s" in page

    for value in ("0", "-5"):
        rejected = client.post(
            "/admin/runner/fleetsettings/1/change/",
            {"eviction_policy": "ttl", "keep_alive_s": value},
        )
        assert rejected.status_code == 200, value
        errors = rejected.context["adminform"].form.errors["keep_alive_s"]
        assert errors == ["Ensure this value is greater than or equal to 1."], value
    assert FleetSettings.current().keep_alive_s == 30


@pytest.mark.django_db
def test_histogram_counts_one_use_per_run(alice):
    # A batch of 11 images calls the model 11 times in one run. Those calls
    # are no idle times between runs, so the model keeps the fallback
    # keep-alive instead of one from a histogram of 10 gaps of milliseconds.
    cache = new_cache(64)
    cache.configure(cache.budget_bytes, "histogram", keep_alive_s=600)
    definition = detection("yolov8n.yaml-320")
    plan = build_plan(definition, definition_digest(definition))
    source = resolve_model("yolov8n.yaml-320", alice.id)
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")
    timer = RunTimer()
    provider = ModelProvider(cache, {"yolov8n.yaml-320": source}, timer)
    execute_plan(plan, [{"image": image}] * 11, models=provider, timer=timer)

    assert timer.model("yolov8n.yaml-320").calls == 11
    assert cache.policy.histograms == {}
    assert cache.policy.keep_alive_for(source.cache_key) == 600
    cache.expire_idle()
    assert [model["cache_key"] for model in cache.snapshot()] == [source.cache_key]
