"""Start a run from a request, the same way for every entry point.

The REST API, the Roboflow-compatible routes, the browser and the
``runworkflow`` command all call ``start_run``.
"""

from dataclasses import dataclass
from typing import Any

from django.conf import settings

from runner.dispatch import Submission, submit, wait_for_result
from runner.models import Run
from workflows.compiler import plan_cache
from workflows.inputs import read_inputs


@dataclass
class RunOutcome:
    run: Run
    # The finished run's payload, or None when it is still queued or running.
    payload: dict[str, Any] | None


def start_run(
    *,
    owner_id: int,
    source: str,
    definition: dict,
    raw_inputs: Any,
    started_ns: int,
    wait_s: float,
    workflow_version_id: int | None = None,
    token_id: int | None = None,
    uploads: dict[str, bytes] | None = None,
    runner: str | None = None,
) -> RunOutcome:
    """Compile, check inputs, queue, and wait up to ``wait_s`` for the result.

    Raises DefinitionError, InputError, ModelNotFoundError or NoRunnerError
    before anything is stored.
    """
    compiled = plan_cache.compile(definition)
    inputs = read_inputs(
        compiled.plan,
        raw_inputs,
        max_pixels=settings.GLASSBOX["MAX_IMAGE_PIXELS"],
        uploads=uploads,
    )
    run = submit(
        Submission(
            owner_id=owner_id,
            source=source,
            plan=compiled.plan,
            inputs=inputs,
            request_started_ns=started_ns,
            workflow_version_id=workflow_version_id,
            inline_definition=None if workflow_version_id else definition,
            token_id=token_id,
            runner=runner,
        ),
        require_runner=wait_s > 0,
    )
    payload = wait_for_result(str(run.id), wait_s)
    return RunOutcome(run, payload)
