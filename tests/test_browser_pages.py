"""API tokens and billing pages in a real browser: reloads, layout, charts."""

import datetime

from tests.conftest import ARTIFACTS, registered_runner
from tests.definitions import detection
from tests.test_billing_pages import DAY, make_bill, version_of
from tests.test_browser_run import sign_in
from webapp.models import ApiToken
from workflows.models import Workflow

LONG_NAME = "Detect people on the platform cameras " * 5 + "(night shift)"


def test_token_page_reload_creates_nothing(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/tokens/")
    page.fill("#token-name", "laptop")
    page.click("text=Create token")
    page.wait_for_selector("#new-token-key")
    key = page.locator("#new-token-key").text_content()
    token = ApiToken.objects.get(user=alice)
    assert key.startswith(token.prefix)
    assert page.url == f"{asgi_server}/tokens/"

    page.reload()
    page.wait_for_selector("table")
    assert ApiToken.objects.filter(user=alice).count() == 1
    assert page.locator("#new-token").count() == 0
    assert key not in page.content()
    page.go_back()
    assert key not in page.content()


def test_token_revoke_asks_first(transactional_db, asgi_server, page, alice):
    laptop, _ = ApiToken.issue(alice, "laptop")
    desktop, _ = ApiToken.issue(alice, "desktop")
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/tokens/")
    revoke_laptop = page.get_by_role("button", name="Revoke token “laptop”…")

    revoke_laptop.click()
    confirm = page.locator("#revoke-confirm")
    assert "Revoke token “laptop”" in confirm.text_content()
    assert page.evaluate("document.activeElement.id") == "revoke-confirm"
    laptop.refresh_from_db()
    assert laptop.revoked_at is None
    page.click("#revoke-cancel")
    assert confirm.count() == 0
    laptop.refresh_from_db()
    assert laptop.revoked_at is None

    # The same steps with the keyboard, and this time confirmed.
    revoke_laptop.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#revoke-confirm")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "revoke-confirm-button"
    page.keyboard.press("Enter")
    page.wait_for_selector("text=Token “laptop” revoked.")
    assert confirm.count() == 0
    laptop.refresh_from_db()
    assert laptop.revoked_at is not None
    desktop.refresh_from_db()
    assert desktop.revoked_at is None


def test_token_revoke_escape_refocuses(transactional_db, asgi_server, page, alice):
    laptop, _ = ApiToken.issue(alice, "laptop")
    ApiToken.issue(alice, "desktop")
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/tokens/")
    page.get_by_role("button", name="Revoke token “laptop”…").click()
    confirm = page.locator("#revoke-confirm")
    confirm.wait_for()
    assert page.evaluate("document.activeElement.id") == "revoke-confirm"
    loads = []
    page.on("load", lambda _: loads.append(page.url))

    page.keyboard.press("Escape")
    page.wait_for_url(f"{asgi_server}/tokens/")
    assert confirm.count() == 0
    # The question closed in place, without loading the page again.
    assert loads == []
    # Focus returns to the Revoke button that opened the question.
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == (
        "Revoke token “laptop”…"
    )
    laptop.refresh_from_db()
    assert laptop.revoked_at is None


def test_token_revoke_cancel_refocuses(transactional_db, asgi_server, page, alice):
    ApiToken.issue(alice, "laptop")
    desktop, _ = ApiToken.issue(alice, "desktop")
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/tokens/")
    page.get_by_role("button", name="Revoke token “desktop”…").click()
    confirm = page.locator("#revoke-confirm")
    confirm.wait_for()
    loads = []
    page.on("load", lambda _: loads.append(page.url))

    page.click("#revoke-cancel")
    page.wait_for_url(f"{asgi_server}/tokens/")
    assert confirm.count() == 0
    assert loads == []
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == (
        "Revoke token “desktop”…"
    )

    # Enter on the focused button opens the same question again.
    page.keyboard.press("Enter")
    page.wait_for_url(f"{asgi_server}/tokens/?revoke={desktop.id}")
    assert "Revoke token “desktop”" in confirm.text_content()
    desktop.refresh_from_db()
    assert desktop.revoked_at is None


def test_token_revoke_cancel_without_script(
    transactional_db, asgi_server, browser, alice
):
    laptop, _ = ApiToken.issue(alice, "laptop")
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/tokens/?revoke={laptop.id}")
    assert page.locator("#revoke-confirm").count() == 1

    page.click("#revoke-cancel")
    page.wait_for_url(f"{asgi_server}/tokens/")
    assert page.locator("#revoke-confirm").count() == 0
    laptop.refresh_from_db()
    assert laptop.revoked_at is None
    context.close()


def test_billing_page_cuts_long_names(transactional_db, asgi_server, browser, alice):
    long = version_of(alice, LONG_NAME)
    short = version_of(alice, "People")
    for index in range(3):
        when = DAY - datetime.timedelta(hours=index)
        make_bill(alice, version=long, created_at=when)
        make_bill(alice, version=short, created_at=when)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/billing/")
    page.wait_for_function("window.Chart && Chart.getChart('chart-latency')")
    page.screenshot(path=str(ARTIFACTS / "billing-long-names.png"), full_page=True)

    names = page.locator("#bill-table td.workflow .long-name")
    assert names.count() == 6
    name = names.filter(has_text="Detect people").first
    assert name.get_attribute("title") == f"{LONG_NAME} ({long.workflow.slug})"
    assert name.evaluate("el => el.scrollWidth > el.clientWidth")
    assert name.evaluate("el => getComputedStyle(el).textOverflow") == "ellipsis"
    # Every column, Amount included, fits without scrolling the table.
    scroll = page.locator(".table-scroll")
    widths = scroll.evaluate("el => [el.scrollWidth, el.clientWidth]")
    assert widths[0] <= widths[1], widths

    # The filters stay on one row: every field overlaps every other vertically.
    rows = page.locator("#billing-filters > p").evaluate_all(
        "ps => ps.map((p) => p.getBoundingClientRect()).map((r) => [r.top, r.bottom])"
    )
    assert max(top for top, _ in rows) < min(bottom for _, bottom in rows), rows

    # The latency chart keeps most of its height for the bars.
    chart = page.evaluate(
        """() => {
            const chart = Chart.getChart('chart-latency');
            return {labels: chart.data.labels,
                    area: chart.chartArea.bottom - chart.chartArea.top,
                    box: chart.height};
        }"""
    )
    assert chart["area"] > 0.6 * chart["box"], chart
    assert all(len(label) <= 40 for label in chart["labels"]), chart["labels"]
    assert any(
        label.startswith("Detect people") and "…" in label for label in chart["labels"]
    )
    context.close()


def test_billing_donut_has_no_model_slice(transactional_db, asgi_server, page, alice):
    people = version_of(alice, "People")
    heights = version_of(alice, "Heights")
    make_bill(alice, version=people)
    make_bill(alice, version=people, cold_load=500_000)
    make_bill(alice, version=heights, models=[])
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/billing/")
    page.wait_for_function("window.Chart && Chart.getChart('chart-starts')")
    labels = page.evaluate("Chart.getChart('chart-starts').data.labels")
    assert labels == ["Hot: 1", "Cold: 1", "No model: 1"]
    start = page.locator("#bill-table td.start .badge").all_text_contents()
    assert sorted(start) == ["cold", "hot", "no model"]


def test_billing_charts_without_latency(transactional_db, asgi_server, page, alice):
    # A dying runner never timed this run, so it has no latency to draw.
    make_bill(alice, version=version_of(alice, "People"), billed=False, timed=False)
    errors = []

    def record_console_error(message):
        if message.type == "error":
            errors.append(message.text)

    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", record_console_error)
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/billing/")
    page.wait_for_function("window.Chart && Chart.getChart('chart-starts')")
    labels = page.evaluate("Chart.getChart('chart-starts').data.labels")
    assert labels == ["Hot: 0", "Cold: 0", "Not timed: 1"]
    assert page.locator("#latency-empty").is_visible()
    assert errors == []


def test_pages_fit_a_narrow_screen(transactional_db, asgi_server, browser, alice):
    workflow = Workflow.create_with_version(alice, LONG_NAME, detection())
    ApiToken.issue(alice, "laptop")
    context = browser.new_context(viewport={"width": 400, "height": 800})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    for path in ("/workflows/", "/tokens/", f"/workflows/{workflow.id}/run/"):
        page.goto(f"{asgi_server}{path}")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, (path, width)
    page.goto(f"{asgi_server}/workflows/{workflow.id}/edit")
    page.wait_for_selector("#builder[data-ready='true']")
    canvas = page.evaluate(
        "document.getElementById('drawflow').getBoundingClientRect().width"
    )
    assert canvas > 300, canvas
    page.screenshot(path=str(ARTIFACTS / "builder-narrow.png"), full_page=True)
    context.close()


def test_billing_amount_stays_in_view(transactional_db, asgi_server, browser, alice):
    make_bill(alice, version=version_of(alice, "People"), created_at=DAY)
    context = browser.new_context(viewport={"width": 900, "height": 800})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/billing/")
    scroll = page.locator(".table-scroll")
    widths = scroll.evaluate("el => [el.scrollWidth, el.clientWidth]")
    assert widths[0] > widths[1], "the table must be wider than its box here"
    amount = page.locator("#bill-table td.amount").first.bounding_box()
    box = scroll.bounding_box()
    assert amount["x"] + amount["width"] <= box["x"] + box["width"] + 1
    context.close()


def test_billing_export_after_filtering(transactional_db, asgi_server, page, alice):
    # The form submits every filter, empty ones too, and the page's URL may
    # carry parameters the export does not take. The export link still
    # downloads the filtered rows.
    people = version_of(alice, "People")
    heights = version_of(alice, "Heights")
    kept = make_bill(alice, version=people)
    make_bill(alice, version=heights)
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/billing/?utm_source=mail&page=1")
    page.select_option("#id_workflow", str(people.workflow_id))
    page.click("#billing-filters button[type=submit]")
    page.wait_for_url(f"**workflow={people.workflow_id}**")

    with page.expect_download() as download_info:
        page.click("#billing-export")
    download = download_info.value
    assert download.suggested_filename == "billing.csv"
    lines = open(download.path(), encoding="utf-8").read().splitlines()
    assert len(lines) == 2
    assert str(kept.run_id) in lines[1]

    # The same link on a page opened with a parameter the export rejects.
    page.goto(page.url + "&utm_source=mail")
    href = page.get_attribute("#billing-export", "href")
    assert "utm_source" not in href
    response = page.request.get(f"{asgi_server}{href}")
    assert response.status == 200
    assert str(kept.run_id) in response.text()


def test_billing_table_fits_1280_window(transactional_db, asgi_server, browser, alice):
    long = version_of(alice, LONG_NAME)
    short = version_of(alice, "People")
    make_bill(alice, version=long, cold_load=2_615_124, inference=1_345_597)
    make_bill(alice, version=short, billed=False)
    make_bill(alice, version=short, models=[])
    # 1280 px less the 17 px scrollbar that browsers on Windows draw.
    context = browser.new_context(viewport={"width": 1263, "height": 900})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/billing/")
    page.screenshot(path=str(ARTIFACTS / "billing-1280.png"), full_page=True)

    scroll = page.locator(".table-scroll")
    widths = scroll.evaluate("el => [el.scrollWidth, el.clientWidth]")
    assert widths[0] <= widths[1], widths
    box = scroll.bounding_box()
    headers = page.locator("#bill-table th")
    assert headers.count() == 16
    for index in range(headers.count()):
        header = headers.nth(index).bounding_box()
        assert header["x"] + header["width"] <= box["x"] + box["width"] + 1, index
    # A header breaks only between words or at its soft hyphens.
    serialization = page.locator("#bill-table th.serialization")
    assert serialization.evaluate("el => el.scrollWidth <= el.clientWidth")
    size = page.locator("#bill-table td.amount").first.evaluate(
        "el => parseFloat(getComputedStyle(el).fontSize)"
    )
    assert size >= 12, size
    # The date and the time of day stay whole when the cell breaks.
    time = page.locator("#bill-table td.time").first
    lines = time.locator("span").evaluate_all(
        "spans => spans.map((s) => s.getClientRects().length)"
    )
    assert lines == [1, 1], lines
    context.close()


def test_billing_page_fits_phone(transactional_db, asgi_server, browser, alice):
    make_bill(alice, version=version_of(alice, LONG_NAME), created_at=DAY)
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/billing/")
    page.wait_for_function("window.Chart && Chart.getChart('chart-starts')")
    page.screenshot(path=str(ARTIFACTS / "billing-390.png"), full_page=True)

    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    # The rows are wider than the table's box, which scrolls them sideways.
    scroll = page.locator(".table-scroll")
    box = scroll.bounding_box()
    row = page.locator("#bill-table tbody tr").first.bounding_box()
    assert row["width"] > box["width"], (row, box)
    assert box["x"] >= 0
    assert box["x"] + box["width"] <= 390
    amount = page.locator("#bill-table td.amount").first.bounding_box()
    assert amount["x"] + amount["width"] <= box["x"] + box["width"] + 1

    # Every legend entry of every chart is drawn whole, inside its chart.
    charts = ("chart-daily", "chart-billed-time", "chart-latency", "chart-starts")
    for chart_id in charts:
        overflow = page.evaluate(
            """(id) => {
                const chart = Chart.getChart(id);
                return chart.legend.legendHitBoxes
                    .filter((box) => box.left < 0 || box.left + box.width > chart.width)
                    .map((box) => [box.left, box.width, chart.width]);
            }""",
            chart_id,
        )
        assert overflow == [], (chart_id, overflow)
    context.close()


def test_workflow_actions_reachable_on_phone(
    transactional_db, asgi_server, browser, alice
):
    workflow = Workflow.create_with_version(alice, LONG_NAME, detection())
    for _ in range(5):
        make_bill(alice, version=workflow.latest_version(), created_at=DAY)
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/")
    page.screenshot(path=str(ARTIFACTS / "workflow-list-390.png"), full_page=True)

    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    row = page.locator(f"tr[data-workflow-id='{workflow.id}']")
    assert row.locator(".sparkline").count() == 1
    actions = {
        "Edit": row.get_by_role("link", name="Edit"),
        "Run": row.get_by_role("link", name="Run"),
        "Delete": row.get_by_role("button", name=f"Delete workflow “{LONG_NAME}”…"),
    }
    for name, action in actions.items():
        box = action.bounding_box()
        assert box["x"] >= 0, name
        assert box["x"] + box["width"] <= 390, (name, box)

    actions["Run"].click()
    page.wait_for_url(f"{asgi_server}/workflows/{workflow.id}/run/")
    context.close()


def test_fleet_page_fits_phone(
    transactional_db, asgi_server, browser, django_user_model
):
    django_user_model.objects.create_user(
        "operator", password="operator-password", is_staff=True, is_superuser=True
    )
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    with registered_runner("runner-with-a-long-name", ("people-detector",)):
        sign_in(page, asgi_server, "operator", "operator-password")
        page.goto(f"{asgi_server}/admin/runner/run/fleet/")
        page.screenshot(path=str(ARTIFACTS / "fleet-390.png"), full_page=True)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        assert "runner-with-a-long-name" in page.locator("#live-runners").inner_text()
        table = page.locator("#live-runners")
        box = table.locator("xpath=..").bounding_box()
        assert box["x"] + box["width"] <= 390, box
        widths = table.evaluate("el => [el.scrollWidth, el.parentElement.clientWidth]")
        assert widths[0] > widths[1], "the table must be wider than its box here"
    context.close()


def test_token_revoke_reachable_on_phone(transactional_db, asgi_server, browser, alice):
    ApiToken.issue(alice, "laptop")
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/tokens/")
    page.screenshot(path=str(ARTIFACTS / "tokens-390.png"), full_page=True)

    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    revoke = page.get_by_role("button", name="Revoke token “laptop”…")
    box = revoke.bounding_box()
    assert box["x"] >= 0
    assert box["x"] + box["width"] <= 390, box
    # Each value keeps its column's name when the header row is not drawn.
    last_used = page.locator("td[data-label='Last used (UTC)']").first
    label = last_used.evaluate("el => getComputedStyle(el, '::before').content")
    assert label == '"Last used (UTC): "', label
    assert last_used.inner_text() == "never"
    context.close()


def test_run_form_fits_phone(transactional_db, asgi_server, browser, alice):
    workflow = Workflow.create_with_version(alice, "People", detection())
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")

    form = page.locator("#run-form").bounding_box()
    fields = page.locator("#run-form input, #run-form select, #run-form button")
    assert fields.count() >= 3
    for index in range(fields.count()):
        box = fields.nth(index).bounding_box()
        assert box["x"] + box["width"] <= form["x"] + form["width"], (index, box)
    context.close()


def test_pages_fit_320_pixels(transactional_db, asgi_server, browser, alice):
    # WCAG 2.1 success criterion 1.4.10 (Reflow) requires content to fit a
    # width of 320 CSS pixels without scrolling sideways.
    workflow = Workflow.create_with_version(alice, "People", detection())
    bill = make_bill(alice, version=workflow.latest_version(), created_at=DAY)
    context = browser.new_context(viewport={"width": 320, "height": 640})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    paths = (
        "/workflows/",
        f"/workflows/{workflow.id}/run/",
        f"/runs/{bill.run_id}/",
        "/billing/",
        f"/billing/runs/{bill.run_id}/",
        "/models/",
        "/tokens/",
    )
    for path in paths:
        page.goto(f"{asgi_server}{path}")
        page.wait_for_load_state("networkidle")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 320, (path, width)
    context.close()


# A timeline row as run.js's addRow builds it: label, bar, value.
TIMELINE_ROW_SCRIPT = """
([label, value]) => {
  const li = document.createElement("li");
  const name = document.createElement("span");
  name.textContent = label;
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.width = "100%";
  const number = document.createElement("span");
  number.className = "num";
  number.textContent = value;
  li.append(name, bar, number);
  document.getElementById("timeline").append(li);
}
"""


def test_run_timeline_values_stay_whole(transactional_db, asgi_server, browser, alice):
    # The page's stylesheet on rows with a four- and a five-digit value, at
    # the narrowest width and a common phone's.
    workflow = Workflow.create_with_version(alice, "People", detection())
    rows = [
        ("cold load · people-detector (step detect)", "1023.413 ms"),
        ("inference · people-detector (step detect)", "12345.678 ms"),
    ]
    for width in (320, 375):
        context = browser.new_context(viewport={"width": width, "height": 740})
        page = context.new_page()
        sign_in(page, asgi_server, "alice", "alice-password")
        page.goto(f"{asgi_server}/workflows/{workflow.id}/run/")
        for row in rows:
            page.evaluate(TIMELINE_ROW_SCRIPT, list(row))
        values = page.locator("#timeline li .num")
        assert values.count() == len(rows)
        for index, (_, text) in enumerate(rows):
            value = values.nth(index)
            lines = value.evaluate(
                "el => el.getClientRects().length === 1"
                " && Math.round(el.getBoundingClientRect().height"
                " / parseFloat(getComputedStyle(el).lineHeight))"
            )
            assert lines == 1, (width, text, lines)
            box = value.bounding_box()
            assert box["x"] + box["width"] <= width, (width, text, box)
        context.close()


def test_token_page_fits_long_name(transactional_db, asgi_server, browser, alice):
    # No space or hyphen, so the browser finds no place to break the line.
    long_name = "NightShiftCameraUploader" * 4 + "Nord"
    assert len(long_name) == 100
    token, _ = ApiToken.issue(alice, long_name)
    for width in (1280, 320):
        context = browser.new_context(viewport={"width": width, "height": 900})
        page = context.new_page()
        sign_in(page, asgi_server, "alice", "alice-password")
        for path in ("/tokens/", f"/tokens/?revoke={token.id}"):
            page.goto(f"{asgi_server}{path}")
            page.wait_for_selector("table.token-list")
            widths = page.evaluate(
                "[document.documentElement.scrollWidth,"
                " document.documentElement.clientWidth]"
            )
            assert widths[0] <= widths[1], (width, path, widths)
            revoke = page.get_by_role("button", name=f"Revoke token “{long_name}”…")
            box = revoke.bounding_box()
            assert box["x"] + box["width"] <= widths[1], (width, path, box)

        # The page that shows a new token's key names the token too.
        page.fill("#token-name", f"{width}{long_name}"[:100])
        page.click("text=Create token")
        page.wait_for_selector("#new-token-key")
        widths = page.evaluate(
            "[document.documentElement.scrollWidth,"
            " document.documentElement.clientWidth]"
        )
        assert widths[0] <= widths[1], (width, "new token", widths)
        context.close()


def test_workflow_list_fits_long_names(transactional_db, asgi_server, browser, alice):
    spaced = Workflow.create_with_version(alice, LONG_NAME, detection())
    # No space or hyphen, so the browser finds no place to break the line.
    unbroken = Workflow.create_with_version(
        alice, "CameraPlatformNightShift" * 8, detection()
    )
    for width in (1280, 320):
        context = browser.new_context(viewport={"width": width, "height": 900})
        page = context.new_page()
        sign_in(page, asgi_server, "alice", "alice-password")
        paths = [
            "/workflows/",
            f"/workflows/?delete={spaced.id}",
            f"/workflows/?delete={unbroken.id}",
        ]
        for path in paths:
            page.goto(f"{asgi_server}{path}")
            page.wait_for_selector("table.workflow-list")
            widths = page.evaluate(
                "[document.documentElement.scrollWidth,"
                " document.documentElement.clientWidth]"
            )
            assert widths[0] <= widths[1], (width, path, widths)
        context.close()


def test_skip_link_passes_navigation(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/workflows/")

    page.keyboard.press("Tab")
    skip = page.locator(".skip-link")
    assert page.evaluate("document.activeElement.className") == "skip-link"
    assert skip.text_content() == "Skip to content"
    box = skip.bounding_box()
    assert box["y"] >= 0, box
    assert box["y"] + box["height"] <= 900, box
    page.screenshot(path=str(ARTIFACTS / "skip-link.png"))

    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "content"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "new-workflow"


NAV_LINK_STYLE = """el => {
  const style = getComputedStyle(el);
  return [style.fontWeight, style.borderBottomStyle];
}"""


def assert_marked_links(page, base_url, nav, cases, other_weight=None) -> None:
    """Check, for each (path, link name, aria-current value), the link marked there.

    Exactly that link is marked, and the mark is visible too, not only
    announced. ``other_weight`` is the font weight expected of an unmarked
    link, where the page's style fixes it.
    """
    for path, current_name, value in cases:
        page.goto(f"{base_url}{path}")
        marked = nav.locator("a[aria-current]")
        assert marked.count() == 1, path
        assert marked.text_content() == current_name, path
        assert marked.get_attribute("aria-current") == value, path

        other = nav.locator("a:not([aria-current])").first
        assert marked.evaluate(NAV_LINK_STYLE) == ["600", "solid"], path
        other_weight_seen, other_border = other.evaluate(NAV_LINK_STYLE)
        assert other_border == "none", path
        if other_weight is not None:
            assert other_weight_seen == other_weight, path


def test_navigation_marks_current_page(transactional_db, asgi_server, page, alice):
    workflow = Workflow.create_with_version(alice, "Marked", detection())
    sign_in(page, asgi_server, "alice", "alice-password")
    nav = page.locator("header.top nav")
    cases = [
        ("/tokens/", "API tokens", "page"),
        ("/billing/", "Billing", "page"),
        ("/models/", "Models", "page"),
        ("/workflows/", "Workflows", "page"),
        (f"/workflows/{workflow.id}/run/", "Workflows", "true"),
    ]
    assert_marked_links(page, asgi_server, nav, cases, other_weight="400")


def test_navigation_marks_staff_pages(
    transactional_db, asgi_server, page, django_user_model
):
    django_user_model.objects.create_user(
        "operator", password="operator-password", is_staff=True, is_superuser=True
    )
    sign_in(page, asgi_server, "operator", "operator-password")
    # The admin pages show the site's navigation too, so that Fleet and
    # Admin can be marked where they lead.
    nav = page.locator(
        "nav", has=page.get_by_role("link", name="Fleet", exact=True)
    ).first
    cases = [
        ("/workflows/", "Workflows", "page"),
        ("/admin/runner/run/fleet/", "Fleet", "page"),
        ("/admin/", "Admin", "page"),
        ("/admin/runner/run/", "Admin", "true"),
    ]
    assert_marked_links(page, asgi_server, nav, cases)
    page.screenshot(path=str(ARTIFACTS / "admin-navigation.png"))


def test_failed_sign_in_keeps_username(transactional_db, asgi_server, page, alice):
    page.goto(f"{asgi_server}/accounts/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "not-her-password")
    page.click("button[type=submit]")
    page.wait_for_selector("text=Wrong username or password.")

    # Only the password is typed again, and focus waits in its field.
    assert page.input_value("#id_username") == "alice"
    assert page.input_value("#id_password") == ""
    assert page.evaluate("document.activeElement.id") == "id_password"
    page.keyboard.type("alice-password")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{asgi_server}/workflows/")


def test_billing_latency_fits_phone(transactional_db, asgi_server, browser, alice):
    for name in ("Untrained timing", "People flow renamed", "Platform cameras"):
        make_bill(alice, version=version_of(alice, name))
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/billing/")
    page.wait_for_function("window.Chart && Chart.getChart('chart-latency')")
    page.locator("#chart-latency").screenshot(
        path=str(ARTIFACTS / "billing-latency-phone.png")
    )

    chart = page.evaluate(
        """() => {
            const chart = Chart.getChart('chart-latency');
            return {rotation: chart.scales.x.labelRotation,
                    area: chart.chartArea.bottom - chart.chartArea.top,
                    box: chart.height,
                    labels: chart.data.labels};
        }"""
    )
    # The workflow names lie flat, wrapped onto lines, and leave the bars
    # more than half the height (a third with the names rotated).
    assert chart["rotation"] == 0, chart
    assert chart["area"] > 0.5 * chart["box"], chart
    lines = [line for label in chart["labels"] for line in label]
    assert "People flow" in lines, chart["labels"]
    context.close()


def test_password_change_in_site_layout(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.click("header >> text=Change password")
    page.wait_for_url(f"{asgi_server}/accounts/password_change/")

    # The site's own page: its header, navigation and Sign out, not the
    # admin's, whose Home link leads a user who is not staff to a refusal.
    assert page.locator("header.top a.brand").text_content() == "Glassbox"
    assert page.get_by_role("button", name="Sign out").is_visible()
    assert "Django administration" not in page.content()
    assert page.locator("a[href='/admin/']").count() == 0

    page.fill("#id_old_password", "not-her-password")
    page.fill("#id_new_password1", "a-new-long-password-42")
    page.fill("#id_new_password2", "a-new-long-password-42")
    page.click("main button[type=submit]")
    error = page.locator("#id_old_password_error")
    assert "Your old password was entered incorrectly" in error.text_content()
    old = page.locator("#id_old_password")
    assert old.get_attribute("aria-invalid") == "true"
    assert "id_old_password_error" in old.get_attribute("aria-describedby")

    page.fill("#id_old_password", "alice-password")
    page.fill("#id_new_password1", "a-new-long-password-42")
    page.fill("#id_new_password2", "a-new-long-password-42")
    page.click("main button[type=submit]")
    page.wait_for_url(f"{asgi_server}/accounts/password_change/done/")
    assert page.locator("h1").text_content() == "Password changed"
    assert page.locator("header.top a.brand").count() == 1
    alice.refresh_from_db()
    assert alice.check_password("a-new-long-password-42")


def test_token_form_aligns_button(transactional_db, asgi_server, page, alice):
    sign_in(page, asgi_server, "alice", "alice-password")
    page.goto(f"{asgi_server}/tokens/")
    field = page.locator("#token-name").bounding_box()
    button = page.get_by_role("button", name="Create token").bounding_box()
    # The button is on the same line as the field it submits.
    field_bottom = field["y"] + field["height"]
    button_bottom = button["y"] + button["height"]
    assert abs(field_bottom - button_bottom) <= 4, (field, button)
