"""Account pages: the home redirect and API tokens."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache

from webapp.handlers import allow_methods
from webapp.models import ApiToken, hash_token


@login_required
@allow_methods("GET")
def home(request):
    return redirect("workflow-list")


class LogoutView(auth_views.LogoutView):
    """Sign out, then follow a safe ``next`` or show the signed-out page.

    Django's view redirects a request whose query contains anything but a safe
    ``next`` (an offsite URL, or another parameter) to the bare logout path,
    and that path responds 405 to GET here.
    """

    def post(self, request, *args, **kwargs):
        logout(request)
        redirect_to = self.get_success_url()
        if redirect_to != request.path:
            return HttpResponseRedirect(redirect_to)
        return self.render_to_response(self.get_context_data(**kwargs))


# A new token's key reaches the page after the redirect only in this signed
# cookie. The server keeps only the key's hash.
NEW_TOKEN_COOKIE = "new_api_token"
NEW_TOKEN_SALT = "webapp.tokens.new"
# Long enough for the redirect. A browser that never follows it drops the
# key soon after.
NEW_TOKEN_COOKIE_MAX_AGE_S = 120
# Session key of the ids of new tokens whose key the page has shown.
SHOWN_TOKENS_SESSION_KEY = "shown_new_tokens"


@login_required
@allow_methods("GET", "POST")
@never_cache
def tokens(request):
    """List the user's tokens; POST creates or revokes one, then redirects.

    GET with ``?revoke=<id>`` shows the page with a confirmation for
    revoking that token. Its button sends the POST that revokes it.

    A new token's key goes to the browser in a signed, HttpOnly cookie on
    the redirect, limited to this page, and the next GET shows it once and
    deletes the cookie. The server stores no copy of the key, not even in
    the session, so a database dump does not reveal it. Reloading the page
    neither shows the key again nor creates another token, and never_cache
    keeps browsers from storing it.
    """
    if request.method == "POST":
        if request.POST.get("action") == "create":
            return _create(request)
        if request.POST.get("action") == "revoke":
            return _revoke(request, request.POST.get("token", ""))
        messages.error(request, "Unknown action: send “create” or “revoke”.")
        return _tokens_page(request, {}, status=400)
    context = {}
    if "revoke" in request.GET:
        token, error = _own_token(request, request.GET["revoke"])
        if error:
            return error
        if token.revoked_at is None:
            context["revoke_token"] = token
        else:
            messages.info(request, f"Token “{token.name}” is already revoked.")
    new_token = _new_token(request)
    if new_token:
        context.update(new_key=new_token[1], new_name=new_token[0].name)
        # Ids only: a copy of the cookie sent again shows nothing.
        shown_ids = request.session.get(SHOWN_TOKENS_SESSION_KEY, [])
        request.session[SHOWN_TOKENS_SESSION_KEY] = [*shown_ids, new_token[0].pk][-20:]
    response = _tokens_page(request, context)
    if NEW_TOKEN_COOKIE in request.COOKIES:
        response.delete_cookie(NEW_TOKEN_COOKIE, path=request.path)
    return response


def _new_token(request) -> tuple[ApiToken, str] | None:
    """Return the user's active token named by the new-token cookie, with its key."""
    key = request.get_signed_cookie(
        NEW_TOKEN_COOKIE,
        default=None,
        salt=NEW_TOKEN_SALT,
        max_age=NEW_TOKEN_COOKIE_MAX_AGE_S,
    )
    if not key:
        return None
    shown_ids = request.session.get(SHOWN_TOKENS_SESSION_KEY, [])
    token = (
        ApiToken.objects.exclude(pk__in=shown_ids)
        .filter(user=request.user, key_hash=hash_token(key), revoked_at__isnull=True)
        .first()
    )
    return (token, key) if token else None


def _create(request) -> HttpResponse:
    # Unprintable characters go: PostgreSQL cannot store U+0000.
    raw_name = request.POST.get("name", "")
    name = "".join(c for c in raw_name if c.isprintable()).strip()[:100]
    if not name:
        messages.error(request, "A token needs a name.")
        return redirect("tokens")
    _, key = ApiToken.issue(request.user, name)
    response = redirect("tokens")
    response.set_signed_cookie(
        NEW_TOKEN_COOKIE,
        key,
        salt=NEW_TOKEN_SALT,
        max_age=NEW_TOKEN_COOKIE_MAX_AGE_S,
        path=request.path,
        secure=request.is_secure() or settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite="Strict",
    )
    return response


def _tokens_page(request, context: dict, status: int = 200) -> HttpResponse:
    context["tokens"] = ApiToken.objects.filter(user=request.user)
    return render(request, "webapp/tokens.html", context, status=status)


def _own_token(
    request, token_id: str
) -> tuple[ApiToken, None] | tuple[None, HttpResponse]:
    """Return the user's token with this id, or the page with a 400 or 404 error.

    Another user's token gets the same 404 as a missing one, so the response
    does not reveal whether that id exists.
    """
    if not (token_id.isascii() and token_id.isdigit()):
        messages.error(
            request, f"Token id “{token_id}” is invalid: it must be a number."
        )
        return None, _tokens_page(request, {}, status=400)
    token = ApiToken.objects.filter(pk=int(token_id), user=request.user).first()
    if token is None:
        messages.error(request, f"Token {token_id} not found among your tokens.")
        return None, _tokens_page(request, {}, status=404)
    return token, None


def _revoke(request, token_id: str) -> HttpResponse:
    """Revoke one of the user's tokens, or show the page with a 400 or 404 error."""
    token, error = _own_token(request, token_id)
    if error:
        return error
    token.revoke()
    messages.info(request, f"Token “{token.name}” revoked.")
    return redirect("tokens")
