"""Keep API keys out of the web servers' logs.

Clients may send a key as an ``api_key`` query parameter, and request lines
reach three logs. gunicorn's access log format leaves out the query string,
but a key may be sent in the path. gunicorn's warnings about malformed
requests quote the whole line, and so does daphne's access log. All three
go through redact_api_keys, and so does Django's own logging.
"""

import logging
import re
from urllib.parse import unquote

from daphne.access import AccessLogGenerator
from gunicorn.glogging import Logger

from webapp.api_keys import TOKEN_PREFIX

_SECRETS = re.compile(
    rf"(?P<parameter>api_key=)[^&\s'\"]*|{re.escape(TOKEN_PREFIX)}[A-Za-z0-9_-]+",
    re.IGNORECASE,
)


def redact_api_keys(text: str) -> str:
    """Replace ``api_key=`` values and anything shaped like a glassbox key.

    The text is percent-decoded first, as Django decodes paths and query
    strings, so ``api%5Fkey=gbx%5F...`` is found too. Characters that are
    not printable after decoding are written as escapes, so a decoded line
    break cannot start a forged log line.
    """
    decoded = unquote(text, errors="backslashreplace")
    redacted = _SECRETS.sub(
        lambda match: (match.group("parameter") or "") + "[redacted]", decoded
    )
    if redacted.isprintable():
        return redacted
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode()
        for char in redacted
    )


class RedactApiKeys(logging.Filter):
    """Redact a record's message and its traceback, which may quote a key."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_api_keys(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text once it is set.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for name in ("exc_text", "stack_info"):
            text = getattr(record, name, None)
            if text:
                lines = text.split("\n")
                setattr(record, name, "\n".join(map(redact_api_keys, lines)))
        return True


# Maximum length of a message that WithoutTraceback keeps whole.
MAX_MESSAGE_CHARS = 300


class WithoutTraceback(logging.Filter):
    """Drop a record's traceback and log it as a warning.

    Django logs a request with a disallowed Host header at ERROR with the
    traceback of its DisallowedHost exception, about 40 lines for a request
    that anyone can send. The message alone names the host.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        # The message quotes the header twice, and a header can be 8 kB.
        message = record.getMessage()
        if len(message) > MAX_MESSAGE_CHARS:
            record.msg, record.args = message[:MAX_MESSAGE_CHARS] + "…", None
        return True


class GunicornLogger(Logger):
    """gunicorn's logger, with keys redacted from its error and access logs."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        self.error_log.addFilter(RedactApiKeys())
        # The access log's format leaves out the query string, but a key
        # can be sent in the path.
        self.access_log.addFilter(RedactApiKeys())


class DaphneAccessLog(AccessLogGenerator):
    """daphne's access log, with keys redacted from each request line."""

    def write_entry(self, host, date, request, status=None, length=None, **fields):
        super().write_entry(
            host, date, redact_api_keys(request), status, length, **fields
        )
