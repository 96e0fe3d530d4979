"""The billing pages: history table, CSV export, chart data and explanations.

Runs and bills are written straight to the database, priced by the real
policy, so these tests need no runner process.
"""

import csv
import datetime
import html
import io
import json
import math
import random
import re
import uuid
from collections import defaultdict
from html.parser import HTMLParser

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import Bill
from billing.policy import BillingPolicy
from runner.events import stored_events
from runner.models import Run
from tests.definitions import image_height
from webapp.models import ApiToken
from workflows.models import Workflow
from workflows.timing import RUNNER_COMPONENTS

POLICY = BillingPolicy(rate_microcredits_per_second=2000, minimum_ms=100)
DAY = datetime.datetime(2025, 3, 10, 12, 0, tzinfo=datetime.UTC)
HISTORY = reverse("billing-history")
EXPORT = reverse("billing-export")
SUMMARY = reverse("billing-summary")

# ------------------------------------------------------------------ helpers


def make_bill(
    owner,
    *,
    version=None,
    token=None,
    created_at=DAY,
    cold_load=0,
    inference=20_000,
    blocks=3_000,
    request=800,
    queue=1_500,
    billed=True,
    timed=True,
    models=None,
) -> Bill:
    """Create a finished run and its bill. Times are in µs.

    ``models`` replaces the breakdown's one call of people-detector.
    """
    components = {
        "request": request,
        "queue": queue,
        "compile": 1_200,
        "cold_load": cold_load,
        "preprocess": 2_100,
        "inference": inference,
        "postprocess": 900,
        "blocks": blocks,
        "serialization": 350,
        "overhead": 777,
    }
    runner_total = sum(components[name] for name in RUNNER_COMPONENTS)
    breakdown = {
        "components": components,
        "runner_total": runner_total,
        "total": sum(components.values()),
        "models": models
        if models is not None
        else [
            {
                "model_id": "people-detector",
                "cold": cold_load > 0,
                "cold_load": {
                    "read": cold_load // 2,
                    "to_device": cold_load // 4,
                    "warmup": cold_load - cold_load // 2 - cold_load // 4,
                    "total": cold_load,
                },
                "preprocess": 2_100,
                "inference": inference,
                "postprocess": 900,
                "calls": 1,
            }
        ],
    }
    run = Run.objects.create(
        owner=owner,
        workflow_version=version,
        inline_definition=None if version else image_height(),
        definition_digest="0" * 64,
        source="api",
        status="succeeded" if billed else "failed",
        token=token,
        cold=timed and cold_load > 0,
        total_us=breakdown["total"] if timed else None,
        runner_total_us=runner_total if timed else None,
        breakdown=breakdown if timed else None,
    )
    if billed:
        line = POLICY.bill(breakdown)
    else:
        line = POLICY.waive(breakdown if timed else None, "runner died")
    bill = Bill.objects.create(
        run=run,
        owner=owner,
        billed=line.billed,
        components=line.components,
        billable_us=line.billable_us,
        billed_ms=line.billed_ms,
        rate_microcredits_per_second=line.rate_microcredits_per_second,
        minimum_ms=line.minimum_ms,
        amount_microcredits=line.amount_microcredits,
        policy=line.policy,
        formula=line.formula,
        created_at=created_at,
    )
    return bill


def version_of(owner, name: str):
    return Workflow.create_with_version(owner, name, image_height()).latest_version()


def seed_bills(owner, count: int, *, versions, tokens=(None,), seed: int = 7):
    """Create ``count`` varied bills 67 minutes apart and return them oldest first."""
    rng = random.Random(seed)
    bills = []
    for index in range(count):
        kind = rng.random()
        bills.append(
            make_bill(
                owner,
                version=rng.choice(versions),
                token=rng.choice(tokens),
                created_at=DAY + datetime.timedelta(minutes=67 * index),
                cold_load=rng.choice([0, 0, 0, rng.randrange(50_000, 3_000_000)]),
                inference=rng.randrange(1_000, 400_000),
                blocks=rng.randrange(0, 50_000),
                request=rng.randrange(100, 5_000),
                queue=rng.randrange(0, 900_000),
                billed=kind > 0.05,
                timed=kind > 0.02,
            )
        )
    return bills


class PageParser(HTMLParser):
    """Collect the text of elements with an id and the rows of #bill-table."""

    VOID = {"area", "br", "col", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.texts: dict[str, str] = {}
        self.open: list[str | None] = []
        self.in_table = False
        self.in_body = False
        self.header: list[str] = []
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.html = html
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if attributes.get("id") == "bill-table":
            self.in_table = True
        if self.in_table and tag == "tbody":
            self.in_body = True
        if self.in_table and tag == "tr" and self.in_body:
            self.rows.append([])
        if self.in_table and tag in ("td", "th"):
            self.cell = []
        if tag not in self.VOID:
            element_id = attributes.get("id")
            if element_id:
                self.texts[element_id] = ""
            self.open.append(element_id)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.in_table and tag in ("td", "th") and self.cell is not None:
            text = "".join(self.cell).strip()
            if self.in_body:
                self.rows[-1].append(text)
            else:
                self.header.append(text)
            self.cell = None
        if tag == "tbody":
            self.in_body = False
        if tag == "table" and self.in_table:
            self.in_table = False
        if self.open:
            self.open.pop()

    def handle_data(self, data):
        # Soft hyphens only mark where a browser may break a word.
        data = data.replace("\u00ad", "")
        for element_id in self.open:
            if element_id:
                self.texts[element_id] += data
        if self.cell is not None:
            self.cell.append(data)


def parse(response) -> PageParser:
    assert response.status_code == 200, response.content[:500]
    return PageParser(response.content.decode())


def csv_rows(response) -> list[list[str]]:
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/csv")
    return list(csv.reader(io.StringIO(response.content.decode())))


def table_rows_all_pages(client, params: dict) -> tuple[list[str], list[list[str]]]:
    """Return the table header and the rows of every page, in page order."""
    parsed = parse(client.get(HISTORY, params))
    header, rows, page = parsed.header, list(parsed.rows), 1
    while 'rel="next"' in parsed.html:
        page += 1
        parsed = parse(client.get(HISTORY, {**params, "page": page}))
        rows.extend(parsed.rows)
    return header, rows


def nearest_rank(values: list[int], percentile: int) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(percentile * len(ordered) / 100) - 1]


