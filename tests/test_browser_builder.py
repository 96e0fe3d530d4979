"""The workflow builder in a real browser: node placement and saving."""

import json

from tests.conftest import ARTIFACTS
from tests.definitions import (
    compare,
    detect_then_crops,
    detection,
    detection_property,
    filtered_detection,
    group,
    keep_where,
    parameter,
    static,
)
from tests.test_browser_run import sign_in
from workflows.models import Workflow

DETECTION = "roboflow_core/roboflow_object_detection_model@v1"
# Space to keep between nodes, in screen pixels at the builder's 100% zoom,
# so that a line between neighbours is drawn outside both.
MIN_GAP_PX = 20


def node_boxes(page) -> list[dict]:
    return page.evaluate(
        """() => [...document.querySelectorAll('#drawflow .drawflow-node')].map((n) => {
            const r = n.getBoundingClientRect();
            return {name: n.textContent.trim().slice(0, 40),
                    left: r.left, top: r.top, right: r.right, bottom: r.bottom};
        })"""
    )


def canvas_box(page) -> dict:
    return page.evaluate(
        """() => {
            const r = document.getElementById('drawflow').getBoundingClientRect();
            return {left: r.left, top: r.top, right: r.right, bottom: r.bottom};
        }"""
    )


def assert_placed_apart(page) -> None:
    boxes = node_boxes(page)
    canvas = canvas_box(page)
    for box in boxes:
        assert box["left"] >= canvas["left"], box
        assert box["top"] >= canvas["top"], box
        assert box["right"] <= canvas["right"], (box, canvas)
        assert box["bottom"] <= canvas["bottom"], (box, canvas)
    for index, box in enumerate(boxes):
        for other in boxes[index + 1 :]:
            apart = (
                box["right"] + MIN_GAP_PX <= other["left"]
                or other["right"] + MIN_GAP_PX <= box["left"]
                or box["bottom"] + MIN_GAP_PX <= other["top"]
                or other["bottom"] + MIN_GAP_PX <= box["top"]
            )
            assert apart, (box, other)


