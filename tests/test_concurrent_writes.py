"""Workflow edits and creates that arrive at the same moment, on real connections.

Each thread has its own database connection, so on PostgreSQL the writes
really overlap. On SQLite they queue for the write lock.
"""

import threading

import pytest
from django.conf import settings
from django.db import OperationalError, connection, transaction

from runner.dispatch import lock_live_workflow
from runner.models import Run
from tests.conftest import registered_runner, start_cli_run
from tests.definitions import image_height
from webapp.requests import TooManyRequests
from workflows.models import Workflow

THREADS = 8


def run_together(target) -> list:
    """Call ``target()`` in THREADS threads released at once; return results."""
    barrier = threading.Barrier(THREADS)
    results: list = [None] * THREADS

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = target()
        except Exception as error:  # reported by the assertions below
            results[index] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_concurrent_edits_get_consecutive_versions(transactional_db, alice):
    workflow = Workflow.create_with_version(alice, "edited", image_height())

    results = run_together(lambda: workflow.add_version(image_height()).number)

    assert [r for r in results if isinstance(r, Exception)] == []
    assert sorted(results) == list(range(2, THREADS + 2))
    numbers = list(workflow.versions.values_list("number", flat=True))
    assert sorted(numbers) == list(range(1, THREADS + 2))


def test_concurrent_creates_get_distinct_slugs(transactional_db, alice):
    results = run_together(
        lambda: Workflow.create_with_version(alice, "same name", image_height()).slug
    )

    assert [r for r in results if isinstance(r, Exception)] == []
    assert len(set(results)) == THREADS
    assert "same-name" in results
    assert Workflow.objects.filter(owner=alice).count() == THREADS


def api_client(key: str):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def test_concurrent_same_definition_adds_one_version(
    transactional_db, alice, alice_key
):
    workflow = Workflow.create_with_version(alice, "same", image_height())
    changed = image_height()
    changed["steps"][0]["name"] = "changed"
    changed["outputs"][0]["selector"] = "$steps.changed.output"
    url = f"/api/workflows/{workflow.id}"

    results = run_together(
        lambda: (
            api_client(alice_key)
            .put(url, {"definition": changed}, format="json")
            .status_code
        )
    )

    assert results == [200] * THREADS
    assert workflow.versions.count() == 2


def test_concurrent_async_runs_respect_queue_limit(transactional_db, alice):
    # The runs go to a runner that looks alive but is no process, so they
    # stay queued while the limit is counted.
    settings.GLASSBOX["QUEUED_RUNS_PER_USER"], saved = (
        3,
        settings.GLASSBOX["QUEUED_RUNS_PER_USER"],
    )
    try:
        with registered_runner("limit-parked") as name:
            results = run_together(
                lambda: start_cli_run(alice, image_height(), wait_s=0, runner=name).run
            )
    finally:
        settings.GLASSBOX["QUEUED_RUNS_PER_USER"] = saved

    rejected = [r for r in results if isinstance(r, TooManyRequests)]
    assert len(rejected) == THREADS - 3, results
    assert Run.objects.filter(owner=alice).count() == 3


def test_save_from_a_stale_version_is_refused(alice, alice_client):
    # Two editors loaded version 1; the second save must not silently undo
    # the first's change.
    workflow = Workflow.create_with_version(alice, "stale", image_height())
    url = f"/api/workflows/{workflow.id}"
    first = image_height()
    first["steps"][0]["operations"][0]["property_name"] = "width"
    saved = alice_client.put(
        url, {"definition": first, "base_version": 1}, format="json"
    )
    assert saved.status_code == 200
    assert saved.json()["version"] == 2

    stale = alice_client.put(
        url,
        {"name": "renamed", "definition": image_height(), "base_version": 1},
        format="json",
    )
    assert stale.status_code == 409
    body = stale.json()
    assert body["code"] == "version_conflict"
    assert body["field"] == "base_version"
    assert "at version 2" in body["message"]
    workflow.refresh_from_db()
    assert workflow.name == "stale"
    assert workflow.latest_version().number == 2
    assert workflow.latest_version().definition == first

    # Without base_version, a save applies as before.
    plain = alice_client.put(url, {"name": "renamed"}, format="json")
    assert plain.status_code == 200
    for bad in ("latest", 0, True):
        response = alice_client.put(url, {"base_version": bad}, format="json")
        assert response.status_code == 400


