"""The run page in a real browser: live timeline, cold then hot, the bill."""

import json
import os
import re
import shutil
import signal

from django.utils import timezone

from billing.models import Bill
from runner.events import MAX_EVENT_BYTES, RunEvents
from runner.models import Run
from runner.presenters import bill_to_dict
from runner.registry import resolve_model
from tests.conftest import ARTIFACTS, daphne_server, image_b64, image_path
from tests.definitions import detection, image_height
from tests.test_billing_pages import (
    failed_load_entry,
    make_bill,
    model_entry,
    version_of,
)
from tests.test_estimate import marked_busy, wait_until_loaded
from tests.test_runs import run_workflow
from webapp.redis import get_redis
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


def record_posts(page) -> list[str]:
    """Return a list that collects the URL of every POST the page sends."""
    posted: list[str] = []
    page.on(
        "request",
        lambda request: (
            posted.append(request.url) if request.method == "POST" else None
        ),
    )
    return posted


def estimate_parts(page) -> dict[str, list[str]]:
    """Return each part of the shown estimate: its line, then its sub-items."""
    return page.evaluate(
        """() => Object.fromEntries(
            [...document.querySelectorAll('#estimate li[data-part]')].map((li) => [
                li.dataset.part,
                [li.firstChild.textContent,
                 ...[...li.querySelectorAll('li')].map((item) => item.textContent)],
            ]))"""
    )


def read_estimate(page, base_url: str, workflow_id: int) -> dict[str, list[str]]:
    page.goto(f"{base_url}/workflows/{workflow_id}/run/")
    page.wait_for_function(
        "document.getElementById('estimate').textContent !== 'Estimating…'"
    )
    return estimate_parts(page)


def test_run_page_shows_live_timeline(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "People", detection("people-detector-512")
    )
    sign_in(page, asgi_server, "alice", "alice-password")

    estimate = read_estimate(page, asgi_server, workflow.id)
    assert estimate["start"][0].startswith(
        "Start: cold, people-detector-512 to be loaded by "
    )
    assert estimate["latency"] == ["Latency: unknown"]
    assert estimate["price"] == ["Price: unknown"]

    first_run = run_once(page, asgi_server, workflow.id)
    assert page.locator("#transport").text_content() == "live over websocket"
    assert page.locator("#timeline li[data-phase=cold_load]").count() == 1
    page.screenshot(path=str(ARTIFACTS / "run-page-cold.png"), full_page=True)

    shown = int(page.locator("#summary-amount").get_attribute("data-microcredits"))
    assert shown == Bill.objects.get(run_id=first_run).amount_microcredits

    wait_until_loaded(runner, "people-detector-512")
    estimate = read_estimate(page, asgi_server, workflow.id)
    assert estimate["start"] == [f"Start: hot on {runner.name}"]
    assert estimate["latency"][0].startswith("Latency: about ")
    # The latency's phases, in the timeline's words.
    assert "inference " in estimate["latency"][1]
    assert "cold load" not in estimate["latency"][1]
    assert estimate["price"][0].startswith("Price: ")
    assert estimate["price"][0].endswith(" credits)")
    # The workflow's own times and the model's call times both come from the
    # definition's one run.
    basis = estimate["basis"][0]
    assert basis.startswith("Based on medians of 1 earlier run of this definition; ")
    assert basis.endswith(
        "people-detector-512 call times from 1 run of this definition."
    )

    run_once(page, asgi_server, workflow.id)
    assert page.locator("#timeline li[data-phase=cold_load]").count() == 0
    inference = page.locator("#timeline li[data-phase=inference]")
    assert inference.count() == 1
    # Each model row names the step that called the model.
    assert "inference · people (people-detector-512)" in inference.text_content()
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


def test_estimate_counts_model_runs_apart(
    runner, asgi_server, page, alice, alice_client
):
    """Call times come from this definition's runs, else from any workflow's."""
    shown = Workflow.create_with_version(alice, "Shown", detection())
    other = Workflow.create_with_version(alice, "Other", detection(confidence=0.5))
    fresh = Workflow.create_with_version(alice, "Fresh", detection(confidence=0.3))
    for workflow in (shown, other, other):
        assert run_workflow(alice_client, workflow.id).status_code == 200

    sign_in(page, asgi_server, "alice", "alice-password")
    basis = read_estimate(page, asgi_server, shown.id)["basis"][0]
    assert "medians of 1 earlier run of this definition; " in basis
    assert "people-detector call times from 1 run of this definition" in basis

    # A definition that never ran times its model from every workflow's runs:
    # the hot ones, which leaves out the first if it loaded the model.
    response = alice_client.post(
        f"/api/workflows/{fresh.id}/estimate", {}, format="json"
    )
    assert response.status_code == 200, response.json()
    model = response.json()["models"][0]
    assert model["samples_from"] == "any"
    assert model["samples"] in (2, 3)


def run_rows(workflow) -> int:
    return Run.objects.filter(workflow_version__workflow=workflow).count()