@pytest.fixture
def alice_browser(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def people(alice):
    return version_of(alice, "People counter")


@pytest.fixture
def heights(alice):
    return version_of(alice, "Image heights")


# ------------------------------------------------------------------ access


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url_name", ["billing-history", "billing-export", "billing-summary", "bill-explain"]
)
def test_pages_require_login(client, alice, people, url_name):
    bill = make_bill(alice, version=people)
    args = [bill.run_id] if url_name == "bill-explain" else []
    response = client.get(reverse(url_name, args=args))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


@pytest.mark.django_db
def test_data_endpoints_accept_api_tokens(client, alice, bob, people):
    own = make_bill(alice, version=people)
    bobs = make_bill(bob, version=version_of(bob, "Bob's workflow"))
    _, key = ApiToken.issue(alice, "billing export")
    bearer = {"HTTP_AUTHORIZATION": f"Bearer {key}"}

    summary = client.get(SUMMARY, **bearer)
    assert summary.status_code == 200
    assert summary.json()["totals"]["runs"] == 1

    exported = client.get(EXPORT, {"api_key": key}).content.decode()
    assert str(own.run_id) in exported
    assert str(bobs.run_id) not in exported

    # The history page itself stays a browser page.
    assert client.get(HISTORY, **bearer).status_code == 302


