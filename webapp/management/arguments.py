"""Argument types for the management commands: a bad value stops at parsing.

argparse reports an ArgumentTypeError as a one-line usage error, before the
command does anything.
"""

import argparse
import math

from billing.policy import MAX_PRICE_MICROCREDITS


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_seconds(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive, finite number of seconds"
        )
    return value


def positive_microcredits(text: str) -> int:
    """Return a price cap: a whole number of micro-credits, as the API takes."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= MAX_PRICE_MICROCREDITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of micro-credits from 1 to "
            f"{MAX_PRICE_MICROCREDITS:,}"
        )
    return value


# 2**43 MiB is 2**63 bytes, one past the largest signed 64-bit integer.
MAX_MIB = 2**43


def positive_mib(text: str) -> float:
    """Return a size in MiB that is positive and whose byte count fits 64 bits."""
    value = _number(text, float)
    if not math.isfinite(value) or not 0 < value < MAX_MIB:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive number of MiB below {MAX_MIB}"
        )
    return value


def seconds_or_zero(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not zero or a positive, finite number of seconds"
        )
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def count(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not zero or more")
    return value


def port_pair(text: str) -> int:
    """Return a TCP port whose successor is a port too (the websocket server's)."""
    value = _number(text, int)
    if not 1 <= value <= 65534:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port from 1 to 65534 (the next port is used too)"
        )
    return value


def listen_host(text: str) -> str:
    """Return a non-empty ``up --host``: the URLs that ``up`` polls contain it."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "the address is empty; pass 127.0.0.1 for this machine only, or "
            "0.0.0.0 for every interface"
        )
    return text


# Runs record the runner's name and its queue ("runner.<name>") in columns
# of 200 characters.
MAX_RUNNER_NAME_CHARS = 190


def runner_name_problem(name: str, what: str = "runner name") -> str | None:
    """Return why ``name`` cannot name a runner, or None when it can."""
    symbols_removed = name.replace("-", "").replace("_", "").replace(".", "")
    if not symbols_removed:
        return f"{what} {name!r} needs at least one letter or digit"
    # isalnum alone passes letters and digits of every script, such as 'é'
    # and '²', which log lines, metric labels and shells handle less well.
    if not (symbols_removed.isascii() and symbols_removed.isalnum()):
        return (
            f"{what} {name!r} may contain only ASCII letters and digits, "
            "'-', '_' and '.'"
        )
    return None


def runner_prefix(text: str) -> str:
    """Return an ``up --runner-prefix`` whose characters make valid runner names.

    ``up`` checks the length of the names it makes, which depends on the
    number of runners.
    """
    if text == "":
        raise argparse.ArgumentTypeError(
            "the prefix is empty; leave the option out for the default"
        )
    problem = runner_name_problem(text, what="prefix")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text
