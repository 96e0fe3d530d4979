from channels.generic.websocket import AsyncWebsocketConsumer
from django.urls import path, re_path

from runner.consumers import CLOSE_NOT_FOUND, RunEventsConsumer
from webapp import converters  # noqa: F401 (registers anycase_uuid)


class UnknownPathConsumer(AsyncWebsocketConsumer):
    """Close websockets to paths no consumer serves, instead of raising."""

    async def connect(self):
        await self.close(code=CLOSE_NOT_FOUND)


websocket_urlpatterns = [
    path("ws/runs/<anycase_uuid:run_id>/", RunEventsConsumer.as_asgi()),
    re_path(r"", UnknownPathConsumer.as_asgi()),
]