@pytest.mark.django_db
def test_data_endpoints_reject_unparsable_body(client, alice):
    # The key may be in the body, so its parse error is what is reported.
    response = client.generic(
        "GET", SUMMARY, '{"api_key": "x",', content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_request"


@pytest.mark.django_db
def test_data_endpoints_reject_revoked_token(client, alice):
    token, key = ApiToken.issue(alice, "revoked")
    token.revoke()
    response = client.get(SUMMARY, HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"
    assert "manage.py createtoken" in response.json()["hint"]
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.django_db
def test_data_endpoints_prefer_token_to_session(alice_browser, alice, bob, people):
    bobs = make_bill(bob, version=version_of(bob, "Bob's workflow"))
    revoked, revoked_key = ApiToken.issue(alice, "revoked")
    revoked.revoke()
    _, bobs_key = ApiToken.issue(bob, "billing export")

    rejected = alice_browser.get(SUMMARY, HTTP_AUTHORIZATION=f"Bearer {revoked_key}")
    assert rejected.status_code == 401
    exported = alice_browser.get(EXPORT, {"api_key": bobs_key}).content.decode()
    assert str(bobs.run_id) in exported


@pytest.mark.django_db
def test_history_hides_other_users_bills(alice_browser, alice, bob, people):
    own = [make_bill(alice, version=people) for _ in range(3)]
    bobs_version = version_of(bob, "Bob's workflow")
    others = [make_bill(bob, version=bobs_version, inference=900_000) for _ in range(2)]

    page = parse(alice_browser.get(HISTORY))
    run_column = page.header.index("Run")
    assert sorted(row[run_column] for row in page.rows) == sorted(
        str(bill.run_id) for bill in own
    )
    for bill in others:
        assert str(bill.run_id) not in page.html
    assert "Bob's workflow" not in page.html

    exported = alice_browser.get(EXPORT).content.decode()
    for bill in others:
        assert str(bill.run_id) not in exported

    summary = alice_browser.get(SUMMARY).json()
    assert summary["totals"]["runs"] == 3
    assert summary["totals"]["amount_microcredits"] == sum(
        bill.amount_microcredits for bill in own
    )


@pytest.mark.django_db
def test_explain_of_other_users_bill_is_404(alice_browser, bob):
    bobs_bill = make_bill(bob, version=version_of(bob, "Bob's workflow"))
    response = alice_browser.get(reverse("bill-explain", args=[bobs_bill.run_id]))
    assert response.status_code == 404
    assert bobs_bill.formula not in response.content.decode()


@pytest.mark.django_db
def test_explain_of_unknown_run_is_404(alice_browser):
    response = alice_browser.get(reverse("bill-explain", args=[uuid.uuid4()]))
    assert response.status_code == 404


@pytest.mark.django_db
def test_filter_rejects_other_users_workflow(alice_browser, alice, bob, people):
    make_bill(alice, version=people)
    bobs_version = version_of(bob, "Bob's workflow")
    make_bill(bob, version=bobs_version)
    params = {"workflow": bobs_version.workflow_id}

    assert alice_browser.get(EXPORT, params).status_code == 400
    assert alice_browser.get(SUMMARY, params).status_code == 400
    page = parse(alice_browser.get(HISTORY, params))
    assert page.rows == []
    assert "Select a valid choice" in page.html


@pytest.mark.django_db
def test_filter_rejects_other_users_token(alice_browser, alice, bob, people):
    bobs_token, _ = ApiToken.issue(bob, "bob's laptop")
    make_bill(bob, version=version_of(bob, "Bob's workflow"), token=bobs_token)
    response = alice_browser.get(EXPORT, {"token": bobs_token.pk})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_filters"
    assert "token" in body["fields"]
    assert "token" in body["message"]


@pytest.mark.django_db
def test_filter_rejects_repeated_values(alice_browser, alice, people, heights):
    query = f"?workflow={people.workflow_id}&workflow={heights.workflow_id}"
    response = alice_browser.get(SUMMARY + query)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_filters"
    assert (
        "repeated values are not combined" in body["fields"]["workflow"][0]["message"]
    )


# ------------------------------------------------------------------ table and CSV


@pytest.mark.django_db
def test_row_shows_components_in_ms(alice_browser, alice, people):
    bill = make_bill(
        alice,
        version=people,
        cold_load=1_234_567,
        inference=45_678,
        request=800,
        queue=1_500,
    )
    page = parse(alice_browser.get(HISTORY))
    row = dict(zip(page.header, page.rows[0], strict=True))
    assert row == {
        "Time (UTC)": "2025-03-10 12:00:00",
        "Workflow": f"People counter ({people.workflow.slug})",
        "Run": str(bill.run_id),
        "Start": "cold",
        "Request (ms)": "0.800",
        "Queue (ms)": "1.500",
        "Compile (ms)": "1.200",
        "Cold load (ms)": "1234.567",
        "Preprocess (ms)": "2.100",
        "Inference (ms)": "45.678",
        "Postprocess (ms)": "0.900",
        "Blocks (ms)": "3.000",
        "Serialization (ms)": "0.350",
        "Overhead (ms)": "0.777",
        "Billed (ms)": str(bill.billed_ms),
        "Amount (µcr)": str(bill.amount_microcredits),
    }
    assert f'href="/runs/{bill.run_id}/"' in page.html
    assert f'href="/billing/runs/{bill.run_id}/"' in page.html


@pytest.mark.django_db
def test_billed_time_chart_names_its_phases(alice_browser, alice, people):
    # Each series of the chart, in the timing words of the table above it.
    make_bill(alice, version=people)
    page = parse(alice_browser.get(HISTORY))
    note = re.search(r'id="billed-time-note">(.*?)</p>', page.html, re.S)
    assert note is not None
    text = " ".join(note.group(1).split())
    assert "Model steps are preprocess, inference and postprocess" in text
    assert "other runner time is compile, blocks, serialization and overhead" in text
    assert "minimum and rounding is what the policy's minimum" in text


@pytest.mark.django_db
def test_row_of_untimed_run_has_empty_timings(alice_browser, alice, people):
    make_bill(alice, version=people, billed=False, timed=False)
    page = parse(alice_browser.get(HISTORY))
    row = dict(zip(page.header, page.rows[0], strict=True))
    assert row["Start"] == ""
    assert row["Inference (ms)"] == ""
    assert row["Request (ms)"] == ""
    assert row["Amount (µcr)"] == "0"
    assert csv_rows(alice_browser.get(EXPORT))[1][: len(page.header)] == page.rows[0]


@pytest.mark.django_db
def test_inline_run_is_named_inline(alice_browser, alice):
    make_bill(alice, version=None)
    page = parse(alice_browser.get(HISTORY))
    assert page.rows[0][page.header.index("Workflow")] == "inline definition"


@pytest.mark.django_db
def test_history_paginates_newest_first(alice_browser, alice, people):
    bills = seed_bills(alice, 120, versions=[people])
    newest_first = [str(bill.run_id) for bill in reversed(bills)]

    first = parse(alice_browser.get(HISTORY))
    run_column = first.header.index("Run")
    assert [row[run_column] for row in first.rows] == newest_first[:50]
    assert "Page 1 of 3" in first.html

    last = parse(alice_browser.get(HISTORY, {"page": 3}))
    assert [row[run_column] for row in last.rows] == newest_first[100:]


@pytest.mark.django_db
def test_pager_links_keep_filters(alice_browser, alice, people, heights):
    seed_bills(alice, 120, versions=[people, heights])
    page = parse(alice_browser.get(HISTORY, {"workflow": people.workflow_id}))
    assert f"?workflow={people.workflow_id}&amp;page=2" in page.html


@pytest.mark.django_db
def test_csv_matches_table_for_filter(alice_browser, alice, people, heights):
    token, _ = ApiToken.issue(alice, "ci")
    seed_bills(alice, 400, versions=[people, heights], tokens=[token, None])
    params = {
        "workflow": people.workflow_id,
        "token": token.pk,
        "date_from": "2025-03-11",
        "date_to": "2025-03-25",
    }

    header, table = table_rows_all_pages(alice_browser, params)
    exported = csv_rows(alice_browser.get(EXPORT, params))

    expected = Bill.objects.filter(
        owner=alice,
        run__workflow_version__workflow=people.workflow,
        run__token=token,
        created_at__date__gte=datetime.date(2025, 3, 11),
        created_at__date__lte=datetime.date(2025, 3, 25),
    ).count()
    assert expected > 50, "the filter must span several pages"
    columns = len(header)
    assert exported[0][:columns] == header
    assert exported[0][columns:] == ["Status", "Waived (reason)", "Capped at (µcr)"]
    assert [row[:columns] for row in exported[1:]] == table
    assert len(table) == expected


@pytest.mark.django_db
def test_csv_has_status_and_waive_reason(alice_browser, alice, people):
    waived = make_bill(alice, version=people, billed=False)
    billed = make_bill(alice, version=people, created_at=DAY - datetime.timedelta(1))
    rows = csv_rows(alice_browser.get(EXPORT))
    header = rows[0]
    by_run = {row[header.index("Run")]: row for row in rows[1:]}

    waived_row = by_run[str(waived.run_id)]
    assert waived_row[header.index("Status")] == "failed"
    assert waived_row[header.index("Waived (reason)")] == "runner died"
    assert waived_row[header.index("Amount (µcr)")] == "0"

    billed_row = by_run[str(billed.run_id)]
    assert billed_row[header.index("Status")] == "succeeded"
    assert billed_row[header.index("Waived (reason)")] == ""


@pytest.mark.django_db
def test_export_link_keeps_filters(alice_browser, alice, people):
    make_bill(alice, version=people)
    page = parse(
        alice_browser.get(HISTORY, {"workflow": people.workflow_id, "page": 1})
    )
    assert f'href="/billing/export.csv?workflow={people.workflow_id}"' in page.html


# ------------------------------------------------------------------ filters


@pytest.mark.django_db
@pytest.mark.parametrize("url", [EXPORT, SUMMARY])
def test_data_endpoints_reject_unknown_parameters(alice_browser, alice, people, url):
    make_bill(alice, version=people)
    # A misspelled date_from. If it were ignored, the result would cover
    # every bill.
    response = alice_browser.get(url, {"date_form": "2025-03-10", "token": "none"})

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "malformed_request"
    assert body["error_type"] == "MalformedRequest"
    assert body["context"] == "request_parsing"
    assert body["field"] == "date_form"
    assert body["message"] == (
        "unknown query parameters 'date_form'; this route takes api_key, "
        "date_from, date_to, token, workflow"
    )
    runs = alice_browser.get("/api/runs/", {"stauts": "failed"}).json()
    assert sorted(body) == sorted(runs)


@pytest.mark.django_db
def test_history_ignores_unknown_parameters(alice_browser, alice, people):
    bill = make_bill(alice, version=people)
    page = parse(alice_browser.get(HISTORY, {"utm_source": "mail"}))
    assert [row[2] for row in page.rows] == [str(bill.run_id)]
    assert "Ignored utm_source: not a filter." in page.html


@pytest.mark.django_db
def test_history_names_misspelled_filter(alice_browser, alice, people):
    make_bill(alice, version=people)
    page = parse(alice_browser.get(HISTORY, {"from": "2026-12-10", "page": 1}))
    notice = re.search(r'<p class="filter-ignored"[^>]*>([^<]*)</p>', page.html)
    assert notice is not None
    assert notice[1] == (
        "Ignored from: not a filter. The filters are date_from, date_to, "
        "token, workflow."
    )


@pytest.mark.django_db
def test_history_links_all_respond(alice_browser, alice, people, heights):
    # The page is opened with parameters it does not take. Every link on
    # it works, because the export link drops what the export rejects.
    token, key = ApiToken.issue(alice, "ci")
    seed_bills(alice, 600, versions=[people, heights], tokens=[token, None])
    params = {
        "workflow": people.workflow_id,
        "token": token.pk,
        "date_from": "2025-03-01",
        "page": 2,
        "utm_source": "mail",
        "api_key": key,
    }
    page = parse(alice_browser.get(HISTORY, params))
    assert 'rel="prev"' in page.html
    assert 'rel="next"' in page.html
    links = [
        html.unescape(link) for link in re.findall(r'href="([/?][^"]*)"', page.html)
    ]
    assert sum(link.startswith("/billing/runs/") for link in links) == 50

    for link in links:
        url = HISTORY + link if link.startswith("?") else link
        response = alice_browser.get(url, follow=True)
        assert response.status_code == 200, (url, response.content[:300])

    export = re.search(r'id="billing-export" href="([^"]*)"', page.html)[1]
    assert html.unescape(export) == (
        f"/billing/export.csv?date_from=2025-03-01&workflow={people.workflow_id}"
        f"&token={token.pk}"
    )


@pytest.mark.django_db
def test_date_filter_includes_whole_end_day(alice_browser, alice, people):
    before = make_bill(
        alice,
        version=people,
        created_at=datetime.datetime(2025, 3, 9, 23, 59, 59, tzinfo=datetime.UTC),
    )
    first = make_bill(
        alice,
        version=people,
        created_at=datetime.datetime(2025, 3, 10, 0, 0, tzinfo=datetime.UTC),
    )
    last = make_bill(
        alice,
        version=people,
        created_at=datetime.datetime(2025, 3, 11, 23, 59, 59, tzinfo=datetime.UTC),
    )
    after = make_bill(
        alice,
        version=people,
        created_at=datetime.datetime(2025, 3, 12, 0, 0, tzinfo=datetime.UTC),
    )
    params = {"date_from": "2025-03-10", "date_to": "2025-03-11"}

    exported = csv_rows(alice_browser.get(EXPORT, params))
    run_ids = {row[2] for row in exported[1:]}
    assert run_ids == {str(first.run_id), str(last.run_id)}
    assert str(before.run_id) not in run_ids
    assert str(after.run_id) not in run_ids


@pytest.mark.django_db
def test_date_filter_open_ended(alice_browser, alice, people):
    old = make_bill(alice, version=people, created_at=DAY)
    new = make_bill(alice, version=people, created_at=DAY + datetime.timedelta(days=5))
    since = csv_rows(alice_browser.get(EXPORT, {"date_from": "2025-03-12"}))
    until = csv_rows(alice_browser.get(EXPORT, {"date_to": "2025-03-12"}))
    assert [row[2] for row in since[1:]] == [str(new.run_id)]
    assert [row[2] for row in until[1:]] == [str(old.run_id)]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("params", "included"),
    [
        ({"date_to": "9999-12-31"}, True),
        ({"date_from": "0001-01-01", "date_to": "9999-12-31"}, True),
        ({"date_from": "9999-12-31"}, False),
        ({"date_to": "0001-01-01"}, False),
    ],
)
def test_date_filter_at_calendar_limits(alice_browser, alice, people, params, included):
    bill = make_bill(alice, version=people)
    expected = [str(bill.run_id)] if included else []

    exported = alice_browser.get(EXPORT, params)
    assert exported.status_code == 200
    assert [row[2] for row in csv_rows(exported)[1:]] == expected

    summary = alice_browser.get(SUMMARY, params)
    assert summary.status_code == 200
    assert summary.json()["totals"]["runs"] == len(expected)

    history = parse(alice_browser.get(HISTORY, params))
    assert (str(bill.run_id) in history.html) == included


@pytest.mark.django_db
def test_reversed_dates_are_rejected(alice_browser, alice, people):
    make_bill(alice, version=people)
    params = {"date_from": "2025-03-12", "date_to": "2025-03-10"}
    assert alice_browser.get(EXPORT, params).status_code == 400
    page = parse(alice_browser.get(HISTORY, params))
    assert "after the end date" in page.html
    assert page.rows == []


@pytest.mark.django_db
def test_invalid_date_is_rejected(alice_browser):
    response = alice_browser.get(SUMMARY, {"date_from": "yesterday"})
    assert response.status_code == 400
    assert "date_from" in response.json()["fields"]


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["1/2/2026", "2026-1-2", "２０２６-12-04"])
def test_date_not_in_iso_form_is_rejected(alice_browser, value):
    response = alice_browser.get(SUMMARY, {"date_from": value})
    assert response.status_code == 400
    assert "date_from" in response.json()["fields"]


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["notadate", "2026-13-45", "2026-02-30"])
def test_invalid_date_message_names_value(alice_browser, value):
    # The history page's date box looks empty for a date the browser cannot
    # read, so the message must show the value.
    expected = f"Enter a valid date as YYYY-MM-DD, not '{value}'."
    response = alice_browser.get(SUMMARY, {"date_from": value})
    assert response.status_code == 400
    messages = [error["message"] for error in response.json()["fields"]["date_from"]]
    assert messages == [expected]
    page = parse(alice_browser.get(HISTORY, {"date_from": value}))
    assert html.escape(expected) in page.html
    # A date input cannot hold the value, and Chromium logs a console
    # warning when the page sets it, so the input is left empty.
    date_input = re.search(r'<input[^>]*name="date_from"[^>]*>', page.html)
    assert date_input is not None
    assert "value=" not in date_input.group(0)
    assert 'type="date"' in date_input.group(0)