def test_builder_places_clicked_nodes_apart(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/new")
    page.wait_for_selector("#builder[data-ready='true']")

    page.click(f"[data-block-type='{DETECTION}']")
    assert_placed_apart(page)
    image = page.locator("[data-input-name='image']").bounding_box()
    step = page.locator(".drawflow-node[data-step-name]").bounding_box()
    # The step sits right of the image input, so the line between them shows.
    assert step["x"] >= image["x"] + image["width"] + MIN_GAP_PX

    # The detection node is selected, and the node right of it would leave
    # the canvas.
    page.click("[data-block-type='JsonField']")
    assert_placed_apart(page)
    page.click(f"[data-block-type='{DETECTION}']")
    page.click("[data-block-type='WorkflowParameter']")
    assert_placed_apart(page)
    assert page.locator("#drawflow .drawflow-node").count() == 5
    page.screenshot(path=str(ARTIFACTS / "builder-placement.png"))


def box_of(page, selector: str) -> dict:
    box = page.locator(selector).bounding_box()
    return {"left": box["x"], "right": box["x"] + box["width"]}


def newest_output(page) -> dict:
    return box_of(page, "#drawflow .drawflow-node.node-output >> nth=-1")


def test_builder_places_outputs_right(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/new")
    page.wait_for_selector("#builder[data-ready='true']")

    # Added with the model step selected, the output reads from it.
    page.click(f"[data-block-type='{DETECTION}']")
    page.click("[data-block-type='JsonField']")
    # Measured after the output is added, which may zoom out to show it.
    step = box_of(page, ".drawflow-node[data-step-name]")
    assert newest_output(page)["left"] >= step["right"] + MIN_GAP_PX
    assert_placed_apart(page)

    # With nothing selected, it goes right of the rightmost step.
    page.click("#drawflow", position={"x": 5, "y": 5})
    page.wait_for_selector("#drawflow .drawflow-node.selected", state="detached")
    page.click("[data-block-type='JsonField']")
    step = box_of(page, ".drawflow-node[data-step-name]")
    assert newest_output(page)["left"] >= step["right"] + MIN_GAP_PX
    assert_placed_apart(page)

    # Added with an output selected, it goes into that output's column.
    page.click(".drawflow-node.node-output >> nth=0")
    page.click("[data-block-type='JsonField']")
    step = box_of(page, ".drawflow-node[data-step-name]")
    selected = box_of(page, ".drawflow-node.node-output >> nth=0")
    assert newest_output(page)["left"] == selected["left"]
    assert newest_output(page)["left"] >= step["right"] + MIN_GAP_PX
    assert_placed_apart(page)
    assert page.locator(".drawflow-node.node-output").count() == 3


def open_builder(page, asgi_server, workflow) -> None:
    page.goto(f"{asgi_server}/workflows/{workflow.id}/edit")
    page.wait_for_selector("#builder[data-ready='true']")


def set_confidence(page, value: float) -> None:
    page.evaluate(
        "(value) => window.glassboxBuilder.setField('people', 'confidence', value)",
        value,
    )


def test_builder_save_sends_base_version(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Saved twice", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)

    for base_version, confidence in ((1, 0.5), (2, 0.6)):
        set_confidence(page, confidence)
        with page.expect_request(f"**/api/workflows/{workflow.id}") as request:
            page.click("#save")
        assert request.value.post_data_json["base_version"] == base_version
        # Each save so far created a version and moved the revision with it.
        assert request.value.post_data_json["base_revision"] == base_version
        page.wait_for_selector(f"#saved-version[data-version='{base_version + 1}']")
    assert workflow.latest_version().number == 3


def test_builder_stale_save_keeps_edits(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Edited twice", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)

    # Another tab or client saves version 2 meanwhile.
    elsewhere = detection(confidence=0.7)
    workflow.add_version(elsewhere)
    set_confidence(page, 0.55)
    with page.expect_response(f"**/api/workflows/{workflow.id}") as response:
        page.click("#save")
    assert response.value.status == 409
    assert response.value.json()["code"] == "version_conflict"

    message = page.locator("#save-message")
    page.wait_for_function(
        "document.getElementById('save-message').textContent.includes('now version')"
    )
    assert message.is_visible()
    assert message.get_attribute("data-kind") == "error"
    assert message.text_content() == (
        "Not saved: this workflow changed since this tab loaded or saved version 1 "
        "(now version 2). Reload to see it; your edits are kept in this tab until "
        "you do."
    )
    edited = page.evaluate("window.glassboxBuilder.getDefinition()")
    assert edited["steps"][0]["confidence"] == 0.55
    assert page.locator("#saved-version").get_attribute("data-version") == "1"

    latest = workflow.latest_version()
    assert latest.number == 2
    assert latest.definition == elsewhere


def test_builder_save_after_a_rename_elsewhere_is_refused(
    transactional_db, asgi_server, page, alice
):
    workflow = Workflow.create_with_version(alice, "Old name", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)

    # Another tab renames the workflow, which creates no version.
    Workflow.objects.filter(pk=workflow.pk).update(name="New name", revision=2)
    set_confidence(page, 0.55)
    with page.expect_response(f"**/api/workflows/{workflow.id}") as response:
        page.click("#save")
    assert response.value.status == 409
    assert response.value.json()["field"] == "base_revision"
    page.wait_for_function(
        "document.getElementById('save-message').textContent.includes('same version')"
    )
    assert (
        page.locator("#save-message")
        .text_content()
        .startswith(
            "Not saved: this workflow changed since this tab loaded or saved version 1 "
            "(same version; its name or description changed)."
        )
    )
    workflow.refresh_from_db()
    assert workflow.name == "New name"
    assert workflow.latest_version().number == 1


def test_builder_save_after_delete_keeps_edits(
    transactional_db, asgi_server, page, alice
):
    workflow = Workflow.create_with_version(alice, "Deleted meanwhile", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)

    # Another tab deletes the workflow while this one edits it.
    assert workflow.mark_deleted()
    set_confidence(page, 0.65)
    with page.expect_response(f"**/api/workflows/{workflow.id}") as response:
        page.click("#save")
    assert response.value.status == 404
    message = page.locator("#save-message")
    page.wait_for_function(
        "document.getElementById('save-message').textContent.includes('was deleted')"
    )
    assert message.text_content() == (
        "Not saved: workflow “Deleted meanwhile” was deleted after this tab opened "
        "it. Save again to keep these edits as a new workflow."
    )
    assert page.locator("#saved-version").text_content() == "Not saved"
    assert page.locator("#run-link").is_hidden()

    with page.expect_response("**/api/workflows/") as response:
        page.click("#save")
    assert response.value.status == 201
    created = Workflow.objects.get(pk=response.value.json()["id"])
    assert created.pk != workflow.pk
    assert created.name == "Deleted meanwhile"
    assert created.latest_version().definition["steps"][0]["confidence"] == 0.65
    page.wait_for_url(f"**/workflows/{created.pk}/edit")
    assert page.locator("#saved-version").get_attribute("data-version") == "1"


def test_builder_ctrl_s_twice_saves_once(transactional_db, asgi_server, page, alice):
    # Ctrl+S bypasses the Save button that is disabled during a save.
    workflow = Workflow.create_with_version(alice, "Keyboard", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    set_confidence(page, 0.45)
    puts = []
    page.on(
        "request",
        lambda request: puts.append(request) if request.method == "PUT" else None,
    )
    # Two presses in one task, so the second always comes while the first
    # save is on its way.
    page.evaluate(
        """() => {
            for (let press = 0; press < 2; press++) {
                document.dispatchEvent(
                    new KeyboardEvent("keydown", {key: "s", ctrlKey: true}));
            }
        }"""
    )
    page.wait_for_selector("#saved-version[data-version='2']")
    # A later request, sent after the first save got its response. A second
    # save, sent with the first or as it ended, would be seen before it.
    page.evaluate("window.glassboxBuilder.validate()")
    assert len(puts) == 1
    assert page.locator("#save-message").get_attribute("data-kind") != "error"
    assert workflow.latest_version().number == 2


def double_click_after_response(page, url: str) -> list:
    """Double-click Save, the first save getting its response before the second click.

    Return the save requests sent. A person's double-click is that slow
    when the server rejects the first save quickly.
    """
    saves = []
    page.on(
        "request",
        lambda request: saves.append(request) if request.url == url else None,
    )
    box = page.locator("#save").bounding_box()
    x = box["x"] + box["width"] / 2
    y = box["y"] + box["height"] / 2
    with page.expect_response(url):
        page.mouse.click(x, y)
    page.wait_for_selector("#save:enabled")
    page.wait_for_function(
        "document.getElementById('save-message').dataset.kind !== 'pending'"
    )
    # The second click of the double-click, as the browser counts it.
    page.mouse.down(click_count=2)
    page.mouse.up(click_count=2)
    # A later request, whose response arrives after any save the click sent.
    page.evaluate("window.glassboxBuilder.validate()")
    return saves


def test_builder_double_click_saves_invalid_once(
    transactional_db, asgi_server, page, alice
):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/new")
    page.wait_for_selector("#builder[data-ready='true']")
    # A model step without its image: the server rejects the draft.
    page.click(f"[data-block-type='{DETECTION}']")
    page.fill("#workflow-name", "Invalid draft")

    saves = double_click_after_response(page, f"{asgi_server}/api/workflows/")
    assert len(saves) == 1
    assert page.locator("#save-message").text_content() == (
        "Not saved: the definition has problems, listed under Problems."
    )
    assert page.locator("#save").is_enabled()
    assert not Workflow.objects.exists()


def test_builder_double_click_saves_valid_once(
    transactional_db, asgi_server, page, alice
):
    workflow = Workflow.create_with_version(alice, "Double-clicked", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    set_confidence(page, 0.45)

    url = f"{asgi_server}/api/workflows/{workflow.id}"
    saves = double_click_after_response(page, url)
    assert len(saves) == 1
    assert page.locator("#saved-version").text_content() == "Saved as version 2"
    assert page.locator("#save").is_enabled()
    assert workflow.latest_version().number == 2


def test_builder_problems_follow_unreadable_json(
    transactional_db, asgi_server, page, alice
):
    definition = detection()
    definition["outputs"] = []
    workflow = Workflow.create_with_version(alice, "No outputs", definition)
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    page.wait_for_function(
        "document.getElementById('problems').textContent.includes('no outputs')"
    )
    page.click("#tab-json")
    page.fill("#definition-json", '{"version": "1.0", ')
    page.click("#tab-graph")
    problems = page.locator("#problems").text_content()
    assert "Invalid JSON" in problems
    assert "no outputs" not in problems


def focused_node(page) -> str | None:
    """Return the step, input or output name of the focused node, else None."""
    return page.evaluate(
        """() => {
            const node = document.activeElement.closest('.drawflow-node');
            if (!node) return null;
            const d = node.dataset;
            return d.stepName ?? d.inputName ?? d.outputName;
        }"""
    )


def step_names(page) -> list[str]:
    definition = page.evaluate("window.glassboxBuilder.getDefinition()")
    return [step["name"] for step in definition["steps"]]


def test_builder_nodes_by_keyboard(transactional_db, asgi_server, page, alice):
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    workflow = Workflow.create_with_version(alice, "Keys", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)

    # Tab from the canvas reaches the nodes in the definition's order.
    page.focus("#drawflow")
    page.keyboard.press("Tab")
    assert focused_node(page) == "image"
    page.keyboard.press("Tab")
    assert focused_node(page) == "people"
    page.keyboard.press("Enter")
    assert page.input_value("#node-panel [data-field='name']") == "people"
    people = page.locator("[data-step-name='people']")
    assert "selected" in people.get_attribute("class")

    # An arrow key moves the focused node by 20 canvas pixels.
    left = float(people.evaluate("node => parseFloat(node.style.left)"))
    page.keyboard.press("ArrowRight")
    moved = float(people.evaluate("node => parseFloat(node.style.left)"))
    assert moved == left + 20

    page.keyboard.press("Tab")
    assert focused_node(page) == "count"
    page.keyboard.press(" ")
    assert page.input_value("#node-panel [data-field='name']") == "count"

    # Delete removes the focused node and leaves the focus on the canvas.
    page.keyboard.press("Delete")
    assert step_names(page) == ["people"]
    assert page.locator("[data-step-name='count']").count() == 0
    assert page.evaluate("document.activeElement.id") == "drawflow"
    assert errors == []


def test_builder_panel_shows_new_name(transactional_db, asgi_server, page, alice):
    # The side panel of an input or output names it in its subtitle, which
    # must follow a rename made in the panel itself.
    workflow = Workflow.create_with_version(alice, "Renamed", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    subtitle = page.locator("#node-panel .panel-subtitle")
    name = page.locator("#node-panel [data-field='name']")

    page.locator("[data-input-name='image']").click()
    assert subtitle.text_content() == "$inputs.image"
    name.fill("picture")
    name.press("Enter")
    assert subtitle.text_content() == "$inputs.picture"

    output = page.locator(".drawflow-node.node-output").first
    old_name = output.get_attribute("data-output-name")
    output.click()
    assert subtitle.text_content() == f'returned as "{old_name}"'
    name.fill("people_total")
    # Tab applies the name and moves on to the next field, which keeps the focus.
    name.press("Tab")
    assert subtitle.text_content() == 'returned as "people_total"'
    assert page.evaluate("document.activeElement.dataset.field") == "selector"
    definition = page.evaluate("window.glassboxBuilder.getDefinition()")
    assert definition["inputs"][0]["name"] == "picture"
    assert definition["steps"][0]["images"] == "$inputs.picture"
    assert "people_total" in [output["name"] for output in definition["outputs"]]


def test_builder_rename_updates_filter_parameters(
    transactional_db, asgi_server, page, alice
):
    # Each value of the filter's operations_parameters may be a selector, which
    # a rename must update as it does the step's own fields.
    definition = filtered_detection(
        keep_where(
            compare(
                detection_property("class_name"), "in (Sequence)", parameter("wanted")
            )
        ),
        {"wanted": "$inputs.classes", "threshold": "$steps.count.output"},
    )
    definition["inputs"].append(
        {"type": "WorkflowParameter", "name": "classes", "default_value": ["Normal"]}
    )
    workflow = Workflow.create_with_version(alice, "Filter by parameter", definition)
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    name = page.locator("#node-panel [data-field='name']")

    page.locator("[data-input-name='classes']").click()
    name.fill("wanted_classes")
    name.press("Enter")
    page.locator(".drawflow-node[data-step-name='count']").click()
    name.fill("people_count")
    name.press("Enter")

    edited = page.evaluate("window.glassboxBuilder.getDefinition()")
    parameters = edited["steps"][2]["operations_parameters"]
    assert parameters["wanted"] == "$inputs.wanted_classes"
    assert parameters["threshold"] == "$steps.people_count.output"
    # The rename leaves the filter's operations, which hold no selectors, as
    # they were.
    assert edited["steps"][2]["operations"] == definition["steps"][2]["operations"]
    outcome = page.evaluate("window.glassboxBuilder.validate()")
    assert outcome["ok"], outcome


def test_builder_edits_selector_lists_as_json(
    transactional_db, asgi_server, page, alice
):
    # Consensus takes a list of detection selectors, continue if a list of
    # steps and an object of selectors: the panel edits each as JSON, and a
    # rename updates the selectors inside them.
    workflow = Workflow.create_with_version(alice, "Lists", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    page.click("[data-block-type='roboflow_core/detections_consensus@v1']")
    page.click("[data-block-type='roboflow_core/continue_if@v1']")
    panel = page.locator("#node-panel")

    page.locator(".drawflow-node[data-step-name='detections_consensus']").click()
    panel.locator("[data-field='predictions_batches']").fill(
        '["$steps.people.predictions", "$steps.people.predictions"]'
    )
    panel.locator("[data-field='required_votes']").fill("2")
    page.locator(".drawflow-node[data-step-name='continue_if']").click()
    condition = group(compare(parameter("n"), "(Number) >", static(0)))
    panel.locator("[data-field='condition_statement']").fill(json.dumps(condition))
    panel.locator("[data-field='evaluation_parameters']").fill(
        '{"n": "$steps.count.output"}'
    )
    panel.locator("[data-field='next_steps']").fill('["$steps.detections_consensus"]')
    outcome = page.evaluate("window.glassboxBuilder.validate()")
    assert outcome["ok"], outcome

    name = panel.locator("[data-field='name']")
    page.locator(".drawflow-node[data-step-name='people']").click()
    name.fill("persons")
    name.press("Enter")
    page.locator(".drawflow-node[data-step-name='count']").click()
    name.fill("persons_count")
    name.press("Enter")
    page.locator(".drawflow-node[data-step-name='detections_consensus']").click()
    name.fill("vote")
    name.press("Enter")

    steps = {
        step["name"]: step
        for step in page.evaluate("window.glassboxBuilder.getDefinition()")["steps"]
    }
    assert steps["vote"]["predictions_batches"] == [
        "$steps.persons.predictions",
        "$steps.persons.predictions",
    ]
    assert steps["continue_if"]["evaluation_parameters"] == {
        "n": "$steps.persons_count.output"
    }
    assert steps["continue_if"]["next_steps"] == ["$steps.vote"]
    outcome = page.evaluate("window.glassboxBuilder.validate()")
    assert outcome["ok"], outcome


def test_builder_deletes_clicked_line(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Line", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    count_id = page.get_attribute("[data-step-name='count']", "id")
    line = page.locator(f".connection.node_in_{count_id} .main-path")
    assert line.count() == 1

    line.click()
    page.keyboard.press("Delete")
    assert line.count() == 0
    definition = page.evaluate("window.glassboxBuilder.getDefinition()")
    assert "data" not in definition["steps"][1]
    assert definition["steps"][0]["images"] == "$inputs.image"


def test_builder_names_unnamed_output(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/new")
    page.wait_for_selector("#builder[data-ready='true']")
    page.click("#tab-json")
    page.fill("#definition-json", '{"inputs":[1,2,"x"],"steps":[null],"outputs":[{}]}')
    page.click("#tab-graph")
    page.wait_for_function(
        "document.getElementById('problems').textContent.includes('name is missing')"
    )

    problems = page.locator("#problems").text_content()
    assert "Output “(no name)”" in problems
    assert "undefined" not in problems
    output = page.locator(".drawflow-node.node-output")
    assert output.locator(".node-name").text_content() == "(no name)"
    page.locator("#problems .problem-link", has_text="Output “(no name)”").click()
    assert "undefined" not in page.locator("#node-panel").text_content()


def test_builder_save_error_clears(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Fixed later", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    message = page.locator("#save-message")

    page.click("#tab-json")
    valid = page.input_value("#definition-json")
    page.fill("#definition-json", valid[:-1])
    page.click("#save")
    assert message.text_content() == (
        "Not saved: the JSON has an error, shown under it."
    )
    # The message disappears once the JSON parses again, before any save.
    page.fill("#definition-json", valid)
    message.wait_for(state="hidden")
    page.click("#tab-graph")
    assert message.is_hidden()

    page.fill("#workflow-name", "")
    page.click("#save")
    assert message.text_content() == "Enter a workflow name before saving."
    page.type("#workflow-name", "Named")
    assert message.is_hidden()

    set_images = "(value) => window.glassboxBuilder.setField('people', 'images', value)"
    page.evaluate(set_images, None)
    page.click("#save")
    page.wait_for_function(
        "document.getElementById('save-message').textContent.includes('has problems')"
    )
    page.evaluate(set_images, "$inputs.image")
    message.wait_for(state="hidden")
    assert workflow.latest_version().number == 1


def wide_definition() -> dict:
    """Return a workflow laid out in five columns: input, three steps, outputs."""
    definition = detect_then_crops("people-detector")
    definition["outputs"].append(
        {"type": "JsonField", "name": "inner", "selector": "$steps.inner.predictions"}
    )
    return definition


def assert_inside_canvas(page) -> None:
    canvas = canvas_box(page)
    for box in node_boxes(page):
        assert box["left"] >= canvas["left"], (box, canvas)
        assert box["top"] >= canvas["top"], (box, canvas)
        assert box["right"] <= canvas["right"], (box, canvas)
        assert box["bottom"] <= canvas["bottom"], (box, canvas)


def test_builder_fits_graph_on_load(transactional_db, asgi_server, browser, alice):
    workflow = Workflow.create_with_version(alice, "Wide", wide_definition())
    for width, height in ((1280, 900), (400, 800)):
        context = browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        sign_in(page, asgi_server, "alice", "alice-password")
        open_builder(page, asgi_server, workflow)
        assert page.locator("#drawflow .drawflow-node").count() == 8
        assert_inside_canvas(page)
        page.locator(".builder-main").screenshot(
            path=str(ARTIFACTS / f"builder-fit-{width}.png")
        )
        context.close()


def test_builder_tab_pans_to_node(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Zoomed", wide_definition())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    for _ in range(8):
        page.click("#zoom-in")

    canvas = canvas_box(page)
    page.focus("#drawflow")
    for _ in range(8):
        page.keyboard.press("Tab")
        assert focused_node(page) is not None
        box = page.evaluate(
            "() => { const r = document.activeElement.getBoundingClientRect();"
            " return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; }"
        )
        assert box["left"] >= canvas["left"], (box, canvas)
        assert box["right"] <= canvas["right"], (box, canvas)
        assert box["top"] >= canvas["top"], (box, canvas)
        assert box["bottom"] <= canvas["bottom"], (box, canvas)
        assert page.evaluate("document.getElementById('drawflow').scrollLeft") == 0


def test_builder_reads_roboflow_field_spellings(
    transactional_db, asgi_server, page, alice
):
    stored = detection()
    stored["steps"][0]["image"] = stored["steps"][0].pop("images")
    workflow = Workflow.create_with_version(alice, "Spelled image", stored)
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)

    # The input's line into the model step is drawn, under the field's name.
    people_id = page.get_attribute("[data-step-name='people']", "id")
    assert page.locator(f".connection.node_in_{people_id} .main-path").count() == 1
    definition = page.evaluate("window.glassboxBuilder.getDefinition()")
    assert definition["steps"][0]["images"] == "$inputs.image"
    assert "image" not in definition["steps"][0]

    # Pasted into the JSON tab, the spelling is renamed there too.
    pasted = detection()
    pasted["steps"][0] = {
        ("image" if key == "images" else key): value
        for key, value in pasted["steps"][0].items()
    }
    page.click("#tab-json")
    page.fill("#definition-json", json.dumps(pasted))
    page.wait_for_function(
        "document.getElementById('definition-json').value.includes('\"images\"')"
    )
    definition = page.evaluate("window.glassboxBuilder.getDefinition()")
    assert definition["steps"][0]["images"] == "$inputs.image"
    # In its place among the keys, and the note lists the rename.
    assert list(definition["steps"][0])[:3] == ["type", "name", "images"]
    note = page.locator("#json-note")
    assert note.is_visible()
    assert "people: image → images" in note.text_content()


def test_builder_suggests_model_ids(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Suggests models", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    page.click(".drawflow-node[data-step-name='people']")
    options = page.eval_on_selector_all(
        "#choices-model_id option",
        "(options) => options.map((o) => [o.value, o.label])",
    )
    assert ["people-detector", "model directory"] in options
    assert ["yolov8n.yaml", "untrained architecture, for timing"] in options
    # The compiler rejects a step output as a model_id, so none is offered.
    values = [value for value, _ in options]
    assert "$steps.count.output" not in values


def prompts_before_leaving(page) -> bool:
    """Close the page as a person leaving would; return whether it asked first."""
    dialogs = []

    def leave(dialog) -> None:
        dialogs.append(dialog.type)
        dialog.accept()

    page.on("dialog", leave)
    with page.expect_event("close"):
        page.close(run_before_unload=True)
    return dialogs == ["beforeunload"]


def test_builder_asks_before_losing_json(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Half typed", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    page.click("#tab-json")
    # Text that does not parse yet never reaches the definition, and it is
    # the person's work all the same.
    page.fill("#definition-json", '{"version": "1.0", "steps": [')
    page.wait_for_selector("#json-error:not([hidden])")
    assert prompts_before_leaving(page)


def test_builder_asks_before_losing_json_typed_just_now(
    transactional_db, asgi_server, page, alice
):
    workflow = Workflow.create_with_version(alice, "Just typed", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    page.click("#tab-json")
    text = page.input_value("#definition-json")
    # Left before the JSON tab applied the text to the definition.
    page.fill("#definition-json", text.replace('"people"', '"walkers"'))
    assert prompts_before_leaving(page)


def test_builder_leaves_unedited_json_quietly(
    transactional_db, asgi_server, page, alice
):
    workflow = Workflow.create_with_version(alice, "Only read", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    page.click("#tab-json")
    assert not prompts_before_leaving(page)


def test_builder_marks_unsaved_changes(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Marked", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    status = page.locator("#saved-version")
    assert status.text_content() == "Version 1"

    set_confidence(page, 0.45)
    assert status.text_content() == "Version 1, unsaved changes"
    page.click("#save")
    page.wait_for_selector("#saved-version[data-version='2']")
    assert status.text_content() == "Saved as version 2"

    page.fill("#workflow-name", "Marked again")
    assert status.text_content() == "Version 2, unsaved changes"


def test_builder_back_shows_saved_version(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Saved, then back", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    set_confidence(page, 0.45)
    page.click("#save")
    page.wait_for_selector("#saved-version[data-version='2']")

    # Back from the run page loads the builder again, not the copy of the page
    # that still contained version 1 and would make the next save a conflict.
    page.click("#run-link")
    page.wait_for_url(f"**/workflows/{workflow.id}/run/")
    page.go_back()
    page.wait_for_selector("#builder[data-ready='true']")
    assert page.locator("#saved-version").get_attribute("data-version") == "2"
    edited = page.evaluate("window.glassboxBuilder.getDefinition()")
    assert edited["steps"][0]["confidence"] == 0.45

    set_confidence(page, 0.5)
    with page.expect_response(f"**/api/workflows/{workflow.id}") as response:
        page.click("#save")
    assert response.value.status == 200
    page.wait_for_selector("#saved-version[data-version='3']")


def test_builder_empty_selector_looks_empty(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/new")
    page.wait_for_selector("#builder[data-ready='true']")
    page.click(f"[data-block-type='{DETECTION}']")

    # The suggestion reads as an example, not as the selector already set.
    images = page.locator("#node-panel [data-field='images']")
    assert images.input_value() == ""
    assert images.get_attribute("placeholder") == "e.g. $inputs.image"
    page.wait_for_selector("#node-panel [data-field='images'][aria-invalid='true']")

    images.fill("$inputs.image")
    page.wait_for_selector(
        "#node-panel [data-field='images']:not([aria-invalid='true'])"
    )
    definition = page.evaluate("window.glassboxBuilder.getDefinition()")
    assert definition["steps"][0]["images"] == "$inputs.image"


def test_builder_draws_batch_input_as_image(transactional_db, asgi_server, page, alice):
    stored = detection()
    stored["inputs"][0] = {
        "type": "WorkflowBatchInput",
        "name": "image",
        "kind": ["image"],
    }
    workflow = Workflow.create_with_version(alice, "Batch input", stored)
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)

    title = page.locator("[data-input-name='image'] .node-title")
    assert title.text_content() == "Image input"
    page.locator("[data-input-name='image']").click()
    panel = page.locator("#node-panel")
    panel.get_by_text("An image given when the workflow runs.").wait_for()
    assert panel.locator("[data-field='default_value']").count() == 0


def test_builder_warns_untrained_model(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(
        alice, "Timing only", detection("yolov8n.yaml")
    )
    sign_in(page, asgi_server, "alice", "alice-password")
    open_builder(page, asgi_server, workflow)
    page.wait_for_selector("#validation-status[data-state='valid']")

    warnings = page.locator("#problems li.warning").all_text_contents()
    assert len(warnings) == 1, warnings
    assert "step 'people'" in warnings[0]
    assert "'yolov8n.yaml' is an untrained architecture" in warnings[0]
    assert "1 warning" in page.locator("#validation-status").text_content()

    # Pretrained weights in its place take the warning away.
    page.evaluate(
        "() => window.glassboxBuilder.setField('people', 'model_id', 'people-detector')"
    )
    page.wait_for_selector("#problems li.warning", state="detached")
    assert page.locator("#validation-status").text_content() == "Valid"
