"""The models page in a real browser: list, upload and delete through the API."""

import hashlib
import re
from pathlib import Path

from django.conf import settings
from playwright.sync_api import expect

from runner.models import ModelUpload, Run
from runner.registry import resolve_model
from tests.definitions import detection
from tests.test_browser_run import sign_in
from tests.test_model_upload import damaged_checkpoint, make_weights, upload
from webapp.clock import clock
from workflows.models import Workflow


def open_models_page(page, base_url: str) -> None:
    page.goto(f"{base_url}/models/")
    page.wait_for_selector("#models[data-ready='true']")


def upload_row(page, model_id: str):
    return page.locator(f"#uploads tbody tr[data-model-id='{model_id}']")


def stored_files(user) -> set[Path]:
    directory = Path(settings.GLASSBOX["UPLOAD_DIR"]) / str(user.id)
    return set(directory.glob("*")) if directory.exists() else set()


def fill_upload_form(page, model_id: str, path: Path | None) -> None:
    page.fill("#upload-model-id", model_id)
    page.set_input_files("#upload-file", [str(path)] if path else [])


def test_models_page_lists_upload(
    transactional_db, asgi_server, page, alice, alice_client
):
    trained = Path(resolve_model("people-detector").local_path())
    response = upload(alice_client, "my-people", trained)
    assert response.status_code == 201, response.json()
    record = ModelUpload.objects.get(owner=alice, model_id="my-people")

    sign_in(page, asgi_server, "alice", "alice-password")
    page.get_by_role("link", name="Models", exact=True).click()
    page.wait_for_selector("#models[data-ready='true']")
    assert page.url == f"{asgi_server}/models/"

    row = upload_row(page, "my-people")
    assert row.count() == 1
    assert row.locator(".model-id").text_content() == "my-people"
    assert row.locator(".task").text_content() == "detect"
    assert row.locator(".class-names").text_content() == "Normal, Fall"
    assert record.class_names == ["Normal", "Fall"]
    assert row.locator(".sha256").text_content() == record.sha256
    assert row.locator(".weights").text_content() == "pretrained"
    assert f"{record.size_bytes:,} bytes" == row.locator(".size").get_attribute("title")

    model_dir = page.locator("#model-dir li[data-model-id='people-detector']")
    assert model_dir.locator(".badge").text_content() == "pretrained"
    architectures = page.locator("#architectures").text_content()
    assert "yolov8n.yaml" in architectures
    assert "untrained" in architectures
    assert "random weights, for timing only" in architectures


def test_upload_time_is_utc(transactional_db, asgi_server, browser, alice, tmp_path):
    # Every page shows times in UTC, whatever the browser's time zone.
    weights = make_weights(tmp_path / "zoned.pt")
    context = browser.new_context(timezone_id="Pacific/Auckland")
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    fill_upload_form(page, "zoned", weights)
    page.click("#upload-button")
    row = upload_row(page, "zoned")
    row.wait_for()
    created = ModelUpload.objects.get(owner=alice, model_id="zoned").created_at
    assert created.utcoffset().total_seconds() == 0
    expected = created.strftime("%Y-%m-%d %H:%M")
    assert row.locator(".created").text_content() == expected
    assert page.locator("#uploads th", has_text="Uploaded").text_content() == (
        "Uploaded (UTC)"
    )
    context.close()


def test_form_upload_adds_row(transactional_db, asgi_server, page, alice, tmp_path):
    weights = make_weights(tmp_path / "mine.pt")
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    assert page.locator("#uploads tbody tr.empty").text_content() == "No uploads yet."

    fill_upload_form(page, "my-detector", weights)
    page.click("#upload-button")
    # The server checks the file in a child process that imports torch, so
    # the response comes well after these checks.
    expect(page.locator("#upload-progress")).to_be_visible()
    expect(page.locator("#upload-button")).to_be_disabled()
    assert "checking the weights" in page.locator("#upload-status").text_content()

    row = upload_row(page, "my-detector")
    row.wait_for(timeout=60_000)
    record = ModelUpload.objects.get(owner=alice, model_id="my-detector")
    assert record.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert row.locator(".sha256").text_content() == record.sha256
    assert row.locator(".task").text_content() == "detect"
    # Saved from an architecture: the API reports it as not pretrained.
    assert record.trained is False
    assert row.locator(".weights").text_content() == "untrained"
    # An architecture's classes are numbered: "0" to "79".
    assert len(record.class_names) == 80
    assert row.locator(".class-names summary").text_content() == "80 classes"
    row.locator(".class-names summary").click()
    assert row.locator(".class-names p").text_content() == ", ".join(record.class_names)
    assert page.locator("#upload-status").text_content() == (
        "Uploaded “my-detector”: detect, 80 classes, untrained."
    )
    assert page.locator("#upload-progress").is_hidden()
    assert page.locator("#upload-button").is_enabled()
    assert page.locator("#upload-model-id").input_value() == ""
    assert page.locator("#upload-error").is_hidden()
    assert page.locator("#uploads tbody tr.empty").count() == 0


