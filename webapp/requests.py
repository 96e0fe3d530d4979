"""Reading request bodies once, with errors in the API's shape."""

import json
import math
import re
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser

from billing.policy import MAX_PRICE_MICROCREDITS
from workflows.blocks.base import json_type_name, shown
from workflows.errors import WorkflowError


class MalformedRequest(WorkflowError):
    code = "malformed_request"


# Multipart framing around an upload's file: boundaries, part headers and
# the model_id field. A body may exceed MAX_UPLOAD_BYTES by this much.
MULTIPART_ALLOWANCE_BYTES = 64 * 1024


def _reject_constant(name: str) -> Any:
    # Python's json module accepts NaN and Infinity, which are not JSON and
    # which the response renderer and other JSON parsers reject later.
    raise ValueError(f"{name} is not a valid JSON value")


def _finite_float(text: str) -> float:
    # A literal such as 1e400 parses as infinity, which is not JSON either.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text} is out of range for a 64-bit float")
    return value


# The default limit of int() on digit strings (sys.int_info.default_max_str_digits).
MAX_INTEGER_DIGITS = 4300


def _bounded_int(text: str) -> int:
    # int() would raise a ValueError whose message tells the server's
    # operator to call sys.set_int_max_str_digits(), which a client cannot do.
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise ValueError(
            f"an integer has {digits} digits, over the limit of {MAX_INTEGER_DIGITS}"
        )
    return int(text)


# A \uD800 to \uDFFF escape: one half of a surrogate pair.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    """Return whether a string in ``value``, as key or item, has an unpaired surrogate.

    Such strings cannot be encoded as UTF-8, so storing them or sending them
    back fails later, after a run may have been stored.
    """
    return any(_is_lone_surrogate(text) for text in _strings(value))


def _is_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _strings(value: Any):
    """Yield every string in ``value``, keys included."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            yield item


class _DuplicateKeysObject(dict):
    """A JSON object whose text named the keys in ``duplicates`` more than once."""

    duplicates: list[str]