def test_run_button_starts_one_run(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Once", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    page.wait_for_function(
        "document.getElementById('estimate').textContent !== 'Estimating…'"
    )

    # Two real clicks 120 ms apart, then Enter-style submissions, which a
    # disabled button does not stop.
    box = page.locator("#run-button").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.click(x, y)
    page.wait_for_timeout(120)
    page.mouse.click(x, y)
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]+/$"))
    assert page.locator("#run-button").is_disabled()
    page.evaluate("document.getElementById('run-form').requestSubmit()")
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )
    page.wait_for_function("!document.getElementById('run-button').disabled")
    page.wait_for_function(
        "document.getElementById('result-json').textContent.length > 0"
    )

    assert run_rows(workflow) == 1
    run = Run.objects.get(workflow_version__workflow=workflow)
    assert page.url.endswith(f"/runs/{run.id}/")
    assert_page_shows_run(page, run)

    # A second run replaces the first on the page.
    page.click("#run-button")
    page.wait_for_function(
        f"!location.pathname.includes('{run.id}')"
        " && document.getElementById('run-status').textContent === 'succeeded'"
        " && document.getElementById('result-json').textContent.length > 0",
        timeout=120_000,
    )
    assert run_rows(workflow) == 2
    second = Run.objects.filter(workflow_version__workflow=workflow).latest(
        "created_at"
    )
    assert page.url.endswith(f"/runs/{second.id}/")
    assert_page_shows_run(page, second)


def assert_page_shows_run(page, run) -> None:
    """Check the run page's summary, bill and result against the stored run."""
    run.refresh_from_db()
    total = page.locator("#summary-total").text_content()
    assert total == f"{run.breakdown['total'] / 1000:.3f} ms"
    amount = page.locator("#summary-amount").get_attribute("data-microcredits")
    assert int(amount) == Bill.objects.get(run=run).amount_microcredits
    shown = json.loads(page.locator("#result-json").text_content())
    assert shown == run.outputs
    assert page.locator("#timeline li[data-phase=request]").count() == 1
    assert page.locator("#bill-link").get_attribute("href") == (
        f"/billing/runs/{run.id}/"
    )


