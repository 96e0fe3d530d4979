"""Workflow definitions used across tests."""


def image_height() -> dict:
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [
            {
                "type": "roboflow_core/property_definition@v1",
                "name": "h",
                "data": "$inputs.image",
                "operations": [
                    {"type": "ExtractImageProperty", "property_name": "height"}
                ],
            }
        ],
        "outputs": [
            {"type": "JsonField", "name": "height", "selector": "$steps.h.output"}
        ],
    }


def detection(model_id: str = "people-detector", confidence: float = 0.4) -> dict:
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [
            {
                "type": "roboflow_core/roboflow_object_detection_model@v1",
                "name": "people",
                "images": "$inputs.image",
                "model_id": model_id,
                "confidence": confidence,
            },
            {
                "type": "PropertyDefinition",
                "name": "count",
                "data": "$steps.people.predictions",
                "operations": [{"type": "SequenceLength"}],
            },
        ],
        "outputs": [
            {
                "type": "JsonField",
                "name": "predictions",
                "selector": "$steps.people.predictions",
            },
            {"type": "JsonField", "name": "count", "selector": "$steps.count.output"},
        ],
    }


def detect_then_crops(inner_model: str, outer_model: str = "people-detector") -> dict:
    """Return a detection whose boxes are cropped and run through ``inner_model``."""
    definition = detection(outer_model)
    definition["steps"] += [
        {
            "type": "roboflow_core/dynamic_crop@v1",
            "name": "crops",
            "images": "$inputs.image",
            "predictions": "$steps.people.predictions",
        },
        {
            "type": "roboflow_core/roboflow_object_detection_model@v1",
            "name": "inner",
            "images": "$steps.crops.crops",
            "model_id": inner_model,
        },
    ]
    return definition