def _object_with_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object as json.loads does, last value winning, marking repeats."""
    marked = _DuplicateKeysObject(pairs)
    seen: set[str] = set()
    duplicates: list[str] = []
    for key, _ in pairs:
        if key in seen and key not in duplicates:
            duplicates.append(key)
        seen.add(key)
    marked.duplicates = duplicates
    return marked


# Keys that a path names with a dot; others are quoted in brackets.
NAME_LIKE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def _member_path(path: str, key: str) -> str:
    """Return the path of member ``key`` of the object at ``path`` ("" for the top)."""
    if NAME_LIKE_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _first_duplicate(value: Any) -> tuple[str, str] | None:
    """Return the path of the first object with a repeated key, and that key.

    Objects are visited in document order, so the error names the first
    repeat a reader of the text meets, members of enclosing objects first.
    The walk keeps one iterator per open object or list and builds the path
    of containers only: a body of millions of members, or one nested deeply,
    then takes no more memory than its own values.
    """
    if isinstance(value, _DuplicateKeysObject):
        return "", value.duplicates[0]
    if not isinstance(value, (dict, list)):
        return None
    open_containers: list[tuple[str, Any]] = [("", _members(value))]
    while open_containers:
        path, members = open_containers[-1]
        for key, child in members:
            if not isinstance(child, (dict, list)):
                continue
            if isinstance(key, str):
                child_path = _member_path(path, key)
            else:
                child_path = f"{path}[{key}]"
            if isinstance(child, _DuplicateKeysObject):
                return child_path, child.duplicates[0]
            open_containers.append((child_path, _members(child)))
            break
        else:
            open_containers.pop()
    return None


def _members(container: dict | list):
    """Return an iterator over (key or index, value) of ``container``."""
    if isinstance(container, dict):
        return iter(container.items())
    return enumerate(container)


def parse_json(raw: bytes) -> Any:
    """Parse a UTF-8 request body as strict JSON; raise MalformedRequest if it is not.

    Python's json module would also take UTF-16 and UTF-32 bodies, and UTF-8
    with encoded surrogates, whose strings then fail when stored or sent
    back. Beyond that, the checks of ``parse_json_text`` apply.
    """
    try:
        # A leading byte order mark is allowed and dropped.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MalformedRequest(
            f"request body is not UTF-8: byte {error.start} is invalid "
            f"({error.reason})",
            context="request_parsing",
            hint="Encode the JSON body as UTF-8.",
        ) from None
    return parse_json_text(text)


def parse_json_text(text: str, what: str = "request body") -> Any:
    """Parse ``text`` as strict JSON; raise MalformedRequest naming ``what`` if not.

    Beyond what Python's json module checks, NaN, Infinity, numbers beyond a
    64-bit float, integers over MAX_INTEGER_DIGITS digits, nesting deeper
    than the parser's recursion limit, and escapes of NUL characters and of
    unpaired UTF-16 surrogates are rejected: each would fail later, when
    stored or sent back. ``text`` must hold no unpaired surrogate itself, as
    text decoded from UTF-8 does not. An object that names a key twice is
    rejected too, naming the key and where it is. Python's parser keeps the
    last value, but other parsers keep the first, so the sender may have
    meant either.
    """
    repeated = False

    def build_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        built = dict(pairs)
        if len(built) == len(pairs):
            return built
        repeated = True
        return _object_with_duplicates(pairs)

    try:
        parsed = json.loads(
            text,
            object_pairs_hook=build_object,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except ValueError as error:
        raise MalformedRequest(
            f"{what} is not valid JSON: {error}",
            context="request_parsing",
            hint="Send a JSON object with Content-Type: application/json.",
        ) from None
    except RecursionError:
        raise MalformedRequest(
            f"{what} is not valid JSON: it is nested too deeply",
            context="request_parsing",
        ) from None
    # In JSON text decoded from UTF-8, a NUL or a surrogate can only come
    # from an escape, so only text with one is walked.
    # PostgreSQL cannot store U+0000 in text or JSON, so a definition or
    # parameter with one would fail only when written.
    if "\\u0000" in text and any("\x00" in item for item in _strings(parsed)):
        raise MalformedRequest(
            f"{what} has a string with a NUL character (\\u0000), which "
            "cannot be stored",
            context="request_parsing",
            hint="Remove the \\u0000 escapes from the JSON strings.",
        )
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(parsed):
        raise MalformedRequest(
            f"{what} is not valid JSON text: it has an unpaired UTF-16 "
            "surrogate escape (\\uD800 to \\uDFFF) that encodes no character",
            context="request_parsing",
            hint="Escape characters outside the Basic Multilingual Plane as a "
            "pair of surrogates, or send them as UTF-8.",
        )
    if repeated:
        _reject_duplicate_key(parsed, what)
    return parsed


def _reject_duplicate_key(parsed: Any, what: str) -> None:
    """Raise MalformedRequest naming the first key that an object repeats."""
    found = _first_duplicate(parsed)
    assert found is not None, "a repeated key was seen while parsing"
    path, key = found
    where = f"the object at {path}" if path else "the top-level object"
    raise MalformedRequest(
        f"{what} has the key {json.dumps(key, ensure_ascii=False)} more than "
        f"once in {where}",
        context="request_parsing",
        field_name=_member_path(path, key),
        hint="Send each key once per JSON object: parsers differ on which of "
        "the repeated values they keep.",
    )


class PayloadTooLarge(WorkflowError):
    code = "payload_too_large"
    status = 413


class TooManyRequests(WorkflowError):
    """A per-user or per-process limit on concurrent work was reached."""

    code = "too_many_requests"
    status = 429
    # A waiting or queued run usually ends within seconds, freeing a place.
    headers = {"Retry-After": "1"}


class UnsupportedMediaType(WorkflowError):
    """A body this route cannot read as it was sent."""

    code = "unsupported_media_type"
    status = 415


class UnsupportedEncoding(UnsupportedMediaType):
    """A body compressed with a Content-Encoding this server does not decode."""


def read_body(django_request) -> bytes:
    """Return the raw body, or a 413 error body when it is over the limit.

    A compressed body (Content-Encoding other than identity) gets a 415:
    neither gunicorn nor Django decompresses it, and its bytes would
    otherwise be reported as invalid UTF-8.
    """
    encoding = django_request.META.get("HTTP_CONTENT_ENCODING", "").strip()
    if encoding and encoding.lower() != "identity":
        raise UnsupportedEncoding(
            f"request bodies with Content-Encoding {encoding[:50]!r} are not supported",
            context="request_parsing",
            hint="Send the body uncompressed, without a Content-Encoding header.",
        )
    try:
        return django_request.body
    except RequestDataTooBig:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raise PayloadTooLarge(
            f"request body is larger than the limit of {limit} bytes",
            context="request_parsing",
            hint="Send smaller images, or raise MAX_REQUEST_BYTES on the server.",
        ) from None


def json_body(request) -> Any:
    """Parse the JSON body once per request (authentication may have done it)."""
    django_request = getattr(request, "_request", request)
    cached = getattr(django_request, "_json_body", None)
    if cached is not None:
        return cached
    if django_request.content_type.startswith("multipart/"):
        # Django streams a multipart body into request.POST without keeping
        # it, as the CSRF check of a session request makes it do, so it could
        # not be read here, and it holds no JSON anyway.
        raise UnsupportedMediaType(
            "this route reads a JSON body, not multipart form data, which only "
            "a model upload (POST /api/models/) takes",
            context="request_parsing",
            hint="Send the body as a JSON object with Content-Type: application/json.",
        )
    raw = read_body(django_request)
    if not raw:
        return {}
    parsed = parse_json(raw)
    django_request._json_body = parsed
    return parsed


class StrictJSONParser(BaseParser):
    """DRF's parser for JSON bodies, with the checks and errors of ``parse_json``.

    DRF parses the body on its own when something reads ``request.data`` or
    ``request.POST``, as the CSRF check of session requests does. With its
    own JSON parser, browser requests got other error codes than API-key
    requests for the same body, and a deeply nested body a 500.
    """

    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None):
        return json_body(parser_context["request"])


def json_object(request) -> dict[str, Any]:
    body = json_body(request)
    if not isinstance(body, dict):
        raise MalformedRequest(
            "request body must be a JSON object", context="request_parsing"
        )
    return body


def version_number(body: dict[str, Any], key: str) -> int | None:
    """Read an optional version or revision number, sent as an integer or digits."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        # Python refuses to convert more than 4,300 digits; no version has 19.
        digits = value.lstrip("0") or "0"
        if len(digits) > 18:
            raise MalformedRequest(
                f"'{key}' must be a number of at most 18 digits, got "
                f"{len(digits)} digits",
                context="request_parsing",
                field_name=key,
            )
        value = int(digits)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MalformedRequest(
            f"'{key}' must be a positive integer, got {shown(value)}",
            context="request_parsing",
            field_name=key,
        )
    return value