@pytest.mark.django_db
def test_valid_date_stays_in_its_input(alice_browser):
    page = parse(alice_browser.get(HISTORY, {"date_from": "2026-02-28"}))
    date_input = re.search(r'<input[^>]*name="date_from"[^>]*>', page.html)
    assert date_input is not None
    assert 'value="2026-02-28"' in date_input.group(0)


@pytest.mark.django_db
def test_csv_cells_never_start_formulas(alice_browser, alice):
    name = '=HYPERLINK("http://example.invalid/?x="&A1,"open")'
    workflow = Workflow.create_with_version(alice, name, image_height())
    make_bill(alice, version=workflow.versions.get())

    header, row = csv_rows(alice_browser.get(EXPORT))
    assert row[header.index("Workflow")] == f"'{name} ({workflow.slug})"


@pytest.mark.django_db
def test_workflow_filter_tells_equal_names_apart(alice_browser, alice):
    Workflow.create_with_version(alice, "Same", image_height())
    Workflow.create_with_version(alice, "Same", image_height())

    page = alice_browser.get(HISTORY).content.decode()
    assert "Same (same)" in page
    assert "Same (same-2)" in page


@pytest.mark.django_db
def test_workflow_filter(alice_browser, alice, people, heights):
    counted = make_bill(alice, version=people)
    make_bill(alice, version=heights)
    inline = make_bill(alice, version=None)

    by_workflow = csv_rows(alice_browser.get(EXPORT, {"workflow": people.workflow_id}))
    assert [row[2] for row in by_workflow[1:]] == [str(counted.run_id)]
    inline_only = csv_rows(alice_browser.get(EXPORT, {"workflow": "inline"}))
    assert [row[2] for row in inline_only[1:]] == [str(inline.run_id)]


