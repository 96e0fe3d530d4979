"""Browser pages for billing: per-request history, charts, explanations."""

import csv

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpResponse, JsonResponse, QueryDict
from django.shortcuts import get_object_or_404, render
from django.views.decorators.csrf import csrf_exempt

from billing.explain import explain_bill
from billing.models import Bill
from billing.queries import (
    COLUMNS,
    CSV_COLUMNS,
    BillFilterForm,
    bill_rows,
    filtered_bills,
    summarize,
)
from webapp.authentication import login_or_token_required
from webapp.errors import json_error
from webapp.handlers import allow_methods
from webapp.requests import MalformedRequest, reject_unknown_fields

PAGE_SIZE = 50

# The query parameters that the CSV export and the chart data take. Clients
# may send their key as api_key.
DATA_PARAMETERS = set(BillFilterForm.base_fields) | {"api_key"}


# The query parameters of the history page: the filters and the page number.
PAGE_PARAMETERS = set(BillFilterForm.base_fields) | {"page"}


@login_required
@allow_methods("GET")
def history(request):
    form = BillFilterForm(request.GET, user=request.user)
    context = {
        "form": form,
        "columns": COLUMNS,
        "filters_valid": form.is_valid(),
        # Links with tracking parameters still open the page, but a
        # misspelled filter (?from=...) must not pass for a filtered list.
        "ignored_parameters": sorted(set(request.GET) - PAGE_PARAMETERS),
        "filter_names": sorted(BillFilterForm.base_fields),
    }
    if context["filters_valid"]:
        bills = filtered_bills(request.user, form.cleaned_data)
        page = Paginator(bills, PAGE_SIZE).get_page(request.GET.get("page"))
        context.update(
            page=page,
            rows=list(bill_rows(page.object_list)),
            summary=summarize(bills),
            export_query=filter_query(request.GET),
        )
    return render(request, "billing/history.html", context)


def filter_query(query: QueryDict) -> str:
    """Return the filter parameters of ``query`` as a query string.

    The export link carries only these, because the export rejects other
    parameters, such as ``page``. It also keeps an ``api_key`` in the page's
    URL out of the link.
    """
    filters = QueryDict(mutable=True)
    for name in BillFilterForm.base_fields:
        if name in query:
            filters.setlist(name, query.getlist(name))
    return filters.urlencode()


def _unknown_parameters(request) -> JsonResponse | None:
    # A misspelled filter (?date_form=...) would export every bill.
    try:
        reject_unknown_fields(
            request.GET, DATA_PARAMETERS, "query parameters", "this route"
        )
    except MalformedRequest as error:
        return JsonResponse(error.to_dict(), status=error.status)
    return None


def _invalid_filters(form: BillFilterForm) -> HttpResponse:
    fields = form.errors.get_json_data()
    return json_error(
        "invalid filters: " + ", ".join(sorted(fields)),
        "invalid_filters",
        400,
        context="request_parsing",
        error_type="ValidationError",
        fields=fields,
        hint="Dates are YYYY-MM-DD; workflow and token are ids of your own.",
    )


def _options(name: str, renders: str) -> dict:
    """Return what OPTIONS returns, in the shape of the API views' metadata."""
    return {"name": name, "description": "", "renders": [renders], "parses": []}


# Read-only, and sent with API keys, which carry no CSRF token: exempt, so
# that another method gets the JSON 405 rather than the CSRF check's HTML 403.
@csrf_exempt
@login_or_token_required
@allow_methods("GET", options=_options("Billing Export", "text/csv"))
def export_csv(request):
    """Return every row that matches the filters, with the table's columns,
    the run's status and, for a waived bill, the reason.

    The response is built in memory rather than streamed, because under ASGI
    (daphne) Django 5.2 reads a synchronous streaming iterator into a list
    before sending it anyway.
    """
    rejected = _unknown_parameters(request)
    if rejected is not None:
        return rejected
    form = BillFilterForm(request.GET, user=request.user)
    if not form.is_valid():
        return _invalid_filters(form)
    bills = filtered_bills(request.user, form.cleaned_data)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="billing.csv"'
    writer = csv.writer(response)
    writer.writerow([column.header for column in CSV_COLUMNS])
    for row in bill_rows(bills.iterator(chunk_size=1000), CSV_COLUMNS):
        writer.writerow([spreadsheet_safe(value) for value in row.values])
    return response


def spreadsheet_safe(value):
    """Return ``value`` so that a spreadsheet shows it as text, never as a formula.

    Workflow and token names are the user's own text. A cell that starts with
    one of =, +, -, @, tab or carriage return runs as a formula when the CSV
    is opened in a spreadsheet, so such a string gets a leading apostrophe.
    Numbers are left as they are.
    """
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return value


@csrf_exempt
@login_or_token_required
@allow_methods("GET", options=_options("Billing Summary", "application/json"))
def summary_json(request):
    """Return the chart data for the filters; the history page embeds the same."""
    rejected = _unknown_parameters(request)
    if rejected is not None:
        return rejected
    form = BillFilterForm(request.GET, user=request.user)
    if not form.is_valid():
        return _invalid_filters(form)
    return JsonResponse(summarize(filtered_bills(request.user, form.cleaned_data)))


@login_required
@allow_methods("GET")
def explain(request, run_id):
    bill = get_object_or_404(
        Bill.objects.select_related("run__workflow_version__workflow"),
        run_id=run_id,
        owner=request.user,
    )
    return render(request, "billing/explain.html", {"explanation": explain_bill(bill)})