def test_run_page_shows_untrained_model(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "Untrained", detection("yolov8n.yaml")
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    estimate = read_estimate(page, asgi_server, workflow.id)
    assert estimate["untrained"][0].startswith(
        "yolov8n.yaml is an untrained architecture (random weights)"
    )

    run_id = run_once(page, asgi_server, workflow.id)
    page.wait_for_selector("#run-warnings:not([hidden])")
    warnings = page.locator("#run-warnings li").all_text_contents()
    assert warnings == Run.objects.get(pk=run_id).warnings
    assert any("yolov8n.yaml' is an untrained architecture" in w for w in warnings)
    page.wait_for_function(
        "document.getElementById('estimate').textContent.includes('hot on')"
    )
    assert (
        "yolov8n.yaml is an untrained architecture"
        in page.locator("#estimate").text_content()
    )

    page.goto(f"{asgi_server}/billing/runs/{run_id}/")
    model = page.locator("table.models tbody tr").first
    assert model.locator(".badge.untrained").text_content() == "untrained"

    page.goto(f"{asgi_server}/billing/")
    start = page.locator(f"#bill-table tr:has(a[href='/runs/{run_id}/']) td.start")
    assert start.locator(".badge.untrained").count() == 1


def test_run_page_shows_waived_bill(transactional_db, asgi_server, page, alice):
    version = Workflow.create_with_version(
        alice, "Waived", detection()
    ).latest_version()
    bill = make_bill(
        alice,
        version=version,
        billed=False,
        models=[model_entry("people-detector", calls=0)],
    )
    Run.objects.filter(pk=bill.run_id).update(finished_at=timezone.now())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/runs/{bill.run_id}/")
    page.wait_for_selector("#summary:not([hidden])", timeout=30_000)

    summary = " ".join(page.locator("#summary").text_content().split())
    assert "not billed: runner died" in summary
    assert "billed 0 ms" not in summary
    assert page.locator("#summary-billed").count() == 0
    model = page.locator("#timeline li[data-model='people-detector']")
    assert model.text_content().strip() == "model people-detector · not called"
    assert model.locator(".badge").count() == 0


def test_run_page_shows_failed_load(transactional_db, asgi_server, page, alice):
    version = Workflow.create_with_version(
        alice, "Broken weights", detection()
    ).latest_version()
    bill = make_bill(
        alice,
        version=version,
        billed=False,
        cold_load=2_092,
        models=[failed_load_entry("people-detector")],
    )
    Run.objects.filter(pk=bill.run_id).update(finished_at=timezone.now())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/runs/{bill.run_id}/")
    page.wait_for_selector("#summary:not([hidden])", timeout=30_000)

    # The billing pages call this run "load failed", and so does its model row.
    model = page.locator("#timeline li[data-model='people-detector']")
    assert model.locator(".badge").text_content() == "load failed"
    assert model.locator(".badge.cold").count() == 0


def test_run_page_reads_timing_of_reduced_done(
    transactional_db, asgi_server, page, alice
):
    # A breakdown this long puts the done event over MAX_EVENT_BYTES, so the
    # websocket sends it without the breakdown, and the page reads the timing
    # from the run API.
    models = [model_entry(f"model-{index}", calls=1) for index in range(6_000)]
    bill = make_bill(alice, version=version_of(alice, "Many models"), models=models)
    run = Run.objects.get(pk=bill.run_id)
    Run.objects.filter(pk=run.pk).update(finished_at=timezone.now())
    assert len(json.dumps(run.breakdown)) > MAX_EVENT_BYTES
    events = RunEvents(str(run.pk))
    events.emit("request", duration=run.breakdown["components"]["request"])
    events.emit(
        "done",
        status=run.status,
        breakdown=run.breakdown,
        bill=bill_to_dict(bill),
        error=None,
    )
    events.send_with(get_redis().pipeline(transaction=False))
    frames: list[str] = []
    page.on(
        "websocket",
        lambda socket: socket.on("framereceived", lambda text: frames.append(text)),
    )

    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/runs/{run.pk}/")
    page.wait_for_selector("#summary:not([hidden])", timeout=30_000)

    done = json.loads(frames[-1])
    assert done["phase"] == "done"
    assert done["truncated"] == ["breakdown"]
    assert page.locator("#transport").text_content() == (
        "finished before this page opened; read over websocket"
    )
    assert page.locator("#summary-times").is_visible()
    total = page.locator("#summary-total").text_content()
    assert total == f"{run.breakdown['total'] / 1000:.3f} ms"
    runner_total = page.locator("#summary-runner").text_content()
    assert runner_total == f"{run.breakdown['runner_total'] / 1000:.3f} ms"
    assert page.locator("#timeline li[data-phase=overhead]").count() == 1
    assert page.locator("#timeline li[data-model]").count() == len(models)
    amount = page.locator("#summary-amount").get_attribute("data-microcredits")
    assert int(amount) == bill.amount_microcredits


def test_run_page_rejects_oversized_image(
    transactional_db, asgi_server, page, alice, tmp_path
):
    workflow = Workflow.create_with_version(alice, "Large", detection())
    large = tmp_path / "large.jpg"
    with large.open("wb") as file:
        file.truncate(57 * 1024 * 1024)
    posted = record_posts(page)
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    page.set_input_files(".image-file", str(large))

    expected = (
        "the image is 57.0 MiB; images up to about 48 MiB fit "
        "(they are sent base64-encoded, which adds a third)"
    )
    error = page.locator("#run-form-error")
    assert error.text_content() == expected
    page.click("#run-button")
    page.wait_for_function("!document.getElementById('run-button').disabled")
    assert error.text_content() == expected
    assert not [url for url in posted if url.endswith("/runs")]
    assert run_rows(workflow) == 0


def crops_definition() -> dict:
    """Detect people, detect again in each person's crop, and draw the boxes.

    The crops' detections are output twice: relative to each crop, and in
    the input image's coordinates.
    """
    definition = detection()
    definition["steps"] += [
        {
            "type": "roboflow_core/dynamic_crop@v1",
            "name": "crop",
            "images": "$inputs.image",
            "predictions": "$steps.people.predictions",
        },
        {
            "type": "roboflow_core/roboflow_object_detection_model@v1",
            "name": "inner",
            "images": "$steps.crop.crops",
            "model_id": "people-detector",
            "confidence": 0.25,
        },
        {
            "type": "roboflow_core/bounding_box_visualization@v1",
            "name": "viz",
            "image": "$inputs.image",
            "predictions": "$steps.people.predictions",
        },
    ]
    definition["outputs"] += [
        {
            "type": "JsonField",
            "name": "inner_own",
            "selector": "$steps.inner.predictions",
        },
        {
            "type": "JsonField",
            "name": "inner_parent",
            "selector": "$steps.inner.predictions",
            "coordinates_system": "parent",
        },
        {"type": "JsonField", "name": "boxes", "selector": "$steps.viz.image"},
    ]
    return definition


def test_run_page_draws_nested_boxes(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Crops", crops_definition())
    sign_in(page, asgi_server, "alice", "alice-password")
    run_id = run_once(page, asgi_server, workflow.id)
    page.wait_for_function(
        "document.getElementById('result-canvas').dataset.labels !== undefined"
    )
    outputs = Run.objects.get(pk=run_id).outputs[0]
    top = len(outputs["predictions"]["predictions"])
    nested = sum(len(crop["predictions"]) for crop in outputs["inner_parent"])
    assert top >= 2
    assert nested >= 1

    canvas = page.locator("#result-canvas")
    assert int(canvas.get_attribute("data-boxes")) == top + nested
    labels = json.loads(canvas.get_attribute("data-labels"))
    assert len(labels) == top + nested
    for x, y, w, h in labels:
        assert x >= 0, (x, w)
        assert x + w <= 810, (x, w)
        assert y >= 0, (y, h)
        assert y + h <= 1080, (y, h)
    for index, (x, y, w, h) in enumerate(labels):
        for ox, oy, ow, oh in labels[index + 1 :]:
            apart = x + w <= ox or ox + ow <= x or y + h <= oy or oy + oh <= y
            assert apart, ((x, y, w, h), (ox, oy, ow, oh))

    # inner_own repeats inner_parent's detections relative to the crops:
    # they are drawn from inner_parent, so none is reported as left out.
    assert page.locator("#result-note").text_content() == ""

    image = page.locator("#result-images img")
    assert image.count() == 1
    assert image.evaluate("img => img.complete && img.naturalWidth") == 810
    assert page.locator("#result-images figcaption").text_content() == "boxes"
    assert (
        "base64 characters, shown above" in page.locator("#result-json").text_content()
    )
    page.screenshot(path=str(ARTIFACTS / "run-page-crops.png"), full_page=True)


def test_run_page_counts_boxes_left_out(runner, asgi_server, page, alice):
    # Without inner_parent, the crops' detections are only relative to the
    # crops, so the note counts them as not drawn.
    definition = crops_definition()
    definition["outputs"] = [
        output for output in definition["outputs"] if output["name"] != "inner_parent"
    ]
    workflow = Workflow.create_with_version(alice, "Own crops", definition)
    sign_in(page, asgi_server, "alice", "alice-password")
    run_id = run_once(page, asgi_server, workflow.id)
    page.wait_for_function(
        "document.getElementById('result-canvas').dataset.labels !== undefined"
    )
    outputs = Run.objects.get(pk=run_id).outputs[0]
    top = len(outputs["predictions"]["predictions"])
    nested = sum(len(crop["predictions"]) for crop in outputs["inner_own"])
    assert nested >= 1

    assert int(page.locator("#result-canvas").get_attribute("data-boxes")) == top
    note = page.locator("#result-note").text_content()
    assert note.startswith(f"{nested} detection")
    assert "relative to crop" in note


def test_run_page_note_agrees_in_number(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Note", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    one = page.evaluate("undrawnDetectionsNote(1)")
    assert one.startswith("1 detection is not drawn: its box is relative to a crop")
    assert "the crop's position" in one
    assert one.endswith("to draw it.")
    three = page.evaluate("undrawnDetectionsNote(3)")
    assert three.startswith("3 detections are not drawn: their boxes are relative")
    assert "the crops' positions" in three
    assert three.endswith("to draw them.")


def test_run_page_runs_the_version_it_shows(runner, asgi_server, page, alice):
    definition = detection()
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "conf", "default_value": 0.4}
    )
    definition["steps"][0]["confidence"] = "$inputs.conf"
    workflow = Workflow.create_with_version(alice, "Pinned", definition)
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    assert page.locator("h1").text_content().endswith("v1")
    # Another tab saves version 2 while this page still shows version 1.
    workflow.add_version(detection("yolov8n.yaml"))
    # An empty field leaves the parameter out, so its default applies.
    page.fill("#param-conf", "")
    page.click("#run-button")
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )
    run = Run.objects.get(pk=page.url.rstrip("/").rsplit("/", 1)[-1])
    assert run.workflow_version.number == 1
    assert run.model_refs[0]["model_id"] == "people-detector"

    page.reload()
    page.wait_for_function(
        "document.getElementById('transport').textContent.startsWith('finished')"
    )
    note = page.locator("#stored-run-note")
    assert "Input images are not kept" in note.text_content()
    assert page.locator("h1 a").get_attribute("href") == (
        f"/workflows/{workflow.id}/run/"
    )


