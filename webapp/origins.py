"""Accept run-event websockets only from this site's own pages.

A browser sends its session cookie with a websocket handshake to any port
of the host, whatever page opened it, so the Origin header is the check. The
origin's host must be in ALLOWED_HOSTS, its scheme http or https, and its
port that of the websocket server itself (pages it served) or WEB_SERVER_PORT
(pages of the HTTP server beside it, as ``manage.py up`` runs them).
"""

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

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
    return port in page_ports(scope)


class SiteOriginValidator:
    """ASGI middleware that denies websockets whose Origin is not this site."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        origin = dict(scope.get("headers", [])).get(b"origin", b"")
        if not is_site_origin(origin.decode("latin1"), scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
