"""API token authentication accepting every place Roboflow clients put the key.

``Authorization: Bearer <key>`` or ``Token <key>``, an ``api_key`` query
parameter, or an ``api_key`` field in a JSON body (what ``inference-sdk``
sends).
"""

import functools
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.utils import timezone
from rest_framework import authentication, exceptions

from webapp.models import ApiToken, hash_token
from webapp.requests import MalformedRequest, json_body, read_body

# Some editors and Windows tools start UTF-8 text with it; the JSON parser
# drops it too.
UTF8_BOM = b"\xef\xbb\xbf"


def find_api_key(request) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    query_keys = request.GET.getlist("api_key")
    if len(query_keys) > 1:
        # Which one would win is the query parser's choice, not the client's.
        raise MalformedRequest(
            f"api_key is given {len(query_keys)} times in the query; give it once",
            context="request_parsing",
            field_name="api_key",
        )
    if query_keys and query_keys[0]:
        return query_keys[0]
    # The views parse every body not sent as multipart form data as JSON,
    # whatever its Content-Type, so the key is read from the same bodies.
    if (
        not request.content_type.startswith("multipart/")
        and read_body(request).removeprefix(UTF8_BOM).lstrip()[:1] == b"{"
    ):
        return _api_key_from_body(request)
    return None


def _api_key_from_body(request) -> str | None:
    """Return the body's ``api_key``: None if absent, null or empty.

    A key that is not a string is returned as "", which matches no token,
    so the request fails as one with an invalid key.
    """
    # A body that looks like a JSON object but does not parse raises
    # MalformedRequest (400) here: the key may be in it, so "not
    # authenticated" would point the client at the wrong problem.
    parsed = json_body(request)
    if not isinstance(parsed, dict):
        return None
    key = parsed.get("api_key")
    if key is None or key == "":
        return None
    return key if isinstance(key, str) else ""


# last_used_at is written at most this often per token, to keep a database
# write off most requests.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@functools.cache
def _token_query() -> str:
    """SQL selecting an active token and its active user by key hash."""
    user_model = get_user_model()
    quote = connection.ops.quote_name
    columns = [f"t.{quote(f.column)}" for f in ApiToken._meta.concrete_fields]
    columns += [f"u.{quote(f.column)}" for f in user_model._meta.concrete_fields]
    return (
        f"SELECT {', '.join(columns)} "
        f"FROM {quote(ApiToken._meta.db_table)} t "
        f"JOIN {quote(user_model._meta.db_table)} u "
        f"ON u.{quote(user_model._meta.pk.column)} = t.{quote('user_id')} "
        "WHERE t.key_hash = %s AND t.revoked_at IS NULL AND u.is_active = %s"
    )


def _find_active_token(key: str) -> ApiToken | None:
    """Look the token up with one plain query.

    The ORM's version of this join took about 470 us per request on a 2-core
    machine, almost all of it building the query; this takes about 50 us.
    Nothing is cached, so a revoked token fails on its next request.
    """
    with connection.cursor() as cursor:
        cursor.execute(_token_query(), [hash_token(key), True])
        row = cursor.fetchone()
    if row is None:
        return None
    split = len(ApiToken._meta.concrete_fields)
    token = _instance(ApiToken, row[:split])
    token.user = _instance(get_user_model(), row[split:])
    return token


@functools.cache
def _converters(model) -> list[tuple]:
    """Per concrete field: the column expression and the backend's converters."""
    found = []
    for field in model._meta.concrete_fields:
        expression = field.get_col(model._meta.db_table)
        converters = connection.ops.get_db_converters(
            expression
        ) + field.get_db_converters(connection)
        found.append((expression, converters))
    return found


def _instance(model, values):
    """Build a model instance from raw column values, as the ORM would.

    The backend's converters turn raw values into Python ones (SQLite's
    datetimes into aware datetimes, for example).
    """
    converted = []
    for (expression, converters), value in zip(_converters(model), values, strict=True):
        for converter in converters:
            value = converter(value, expression, connection)
        converted.append(value)
    attnames = [f.attname for f in model._meta.concrete_fields]
    return model.from_db(connection.alias, attnames, converted)


def authenticate_key(key: str) -> ApiToken | None:
    token = _find_active_token(key)
    if token is not None:
        now = timezone.now()
        if (
            token.last_used_at is None
            or now - token.last_used_at > LAST_USED_RESOLUTION
        ):
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
            token.last_used_at = now
    return token


def login_or_token_required(view):
    """Serve a plain Django view to a signed-in user or an API token's owner.

    A key in the request wins over a session, as in the API: the view runs
    as the key's owner, and an invalid or revoked key gets a 401 error body.
    Browsers with neither are redirected to the login page, as by
    ``login_required``.
    """

    signed_in_view = login_required(view)

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            key = find_api_key(request)
        except MalformedRequest as error:
            # Outside DRF, nothing else turns it into its 400.
            from django.http import JsonResponse

            return JsonResponse(error.to_dict(), status=error.status)
        if key is not None:
            token = authenticate_key(key)
            if token is None:
                # webapp.errors imports DRF's views, which import this
                # module through DRF's settings.
                from webapp.errors import json_error

                response = json_error(
                    INVALID_KEY_MESSAGE,
                    "authentication_failed",
                    401,
                    context="request",
                    error_type="AuthenticationFailed",
                    hint=INVALID_KEY_HINT,
                )
                # As the API's 401s: HTTP requires the header with a 401.
                response["WWW-Authenticate"] = "Bearer"
                return response
            request.user = token.user
        return signed_in_view(request, *args, **kwargs)

    return wrapper


INVALID_KEY_MESSAGE = "Invalid or revoked API key."
INVALID_KEY_HINT = (
    "Send a whole, active key. The API tokens page (/tokens/) lists which keys "
    "are revoked and creates new ones, as 'manage.py createtoken USERNAME' does."
)


class InvalidApiKey(exceptions.AuthenticationFailed):
    """An API key that names no active token."""

    default_detail = INVALID_KEY_MESSAGE


class ApiTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        key = find_api_key(request._request)
        if key is None:
            return None
        token = authenticate_key(key)
        if token is None:
            raise InvalidApiKey()
        return token.user, token

    def authenticate_header(self, request) -> str:
        return "Bearer"
