"""Operations of Roboflow's query language on numbers, strings and lists.

Names, keys and results follow roboflow_workflows (the ``inference`` 1.8.3
wheel, query_language/operations). Each operation reads one kind of value
and makes another, so a chain can be checked before it runs where the
kinds are known. Where Roboflow applies a Python operator to any value (for
example ``Multiply`` on a string repeats it), these operations accept only
the kinds Roboflow declares for them and fail the step on others.
"""

import itertools
import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import regex

from workflows.blocks.base import DETECTIONS, IMAGE, json_type_name, shown
from workflows.deadline import slices_within_time_limit

# Kinds of values. Property definition adds the image and detection kinds.
NUMBER, STRING, LIST, OBJECT, BOOLEAN = "number", "string", "list", "object", "boolean"
# An encoded image, such as ConvertImageToJPEG makes. No input is bytes, and
# an output writes them as base64 text.
BYTES = "bytes"
# The kind of a value that is known only when the chain runs.
UNKNOWN = "unknown"
# Every kind, for an operation that reads any value.
ANY_KIND = (NUMBER, STRING, LIST, OBJECT, BOOLEAN, BYTES, IMAGE, DETECTIONS)

# The maximum nesting depth of SequenceApply operations. Parsing and
# evaluation recurse at each level.
MAX_APPLY_DEPTH = 16
# Roboflow's limit on the length of a SequenceJoin result, in characters.
MAX_JOINED_LENGTH = 1_000_000
# Python's str() and json write ints of at most this many decimal digits
# (sys.int_info.default_max_str_digits). Multiply, a NumberRound that rounds
# 9…9 up, or a sum could make a longer one, on which ToString, an error
# message or the run's output would then fail as an internal error rather
# than the step's.
MAX_INTEGER_DIGITS = sys.int_info.default_max_str_digits
# The smallest integer with more than MAX_INTEGER_DIGITS digits.
_TOO_MANY_DIGITS = 10**MAX_INTEGER_DIGITS
# The maximum length of a SequenceMap or SequenceApply result, in characters
# of JSON, as json_length estimates it: the default request size limit
# (64 MiB). A lookup returns its table's value itself, not a copy. So a list
# of a few kilobytes, mapped to a value of up to a definition's 256 KiB, can
# expand to terabytes of text when ToString, SequenceElementsCount or the
# run's output writes it out.
MAX_SEQUENCE_LENGTH = 64 * 1024 * 1024


class ValueOperationError(ValueError):
    """A value of a kind the operation cannot read, or a failed operation."""


@dataclass(frozen=True)
class ValueOperation:
    # Keys besides "type", with their default, or REQUIRED.
    keys: dict[str, Any]
    reads: tuple[str, ...]
    makes: str
    # Returns a problem with the operation's keys, or None.
    check: Callable[[dict], str | None]
    apply: Callable[[dict, Any], Any]


REQUIRED = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _needs(kind: str, value: Any) -> ValueOperationError:
    return ValueOperationError(f"needs {kind}, got {json_type_name(value)}")


def _number(value: Any) -> Any:
    if not _is_number(value):
        raise _needs("a number", value)
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _needs("a string", value)
    return value