def test_failed_upload_redraws_list(
    transactional_db, asgi_server, page, alice, alice_client, tmp_path
):
    # Another tab or client took the id after this page loaded: the error
    # comes with the list as it is now.
    weights = make_weights(tmp_path / "mine.pt")
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    assert upload(alice_client, "taken", weights).status_code == 201
    assert upload_row(page, "taken").count() == 0

    fill_upload_form(page, "taken", weights)
    page.click("#upload-button")
    expect(page.locator("#upload-error .error-message")).to_have_text(
        "you already have a model 'taken'", timeout=60_000
    )
    upload_row(page, "taken").wait_for()


def test_rejected_upload_shows_api_error(
    transactional_db, asgi_server, page, alice, alice_client, tmp_path
):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    damaged = damaged_checkpoint(tmp_path / "damaged.pt")
    weights = make_weights(tmp_path / "mine.pt")
    cases = [
        ("junk", junk, "file"),
        ("damaged", damaged, "file"),
        ("yolov8n.yaml", weights, "model_id"),
    ]
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    error = page.locator("#upload-error")

    for model_id, path, field in cases:
        # The same request sent with a token: the page must show its body.
        data = {"model_id": model_id} if model_id else {}
        if path:
            data["file"] = path.open("rb")
        expected = alice_client.post("/api/models/", data)
        if path:
            data["file"].close()
        assert expected.status_code == 400, model_id
        assert expected.json()["field"] == field, model_id

        fill_upload_form(page, model_id, path)
        page.click("#upload-button")
        error.wait_for(state="visible", timeout=60_000)
        message = error.locator(".error-message").text_content()
        assert message == expected.json()["message"], model_id
        hint = error.locator(".error-hint")
        if "hint" in expected.json():
            assert hint.is_visible(), model_id
            assert hint.text_content() == expected.json()["hint"], model_id
        else:
            assert hint.is_hidden(), model_id
        invalid = "#upload-file" if field == "file" else "#upload-model-id"
        assert page.get_attribute(invalid, "aria-invalid") == "true", model_id
        assert page.evaluate("document.activeElement.id") == invalid[1:], model_id
        # The typed id stays for the user to fix.
        assert page.locator("#upload-model-id").input_value() == model_id
        assert page.locator("#upload-button").is_enabled()
        assert page.locator("#upload-progress").is_hidden()

    assert ModelUpload.objects.count() == 0
    assert stored_files(alice) == set()
    assert page.locator("#uploads tbody tr[data-model-id]").count() == 0


def test_taken_id_names_model_directory(
    transactional_db, asgi_server, page, alice, tmp_path
):
    weights = make_weights(tmp_path / "mine.pt")
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    fill_upload_form(page, "people-detector", weights)
    page.click("#upload-button")
    error = page.locator("#upload-error")
    error.wait_for(state="visible", timeout=60_000)
    message = error.locator(".error-message").text_content()
    assert message == (
        "model_id 'people-detector' already names a file in the server's model "
        "directory (MODEL_DIR), which your upload would hide from your workflows"
    )
    assert ModelUpload.objects.count() == 0