@pytest.mark.django_db
def test_token_filter(alice_browser, alice, people):
    laptop, _ = ApiToken.issue(alice, "laptop")
    server, _ = ApiToken.issue(alice, "server")
    server.revoke()
    from_laptop = make_bill(alice, version=people, token=laptop)
    from_server = make_bill(alice, version=people, token=server)
    from_browser = make_bill(alice, version=people, token=None)

    for token, bill in [
        (laptop.pk, from_laptop),
        (server.pk, from_server),
        ("none", from_browser),
    ]:
        exported = csv_rows(alice_browser.get(EXPORT, {"token": token}))
        assert [row[2] for row in exported[1:]] == [str(bill.run_id)], token

    page = parse(alice_browser.get(HISTORY))
    assert "server (" in page.html  # revoked tokens stay selectable


@pytest.mark.django_db
def test_summary_follows_filters(alice_browser, alice, people, heights):
    seed_bills(alice, 80, versions=[people, heights])
    summary = alice_browser.get(SUMMARY, {"workflow": heights.workflow_id}).json()
    bills = Bill.objects.filter(
        owner=alice, run__workflow_version__workflow=heights.workflow
    )
    assert summary["totals"]["runs"] == bills.count()
    assert summary["totals"]["amount_microcredits"] == sum(
        bill.amount_microcredits for bill in bills
    )
    assert {entry["workflow"] for entry in summary["latency"]} == {
        f"Image heights ({heights.workflow.slug})"
    }


# ------------------------------------------------------------------ chart data


@pytest.mark.django_db
def test_chart_totals_equal_bill_sums(alice_browser, alice, bob, people, heights):
    seed_bills(alice, 300, versions=[people, heights, None])
    seed_bills(bob, 20, versions=[version_of(bob, "Bob's workflow")], seed=3)
    summary = alice_browser.get(SUMMARY).json()
    bills = list(Bill.objects.filter(owner=alice).select_related("run"))
    billed = [bill for bill in bills if bill.billed]
    timed = [bill for bill in bills if bill.run.total_us is not None]
    assert len(bills) == 300
    assert len(billed) < len(bills), "the seed must include waived bills"
    assert len(timed) < len(bills), "the seed must include untimed runs"

    totals = summary["totals"]
    assert totals["runs"] == len(bills)
    assert totals["amount_microcredits"] == sum(b.amount_microcredits for b in bills)
    assert totals["billed_ms"] == sum(b.billed_ms for b in bills)
    assert totals["billable_us"] == sum(b.billable_us for b in billed)
    assert totals["waived_runs"] == len(bills) - len(billed)

    days = summary["days"]
    assert sum(days["runs"]) == len(bills)
    assert sum(days["amount_microcredits"]) == totals["amount_microcredits"]

    split = summary["billed_time"]
    assert split["total_us"] == sum(b.billed_ms * 1000 for b in bills)
    assert split["cold_load_us"] == sum(b.components["cold_load"] for b in billed)
    assert split["model_steps_us"] == sum(
        b.components["preprocess"]
        + b.components["inference"]
        + b.components["postprocess"]
        for b in billed
    )
    assert split["rounding_us"] == sum(
        b.billed_ms * 1000 - b.billable_us for b in billed
    )
    for part in ("cold_load_us", "model_steps_us", "other_us", "rounding_us"):
        assert sum(days[part]) == split[part], part
    assert (
        split["cold_load_us"]
        + split["model_steps_us"]
        + split["other_us"]
        + split["rounding_us"]
    ) == split["total_us"]

    starts = summary["starts"]
    assert starts["cold"]["runs"] == sum(1 for b in timed if b.run.cold)
    assert starts["hot"]["runs"] == sum(1 for b in timed if not b.run.cold)
    assert starts["no_model"]["runs"] == 0
    assert starts["no_timing"]["runs"] == len(bills) - len(timed)
    assert (
        sum(kind["amount_microcredits"] for kind in starts.values())
        == (totals["amount_microcredits"])
    )

    succeeded = [bill for bill in timed if bill.run.status == Run.Status.SUCCEEDED]
    assert len(succeeded) < len(timed), "the seed must include timed failed runs"
    assert sum(entry["runs"] for entry in summary["latency"]) == len(succeeded)


@pytest.mark.django_db
def test_chart_days_equal_bill_sums_per_day(alice_browser, alice, people):
    bills = seed_bills(alice, 200, versions=[people])
    days = alice_browser.get(SUMMARY).json()["days"]
    amount_per_day: dict[str, int] = defaultdict(int)
    runs_per_day: dict[str, int] = defaultdict(int)
    for bill in bills:
        amount_per_day[bill.created_at.date().isoformat()] += bill.amount_microcredits
        runs_per_day[bill.created_at.date().isoformat()] += 1

    assert days["labels"][0] == min(amount_per_day)
    assert days["labels"][-1] == max(amount_per_day)
    for index, label in enumerate(days["labels"]):
        assert days["amount_microcredits"][index] == amount_per_day.get(label, 0), label
        assert days["runs"][index] == runs_per_day.get(label, 0), label


@pytest.mark.django_db
def test_chart_days_fill_gaps_with_zeros(alice_browser, alice, people):
    make_bill(alice, version=people, created_at=DAY)
    make_bill(alice, version=people, created_at=DAY + datetime.timedelta(days=3))
    days = alice_browser.get(SUMMARY).json()["days"]
    assert days["labels"] == ["2025-03-10", "2025-03-11", "2025-03-12", "2025-03-13"]
    assert days["runs"] == [1, 0, 0, 1]


