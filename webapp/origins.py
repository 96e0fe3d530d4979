"""Accept run-event websockets only from this site's own pages.

A browser sends its session cookie with a websocket handshake to any port
of the host, whatever page opened it, so the Origin header is the check. The
origin's scheme must be http or https, its host in ALLOWED_HOSTS and the
host that the handshake's Host header names, and its port that of the
websocket server itself (pages it served) or WEB_SERVER_PORT (pages of the
HTTP server beside it, as ``manage.py up`` runs them). An origin listed in
CSRF_TRUSTED_ORIGINS is accepted as Django's CSRF check accepts it, for a
proxy that passes another Host header on.

ALLOWED_HOSTS alone is not enough: with ``*`` or ``.example.com`` there, a
page on any host, or on a sibling subdomain whose requests count as
same-site and so carry the session cookie, could open the run streams of a
signed-in user who visits it.
"""

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain

DEFAULT_PORTS = {"http": 80, "https": 443}


def page_ports(scope) -> set[int]:
    """Return the ports whose pages may open websockets on this server."""
    ports = set()
    server = scope.get("server")
    if server and server[1] is not None:
        ports.add(int(server[1]))
    if settings.GLASSBOX["WEB_SERVER_PORT"]:
        ports.add(settings.GLASSBOX["WEB_SERVER_PORT"])
    return ports


def is_site_origin(origin: str, scope) -> bool:
    try:
        parsed = urlsplit(origin)
        port = parsed.port or DEFAULT_PORTS.get(parsed.scheme)
    except ValueError:  # a port that is not a number, or out of range
        return False
    if parsed.scheme not in DEFAULT_PORTS or parsed.username is not None:
        return False
    # The host as Django reads it from a Host header: IPv6 keeps its brackets.
    host, _ = split_domain_port(parsed.netloc)
    if not host or not validate_host(host, settings.ALLOWED_HOSTS):
        return False
    if is_trusted_origin(parsed.scheme, parsed.netloc):
        return True
    # Browsers always send a Host header, so a handshake without one does
    # not come from a page and carries no victim's session cookie.
    handshake_host = _header(scope, b"host")
    if handshake_host is not None:
        if host != split_domain_port(handshake_host.lower())[0]:
            return False
    return port in page_ports(scope)


def is_trusted_origin(scheme: str, netloc: str) -> bool:
    """Return whether CSRF_TRUSTED_ORIGINS lists the origin, as Django's CSRF
    check reads it: exactly, or under a ``scheme://*.domain`` entry."""
    netloc = netloc.lower()
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        parts = urlsplit(trusted.lower())
        if parts.scheme != scheme:
            continue
        if "*" in parts.netloc:
            if is_same_domain(netloc, parts.netloc.lstrip("*")):
                return True
        elif parts.netloc == netloc:
            return True
    return False


def _header(scope, name: bytes) -> str | None:
    """Return the scope's first header called ``name``, or None without one."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin1")
    return None


class SiteOriginValidator:
    """ASGI middleware that denies websockets whose Origin is not this site."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        origin = dict(scope.get("headers", [])).get(b"origin", b"")
        if not is_site_origin(origin.decode("latin1"), scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
