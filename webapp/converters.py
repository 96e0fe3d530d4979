"""URL path converters shared by the HTTP and websocket routes."""

import uuid

from django.urls import register_converter


class AnyCaseUUIDConverter:
    """A UUID in either case, given to the view as a ``uuid.UUID``.

    Django's own ``uuid`` converter matches lowercase hex only, but UUIDs are
    case-insensitive (RFC 9562), and tools that print them in uppercase
    exist, so a run id pasted from one would otherwise get a 404.
    """

    regex = (
        "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    )

    def to_python(self, value: str) -> uuid.UUID:
        return uuid.UUID(value)

    def to_url(self, value) -> str:
        return str(value)


register_converter(AnyCaseUUIDConverter, "anycase_uuid")