def test_save_from_a_stale_revision_keeps_a_rename(alice, alice_client):
    # A rename creates no version, so base_version alone would let a page
    # loaded before it write the old name back.
    workflow = Workflow.create_with_version(alice, "before", image_height())
    url = f"/api/workflows/{workflow.id}"
    assert alice_client.get(url).json()["revision"] == 1
    renamed = alice_client.put(
        url, {"name": "after", "base_version": 1, "base_revision": 1}, format="json"
    )
    assert renamed.status_code == 200
    assert (renamed.json()["version"], renamed.json()["revision"]) == (1, 2)

    changed = image_height()
    changed["steps"][0]["operations"][0]["property_name"] = "width"
    stale = alice_client.put(
        url,
        {
            "name": "before",
            "definition": changed,
            "base_version": 1,
            "base_revision": 1,
        },
        format="json",
    )
    assert stale.status_code == 409
    body = stale.json()
    assert (body["code"], body["field"]) == ("version_conflict", "base_revision")
    assert "at revision 2" in body["message"]
    workflow.refresh_from_db()
    assert (workflow.name, workflow.revision) == ("after", 2)
    assert workflow.latest_version().number == 1

    # A save of what is stored moves nothing on; a real change does.
    same = alice_client.put(url, {"name": "after", "base_revision": 2}, format="json")
    assert same.json()["revision"] == 2
    saved = alice_client.put(
        url, {"definition": changed, "base_revision": 2}, format="json"
    )
    assert (saved.json()["version"], saved.json()["revision"]) == (2, 3)


postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="row locks are PostgreSQL's; SQLite's writes take turns",
)


def hold_run_lock(version_id: int, then) -> None:
    """Hold the lock that storing a run of the version takes, while ``then()`` runs.

    The lock is taken in a thread with its own connection and transaction,
    as a second web server process storing a run would hold it.
    """
    locked, done = threading.Event(), threading.Event()

    def store_run() -> None:
        try:
            with transaction.atomic():
                lock_live_workflow(version_id)
                locked.set()
                done.wait(timeout=30)
        finally:
            connection.close()

    thread = threading.Thread(target=store_run)
    thread.start()
    try:
        assert locked.wait(timeout=30)
        then()
    finally:
        done.set()
        thread.join(timeout=30)


def with_lock_timeout(action):
    """Run ``action()`` in a transaction that waits at most 1 s for a row lock."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = '1s'")
        return action()


@postgresql_only
def test_run_locks_share_workflow_row(transactional_db, alice):
    workflow = Workflow.create_with_version(alice, "popular", image_height())
    version_id = workflow.latest_version().id

    # Storing a second run does not wait for the first one's transaction.
    hold_run_lock(
        version_id, lambda: with_lock_timeout(lambda: lock_live_workflow(version_id))
    )


@postgresql_only
def test_delete_waits_for_run_being_stored(transactional_db, alice):
    workflow = Workflow.create_with_version(alice, "deleted", image_height())
    version_id = workflow.latest_version().id
    blocked = []

    def delete() -> None:
        try:
            with_lock_timeout(workflow.mark_deleted)
        except OperationalError as error:
            blocked.append(error)

    hold_run_lock(version_id, delete)

    assert len(blocked) == 1
    assert "lock timeout" in str(blocked[0])
    assert Workflow.objects.filter(pk=workflow.pk).exists()
    # Once the run is stored, the delete goes through.
    assert workflow.mark_deleted()