@pytest.mark.django_db
def test_latency_percentiles_per_workflow(alice_browser, alice, people, heights):
    seed_bills(alice, 150, versions=[people, heights, None])
    latency = alice_browser.get(SUMMARY).json()["latency"]
    expected: dict[str, list[int]] = defaultdict(list)
    for run in Run.objects.filter(
        owner=alice, total_us__isnull=False, status=Run.Status.SUCCEEDED
    ).select_related("workflow_version__workflow"):
        workflow = run.workflow_version.workflow if run.workflow_version else None
        name = f"{workflow.name} ({workflow.slug})" if workflow else "inline definition"
        expected[name].append(run.total_us)

    assert {entry["workflow"] for entry in latency} == set(expected)
    for entry in latency:
        values = expected[entry["workflow"]]
        assert entry["runs"] == len(values)
        for percentile in (50, 90, 99):
            assert entry[f"p{percentile}_us"] == nearest_rank(values, percentile), (
                entry["workflow"],
                percentile,
            )


@pytest.mark.django_db
def test_latency_chart_empty_without_success(alice_browser, alice, people):
    # A failed run has no latency, so the page draws no empty latency axes.
    make_bill(alice, version=people, billed=False)
    page = parse(alice_browser.get(HISTORY))
    assert "chart-daily" in page.html
    assert 'id="chart-latency"' not in page.html
    assert "no latency to show" in page.texts["latency-empty"]


@pytest.mark.django_db
def test_latency_chart_drawn_with_success(alice_browser, alice, people):
    make_bill(alice, version=people)
    page = parse(alice_browser.get(HISTORY))
    assert 'id="chart-latency"' in page.html
    assert "latency-empty" not in page.texts


@pytest.mark.django_db
def test_page_embeds_same_chart_data(alice_browser, alice, people):
    seed_bills(alice, 30, versions=[people])
    page = parse(alice_browser.get(HISTORY))
    embedded = json.loads(page.texts["billing-summary"])
    assert embedded == alice_browser.get(SUMMARY).json()
    assert "vendor/chartjs/chart.umd.min.js" in page.html
    for canvas in ("chart-daily", "chart-billed-time", "chart-latency", "chart-starts"):
        assert f'id="{canvas}"' in page.html


@pytest.mark.django_db
def test_empty_history(alice_browser):
    page = parse(alice_browser.get(HISTORY))
    assert "No bills match these filters." in page.html
    assert "chart-daily" not in page.html
    summary = alice_browser.get(SUMMARY).json()
    assert summary["totals"]["runs"] == 0
    assert summary["days"]["labels"] == []
    assert summary["latency"] == []


# ------------------------------------------------------------------ query bounds


def count_queries(client, url: str, params: dict | None = None) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, params or {})
    assert response.status_code == 200
    return len(queries)


@pytest.mark.django_db
def test_query_count_does_not_grow_with_rows(
    alice_browser, alice, people, heights, django_assert_max_num_queries
):
    token, _ = ApiToken.issue(alice, "ci")
    bills = seed_bills(alice, 5, versions=[people, heights, None], tokens=[token, None])
    make_bill(alice, version=people, token=token)  # so the filtered page has rows
    explain = reverse("bill-explain", args=[bills[0].run_id])
    pages = [
        (HISTORY, {}),
        (HISTORY, {"page": 2}),
        (EXPORT, {}),
        (SUMMARY, {}),
        (HISTORY, {"workflow": people.workflow_id, "token": token.pk}),
        (explain, {}),
    ]
    few = [count_queries(alice_browser, url, params) for url, params in pages]

    seed_bills(
        alice, 400, versions=[people, heights, None], tokens=[token, None], seed=11
    )
    many = [count_queries(alice_browser, url, params) for url, params in pages]
    assert many == few

    for url, params in pages:
        with django_assert_max_num_queries(10):
            alice_browser.get(url, params)


# ------------------------------------------------------------------ explain page


@pytest.mark.django_db
def test_explain_cold_run(alice_browser, alice, people):
    bill = make_bill(alice, version=people, cold_load=1_500_000, inference=30_000)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))

    assert page.texts["bill-amount"] == str(bill.amount_microcredits)
    assert page.texts["bill-formula"] == bill.formula

    hot_breakdown = {
        "components": {**bill.components, "cold_load": 0},
        "runner_total": bill.billable_us - 1_500_000,
    }
    hot = POLICY.bill(hot_breakdown)
    assert page.texts["bill-hot-amount"] == str(hot.amount_microcredits)
    assert page.texts["bill-cold-cost"] == str(
        bill.amount_microcredits - hot.amount_microcredits
    )
    # 1539 ms cold against 39 ms hot, which the 100 ms minimum raises to 100 ms.
    assert bill.amount_microcredits - hot.amount_microcredits == 3078 - 200
    assert page.texts["bill-hot-formula"] == hot.formula
    assert "the amount on the bill" in page.texts["bill-check"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "formula",
    [
        "ceil(5)",
        "amount_microcredits = ceil(",
        "amount_microcredits = min()",
        "amount_microcredits = ceil(1, 2)",
        "amount_microcredits = 5 / 0",
        "amount_microcredits = True",
        "amount_microcredits = " + "1 + " * 5000 + "1",
    ],
)
def test_explain_malformed_formula_not_evaluated(alice_browser, alice, people, formula):
    bill = make_bill(alice, version=people)
    Bill.objects.filter(pk=bill.pk).update(formula=formula)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert page.texts["bill-check"] == "The stored formula could not be evaluated."


@pytest.mark.django_db
def test_explain_steps_fill_in_numbers(alice_browser, alice, people):
    bill = make_bill(alice, version=people, inference=95_000)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    steps = page.texts["bill-steps"]
    assert f"ceil({bill.billable_us} / 1000)" in steps
    assert f"max({-(-bill.billable_us // 1000)}, 100)" in steps
    assert f"{bill.billed_ms} × 2000 / 1000" in steps
    assert f"= {bill.amount_microcredits} µcr" in steps


@pytest.mark.django_db
def test_explain_hot_run_costs_the_same(alice_browser, alice, people):
    bill = make_bill(alice, version=people, cold_load=0)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert page.texts["bill-hot-amount"] == str(bill.amount_microcredits)
    assert page.texts["bill-cold-cost"] == "0"


