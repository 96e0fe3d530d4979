"""Account pages: the home redirect and API tokens."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache

from webapp.models import ApiToken


@login_required
def home(request):
    return redirect("workflow-list")


# Session key of a token just created, until the page after the redirect
# shows it.
NEW_TOKEN_SESSION_KEY = "new_api_token"


@login_required
@never_cache
def tokens(request):
    """List the user's tokens; POST creates or revokes one, then redirects.

    A new token's key is kept in the session (a database row with Django's
    default session engine) only until the next GET of this page, which
    shows it once. Reloading that page neither shows the key again nor
    creates another token, and never_cache keeps browsers from storing it.
    """
    if request.method == "POST":
        if request.POST.get("action") == "create":
            return _create(request)
        if request.POST.get("action") == "revoke":
            return _revoke(request, request.POST.get("token", ""))
    new_token = request.session.pop(NEW_TOKEN_SESSION_KEY, None)
    context = {}
    if new_token:
        context.update(new_key=new_token["key"], new_name=new_token["name"])
    return _tokens_page(request, context)


def _create(request) -> HttpResponse:
    # Unprintable characters go: PostgreSQL cannot store U+0000.
    raw_name = request.POST.get("name", "")
    name = "".join(c for c in raw_name if c.isprintable()).strip()[:100]
    if not name:
        messages.error(request, "A token needs a name.")
    else:
        token, key = ApiToken.issue(request.user, name)
        request.session[NEW_TOKEN_SESSION_KEY] = {"key": key, "name": token.name}
    return redirect("tokens")


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