def _sequence(value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _needs("a list", value)
    return value


def _no_check(operation: dict) -> str | None:
    return None


def _key_of(name: str, test: Callable[[Any], bool], expected: str):
    def check(operation: dict) -> str | None:
        # A missing key is required or takes its default, which is valid.
        if name not in operation:
            return None
        value = operation[name]
        if not test(value):
            return f"{name} must be {expected}, got {shown(value)}"
        return None

    return check


def _all(*checks: Callable[[dict], str | None]) -> Callable[[dict], str | None]:
    def check(operation: dict) -> str | None:
        for one in checks:
            problem = one(operation)
            if problem:
                return problem
        return None

    return check


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_number(value: Any) -> bool:
    """Return whether ``value`` is a number that converts to a finite float."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        # An integer past a float's range, such as 10**400, which JSON allows.
        return False


def _to_number(operation: dict, value: Any) -> Any:
    # Roboflow converts through float() first, so "2.7" cast to int is 2.
    if not isinstance(value, (int, float, str)):
        raise _needs("a number, a string or a boolean", value)
    try:
        number = float(value)
    except ValueError as error:
        raise ValueOperationError(
            f"cannot convert {shown(value)} to {operation['cast_to']}"
        ) from error
    if operation["cast_to"] == "float":
        return number
    if not math.isfinite(number):
        raise ValueOperationError(f"cannot convert {shown(value)} to int")
    return int(number)


def _round(operation: dict, value: Any) -> Any:
    number = _number(value)
    digits = operation["decimal_digits"]
    if isinstance(number, int):
        # round() of an int computes 10 ** -digits, which for digits of
        # -10**8 blocks the runner for minutes. From this bound on, 10 **
        # -digits exceeds twice the number, so the result is 0 either way.
        digits = max(digits, -(number.bit_length() // 3 + 2))
    return round(number, digits)


def _multiply(operation: dict, value: Any) -> Any:
    return _number(value) * operation["other"]


def _divide(operation: dict, value: Any) -> Any:
    if operation["other"] == 0:
        raise ValueOperationError(f"cannot divide {shown(value)} by 0")
    return _number(value) / operation["other"]


def _lookup(operation: dict, value: Any) -> Any:
    table = operation["lookup_table"]
    try:
        return table[value]
    except TypeError as error:
        raise ValueOperationError(
            f"{json_type_name(value)} cannot be looked up in lookup_table"
        ) from error
    except KeyError as error:
        raise ValueOperationError(
            f"{shown(value)} is not a key of lookup_table (keys: "
            f"{_listed_keys(table)}). JSON keys are strings, so convert numbers "
            "with ToString first"
        ) from error


# The maximum number of keys that a LookupTable miss lists in its error.
MAX_LISTED_KEYS = 20


def _listed_keys(table: dict) -> str:
    """Return the first MAX_LISTED_KEYS keys of ``table``, and how many remain."""
    if not table:
        return "none"
    listed = [shown(key) for key in itertools.islice(table, MAX_LISTED_KEYS)]
    remaining = len(table) - len(listed)
    if remaining:
        listed.append(f"and {remaining} more")
    return ", ".join(listed)


# How many items a SequenceMap or SequenceElementsCount handles between two
# reads of the clock for the run's time limit. A SequenceMap took about
# 0.27 µs per item (CPython 3.11, a 2-core AMD EPYC VM).
ITEMS_PER_TIME_CHECK = 1024


def _map(operation: dict, value: Any) -> list:
    mapped = []
    for items in slices_within_time_limit(
        _sequence(value), ITEMS_PER_TIME_CHECK, "the list of a SequenceMap"
    ):
        mapped.extend([_lookup(operation, item) for item in items])
    check_sequence_length("SequenceMap", mapped)
    return mapped


def json_length(value: Any, lengths: dict[int, int] | None = None) -> int:
    """Estimate how many characters ``value`` takes as JSON.

    Strings count without their escapes, bytes as their base64, and each
    number, boolean or null as 24 characters. A list or object that appears
    more than once counts each time but is measured once, by its id() in
    ``lengths``, so the time taken grows with the memory ``value`` takes, not
    with its JSON.
    """
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, bytes):
        # An output writes bytes as base64 text.
        return 4 * math.ceil(len(value) / 3) + 2
    if not isinstance(value, (list, tuple, dict)):
        return 24
    if lengths is None:
        lengths = {}
    known = lengths.get(id(value))
    if known is not None:
        return known
    if isinstance(value, dict):
        items = [
            len(str(key)) + 4 + json_length(item, lengths)
            for key, item in value.items()
        ]
    else:
        items = [json_length(item, lengths) + 2 for item in value]
    length = 2 + sum(items)
    lengths[id(value)] = length
    return length


def check_sequence_length(kind: str, result: list) -> None:
    """Raise ValueOperationError for a ``kind`` result over MAX_SEQUENCE_LENGTH."""
    length = json_length(result)
    if length > MAX_SEQUENCE_LENGTH:
        raise ValueOperationError(
            f"result of {len(result)} items would be about {length} characters "
            f"long as JSON; at most {MAX_SEQUENCE_LENGTH} are allowed. Each "
            "lookup repeats its value from lookup_table, so map to shorter "
            "values or shorten the list first"
        )


def _join(operation: dict, value: Any) -> str:
    items = _sequence(value)
    separator = operation.get("separator", ", ")
    parts = []
    length = 0
    # Each item is written out only while the text so far is within the
    # limit, so a long list of long items fails without building them all.
    for index, item in enumerate(items):
        part = str(item)
        length += len(part) + (len(separator) if index else 0)
        if length > MAX_JOINED_LENGTH:
            raise ValueOperationError(
                f"the joined string would be longer than {MAX_JOINED_LENGTH} "
                f"characters, the maximum: the first {index + 1} of {len(items)} "
                f"items make {length}. Join fewer or shorter items"
            )
        parts.append(part)
    return separator.join(parts)


def _aggregate(operation: dict, value: Any) -> Any:
    items = _sequence(value)
    if not items:
        raise ValueOperationError("cannot aggregate an empty list")
    mode = operation["mode"]
    if mode == "first":
        return items[0]
    if mode == "last":
        return items[-1]
    try:
        ranked = [item for item, _ in Counter(items).most_common()]
    except TypeError as error:
        raise ValueOperationError(f"{mode} needs hashable items: {error}") from error
    return ranked[0] if mode == "most_common" else ranked[-1]


NUMERIC_AGGREGATES: dict[str, Callable[[Any], Any]] = {
    "min": min,
    "max": max,
    "sum": sum,
}


def _aggregate_numbers(operation: dict, value: Any) -> Any:
    items = _sequence(value)
    if not items:
        return operation.get("neutral_value")
    function = operation["function"]
    try:
        return NUMERIC_AGGREGATES[function](items)
    except TypeError as error:
        raise ValueOperationError(f"{function} failed: {error}") from error


# Roboflow's safe_stringify (query_language/operations/utils.py in
# roboflow_workflows 0.2.13) cuts a SequenceElementsCount key that str()
# writes longer than this to its first MAX_COUNT_KEY_LENGTH characters and
# " [...]", so items that begin alike count together.
MAX_COUNT_KEY_LENGTH = 128


def _count_elements(operation: dict, value: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for items in slices_within_time_limit(
        _sequence(value), ITEMS_PER_TIME_CHECK, "the list of a SequenceElementsCount"
    ):
        for item in items:
            key = str(item)
            if len(key) > MAX_COUNT_KEY_LENGTH:
                key = key[:MAX_COUNT_KEY_LENGTH] + " [...]"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _to_json(operation: dict, value: Any) -> str:
    if not isinstance(value, dict):
        raise _needs("an object", value)
    try:
        # NaN and Infinity are not JSON, though Python's json writes them.
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueOperationError(f"failed: {error}") from error


def _to_boolean(operation: dict, value: Any) -> bool:
    return bool(_number(value))


def _sub_sequence(operation: dict, value: Any) -> str:
    # Python's slice, so the default end of -1 leaves out the last character.
    return _string(value)[operation.get("start", 0) : operation.get("end", -1)]


# Maximum seconds that one StringMatches search may take. A pattern with
# ambiguous repetition, such as ^(a|aa)+$, backtracks for a time that grows
# exponentially with the string, and re neither stops nor releases the GIL,
# so one definition could stall a web server worker (a static operand is
# evaluated when the definition compiles) or a runner for hours. The regex
# package matches as re does, with a time limit and without holding the GIL.
REGEX_TIMEOUT_S = 0.5
# The maximum seconds that all StringMatches searches in one regex_time_budget
# may take together: a step's run, or a definition's compilation. Each
# search under REGEX_TIMEOUT_S alone does not bound them, because a
# SequenceApply repeats a 0.4 s search for each item of a list.
REGEX_TOTAL_TIMEOUT_S = 5.0
# The seconds left to the searches of the current budget, or None outside one.
_regex_seconds_left: ContextVar[list[float] | None] = ContextVar(
    "regex_seconds_left", default=None
)


@contextmanager
def regex_time_budget() -> Iterator[None]:
    """Share REGEX_TOTAL_TIMEOUT_S among the StringMatches searches inside.

    Inside a budget already in place, the searches share that one.
    """
    if _regex_seconds_left.get() is not None:
        yield
        return
    token = _regex_seconds_left.set([REGEX_TOTAL_TIMEOUT_S])
    try:
        yield
    finally:
        _regex_seconds_left.reset(token)


def _matches(operation: dict, value: Any) -> bool:
    text = _string(value)
    seconds_left = _regex_seconds_left.get()
    timeout = REGEX_TIMEOUT_S
    if seconds_left is not None:
        timeout = min(timeout, seconds_left[0])
    started = time.perf_counter()
    try:
        if timeout <= 0:
            raise TimeoutError
        found = regex.search(operation["regex"], text, timeout=timeout, concurrent=True)
    except TimeoutError:
        if timeout < REGEX_TIMEOUT_S:
            raise ValueOperationError(
                f"regex {shown(operation['regex'])} was stopped on a string of "
                f"{len(text)} characters: StringMatches searches took "
                f"{REGEX_TOTAL_TIMEOUT_S} s in all, the most that a step's run "
                "or a definition's compilation may spend on them. Write a regex "
                "that backtracks less, or search fewer or shorter strings"
            ) from None
        raise ValueOperationError(
            f"regex {shown(operation['regex'])} was stopped after "
            f"{REGEX_TIMEOUT_S} s on a string of {len(text)} characters: it "
            "backtracks too much; write it without a repetition that can match "
            "the same text in more than one way, such as (a|aa)+ or (a+)+"
        ) from None
    except regex.error as error:
        raise ValueOperationError(
            f"regex {shown(operation['regex'])} cannot run: {error}"
        ) from None
    finally:
        if seconds_left is not None:
            seconds_left[0] -= time.perf_counter() - started
    return found is not None


def _regex_problem(operation: dict) -> str | None:
    regex = operation.get("regex")
    if not isinstance(regex, str):
        return f"regex must be a string, got {shown(regex)}"
    try:
        re.compile(regex)
    except re.error as error:
        return f"regex {shown(regex)} is not a valid regular expression: {error}"
    return None


def _random_number(operation: dict, value: Any) -> float:
    """Return a random float from min_value up to |max_value - min_value| more.

    As Roboflow's RandomNumber, it ignores ``value``, and when min_value
    exceeds max_value the result still starts at min_value, so min_value 1
    and max_value 0 give a number from 1 to 2. Python's random.random()
    draws it, seeded by the operating system in each runner process, so the
    result differs on every run.
    """
    low = float(operation.get("min_value", 0.0))
    high = float(operation.get("max_value", 1.0))
    if low == high:
        return low
    return low + random.random() * abs(high - low)


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[dict], str | None]:
    return _key_of(name, lambda value: value in choices, "one of " + ", ".join(choices))


VALUE_OPERATIONS: dict[str, ValueOperation] = {
    "ToNumber": ValueOperation(
        {"cast_to": REQUIRED},
        (NUMBER, STRING, BOOLEAN),
        NUMBER,
        _choice("cast_to", ("int", "float")),
        _to_number,
    ),
    "NumberRound": ValueOperation(
        {"decimal_digits": REQUIRED},
        (NUMBER,),
        NUMBER,
        _key_of("decimal_digits", _is_integer, "an integer"),
        _round,
    ),
    "Multiply": ValueOperation(
        {"other": REQUIRED},
        (NUMBER,),
        NUMBER,
        _key_of("other", _finite_number, "a number"),
        _multiply,
    ),
    "Divide": ValueOperation(
        {"other": REQUIRED},
        (NUMBER,),
        NUMBER,
        _key_of("other", _finite_number, "a number"),
        _divide,
    ),
    "ToBoolean": ValueOperation({}, (NUMBER,), BOOLEAN, _no_check, _to_boolean),
    "StringToLowerCase": ValueOperation(
        {}, (STRING,), STRING, _no_check, lambda op, value: _string(value).lower()
    ),
    "StringToUpperCase": ValueOperation(
        {}, (STRING,), STRING, _no_check, lambda op, value: _string(value).upper()
    ),
    "StringSubSequence": ValueOperation(
        {"start": 0, "end": -1},
        (STRING,),
        STRING,
        _all(
            _key_of("start", _is_integer, "an integer"),
            _key_of("end", _is_integer, "an integer"),
        ),
        _sub_sequence,
    ),
    "StringMatches": ValueOperation(
        {"regex": REQUIRED}, (STRING,), BOOLEAN, _regex_problem, _matches
    ),
    "LookupTable": ValueOperation(
        {"lookup_table": REQUIRED},
        (NUMBER, STRING, BOOLEAN),
        UNKNOWN,
        _key_of("lookup_table", lambda v: isinstance(v, dict), "an object"),
        _lookup,
    ),
    "SequenceMap": ValueOperation(
        {"lookup_table": REQUIRED},
        (LIST,),
        LIST,
        _key_of("lookup_table", lambda v: isinstance(v, dict), "an object"),
        _map,
    ),
    "SequenceJoin": ValueOperation(
        {"separator": ", "},
        (LIST,),
        STRING,
        _key_of("separator", lambda v: isinstance(v, str), "a string"),
        _join,
    ),
    "SequenceAggregate": ValueOperation(
        {"mode": REQUIRED},
        (LIST,),
        UNKNOWN,
        _choice("mode", ("first", "last", "most_common", "least_common")),
        _aggregate,
    ),
    "NumericSequenceAggregate": ValueOperation(
        {"function": REQUIRED, "neutral_value": None},
        (LIST,),
        UNKNOWN,
        _choice("function", tuple(NUMERIC_AGGREGATES)),
        _aggregate_numbers,
    ),
    "SequenceElementsCount": ValueOperation(
        {}, (LIST,), OBJECT, _no_check, _count_elements
    ),
    "ConvertDictionaryToJSON": ValueOperation(
        {}, (OBJECT,), STRING, _no_check, _to_json
    ),
    "RandomNumber": ValueOperation(
        {"min_value": 0.0, "max_value": 1.0},
        ANY_KIND,
        NUMBER,
        _all(
            _key_of("min_value", _finite_number, "a number"),
            _key_of("max_value", _finite_number, "a number"),
        ),
        _random_number,
    ),
}

# The operations whose result is not a function of their input. They run
# each time their chain is evaluated, never once for all of a filter's
# detections or at compile time.
RANDOM_OPERATIONS = frozenset({"RandomNumber"})


def value_operation_problem(operation: dict, spec: ValueOperation) -> str | None:
    """Return what is wrong with the keys of ``operation``, or None.

    ``spec`` defines the operation, such as a value of VALUE_OPERATIONS.
    """
    for key in operation:
        if key != "type" and key not in spec.keys:
            allowed = ", ".join(["type", *spec.keys])
            return (
                f"unknown key {shown(key)}; a {operation['type']} has the keys "
                f"{allowed}"
            )
    for key, default in spec.keys.items():
        if default is REQUIRED and key not in operation:
            return f'"{key}" is missing'
    return spec.check(operation)


def apply_value_operation(operation: dict, value: Any, spec: ValueOperation) -> Any:
    """Return ``value`` after ``operation``, which ``spec`` defines.

    Raises ValueOperationError when the value is of a kind the operation
    does not read, or the operation fails on it.
    """
    try:
        result = spec.apply(operation, value)
    except OverflowError as error:
        # Python's int has no bound, but a float does: 10**400 * 1.5 fails.
        raise ValueOperationError(
            f"failed on {shown(value)}: the result is out of range ({error})"
        ) from error
    if _is_integer(result) and abs(result) >= _TOO_MANY_DIGITS:
        raise ValueOperationError(
            f"failed on {shown(value)}: the result has more than "
            f"{MAX_INTEGER_DIGITS} digits, the maximum that an output may have"
        )
    return result