@pytest.mark.django_db
def test_explain_says_cap_absorbed_cold_cost(alice_browser, alice, people):
    # 529 ms billed cold is 1,058 µcr, 100 ms hot is 200 µcr, and the cap
    # of 600 µcr lowers only the cold price.
    bill = make_bill(alice, version=people, cold_load=500_000)
    line = POLICY.bill(bill.run.breakdown, 600)
    Run.objects.filter(pk=bill.run_id).update(max_price_microcredits=600)
    Bill.objects.filter(pk=bill.pk).update(
        amount_microcredits=line.amount_microcredits,
        formula=line.formula,
        capped=line.capped,
    )

    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))

    assert page.texts["bill-cold-cost"] == "400"
    assert page.texts["bill-cold-capped"] == (
        "Without the run's price cap of 600 µcr, it would have added 858 µcr: "
        "the platform absorbed the difference."
    )


@pytest.mark.django_db
def test_explain_uncapped_bill_has_no_cap_note(alice_browser, alice, people):
    bill = make_bill(alice, version=people, cold_load=500_000)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert "bill-cold-capped" not in page.texts


@pytest.mark.django_db
def test_explain_minimum_hides_cold_cost(alice_browser, alice, people):
    # 60 ms of cold load in a 66 ms run: cold and hot prices both hit the
    # 100 ms minimum.
    bill = make_bill(alice, version=people, cold_load=60_000, inference=1_000, blocks=0)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert bill.billed_ms == 100
    assert page.texts["bill-cold-cost"] == "0"


@pytest.mark.django_db
def test_explain_shows_phase_breakdown(alice_browser, alice, people):
    bill = make_bill(alice, version=people, cold_load=500_000)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    breakdown = page.texts["bill-breakdown"]
    assert "Cold load" in breakdown
    assert "500.000" in breakdown
    assert "var(--phase-cold_load)" in page.html
    request_row = breakdown.split("Request", 1)[1].split("Queue", 1)[0]
    assert request_row.split()[-1] == "no"  # request and queue are not billed


@pytest.mark.django_db
def test_explain_waived_bill(alice_browser, alice, people):
    bill = make_bill(alice, version=people, billed=False, timed=False)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert page.texts["bill-amount"] == "0"
    assert page.texts["bill-formula"] == bill.formula
    assert "Not billed: runner died." in page.html
    assert "bill-hot" not in page.texts
    assert "the amount on the bill" in page.texts["bill-check"]
    status = page.texts["bill-run-status"]
    assert "not billed: runner died" in status
    assert "billed 2025" not in status


@pytest.mark.django_db
def test_explain_untimed_run_names_its_runner(alice_browser, alice, people):
    # The runner died while it ran the run, so no breakdown was stored.
    bill = make_bill(alice, version=people, billed=False, timed=False)
    Run.objects.filter(pk=bill.run_id).update(started_at=DAY, runner_name="runner-7")
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    text = page.texts["bill-no-timing"]
    assert "ended on runner runner-7 before the runner recorded its timing" in text
    assert "before a runner started it" not in text


@pytest.mark.django_db
def test_explain_run_never_started(alice_browser, alice, people):
    bill = make_bill(alice, version=people, billed=False, timed=False)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert "before a runner started it" in page.texts["bill-no-timing"]


def model_entry(model_id: str, *, calls: int, pretrained: bool = True) -> dict:
    """Return a breakdown model entry of a hot model."""
    return {
        "model_id": model_id,
        "pretrained": pretrained,
        "cold": False,
        "cold_load": {"read": 0, "to_device": 0, "warmup": 0, "total": 0},
        "preprocess": 2_100 if calls else 0,
        "inference": 20_000 if calls else 0,
        "postprocess": 900 if calls else 0,
        "calls": calls,
    }


def failed_load_entry(model_id: str) -> dict:
    """Return a breakdown model entry of a model whose only load failed."""
    entry = model_entry(model_id, calls=0)
    cold_load = {"read": 2_092, "to_device": 0, "warmup": 0, "total": 2_092}
    return {**entry, "cold": True, "loads": 0, "cold_load": cold_load}


@pytest.mark.django_db
def test_explain_labels_failed_load(alice_browser, alice, people):
    bill = make_bill(
        alice,
        version=people,
        billed=False,
        cold_load=2_092,
        models=[failed_load_entry("people-detector")],
    )
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    models = page.html.split('class="models"', 1)[1].split("</table>", 1)[0]
    assert '<span class="badge load-failed">load failed</span>' in models
    assert ">cold<" not in models


@pytest.mark.django_db
def test_explain_waived_bill_components(alice_browser, alice, people):
    bill = make_bill(
        alice,
        version=people,
        billed=False,
        models=[model_entry("people-detector", calls=0)],
    )
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert "not billed: runner died" in page.texts["bill-run-status"]
    breakdown = page.texts["bill-breakdown"]
    compile_row = breakdown.split("Compile", 1)[1].split("Cold load", 1)[0]
    assert compile_row.split()[-1] == "waived"
    assert "yes" not in breakdown
    models = page.html.split('class="models"', 1)[1].split("</table>", 1)[0]
    assert "not called" in models
    assert ">hot<" not in models


@pytest.mark.django_db
def test_run_without_model_is_no_model(alice_browser, alice, heights):
    bill = make_bill(alice, version=heights, models=[])
    page = parse(alice_browser.get(HISTORY))
    row = dict(zip(page.header, page.rows[0], strict=True))
    assert row["Start"] == "no model"
    assert '<span class="badge no-model">no model</span>' in page.html

    starts = alice_browser.get(SUMMARY).json()["starts"]
    assert starts["no_model"]["runs"] == 1
    assert starts["hot"]["runs"] == 0

    explain = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert '<span class="badge no-model">no model</span>' in explain.html
    assert 'class="badge hot"' not in explain.html


@pytest.mark.django_db
def test_uncalled_model_is_no_model(alice_browser, alice, people):
    make_bill(alice, version=people, models=[model_entry("people-detector", calls=0)])
    page = parse(alice_browser.get(HISTORY))
    row = dict(zip(page.header, page.rows[0], strict=True))
    assert row["Start"] == "no model"


