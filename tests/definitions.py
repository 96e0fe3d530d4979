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


# Parts of Roboflow's filter language, for the detections filter's operations.


def detection_property(name: str) -> dict:
    """Return an operand that reads property ``name`` of the detection tested."""
    return {
        "type": "DynamicOperand",
        "operand_name": "_",
        "operations": [{"type": "ExtractDetectionProperty", "property_name": name}],
    }


def static(value) -> dict:
    return {"type": "StaticOperand", "value": value}


def parameter(name: str) -> dict:
    """Return an operand that reads the entry ``name`` of operations_parameters."""
    return {"type": "DynamicOperand", "operand_name": name}


def compare(left: dict, comparator: str, right: dict, negate: bool = False) -> dict:
    return {
        "type": "BinaryStatement",
        "left_operand": left,
        "comparator": {"type": comparator},
        "right_operand": right,
        "negate": negate,
    }


def group(*statements: dict, operator: str | None = None) -> dict:
    """Return a statement group; without ``operator`` Roboflow's default applies."""
    found = {"type": "StatementGroup", "statements": list(statements)}
    if operator is not None:
        found["operator"] = operator
    return found


def keep_where(*statements: dict, operator: str | None = None) -> list:
    """Return ``operations`` with one DetectionsFilter of ``statements``."""
    return [
        {
            "type": "DetectionsFilter",
            "filter_operation": group(*statements, operator=operator),
        }
    ]


def filtered_detection(
    operations: list, parameters: dict | None = None, model_id="people-detector"
) -> dict:
    """Return a detection whose predictions also go through the step "filter"."""
    definition = detection(model_id)
    step = {
        "type": "roboflow_core/detections_filter@v1",
        "name": "filter",
        "predictions": "$steps.people.predictions",
        "operations": operations,
    }
    if parameters is not None:
        step["operations_parameters"] = parameters
    definition["steps"].append(step)
    definition["outputs"].append(
        {
            "type": "JsonField",
            "name": "filtered",
            "selector": "$steps.filter.predictions",
        }
    )
    return definition
