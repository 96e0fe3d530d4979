"""ASGI entry point: Django's HTTP views plus the run-event websockets."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
django_asgi = get_asgi_application()

import json  # noqa: E402

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from webapp.daphne_request import not_served_body  # noqa: E402
from webapp.origins import SiteOriginValidator  # noqa: E402
from webapp.routing import websocket_urlpatterns  # noqa: E402


async def not_served_here(scope, receive, send):
    """Respond 404 to an HTTP request on a server that carries only websockets."""
    content = json.dumps(not_served_body(scope["path"])).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
    ]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": content})


application = ProtocolTypeRouter(
    {
        "http": not_served_here
        if settings.GLASSBOX["WEBSOCKETS_ONLY"]
        else django_asgi,
        "websocket": SiteOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
