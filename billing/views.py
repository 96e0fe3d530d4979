"""Browser pages for billing: per-request history, charts, explanations."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from billing.models import Bill


@login_required
def history(request):
    bills = Bill.objects.filter(owner=request.user).select_related("run")[:100]
    return render(request, "billing/history.html", {"bills": bills})