def test_empty_upload_field_sends_nothing(
    transactional_db, asgi_server, page, alice, tmp_path
):
    weights = make_weights(tmp_path / "mine.pt")
    cases = [
        ("", weights, "#upload-model-id", "Model id is missing."),
        ("   ", weights, "#upload-model-id", "Model id is missing."),
        ("", None, "#upload-model-id", "Model id is missing."),
        ("no-file", None, "#upload-file", "Weights file is missing."),
    ]
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    error = page.locator("#upload-error")
    posts = []
    page.on(
        "request",
        lambda request: posts.append(request.url) if request.method == "POST" else None,
    )

    for model_id, path, invalid, message in cases:
        fill_upload_form(page, model_id, path)
        page.click("#upload-button")
        error.wait_for(state="visible")
        assert error.locator(".error-message").text_content() == message, model_id
        assert error.locator(".error-hint").is_visible(), model_id
        assert page.get_attribute(invalid, "aria-invalid") == "true", model_id
        assert page.evaluate("document.activeElement.id") == invalid[1:], model_id
        assert page.locator("#upload-status").text_content() == "", model_id
        assert page.locator("#upload-button").is_enabled(), model_id

    # The form sent no request, so no file went over the wire for nothing.
    assert posts == []
    assert ModelUpload.objects.count() == 0

    # Filling the missing field uploads as usual and clears the error.
    fill_upload_form(page, "mine", weights)
    page.click("#upload-button")
    upload_row(page, "mine").wait_for(timeout=60_000)
    assert error.is_hidden()
    assert page.get_attribute("#upload-file", "aria-invalid") == "false"


def test_delete_asks_then_removes_upload(
    transactional_db, asgi_server, page, alice, alice_client, tmp_path
):
    weights = make_weights(tmp_path / "mine.pt")
    assert upload(alice_client, "mine", weights).status_code == 201
    stored = Path(ModelUpload.objects.get(owner=alice, model_id="mine").path)
    assert stored.exists()
    dialogs = record_dialogs(page)
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    row = upload_row(page, "mine")
    delete_mine = page.get_by_role("button", name="Delete upload mine…")
    confirm = page.locator("#delete-confirm")
    assert confirm.is_hidden()

    delete_mine.click()
    assert confirm.is_visible()
    assert confirm.get_attribute("role") == "alertdialog"
    assert page.locator("#delete-question").text_content() == (
        "Delete the upload “mine” and its file? Finished runs keep their record of it."
    )
    assert page.evaluate("document.activeElement.id") == "delete-confirm"
    assert ModelUpload.objects.filter(owner=alice, model_id="mine").exists()
    page.click("#delete-cancel")
    assert confirm.is_hidden()
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == (
        "Delete upload mine…"
    )
    assert row.count() == 1
    assert ModelUpload.objects.filter(owner=alice, model_id="mine").exists()

    # Escape closes the question too.
    page.keyboard.press("Enter")
    assert confirm.is_visible()
    page.keyboard.press("Escape")
    assert confirm.is_hidden()
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == (
        "Delete upload mine…"
    )
    assert ModelUpload.objects.filter(owner=alice, model_id="mine").exists()

    # The same steps with the keyboard, and this time confirmed.
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "delete-confirm-button"
    assert page.locator("#delete-confirm-button").text_content() == "Delete “mine”"
    page.keyboard.press("Enter")
    row.wait_for(state="detached")
    assert confirm.is_hidden()
    assert page.locator("#uploads-status").text_content() == "Deleted “mine”."
    assert page.locator("#uploads tbody tr.empty").text_content() == "No uploads yet."
    assert not ModelUpload.objects.filter(owner=alice).exists()
    assert not stored.exists()
    assert dialogs == []

    page.reload()
    page.wait_for_selector("#models[data-ready='true']")
    assert row.count() == 0


def test_delete_question_names_workflows(
    transactional_db, asgi_server, page, alice, bob, alice_client, tmp_path
):
    weights = make_weights(tmp_path / "mine.pt")
    assert upload(alice_client, "mine", weights).status_code == 201
    Workflow.create_with_version(alice, "Count people", detection("mine"))
    Workflow.create_with_version(alice, "Count people", detection("mine-640"))
    Workflow.create_with_version(alice, "Other model", detection("people-detector"))
    Workflow.create_with_version(bob, "Bob's count", detection("mine"))
    changed = Workflow.create_with_version(alice, "Changed", detection("mine"))
    changed.add_version(detection("people-detector"))
    gone = Workflow.create_with_version(alice, "Deleted", detection("mine"))
    gone.mark_deleted()

    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    page.get_by_role("button", name="Delete upload mine…").click()
    assert page.locator("#delete-question").text_content() == (
        "Delete the upload “mine” and its file? Finished runs keep their record "
        "of it. 2 workflows name it, and their runs will fail with "
        "model_not_found until you upload weights under this id again: "
        "“Count people” (count-people), “Count people” (count-people-2)."
    )


def record_dialogs(page) -> list[str]:
    """Dismiss and record every JavaScript dialog the page opens."""
    messages = []

    def dismiss(dialog):
        messages.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    return messages


