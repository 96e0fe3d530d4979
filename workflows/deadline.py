"""The run's time limit, checked between block calls and inside long ones.

The executor checks a run's Deadline before each block call. While a call
runs, ``current_call_deadline()`` returns the same limit, so that loops
inside the call whose length the definition or its parameters decide (a
filter's statements on each detection, a SequenceApply over a list) stop
the run too. It is a context variable, as the StringMatches time budget
is, because the query language's operations run deep below the block's
``run`` and also at compile time, where no run and no limit exist.
"""

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NoReturn

from workflows.errors import StepExecutionError


class Deadline:
    """The time by which a run's steps must end.

    The executor checks it before each block call, and the query language's
    loops check it inside a call (CallDeadline). A definition decides how
    much work a run does (steps, crops, batch size, statements, list
    lengths), so without a limit one request could hold a runner for hours.
    A call with no such loop, such as a model's call with its cold load,
    runs to its end, and the run stops before the next call.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.at_ns = time.monotonic_ns() + int(limit_s * 1e9)

    def check(self, step_name: str, call_number: int) -> None:
        """Raise StepExecutionError if the limit passed before call ``call_number``.

        ``call_number`` counts the step's calls over the whole batch, from 1.
        """
        if time.monotonic_ns() > self.at_ns:
            raise StepExecutionError(
                f"{_exceeded(self.limit_s)} and stopped before call {call_number} of "
                f"step '{step_name}', which calls its block once per image and "
                "per crop; send fewer images per run, or a workflow with fewer "
                "crops or steps",
                step=step_name,
                user_error=True,
            )

    @contextmanager
    def during_call(self, step_name: str, call_number: int) -> Iterator[None]:
        """Make this limit the one that ``current_call_deadline()`` returns."""
        token = _current_call.set(CallDeadline(self, step_name, call_number))
        try:
            yield
        finally:
            _current_call.reset(token)


class CallDeadline:
    """The run's Deadline during one block call, with the step and call it names.

    A loop compares the clock with ``at_ns`` every so many items, inline
    where its items are cheap, and calls ``stop`` once the clock is past it.
    """

    __slots__ = ("at_ns", "call_number", "limit_s", "step_name")

    def __init__(self, deadline: Deadline, step_name: str, call_number: int) -> None:
        self.at_ns = deadline.at_ns
        self.limit_s = deadline.limit_s
        self.step_name = step_name
        self.call_number = call_number

    def passed(self) -> bool:
        return time.monotonic_ns() > self.at_ns

    def stop(self, where: str) -> NoReturn:
        """Raise the run's time-limit error, saying the call stopped at ``where``.

        ``where`` names the loop's item, such as "statement
        operations[0].filter_operation.statements[2] on detection 5".
        """
        raise StepExecutionError(
            f"{_exceeded(self.limit_s)} and stopped during call "
            f"{self.call_number} of step '{self.step_name}', at {where}; send "
            "fewer images per run, or give the step less work in each call, "
            "such as fewer detections or statements, smaller zones or shorter "
            "lists",
            step=self.step_name,
            user_error=True,
        )


def _exceeded(limit_s: float) -> str:
    return f"the run's steps took longer than RUN_TIME_LIMIT_S ({limit_s:g} s)"


# The limit of the block call that runs now, or None outside a run's call.
_current_call: ContextVar[CallDeadline | None] = ContextVar(
    "current_call_deadline", default=None
)


def current_call_deadline() -> CallDeadline | None:
    """Return the time limit of the block call that runs now, or None.

    None outside a run's block call: at compile time, or when the executor
    runs a plan without a Deadline.
    """
    return _current_call.get()


def slices_within_time_limit(
    items: Sequence, size: int, what: str
) -> Iterator[Sequence]:
    """Yield ``items`` in slices of ``size``, checking the time limit before each.

    ``what`` names the list in the error, such as "the list of a
    SequenceMap". A loop over cheap items checks the clock once per slice,
    and keeps the speed of a comprehension within it.
    """
    deadline = current_call_deadline()
    for start in range(0, len(items), size):
        if deadline is not None and deadline.passed():
            deadline.stop(f"item {start} of {len(items)} of {what}")
        yield items[start : start + size]
