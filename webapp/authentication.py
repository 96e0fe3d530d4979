"""API token authentication accepting every place Roboflow clients put the key.

``Authorization: Bearer <key>`` or ``Token <key>``, an ``api_key`` query
parameter, or an ``api_key`` field in a JSON body (what ``inference-sdk``
sends).
"""

from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions

from webapp.models import ApiToken, hash_token
from webapp.requests import MalformedRequest, json_body, read_body


def find_api_key(request) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    if request.GET.get("api_key"):
        return request.GET["api_key"]
    if (
        request.content_type == "application/json"
        and read_body(request).lstrip()[:1] == b"{"
    ):
        key = _api_key_from_body(request)
        if key:
            return key
    return None


def _api_key_from_body(request) -> str | None:
    try:
        parsed = json_body(request)
    except MalformedRequest:
        # The view parses the body again and reports the error, once the
        # request is authenticated some other way.
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("api_key"), str):
        return parsed["api_key"]
    return None


# last_used_at is written at most this often per token, to keep a database
# write off most requests.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def authenticate_key(key: str) -> ApiToken | None:
    token = (
        ApiToken.objects.active()
        .select_related("user")
        .filter(key_hash=hash_token(key), user__is_active=True)
        .first()
    )
    if token is not None:
        now = timezone.now()
        if (
            token.last_used_at is None
            or now - token.last_used_at > LAST_USED_RESOLUTION
        ):
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
            token.last_used_at = now
    return token


class ApiTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        key = find_api_key(request._request)
        if key is None:
            return None
        token = authenticate_key(key)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        return token.user, token

    def authenticate_header(self, request) -> str:
        return "Bearer"
