"""Browser pages for workflows: the list and the builder."""

from django.contrib.auth.decorators import login_required
from django.db.models import Max
from django.shortcuts import render

from workflows.models import Workflow


@login_required
def workflow_list(request):
    workflows = (Workflow.objects.filter(owner=request.user)
                 .annotate(latest=Max("versions__number")))
    return render(request, "workflows/list.html", {"workflows": workflows})
