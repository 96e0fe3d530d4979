"""The pixels of the images that a run's steps may create, across its batch.

The executor charges each block call's images after the call. A call that
creates many images, such as a dynamic crop with one crop per detection,
also checks the budget after each one through
``current_call_pixel_budget()``, so that it fails before it keeps them all
in memory.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from workflows.errors import StepExecutionError
from workflows.images import WorkflowImage


class PixelBudget:
    """Pixels of the images that a run's steps may create, across its batch.

    Crops and drawings are new images that a runner keeps until the run ends,
    and their number is up to the definition, so they are bounded like the
    input images.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, step_name: str, produced: Any) -> None:
        """Add the pixels of the images in ``produced``, a block call's outputs."""
        self.used += image_pixels(produced)
        if self.used > self.limit:
            raise _over_limit(self.used, self.limit, step_name, "")

    @contextmanager
    def during_call(self, step_name: str) -> Iterator[None]:
        """Make this budget the one that ``current_call_pixel_budget()`` returns."""
        token = _current_call.set(CallPixelBudget(self, step_name))
        try:
            yield
        finally:
            _current_call.reset(token)


class CallPixelBudget:
    """The run's PixelBudget during one block call, with the images made so far.

    The images are charged to the budget after the call, by the executor,
    so ``check`` only counts them against it.
    """

    def __init__(self, budget: PixelBudget, step_name: str) -> None:
        self.budget = budget
        self.step_name = step_name
        self.created = 0

    def check(self, image: WorkflowImage, where: str) -> None:
        """Count ``image`` as made by this call; raise if the budget is now over.

        ``where`` names the image in the error, such as "crop 12 of 300".
        """
        self.created += image.width * image.height
        used = self.budget.used + self.created
        if used > self.budget.limit:
            raise _over_limit(used, self.budget.limit, self.step_name, f", at {where}")


def _over_limit(
    used: int, limit: int, step_name: str, where: str
) -> StepExecutionError:
    return StepExecutionError(
        f"the run's steps created images of {used} pixels together, over the "
        f"limit of {limit} (MAX_RUN_PIXELS), at step '{step_name}'{where}; send "
        "fewer or smaller images per run, or create fewer or smaller crops, "
        "such as by filtering the detections that a dynamic crop cuts out",
        step=step_name,
        user_error=True,
    )


def image_pixels(value: Any) -> int:
    """Return the pixels of the images in ``value``, in its lists and dicts too."""
    if isinstance(value, WorkflowImage):
        return value.width * value.height
    if isinstance(value, dict):
        return sum(image_pixels(item) for item in value.values())
    if isinstance(value, list):
        return sum(image_pixels(item) for item in value)
    return 0


# The budget of the block call that runs now, or None outside a run's call.
_current_call: ContextVar[CallPixelBudget | None] = ContextVar(
    "current_call_pixel_budget", default=None
)


def current_call_pixel_budget() -> CallPixelBudget | None:
    """Return the pixel budget of the block call that runs now, or None.

    None outside a run's block call, or when the executor runs a plan
    without a PixelBudget.
    """
    return _current_call.get()