def test_run_page_uses_last_chosen_image(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Last image", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    sample = page.locator(".image-sample")
    file_input = page.locator(".image-file")

    # Choosing a file moves the sample list to an entry naming the file.
    page.set_input_files(".image-file", str(image_path("zidane.jpg")))
    assert sample.input_value() == ""
    assert sample.locator("option:checked").text_content() == "Your file: zidane.jpg"

    # Choosing a sample afterwards clears the file, and the run sends the sample.
    page.select_option(".image-sample", "bus.jpg")
    assert file_input.evaluate("input => input.files.length") == 0
    assert sample.locator("option[value='']").text_content() == "Upload a file…"
    with page.expect_request(f"**/api/workflows/{workflow.id}/runs") as request:
        page.click("#run-button")
    sent = request.value.post_data_json["inputs"]["image"]["value"]
    assert sent == image_b64("bus.jpg")
    page.wait_for_function("location.pathname.startsWith('/runs/')")
    first_run = page.url.rstrip("/").rsplit("/", 1)[-1]
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )

    # A file chosen after the sample is what the next run sends.
    page.set_input_files(".image-file", str(image_path("zidane.jpg")))
    with page.expect_request(f"**/api/workflows/{workflow.id}/runs") as request:
        page.click("#run-button")
    sent = request.value.post_data_json["inputs"]["image"]["value"]
    assert sent == image_b64("zidane.jpg")
    page.wait_for_function(
        f"!location.pathname.includes('{first_run}')"
        " && document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )


def test_run_page_without_version(transactional_db, asgi_server, page, alice):
    # A workflow made in the admin can have no version at all.
    workflow = Workflow.objects.create(owner=alice, name="Empty", slug="empty")
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")

    note = page.locator("#no-version")
    assert "has no saved version yet" in note.text_content()
    edit_url = f"/workflows/{workflow.id}/edit"
    assert note.locator("a").get_attribute("href") == edit_url
    assert page.locator("#run-button").count() == 0
    assert page.locator("#estimate").count() == 0
    assert "None" not in page.locator("main").text_content()


def test_run_page_refuses_inexact_numbers(transactional_db, asgi_server, page, alice):
    # JSON.stringify sends 1e400 as null, and an integer past 2**53 arrives
    # changed, so the page must stop before sending either.
    workflow = Workflow.create_with_version(
        alice, "Parameters", detection_with_parameters()
    )
    posted = record_posts(page)
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    error = page.locator("#run-form-error")
    for text, problem in (
        ("1e400", "the number 1e400"),
        ("[1, 9007199254740993]", "the integer 9007199254740993"),
    ):
        page.fill("#param-label", text)
        page.click("#run-button")
        page.wait_for_function("!document.getElementById('run-button').disabled")
        assert error.text_content() == (
            f"Parameter 'label': {problem} cannot be sent exactly; use a smaller "
            "number, or quote it to send it as text."
        )
    assert not [url for url in posted if url.endswith("/runs")]
    assert run_rows(workflow) == 0


def test_run_page_shows_a_waiting_run_as_queued(
    transactional_db, asgi_server, page, alice
):
    # No runner has taken the run, so the page says what the API says.
    from webapp.clock import clock

    workflow = Workflow.create_with_version(alice, "Waiting", detection())
    waiting = Run.objects.create(
        owner=alice,
        source="api",
        workflow_version=workflow.latest_version(),
        status=Run.Status.QUEUED,
        queued_at_ns=clock.now_ns(),
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/runs/{waiting.id}/")
    page.wait_for_function(
        "document.getElementById('transport').textContent === 'live over websocket'"
    )
    status = page.locator("#run-status")
    assert status.text_content() == "queued"
    assert "queued" in status.get_attribute("class")
    assert page.locator("#timeline li").count() == 0


def test_run_page_controls_have_labels(transactional_db, asgi_server, page, alice):
    # Screen readers name each control of the run form by its label.
    workflow = Workflow.create_with_version(
        alice, "Parameters", detection_with_parameters()
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('#run-form input, #run-form select')]
            .filter((control) => control.labels.length === 0
                && !control.getAttribute('aria-label'))
            .map((control) => control.outerHTML)"""
    )
    assert unlabelled == []
    sample = page.get_by_label("Image “image”: a sample or your file")
    assert sample.evaluate("control => control.classList.contains('image-sample')")
    upload = page.get_by_label("Image “image”: file to upload")
    assert upload.get_attribute("type") == "file"
    legend = page.locator("fieldset[data-image-input='image'] legend")
    assert legend.text_content() == "Image “image”"


def test_run_page_estimate_follows_typing(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "Parameters", detection_with_parameters()
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    page.wait_for_function(
        "document.getElementById('estimate').textContent !== 'Estimating…'"
    )
    # Typed without leaving the field, so no change event fires.
    page.locator("#param-model").press_sequentially('"no-such-model"')
    page.wait_for_function(
        "document.getElementById('estimate').textContent.includes('no-such-model')"
    )
    assert page.locator("#estimate").text_content().startswith("No estimate: ")


def test_first_estimate_in_short_parts(transactional_db, asgi_server, page, alice):
    # A workflow that never ran, of a model no runner has loaded: every
    # reason the latency and price are unknown is a part of its own.
    source = resolve_model("people-detector").local_path()
    copy = source.replace("people-detector.pt", "never-loaded.pt")
    shutil.copy(source, copy)
    try:
        workflow = Workflow.create_with_version(
            alice, "Never ran", detection("never-loaded")
        )
        sign_in(page, asgi_server, "alice", "alice-password")
        estimate = read_estimate(page, asgi_server, workflow.id)
    finally:
        os.unlink(copy)

    assert list(estimate) == ["start", "latency", "price", "unknown"]
    assert estimate["start"][0].startswith("Start: cold, never-loaded to be loaded by ")
    assert estimate["latency"] == ["Latency: unknown"]
    assert estimate["price"] == ["Price: unknown"]
    reasons = estimate["unknown"]
    assert reasons[0] == "Unknown because:"
    # In the timeline's words for the phases. Whether a runner is up adds
    # a reason about the queue.
    assert reasons[1].startswith("this definition has no succeeded run yet")
    assert "queue, compile, blocks, serialization and overhead" in reasons[1]
    assert (
        "model 'never-loaded' has no succeeded run, so its preprocess, "
        "inference and postprocess times are unknown"
    ) in reasons
    assert reasons[-1].endswith("so its cold load time is unknown")
    page.locator("#estimate").screenshot(path=str(ARTIFACTS / "estimate-first.png"))


def test_estimate_names_model_directory(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "Parameters", detection_with_parameters()
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    page.fill("#param-model", '"nope-model"')
    page.wait_for_function(
        "document.getElementById('estimate').textContent.includes('nope-model')"
    )
    estimate = page.locator("#estimate").text_content()
    assert estimate.startswith("No estimate: Model 'nope-model' not found")
    # The directory is named in plain words, with its setting in brackets.
    assert "the server's model directory (MODEL_DIR/nope-model.pt)" in estimate


def test_run_page_shows_error_hint(
    transactional_db, asgi_server, page, alice, tmp_path
):
    from PIL import Image

    workflow = Workflow.create_with_version(alice, "Hint", detection())
    deep = tmp_path / "deep.tiff"
    Image.new("I", (8, 8)).save(deep)
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    page.set_input_files(".image-file", str(deep))
    page.click("#run-button")
    page.wait_for_function(
        "document.getElementById('run-form-error').textContent !== ''"
    )
    assert page.locator("#run-form-error").text_content() == (
        "Input 'image' is a TIFF image with 32-bit samples, which the runners "
        "cannot decode. Convert it to 8 or 16 bits per sample."
    )
    # The result box stays hidden while it is empty.
    assert not page.locator("#result-json").is_visible()
    assert run_rows(workflow) == 0


def test_run_page_counts_reloads(transactional_db, asgi_server, page, alice):
    version = Workflow.create_with_version(
        alice, "Reloaded", detection()
    ).latest_version()
    model = {
        **model_entry("people-detector", calls=2),
        "cold": True,
        "loads": 2,
        "cold_load": {"read": 800, "to_device": 100, "warmup": 900, "total": 1800},
    }
    bill = make_bill(alice, version=version, cold_load=1800, models=[model])
    Run.objects.filter(pk=bill.run_id).update(finished_at=timezone.now())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/runs/{bill.run_id}/")
    page.wait_for_selector("#summary:not([hidden])", timeout=30_000)

    row = page.locator("#timeline li[data-model='people-detector']")
    assert " ".join(row.text_content().split()).startswith(
        "model people-detector cold · loaded 2 times"
    )


def mean_color(pixels, box: tuple[int, int, int, int]) -> tuple[float, ...]:
    left, top, right, bottom = box
    region = pixels[top:bottom, left:right].reshape(-1, pixels.shape[2])
    return tuple(region[:, :3].mean(axis=0))


def color_distance(first, second) -> float:
    return sum((a - b) ** 2 for a, b in zip(first, second, strict=True)) ** 0.5


def test_run_page_draws_upright_photo(runner, asgi_server, page, alice, tmp_path):
    # A phone stores a photo as the sensor read it, with an EXIF tag that
    # records how to turn it upright. Runners turn it as browsers do when they
    # draw it, so the model sees upright people and the boxes land on them.
    import numpy as np
    from PIL import Image

    upright = Image.open(image_path("bus.jpg"))
    pixels = np.asarray(upright.convert("RGB"), dtype=float)
    # Corners with no box or label on them: sky at the top left, road at
    # the bottom right.
    corners = [(0, 0, 80, 80), (730, 1000, 810, 1080)]
    # Each tag, and the turn that stores the upright photo so that the tag
    # turns it back.
    stored_turns = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90}
    stored_turns[8] = Image.Transpose.ROTATE_270
    workflow = Workflow.create_with_version(alice, "Phone photo", detection())
    sign_in(page, asgi_server, "alice", "alice-password")

    for suffix, orientation in (("jpg", 3), ("jpg", 6), ("png", 8)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = tmp_path / f"bus-orientation-{orientation}.{suffix}"
        upright.transpose(stored_turns[orientation]).save(
            stored, quality=95, exif=exif.tobytes()
        )
        page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
        page.set_input_files(".image-file", str(stored))
        page.click("#run-button")
        page.wait_for_function(
            "document.getElementById('run-status').textContent === 'succeeded'",
            timeout=120_000,
        )
        page.wait_for_function(
            "document.getElementById('result-canvas').dataset.labels !== undefined"
        )
        run_id = page.url.rstrip("/").rsplit("/", 1)[-1]
        found = Run.objects.get(pk=run_id).outputs[0]["predictions"]
        assert found["image"] == {"width": 810, "height": 1080}
        assert len(found["predictions"]) >= 3, orientation

        canvas = page.locator("#result-canvas")
        size = canvas.evaluate("c => [c.width, c.height]")
        assert size == [810, 1080]
        assert int(canvas.get_attribute("data-boxes")) == len(found["predictions"])
        assert "not drawn" not in page.locator("#result-note").text_content()
        for left, top, right, bottom in corners:
            drawn = canvas.evaluate(
                """(c, [x, y, w, h]) =>
                    Array.from(c.getContext('2d').getImageData(x, y, w, h).data)""",
                [left, top, right - left, bottom - top],
            )
            region = np.array(drawn, dtype=float).reshape(bottom - top, right - left, 4)
            shown = mean_color(region, (0, 0, right - left, bottom - top))
            expected = mean_color(pixels, (left, top, right, bottom))
            assert color_distance(shown, expected) < 10, (orientation, left, top)
        page.screenshot(
            path=str(ARTIFACTS / f"run-page-orientation-{suffix}-{orientation}.png"),
            full_page=True,
        )


def test_run_page_of_deleted_workflow(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Deleted meanwhile", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    # Another tab deletes the workflow while this page is open.
    assert workflow.mark_deleted()

    with page.expect_response(f"**/api/workflows/{workflow.id}/runs") as response:
        page.click("#run-button")
    assert response.value.status == 404
    error = page.locator("#run-form-error")
    page.wait_for_function(
        "document.getElementById('run-form-error').textContent !== ''"
    )
    assert error.text_content() == (
        "This workflow was deleted after this page opened, so it cannot run. "
        "Its earlier runs stay in the billing history."
    )
    assert page.locator("#run-button").is_enabled()
    assert Run.objects.count() == 0


def test_run_page_explains_queue_wait(runner, asgi_server, page, alice):
    # The only runner is stopped when the run is sent, so the run waits in
    # the queue, and the page shows why until the resumed runner takes it.
    workflow = Workflow.create_with_version(alice, "Paused", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    waiting = page.locator("#run-waiting")
    assert waiting.is_hidden()
    runner.process.send_signal(signal.SIGSTOP)
    try:
        page.click("#run-button")
        page.wait_for_function(
            "document.getElementById('run-waiting').textContent"
            ".includes('has sent no heartbeat')",
            timeout=30_000,
        )
        assert page.locator("#run-status").text_content() == "queued"
        assert waiting.is_visible()
        # The run is in the runner's own queue or in the shared one, as other
        # runners of earlier tests are still listed or not, and the reason
        # names the silent runner either way.
        reason = waiting.text_content()
        assert f"runner {runner.name}" in reason
        assert "has sent no heartbeat for " in reason
    finally:
        runner.process.send_signal(signal.SIGCONT)
    page.wait_for_function(
        "document.getElementById('run-status').textContent !== 'queued'",
        timeout=60_000,
    )
    assert waiting.is_hidden()
    assert waiting.text_content() == ""
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )
    assert waiting.is_hidden()


def test_run_page_sends_price_cap(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "Capped", detection("people-detector-160")
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    page.fill("#max-price", "abc")
    page.click("#run-button")
    page.wait_for_function(
        "document.getElementById('run-form-error').textContent !== ''"
    )
    assert (
        page.locator("#run-form-error")
        .text_content()
        .startswith("Price cap: “abc” is not a whole number")
    )
    assert Run.objects.count() == 0

    # alice has no runs yet, so the price is unknown and the bill is capped.
    page.fill("#max-price", "1")
    page.click("#run-button")
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )
    assert page.locator("#summary-amount").get_attribute("data-microcredits") == "1"
    assert page.locator("#summary-capped").is_visible()
    page.wait_for_function("!document.getElementById('run-prediction').hidden")
    prediction = page.locator("#run-prediction").text_content()
    assert prediction.startswith("Predicted before the run: ")
    assert "price unknown (price cap 1 µcr" in prediction
    assert "; actual: " in prediction
    page.screenshot(path=str(ARTIFACTS / "run-page-capped.png"), full_page=True)


def test_run_page_sends_chosen_priority(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Height", image_height())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    assert page.locator("#run-priority").input_value() == "standard"
    assert page.locator("#run-priority-note").is_hidden()

    with page.expect_request(lambda request: request.url.endswith("/estimate")) as sent:
        page.select_option("#run-priority", "economy")
    assert json.loads(sent.value.post_data)["priority"] == "economy"
    page.click("#run-button")
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'succeeded'",
        timeout=120_000,
    )

    run = Run.objects.get()
    assert run.priority == Run.Priority.ECONOMY
    assert page.locator("#run-priority-value").text_content() == "economy"
    page.reload()
    assert page.locator("#run-priority-value").text_content() == "economy"


def test_estimate_warns_over_price_cap(runner, asgi_server, page, alice, alice_client):
    workflow = Workflow.create_with_version(alice, "Heights", image_height())
    assert run_workflow(alice_client, workflow.id).status_code == 200
    response = alice_client.post(
        f"/api/workflows/{workflow.id}/estimate", {}, format="json"
    )
    price = response.json()["price"]["amount_microcredits"]
    assert price > 5

    sign_in(page, asgi_server, "alice", "alice-password")
    estimate = read_estimate(page, asgi_server, workflow.id)
    assert estimate["price"][0].startswith(f"Price: {price} µcr")
    assert "over-cap" not in estimate

    # Typed without leaving the field, so no change event fires.
    page.locator("#max-price").press_sequentially("5")
    page.wait_for_function(
        "document.getElementById('estimate').textContent.includes('price cap')"
    )
    assert estimate_parts(page)["over-cap"] == [
        "Over the price cap of 5 µcr, so the run would be rejected: "
        f"raise the cap to at least {price} µcr, or clear it."
    ]

    # Run anyway: the rejection is worded as the form is, and stores nothing.
    runs_before = Run.objects.count()
    page.click("#run-button")
    error = page.locator("#run-form-error")
    page.wait_for_function(
        "document.getElementById('run-form-error').textContent !== ''"
    )
    assert error.text_content() == (
        f"Not started: the predicted price, {price} µcr (starting hot), is over "
        f"the price cap of 5 µcr. Raise the cap to at least {price} µcr, or clear it."
    )
    assert Run.objects.count() == runs_before
    assert page.locator("#run-button").is_enabled()

    # The rejection was about the old cap, so editing the cap clears it.
    page.fill("#max-price", str(price))
    assert error.text_content() == ""
    page.wait_for_function(
        "!document.getElementById('estimate').textContent.includes('price cap')"
    )
    page.fill("#max-price", "5")
    page.wait_for_function(
        "document.getElementById('estimate').textContent.includes('price cap')"
    )
    page.fill("#max-price", "")
    page.wait_for_function(
        "!document.getElementById('estimate').textContent.includes('price cap')"
    )


def test_estimate_shows_price_while_runners_busy(
    runner, asgi_server, page, alice, alice_client
):
    # Every runner busy makes the queue time, and so the latency, unknown,
    # but the price covers only the runner's time, which is still known.
    workflow = Workflow.create_with_version(alice, "Heights", image_height())
    assert run_workflow(alice_client, workflow.id).status_code == 200
    sign_in(page, asgi_server, "alice", "alice-password")

    with marked_busy(runner.name):
        body = alice_client.post(
            f"/api/workflows/{workflow.id}/estimate", {}, format="json"
        ).json()
        price = body["price"]["amount_microcredits"]
        estimate = read_estimate(page, asgi_server, workflow.id)
        page.locator("#max-price").press_sequentially("1")
        page.wait_for_function(
            "document.getElementById('estimate').textContent.includes('price cap')"
        )
        over_cap = estimate_parts(page)["over-cap"]

    assert body["total"] is None
    assert estimate["latency"] == ["Latency: unknown"]
    assert estimate["price"][0].startswith(f"Price: {price} µcr")
    assert estimate["basis"][0].startswith("Based on medians of 1 earlier run")
    assert estimate["unknown"][0] == "Unknown because:"
    assert "every runner is busy with a run" in estimate["unknown"][1]
    assert over_cap[0].startswith("Over the price cap of 1 µcr")


def test_estimate_shows_notes(runner, page, alice, alice_client):
    # A web server with a limit of 1 ms predicts that the runner would stop
    # the run, and the estimate carries a note about it.
    workflow = Workflow.create_with_version(alice, "Limit", detection())
    assert run_workflow(alice_client, workflow.id).status_code == 200

    with daphne_server({"RUN_TIME_LIMIT_S": "0.001"}) as url:
        sign_in(page, url, "alice", "alice-password")
        estimate = read_estimate(page, url, workflow.id)

    assert estimate["notes"][0] == "Notes:"
    assert "over RUN_TIME_LIMIT_S (0.001 s)" in estimate["notes"][1]


def test_run_page_checks_price_cap(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Capped", image_height())
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    posted = record_posts(page)
    cap = page.locator("#max-price")
    error = page.locator("#run-form-error")

    for text in ("abc", "0", "2.5", "-3", "1000000000000001"):
        cap.fill(text)
        page.click("#run-button")
        page.wait_for_function(
            "document.getElementById('run-form-error').textContent !== ''"
        )
        message = error.text_content()
        # The form's own words: the field's label and the value typed, not
        # the API's request field or JSON.
        assert message.startswith(f"Price cap: “{text}” is not"), message
        assert "1 to 1,000,000,000,000,000" in message
        assert "max_price_microcredits" not in message
        assert "JSON" not in message
        assert cap.get_attribute("aria-invalid") == "true"
        assert error.get_attribute("role") == "alert"
        assert not [url for url in posted if url.endswith("/runs")]

    # Editing the field clears the mark and the message.
    cap.fill("")
    assert cap.get_attribute("aria-invalid") is None
    assert error.text_content() == ""
    assert Run.objects.count() == 0


def test_run_form_fits_phone(transactional_db, asgi_server, browser, alice):
    workflow = Workflow.create_with_version(alice, "Height", image_height())
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
    page.wait_for_selector("#estimate li")
    page.screenshot(path=str(ARTIFACTS / "run-form-phone.png"), full_page=True)

    for control_id in ("max-price", "run-priority"):
        control = page.locator(f"#{control_id}")
        help_id = control.get_attribute("aria-describedby")
        assert help_id, control_id
        help_box = page.locator(f"#{help_id}").bounding_box()
        control_box = control.bounding_box()
        # The help sits under its control, not beside it.
        assert help_box["y"] >= control_box["y"] + control_box["height"], control_id
    # The priority's chosen option fits its select, arrow aside, uncut.
    selected = page.evaluate(
        """() => {
            const select = document.getElementById('run-priority');
            const probe = document.createElement('span');
            probe.style.font = getComputedStyle(select).font;
            probe.textContent = select.selectedOptions[0].textContent;
            document.body.append(probe);
            const width = probe.getBoundingClientRect().width;
            probe.remove();
            return {text: width, select: select.clientWidth};
        }"""
    )
    assert selected["text"] < selected["select"] - 24, selected
    context.close()


def test_run_page_marks_untrained_rows(runner, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "Untrained rows", detection("yolov8n.yaml")
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    run_once(page, asgi_server, workflow.id)

    # Every row that names the model carries the untrained badge that the
    # billing pages use, and the rows of other phases do not.
    rows = page.locator("#timeline li")
    named = rows.filter(has_text="yolov8n.yaml")
    assert named.count() >= 4, rows.all_text_contents()
    for index in range(named.count()):
        row = named.nth(index)
        assert row.locator(".badge.untrained").count() == 1, row.text_content()
    for phase in ("request", "queue", "compile", "overhead"):
        row = page.locator(f"#timeline li[data-phase='{phase}']")
        assert row.locator(".badge.untrained").count() == 0, phase
    model = page.locator("#timeline li[data-model='yolov8n.yaml']")
    badge = model.locator(".badge.untrained")
    assert badge.text_content() == "untrained"
    assert "random weights" in badge.get_attribute("title")
