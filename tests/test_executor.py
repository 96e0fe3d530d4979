"""The executor's bound on images that steps create, on real blocks and pixels."""

import pytest

from tests.conftest import image_bytes
from workflows.compiler import build_plan, definition_digest
from workflows.errors import StepExecutionError
from workflows.executor import PixelBudget, execute_plan
from workflows.images import WorkflowImage
from workflows.timing import RunTimer


def three_crops() -> dict:
    """Three 800x1000 crops of the input: 800,000 pixels each."""
    crop = {
        "type": "roboflow_core/absolute_static_crop@v1",
        "images": "$inputs.image",
        "x_center": 405,
        "y_center": 540,
        "width": 800,
        "height": 1000,
    }
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [{**crop, "name": f"crop_{index}"} for index in range(3)],
        "outputs": [
            {"type": "JsonField", "name": "last", "selector": "$steps.crop_2.crops"}
        ],
    }


def run(budget: PixelBudget) -> None:
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")
    definition = three_crops()
    execute_plan(
        build_plan(definition, definition_digest(definition)),
        {"image": image},
        models=None,
        timer=RunTimer(),
        pixel_budget=budget,
    )


def test_created_images_within_budget():
    budget = PixelBudget(limit=2_400_000)
    run(budget)
    assert budget.used == 2_400_000


def test_created_images_over_budget_fail_at_that_step():
    with pytest.raises(StepExecutionError) as caught:
        run(PixelBudget(limit=2_000_000))
    assert caught.value.step == "crop_2"
    assert caught.value.user_error is True
    assert "2400000 pixels together" in caught.value.message