@pytest.mark.django_db
def test_untrained_model_is_marked(alice_browser, alice, people):
    bill = make_bill(
        alice,
        version=people,
        models=[model_entry("yolov8n.yaml", calls=1, pretrained=False)],
    )
    page = parse(alice_browser.get(HISTORY))
    start = page.rows[0][page.header.index("Start")]
    assert start.split() == ["hot", "untrained"]
    assert "Untrained architecture (random weights): yolov8n.yaml" in page.html

    explain = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    models = explain.html.split('class="models"', 1)[1].split("</table>", 1)[0]
    assert '<code>yolov8n.yaml</code> <span class="badge untrained"' in models


@pytest.mark.django_db
def test_pretrained_model_unmarked(alice_browser, alice, people):
    bill = make_bill(alice, version=people)
    page = parse(alice_browser.get(HISTORY))
    assert "badge untrained" not in page.html
    explain = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    assert "badge untrained" not in explain.html


@pytest.mark.django_db
def test_waived_row_title_gives_reason(alice_browser, alice, people):
    make_bill(alice, version=people, billed=False)
    page = parse(alice_browser.get(HISTORY))
    assert 'class="waived" title="Not billed: runner died"' in page.html


@pytest.mark.django_db
def test_admin_cannot_delete_bills_or_runs(client, alice, django_user_model):
    # A finished run keeps exactly one bill, and billing histories keep both.
    bill = make_bill(alice)
    admin = django_user_model.objects.create_superuser("admin", password="admin-pw")
    client.force_login(admin)
    for model, pk in (("billing/bill", bill.pk), ("runner/run", bill.run_id)):
        action = client.post(
            f"/admin/{model}/",
            {"action": "delete_selected", "_selected_action": [pk], "post": "yes"},
        )
        assert action.status_code in (200, 302), model
        assert client.get(f"/admin/{model}/{pk}/delete/").status_code == 403
    assert Bill.objects.filter(pk=bill.pk, run_id=bill.run_id).exists()
    assert Run.objects.filter(pk=bill.run_id).exists()


@pytest.mark.django_db
def test_admin_deletes_user_with_runs(client, alice, bob, people, django_user_model):
    # Deleting a user takes the user's workflows, runs and bills along.
    bill = make_bill(alice, version=people)
    bobs_bill = make_bill(bob)
    admin = django_user_model.objects.create_superuser("admin", password="admin-pw")
    client.force_login(admin)
    page = client.get(f"/admin/auth/user/{alice.pk}/delete/")
    assert page.status_code == 200
    assert "Cannot delete user" not in page.content.decode()

    response = client.post(f"/admin/auth/user/{alice.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not django_user_model.objects.filter(pk=alice.pk).exists()
    assert not Run.objects.filter(pk=bill.run_id).exists()
    assert not Bill.objects.filter(pk=bill.pk).exists()
    assert not Workflow.objects.filter(pk=people.workflow_id).exists()
    assert Bill.objects.filter(pk=bobs_bill.pk, run_id=bobs_bill.run_id).exists()


def test_failed_model_load_is_labelled_load_failed(runner, client, alice, settings):
    # Random bytes in the model directory: the runner reads them as weights
    # only when a run needs them, and the run fails with a waived bill.
    from pathlib import Path

    from tests.conftest import start_cli_run
    from tests.definitions import detection

    weights = Path(settings.GLASSBOX["MODEL_DIR"]) / "random-bytes.pt"
    weights.write_bytes(random.Random(7).randbytes(4096))
    try:
        outcome = start_cli_run(alice, detection("random-bytes"), wait_s=60)
    finally:
        weights.unlink()
    error = outcome.payload["meta"]["error"]
    assert error["code"] == "model_load_failed"
    assert "not a PyTorch checkpoint" in error["message"]

    client.force_login(alice)
    page = parse(client.get(HISTORY))
    row = dict(zip(page.header, page.rows[0], strict=True))
    assert row["Start"] == "load failed"
    starts = client.get(SUMMARY).json()["starts"]
    assert starts["load_failed"]["runs"] == 1
    assert starts["no_model"]["runs"] == 0

    # The live event of the load says that it failed, for the run page.
    events = stored_events(str(outcome.run.id))
    loads = [event for event in events if event["phase"] == "cold_load"]
    assert len(loads) == 1
    assert loads[0]["failed"] is True


@pytest.mark.django_db
def test_admin_keeps_tokens_and_owners(client, alice, bob, people, django_user_model):
    token, _ = ApiToken.issue(alice, "laptop")
    token.revoke()
    admin = django_user_model.objects.create_superuser("admin", password="admin-pw")
    client.force_login(admin)

    # The change form takes a new name, and ignores a new user or revocation.
    client.post(
        f"/admin/webapp/apitoken/{token.pk}/change/",
        {"name": "renamed", "user": bob.pk, "revoked_at_0": "", "revoked_at_1": ""},
    )
    token.refresh_from_db()
    assert token.name == "renamed"
    assert token.user_id == alice.pk
    assert token.revoked_at is not None
    assert client.get(f"/admin/webapp/apitoken/{token.pk}/delete/").status_code == 403

    client.post(
        f"/admin/workflows/workflow/{people.workflow_id}/change/",
        {"name": "people", "slug": "people", "owner": bob.pk},
    )
    assert Workflow.objects.get(pk=people.workflow_id).owner_id == alice.pk


@pytest.mark.django_db
def test_history_without_bills_says_so(alice_browser, alice, people):
    html = alice_browser.get(HISTORY).content.decode()
    assert "none in this range" in html
    assert "all billed" not in html
    # Days start and end at midnight UTC, as the labels state.
    assert ">From (UTC)</label>" in html
    assert ">To (UTC)</label>" in html

    make_bill(alice, version=people)
    assert "all billed" in alice_browser.get(HISTORY).content.decode()


@pytest.mark.django_db
def test_explain_rounds_shares_once(alice_browser, alice, people):
    # 60,107 µs of 90,734 is 66.245...%: 66.2 %, though 66.25 would show 66.3.
    bill = make_bill(alice, version=people, cold_load=60_107)
    page = parse(alice_browser.get(reverse("bill-explain", args=[bill.run_id])))
    cold_row = page.texts["bill-breakdown"].split("Cold load", 1)[1]
    assert "66.2\xa0%" in cold_row.split("Preprocess", 1)[0]


@pytest.mark.django_db
def test_admin_offers_no_upload_forms(client, django_user_model):
    admin = django_user_model.objects.create_superuser("admin", password="admin-pw")
    client.force_login(admin)
    assert client.get("/admin/runner/modelupload/add/").status_code == 403
