"""Errors raised while compiling and executing workflows.

Every error carries a message that is safe to show the user, the phase it
happened in, and where possible the step and field, so the API can point at
the exact place in a definition.  ``user_error`` separates problems with the
request (reported as 4xx and billed normally when they happen during a run)
from failures of the platform (5xx, not billed).
"""

from dataclasses import dataclass
from typing import Any


@dataclass
class BlockError:
    """One problem in one block of a definition."""

    block_id: str | None
    block_type: str | None
    property_name: str | None
    property_details: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_id": self.block_id,
            "block_type": self.block_type,
            "property_name": self.property_name,
            "property_details": self.property_details,
        }


class WorkflowError(Exception):
    """Base class: a user-safe message plus where it happened."""

    code = "workflow_error"
    status = 400
    user_error = True
    # Whether a run that fails with this error is billed. Failures caused by
    # the platform never are.
    billable = True

    def __init__(
        self,
        message: str,
        *,
        context: str = "",
        step: str | None = None,
        field_name: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        self.step = step
        self.field_name = field_name
        self.hint = hint

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": self.message,
            "error_type": type(self).__name__,
            "code": self.code,
            "context": self.context,
        }
        if self.step is not None:
            body["step"] = self.step
        if self.field_name is not None:
            body["field"] = self.field_name
        if self.hint:
            body["hint"] = self.hint
        cause = self.__cause__
        if cause is not None:
            body["inner_error_type"] = type(cause).__name__
            # Roboflow's client appends inner_error_message to the message it
            # raises, so a cause the message already quotes is left out.
            if str(cause) not in self.message:
                body["inner_error_message"] = str(cause)
        return body


class DefinitionError(WorkflowError):
    """The definition is invalid; ``errors`` lists every problem found."""

    code = "invalid_definition"

    def __init__(
        self, errors: list[BlockError], context: str, root: str = "definition"
    ) -> None:
        """Build the message from the first of ``errors``.

        ``root`` names the definition where no step is at fault: the body
        field that contains it, ``specification`` on the inline routes.
        """
        first = errors[0]
        where = f"step '{first.block_id}'" if first.block_id else root
        if first.property_name:
            where += f", field '{first.property_name}'"
        more = (
            f" (and {len(errors) - 1} more "
            f"{'problem' if len(errors) == 2 else 'problems'}, listed in blocks_errors)"
            if len(errors) > 1
            else ""
        )
        super().__init__(
            f"Invalid workflow definition at {where}: {first.property_details}{more}",
            context=context,
            step=first.block_id,
            field_name=first.property_name,
        )
        self.errors = errors

    def with_root(self, root: str) -> "DefinitionError":
        """Return the same error with a message that names ``root`` instead."""
        return DefinitionError(self.errors, self.context, root=root)

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["blocks_errors"] = [error.to_dict() for error in self.errors]
        return body


class InputError(WorkflowError):
    """A run's inputs are missing, malformed or not usable images."""

    code = "invalid_input"


class UndecodableImageError(InputError):
    """An image passed the web server's checks but failed to decode on a runner.

    The web server reads only headers and end markers, so the run was
    accepted. It fails as the user's error, but it is not billed, because
    the platform's check let the image through.
    """

    billable = False


class InputsExpiredError(WorkflowError):
    """A run's input images expired in Redis before a runner started it."""

    code = "inputs_expired"
    # The request was valid and the platform was too slow: not billed, and
    # worth sending again.
    status = 503
    user_error = False


class WorkflowDeletedError(WorkflowError):
    """The run's workflow was deleted after the request read it."""

    code = "not_found"
    status = 404

    def __init__(self, workflow_version_id: int) -> None:
        super().__init__(
            "the workflow was deleted while this run was being accepted; "
            "nothing was stored",
            context="request",
        )
        self.workflow_version_id = workflow_version_id


class ModelNotFoundError(WorkflowError):
    """A model id resolves to no weights."""

    code = "model_not_found"

    def __init__(
        self,
        model_id: str,
        searched: list[str],
        step: str | None = None,
        reason: str | None = None,
        invalid_id: bool = False,
    ):
        """``reason`` replaces the list of places when the id itself is unusable.

        ``invalid_id`` marks an id of a form that no upload, weights file or
        architecture can have, so that no file added later makes it resolve.
        """
        if invalid_id:
            message = f"Model id '{model_id}' is invalid: {reason}"
        elif reason:
            message = f"Model '{model_id}' cannot be used: {reason}"
        else:
            message = f"Model '{model_id}' not found; looked in: {'; '.join(searched)}"
        super().__init__(
            message,
            context="model_resolution",
            step=step,
            field_name="model_id",
            # An id rejected for its form, size suffix or architecture is not
            # missing, so adding a file would not help. The reason states
            # what to change.
            hint=None
            if reason
            else (
                "Put <model_id>.pt in the model directory, upload the weights, or "
                "use an ultralytics architecture such as 'yolov8n.yaml' (untrained, "
                "for timing only)."
            ),
        )
        self.model_id = model_id
        self.searched = searched
        self.invalid_id = invalid_id


class ModelLoadError(WorkflowError):
    """Weights that resolved could not be loaded on a runner.

    The user could not have known: an upload loaded once when it was
    stored, and files in the model directory are the operator's, so the run
    is not billed.
    """

    code = "model_load_failed"
    status = 500
    user_error = False

    def __init__(self, model_id: str, reason: str, step: str | None = None):
        super().__init__(
            f"Model '{model_id}' could not be loaded: {reason}",
            context="model_loading",
            step=step,
            field_name="model_id",
        )


class WeightsFileMissingError(ModelLoadError):
    """A model's weights file is missing from the runner's directory.

    The request was valid, and once the operator copies the file the same
    request runs, so the status is 503 like ``no_runner``'s.
    """

    status = 503


class StepExecutionError(WorkflowError):
    """A step failed while running.  ``user_error`` records whose fault it was."""

    code = "step_failed"
    status = 500

    def __init__(self, message: str, *, step: str, user_error: bool) -> None:
        # Clients that show only the message, as Roboflow's does, learn
        # which step failed from it.
        if f"step '{step}'" not in message:
            message = f"step '{step}': {message}"
        super().__init__(message, context="workflow_execution", step=step)
        self.user_error = user_error
        if user_error:
            self.status = 400
            self.code = "step_rejected_input"
