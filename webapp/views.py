"""Account pages: the home redirect and API tokens."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render

from webapp.models import ApiToken


@login_required
def home(request):
    return redirect("workflow-list")


@login_required
def tokens(request):
    context = {}
    if request.method == "POST":
        if request.POST.get("action") == "create":
            name = request.POST.get("name", "").strip()[:100]
            if not name:
                messages.error(request, "A token needs a name.")
            else:
                token, key = ApiToken.issue(request.user, name)
                context.update(new_key=key, new_name=token.name)
        elif request.POST.get("action") == "revoke":
            token = get_object_or_404(
                ApiToken, pk=request.POST.get("token"), user=request.user
            )
            token.revoke()
            messages.info(request, f"Token “{token.name}” revoked.")
            return redirect("tokens")
    context["tokens"] = ApiToken.objects.filter(user=request.user)
    return render(request, "webapp/tokens.html", context)
