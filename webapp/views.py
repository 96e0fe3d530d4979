"""Account pages: the home redirect and API tokens."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render

from webapp.models import ApiToken


@login_required
def home(request):
    return redirect("workflow-list")


@login_required
def tokens(request):
    context = {}
    if request.method == "POST":
        if request.POST.get("action") == "create":
            # Unprintable characters go: PostgreSQL cannot store U+0000.
            raw_name = request.POST.get("name", "")
            name = "".join(c for c in raw_name if c.isprintable()).strip()[:100]
            if not name:
                messages.error(request, "A token needs a name.")
            else:
                token, key = ApiToken.issue(request.user, name)
                context.update(new_key=key, new_name=token.name)
        elif request.POST.get("action") == "revoke":
            return _revoke(request, request.POST.get("token", ""))
    return _tokens_page(request, context)


def _tokens_page(request, context: dict, status: int = 200) -> HttpResponse:
    context["tokens"] = ApiToken.objects.filter(user=request.user)
    return render(request, "webapp/tokens.html", context, status=status)


def _revoke(request, token_id: str) -> HttpResponse:
    """Revoke one of the user's tokens, or show the page with a 400 or 404 error.

    Another user's token gets the same 404 as a missing one, so the response
    does not reveal whether that id exists.
    """
    if not (token_id.isascii() and token_id.isdigit()):
        messages.error(
            request, f"Token id “{token_id}” is invalid: it must be a number."
        )
        return _tokens_page(request, {}, status=400)
    token = ApiToken.objects.filter(pk=int(token_id), user=request.user).first()
    if token is None:
        messages.error(request, f"Token {token_id} not found among your tokens.")
        return _tokens_page(request, {}, status=404)
    token.revoke()
    messages.info(request, f"Token “{token.name}” revoked.")
    return redirect("tokens")