# The maximum length of a price cap's JSON text that an error body echoes back.
MAX_ECHOED_CAP_CHARS = 256


class InvalidPriceCap(MalformedRequest):
    """A price cap that is not an integer in range.

    The error body echoes the value as sent, with its JSON type, unless its
    JSON text is over ``MAX_ECHOED_CAP_CHARS``. The message shows at most the
    first 80 characters of that text.
    """

    def __init__(self, key: str, value: Any):
        if isinstance(value, int) and not isinstance(value, bool):
            got = shown(value)
        else:
            got = f"{json_type_name(value)}, {shown(value)}"
        super().__init__(
            f"'{key}' must be an integer from 1 to {MAX_PRICE_MICROCREDITS:,} "
            f"micro-credits, got {got}",
            context="request_parsing",
            field_name=key,
            hint="Send the most the run may cost as a JSON integer, such as "
            "5000 for 0.005 credits, or leave the field out for no cap.",
        )
        self.key = key
        self.value = value

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        echoed = shown(self.value, limit=MAX_ECHOED_CAP_CHARS + 1)
        if len(echoed) <= MAX_ECHOED_CAP_CHARS:
            body[self.key] = self.value
        return body


def price_cap(body: dict[str, Any], key: str = "max_price_microcredits") -> int | None:
    """Read an optional price cap: a positive integer of micro-credits."""
    value = body.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 < value <= MAX_PRICE_MICROCREDITS
    ):
        raise InvalidPriceCap(key, value)
    return value


def optional_bool(body: dict[str, Any], key: str) -> bool:
    """Read an optional true/false field; a missing or null value is false."""
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MalformedRequest(
            f"'{key}' must be true or false, got {shown(value)}",
            context="request_parsing",
            field_name=key,
        )
    return value


# Strings that pydantic 2's ``bool`` accepts, compared in lower case (its
# documentation, "Booleans", version 2.3). Roboflow's inference server reads
# its request bodies with pydantic, so its clients may send these.
TRUE_STRINGS = frozenset({"1", "on", "t", "true", "y", "yes"})
FALSE_STRINGS = frozenset({"0", "off", "f", "false", "n", "no"})


def lax_bool(body: dict[str, Any], key: str) -> bool:
    """Read an optional boolean field as pydantic's ``bool`` reads it.

    A missing or null value is false. Besides true and false, the field
    takes the numbers 0 and 1, as integers or floats (0.0, -0.0, 1.0), and
    the strings of TRUE_STRINGS and FALSE_STRINGS in any case, without
    surrounding spaces. Like pydantic 2.11, it rejects other floats, such as
    0.5 and 2.0, and the string "1.0".
    """
    value = body.get(key)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return value == 1
    if isinstance(value, str) and value.lower() in TRUE_STRINGS | FALSE_STRINGS:
        return value.lower() in TRUE_STRINGS
    raise MalformedRequest(
        f"'{key}' must be true or false, got {shown(value)}; 0, 1, 0.0, 1.0 and the "
        'strings "true", "false", "yes", "no", "on", "off", "t", "f", "y", '
        '"n", "1" and "0" are accepted too',
        context="request_parsing",
        field_name=key,
    )


def string_list(body: dict[str, Any], key: str) -> list[str]:
    """Read an optional list of strings; a missing or null value is empty."""
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise MalformedRequest(
            f"'{key}' must be a list of strings, got {shown(value)}",
            context="request_parsing",
            field_name=key,
        )
    return value


def reject_unknown_fields(
    body, known: set[str], kind: str = "fields", taker: str = "this request"
) -> None:
    """Raise MalformedRequest naming the keys of ``body`` outside ``known``.

    ``kind`` names the keys in the message ("query parameters"), and
    ``taker`` what takes them ("this route").
    """
    unknown = sorted(set(body) - known)
    if unknown:
        raise MalformedRequest(
            f"unknown {kind} {', '.join(map(repr, unknown))[:300]}; {taker} "
            f"takes {', '.join(sorted(known))}",
            context="request_parsing",
            field_name=unknown[0][:100],
        )


class JSONOnlyNegotiation(DefaultContentNegotiation):
    """Answer in JSON whatever the request's Accept header names.

    DRF's own negotiation answers 406 to an Accept that names no JSON, such
    as a bare ``text/html``, and Roboflow's clients and curl read JSON in
    any case.
    """

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type