def confirm_delete(page, model_id: str) -> None:
    page.get_by_role("button", name=f"Delete upload {model_id}…").click()
    page.click("#delete-confirm-button")


def test_page_stops_after_sign_in_elsewhere(
    transactional_db, asgi_server, page, alice, alice_client, bob_client, tmp_path
):
    # Both users have an upload "shared". After bob signs in in another tab,
    # alice's open page must not delete bob's upload of that id.
    weights = make_weights(tmp_path / "shared.pt")
    assert upload(alice_client, "shared", weights).status_code == 201
    assert upload(bob_client, "shared", weights).status_code == 201
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)

    other_tab = page.context.new_page()
    other_tab.goto(f"{asgi_server}/models/")
    other_tab.get_by_role("button", name="Sign out").click()
    other_tab.wait_for_url(re.compile(r".*/accounts/logout/$"))
    sign_in(other_tab, asgi_server, "bob", "bob-password")
    other_tab.close()

    confirm_delete(page, "shared")
    error = page.locator("#delete-error")
    expect(error).to_be_visible()
    expect(error.locator(".error-hint")).to_contain_text("Reload the page")
    assert ModelUpload.objects.filter(model_id="shared").count() == 2


def test_delete_of_upload_in_use_shows_409(
    transactional_db, asgi_server, page, alice, alice_client, tmp_path
):
    weights = make_weights(tmp_path / "busy.pt")
    assert upload(alice_client, "busy", weights).status_code == 201
    # A run waiting for a runner, queued just now so that no runner's check
    # for lost runs queues it again during the test.
    waiting = Run.objects.create(
        owner=alice,
        source="api",
        status=Run.Status.QUEUED,
        queued_at_ns=clock.now_ns(),
        model_refs=[
            {
                "model_id": "busy",
                "cache_key": "x",
                "source": resolve_model("busy", alice.id).to_dict(),
            }
        ],
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)

    confirm_delete(page, "busy")
    error = page.locator("#delete-error")
    error.wait_for(state="visible")
    assert error.locator(".error-message").text_content() == (
        f"model 'busy' is used by 1 run(s) that have not finished: {waiting.pk}"
    )
    assert error.locator(".error-hint").is_visible()
    assert error.locator(".error-hint").text_content() == (
        "Delete it once those runs have finished."
    )
    assert upload_row(page, "busy").count() == 1
    assert page.get_by_role("button", name="Delete upload busy…").is_enabled()
    assert ModelUpload.objects.filter(owner=alice, model_id="busy").exists()


def test_other_user_sees_no_upload(
    transactional_db, asgi_server, page, alice, bob, alice_client, tmp_path
):
    weights = make_weights(tmp_path / "private.pt")
    assert upload(alice_client, "alice-private", weights).status_code == 201

    sign_in(page, asgi_server, "bob", "bob-password")
    open_models_page(page, asgi_server)
    assert page.locator("#uploads tbody tr.empty").text_content() == "No uploads yet."
    assert page.locator("#uploads tbody tr[data-model-id]").count() == 0
    assert "alice-private" not in page.content()
    assert page.locator("#model-dir li[data-model-id='people-detector']").count() == 1


def test_models_page_requires_login(transactional_db, asgi_server, page):
    page.goto(f"{asgi_server}/models/")
    page.wait_for_url(re.compile(r".*/accounts/login/\?next=/models/$"))
    assert page.locator("#upload-form").count() == 0


def test_models_page_fits_narrow_screen(
    transactional_db, asgi_server, browser, alice, alice_client
):
    trained = Path(resolve_model("people-detector").local_path())
    assert upload(alice_client, "my-people", trained).status_code == 201
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    open_models_page(page, asgi_server)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    form = page.locator("#upload-form").bounding_box()
    for field in ("#upload-model-id", "#upload-file", "#upload-button"):
        box = page.locator(field).bounding_box()
        assert box["x"] + box["width"] <= form["x"] + form["width"], (field, box, form)
    delete = page.get_by_role("button", name="Delete upload my-people…")
    box = delete.bounding_box()
    assert box["x"] + box["width"] <= 390, box
    size = upload_row(page, "my-people").locator(".size")
    label = size.evaluate("el => getComputedStyle(el, '::before').content")
    assert label == '"Size: "', label
    assert size.evaluate("el => getComputedStyle(el).textAlign") == "left"
    context.close()
