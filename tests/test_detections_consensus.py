"""DetectionsConsensus: Roboflow's voting and merging, and its compile checks."""

import tracemalloc

import numpy as np
import pytest

from runner.model_cache import ModelCache, ModelProvider
from runner.registry import resolve_model
from tests.conftest import image_bytes
from tests.definitions import detection
from workflows.blocks.base import StepContext
from workflows.blocks.detections_consensus.consensus import iou, ious
from workflows.blocks.detections_consensus.v1 import DetectionsConsensusBlock
from workflows.compiler import build_plan, definition_digest
from workflows.deadline import Deadline
from workflows.detections import Detections
from workflows.errors import DefinitionError, StepExecutionError
from workflows.executor import collect_outputs, execute_plan
from workflows.images import WorkflowImage
from workflows.timing import RunTimer

MIB = 1024 * 1024


def boxes(*rows: tuple, parent_id: str = "image") -> Detections:
    """Return detections from (class, confidence, x1, y1, x2, y2) rows."""
    return Detections(
        xyxy=np.array([row[2:] for row in rows], dtype=np.float32).reshape(-1, 4),
        confidence=np.array([row[1] for row in rows], dtype=np.float32),
        class_id=np.array([0 if row[0] == "person" else 1 for row in rows]),
        class_names=[row[0] for row in rows],
        image_size=(200, 100),
        parent_id=parent_id,
    )


def consensus(sources: list[Detections], **fields) -> dict:
    settings = {
        "required_votes": 2,
        "class_aware": True,
        "iou_threshold": 0.3,
        "confidence": 0.0,
        "classes_to_consider": None,
        "required_objects": None,
        "presence_confidence_aggregation": "max",
        "detections_merge_confidence_aggregation": "average",
        "detections_merge_coordinates_aggregation": "average",
        "detections_merge_mask_aggregation": "union",
    }
    settings.update(fields)
    return DetectionsConsensusBlock().run(
        StepContext(step_name="vote", models=None, timer=None),
        predictions_batches=sources,
        **settings,
    )


def test_overlapping_boxes_merge_into_average():
    result = consensus(
        [
            boxes(("person", 0.8, 0, 0, 10, 20)),
            boxes(("person", 0.6, 2, 0, 12, 20)),
        ]
    )
    merged = result["predictions"]
    assert len(merged) == 1
    assert merged.xyxy[0].tolist() == [1, 0, 11, 20]
    assert merged.confidence[0] == pytest.approx(0.7)
    assert merged.class_names == ["person"]
    assert result["object_present"] is True
    assert result["presence_confidence"] == {"person": pytest.approx(0.7)}


def test_merged_detection_gets_new_id_in_same_image():
    first = boxes(("person", 0.8, 0, 0, 10, 20))
    second = boxes(("person", 0.6, 2, 0, 12, 20))
    merged = consensus([first, second])["predictions"]
    assert merged.detection_ids[0] not in first.detection_ids + second.detection_ids
    assert merged.parent_id == "image"
    assert merged.image_size == (200, 100)


def test_detection_without_enough_votes_dropped():
    result = consensus(
        [
            boxes(("person", 0.8, 0, 0, 10, 20), ("person", 0.9, 100, 0, 110, 20)),
            boxes(("person", 0.6, 2, 0, 12, 20)),
        ]
    )
    assert result["predictions"].xyxy.tolist() == [[1, 0, 11, 20]]


def test_one_vote_keeps_every_detection():
    result = consensus(
        [boxes(("person", 0.8, 0, 0, 10, 20)), boxes(("person", 0.6, 100, 0, 110, 20))],
        required_votes=1,
    )
    assert result["predictions"].xyxy.tolist() == [[0, 0, 10, 20], [100, 0, 110, 20]]


def test_overlap_equal_to_threshold_does_not_vote():
    # The boxes share half of each: IoU 1/3.
    first = boxes(("person", 0.8, 0, 0, 10, 10))
    second = boxes(("person", 0.6, 5, 0, 15, 10))
    assert iou(first.xyxy[0], second.xyxy[0]) == pytest.approx(1 / 3)
    assert len(consensus([first, second], iou_threshold=1 / 3)["predictions"]) == 0
    assert len(consensus([first, second], iou_threshold=0.33)["predictions"]) == 1


def test_class_aware_separates_classes():
    sources = [boxes(("person", 0.8, 0, 0, 10, 20)), boxes(("bus", 0.6, 0, 0, 10, 20))]
    aware = consensus(sources)
    assert len(aware["predictions"]) == 0
    assert aware["object_present"] is False
    assert aware["presence_confidence"] == {}

    blind = consensus(sources, class_aware=False)
    assert len(blind["predictions"]) == 1
    assert blind["presence_confidence"] == {"any_object": pytest.approx(0.7)}


@pytest.mark.parametrize(
    ("mode", "confidence", "class_name"),
    [("max", 0.9, "bus"), ("min", 0.5, "person"), ("average", 0.7, "person")],
)
def test_confidence_aggregation_picks_class(mode, confidence, class_name):
    sources = [
        boxes(("person", 0.5, 0, 0, 10, 20)),
        boxes(("bus", 0.9, 0, 0, 10, 20)),
        boxes(("person", 0.7, 0, 0, 10, 20)),
    ]
    merged = consensus(
        sources,
        class_aware=False,
        required_votes=3,
        detections_merge_confidence_aggregation=mode,
    )["predictions"]
    assert merged.confidence[0] == pytest.approx(confidence)
    assert merged.class_names == [class_name]


@pytest.mark.parametrize(
    ("mode", "box"),
    [("max", [0, 0, 20, 20]), ("min", [2, 2, 18, 18]), ("average", [1, 1, 19, 19])],
)
def test_coordinates_aggregation_picks_box(mode, box):
    sources = [
        boxes(("person", 0.5, 0, 0, 20, 20)),
        boxes(("person", 0.5, 2, 2, 18, 18)),
    ]
    merged = consensus(sources, detections_merge_coordinates_aggregation=mode)
    assert merged["predictions"].xyxy[0].tolist() == box


def test_merged_confidence_below_minimum_dropped():
    sources = [
        boxes(("person", 0.5, 0, 0, 10, 20)),
        boxes(("person", 0.3, 0, 0, 10, 20)),
    ]
    assert len(consensus(sources, confidence=0.41)["predictions"]) == 0
    assert len(consensus(sources, confidence=0.39)["predictions"]) == 1


def test_each_source_votes_with_best_unused_match():
    # Source b's second box overlaps a's first box more than its first one.
    a = boxes(("person", 0.9, 0, 0, 10, 10), ("person", 0.9, 3, 0, 13, 10))
    b = boxes(("person", 0.5, 4, 0, 14, 10), ("person", 0.5, 1, 0, 11, 10))
    merged = consensus([a, b])["predictions"]
    # a0 takes b1 (IoU 9/11), then a1 takes b0, the only one left.
    assert merged.xyxy.tolist() == [[0.5, 0, 10.5, 10], [3.5, 0, 13.5, 10]]


def test_classes_to_consider_filters_sources():
    sources = [
        boxes(("person", 0.8, 0, 0, 10, 20), ("bus", 0.8, 50, 0, 90, 40)),
        boxes(("person", 0.6, 0, 0, 10, 20), ("bus", 0.6, 50, 0, 90, 40)),
    ]
    result = consensus(sources, classes_to_consider=["bus"])
    assert result["predictions"].class_names == ["bus"]
    assert consensus(sources, classes_to_consider=[])["predictions"].class_names == [
        "person",
        "bus",
    ]


@pytest.mark.parametrize(
    ("required", "present"),
    [
        (None, True),
        (2, True),
        (3, False),
        ({"person": 1, "bus": 1}, True),
        ({"person": 2}, False),
        ({"dog": 1}, False),
    ],
)
def test_required_objects_decide_presence(required, present):
    sources = [
        boxes(("person", 0.8, 0, 0, 10, 20), ("bus", 0.4, 50, 0, 90, 40)),
        boxes(("person", 0.6, 0, 0, 10, 20), ("bus", 0.6, 50, 0, 90, 40)),
    ]
    result = consensus(sources, required_objects=required)
    assert result["object_present"] is present
    if present:
        assert result["presence_confidence"] == {
            "person": pytest.approx(0.7),
            "bus": pytest.approx(0.5),
        }
    else:
        assert result["presence_confidence"] == {}


def test_required_objects_per_class_summed_without_classes():
    sources = [
        boxes(("person", 0.8, 0, 0, 10, 20)),
        boxes(("person", 0.6, 0, 0, 10, 20)),
    ]
    result = consensus(sources, class_aware=False, required_objects={"a": 1, "b": 1})
    assert result["object_present"] is False


@pytest.mark.parametrize(("mode", "value"), [("max", 0.8), ("min", 0.6)])
def test_presence_confidence_aggregation(mode, value):
    sources = [
        boxes(("person", 0.8, 0, 0, 10, 20), ("person", 0.6, 50, 0, 60, 20)),
        boxes(("person", 0.8, 0, 0, 10, 20), ("person", 0.6, 50, 0, 60, 20)),
    ]
    result = consensus(sources, presence_confidence_aggregation=mode)
    assert result["presence_confidence"] == {"person": pytest.approx(value)}


def test_no_detections_anywhere():
    result = consensus([boxes(), boxes()])
    assert len(result["predictions"]) == 0
    assert result["object_present"] is False
    assert result["presence_confidence"] == {}


def test_detections_of_different_images_rejected():
    sources = [
        boxes(("person", 0.8, 0, 0, 10, 20), parent_id="image"),
        boxes(("person", 0.8, 0, 0, 10, 20), parent_id="crop"),
    ]
    with pytest.raises(StepExecutionError) as caught:
        consensus(sources)
    assert caught.value.user_error is True
    assert caught.value.step == "vote"
    assert "different images (crop, image)" in caught.value.message


def test_empty_first_source_does_not_name_image():
    empty_crop = boxes(parent_id="crop")
    empty_crop.image_size = (20, 10)
    sources = [
        empty_crop,
        boxes(("person", 0.8, 0, 0, 10, 20)),
        boxes(("person", 0.9, 0, 0, 10, 20)),
    ]
    result = consensus(sources)
    assert len(result["predictions"]) == 1
    assert result["predictions"].parent_id == "image"
    assert result["predictions"].image_size == (200, 100)


def test_consensus_stops_at_expired_time_limit():
    # The run's time limit passed before the block call, so the vote stops
    # at the first detection, as it would between any two detections.
    sources = [
        boxes(("person", 0.8, 0, 0, 10, 20)),
        boxes(("person", 0.9, 0, 0, 10, 20)),
    ]
    with Deadline(limit_s=0.0).during_call("vote", 2):
        with pytest.raises(StepExecutionError) as caught:
            consensus(sources)
    assert caught.value.step == "vote"
    assert caught.value.user_error is True
    message = caught.value.message
    assert "took longer than RUN_TIME_LIMIT_S (0 s)" in message
    assert (
        "stopped during call 2 of step 'vote', at detection 0 of "
        "predictions_batches[0]" in message
    )

    # Within the limit, the vote merges as it does without one.
    with Deadline(limit_s=600).during_call("vote", 2):
        assert len(consensus(sources)["predictions"]) == 1


def test_repeated_selector_shares_one_copy():
    # A definition may list one selector thousands of times. Each of the
    # 400 entries here would otherwise get a copy of the 10 detections
    # (selected by class, then as float64 boxes and class names), about
    # 0.9 MB together; shared, the vote's peak is about 0.23 MB.
    people = boxes(*(("person", 0.5, 20 * i, 0, 20 * i + 10, 10) for i in range(10)))
    tracemalloc.start()
    try:
        result = consensus([people] * 400, classes_to_consider=["person"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result["predictions"]) == 10
    assert peak < 0.5 * MIB


def test_ious_of_many_boxes_equal_iou_of_each():
    box = np.array([0.0, 0.0, 10.0, 20.0])
    others = np.array(
        [
            [2.0, 0.0, 12.0, 20.0],
            [20.0, 20.0, 30.0, 30.0],
            [0.0, 0.0, 0.0, 0.0],
            [np.nan, 0.0, 10.0, 20.0],
            [0.0, 0.0, np.inf, 20.0],
            [-np.inf, 0.0, np.inf, 20.0],
        ]
    )
    expected = [iou(box, row) for row in others]
    # NaN == NaN is false, so the values are compared as their text.
    assert [str(value) for value in ious(box, others)] == [
        str(value) for value in expected
    ]


@pytest.mark.parametrize(
    "field",
    [
        "class_aware",
        "iou_threshold",
        "confidence",
        "presence_confidence_aggregation",
        "detections_merge_confidence_aggregation",
        "detections_merge_coordinates_aggregation",
    ],
)
def test_null_setting_takes_default(field):
    # A step output may feed a setting a null, which the executor passes on.
    sources = [
        boxes(("person", 0.8, 0, 0, 10, 20)),
        boxes(("person", 0.6, 0, 0, 10, 20)),
    ]
    expected = consensus(sources)
    result = consensus(sources, **{field: None})
    assert result["predictions"].xyxy.tolist() == expected["predictions"].xyxy.tolist()
    assert result["predictions"].confidence.tolist() == pytest.approx(
        expected["predictions"].confidence.tolist()
    )
    assert result["presence_confidence"] == expected["presence_confidence"]


# The people detector's own detections on bus.jpg.


@pytest.fixture(scope="module")
def bus_people():
    cache = ModelCache(
        budget_bytes=512 * MIB, device="cpu", warmup_size=64, torch_threads=1
    )
    timer = RunTimer()
    provider = ModelProvider(
        cache, {"people-detector": resolve_model("people-detector")}, timer
    )
    definition = two_detectors()
    plan = build_plan(definition, definition_digest(definition))
    image = WorkflowImage.from_bytes(image_bytes(), parent_id="image")
    [results] = execute_plan(plan, [{"image": image}], models=provider, timer=timer)
    return plan, {"image": image}, results


def two_detectors() -> dict:
    """Return the people detector at confidence 0.4 and 0.6, and their consensus.

    On bus.jpg it finds 3 people at 0.4, 2 of them at 0.6.
    """
    definition = detection()
    definition["steps"] += [
        {
            "type": "ObjectDetectionModel",
            "name": "strict",
            "images": "$inputs.image",
            "model_id": "people-detector",
            "confidence": 0.6,
        },
        {
            "type": "roboflow_core/detections_consensus@v1",
            "name": "vote",
            "predictions_batches": [
                "$steps.people.predictions",
                "$steps.strict.predictions",
            ],
            "required_votes": 2,
        },
    ]
    definition["outputs"].append(
        {"type": "JsonField", "name": "vote", "selector": "$steps.vote.*"}
    )
    return definition


@pytest.mark.django_db
def test_model_agrees_with_itself(bus_people):
    _, _, results = bus_people
    people = results["people"]["predictions"]
    assert len(people) == 3

    result = consensus([people, people.take(np.arange(len(people)))])
    merged = result["predictions"]
    assert merged.xyxy.tolist() == people.xyxy.tolist()
    assert merged.confidence.tolist() == pytest.approx(people.confidence.tolist())
    assert merged.class_names == people.class_names
    assert result["object_present"] is True


@pytest.mark.django_db
def test_confident_detections_are_the_consensus(bus_people):
    plan, inputs, results = bus_people
    people = results["people"]["predictions"]
    strict = results["strict"]["predictions"]
    output = collect_outputs(plan, inputs, results)["vote"]

    # Every confident detection is also found at the lower confidence, so
    # the two agree on exactly those, each merged with itself.
    assert len(strict) == 2
    assert len(people) == 3
    merged = output["predictions"]["predictions"]
    assert len(merged) == len(strict)
    expected = sorted(strict.confidence.tolist())
    assert sorted(box["confidence"] for box in merged) == pytest.approx(
        expected, abs=1e-4
    )
    assert output["object_present"] is True
    assert set(output["presence_confidence"]) == set(strict.class_names)


# Compile errors.


def compile_errors(definition: dict) -> list:
    with pytest.raises(DefinitionError) as caught:
        build_plan(definition, "digest")
    return caught.value.errors


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("predictions_batches", "$steps.people.predictions", "non-empty list"),
        ("predictions_batches", [], "non-empty list"),
        ("predictions_batches", ["people"], 'item 0, "people", is not a selector'),
        (
            "predictions_batches",
            ["$steps.people.predictions", "$steps.count.output"],
            "is of kind 'value', this field needs 'object_detection_prediction'",
        ),
        (
            "predictions_batches",
            ["$inputs.image"],
            "is an input, but this field needs outputs of steps",
        ),
        ("predictions_batches", ["$steps.nope.predictions"], "names no step"),
        ("required_votes", 0, "must be an integer of at least 1"),
        ("required_votes", 1.5, "must be an integer"),
        ("iou_threshold", 2, "must be a number from 0 to 1"),
        ("required_objects", {"person": 0}, 'count for class "person"'),
        ("required_objects", True, "must be an integer or an object or null"),
        ("presence_confidence_aggregation", "median", '"average", "max", "min"'),
        ("detections_merge_mask_aggregation", "sum", '"union", "intersection"'),
    ],
)
def test_compile_rejects_bad_field(field, value, problem):
    definition = two_detectors()
    definition["steps"][-1][field] = value
    errors = compile_errors(definition)
    assert [(e.block_id, e.property_name) for e in errors] == [("vote", field)]
    assert problem in errors[0].property_details


def with_crop_detector(definition: dict, *more_steps: dict) -> dict:
    """Insert before the vote a crop of each person and a detector on the crops.

    The detector on the crops is step 'inner'; ``more_steps`` follow it.
    """
    definition["steps"][-1:-1] = [
        {
            "type": "DynamicCrop",
            "name": "crops",
            "images": "$inputs.image",
            "predictions": "$steps.people.predictions",
        },
        {
            "type": "ObjectDetectionModel",
            "name": "inner",
            "images": "$steps.crops.crops",
            "model_id": "people-detector",
        },
        *more_steps,
    ]
    return definition


def test_compile_rejects_image_and_crop_detections():
    definition = with_crop_detector(two_detectors())
    definition["steps"][-1]["predictions_batches"][1] = "$steps.inner.predictions"
    [error] = compile_errors(definition)
    assert (error.block_id, error.property_name) == ("vote", "predictions_batches")
    assert error.block_type == "roboflow_core/detections_consensus@v1"
    assert (
        "item 1, '$steps.inner.predictions', is per crop of step 'crops', but "
        "item 0, '$steps.people.predictions', is per input image"
        in error.property_details
    )
    assert "all on an input image" in error.property_details


def test_compile_accepts_detections_of_same_crops():
    strict = {
        "type": "ObjectDetectionModel",
        "name": "inner_strict",
        "images": "$steps.crops.crops",
        "model_id": "people-detector",
        "confidence": 0.6,
    }
    definition = with_crop_detector(two_detectors(), strict)
    definition["steps"][-1]["predictions_batches"] = [
        "$steps.inner.predictions",
        "$steps.inner_strict.predictions",
    ]
    plan = build_plan(definition, "digest")
    assert plan.steps[-1].name == "vote"
    assert plan.steps[-1].dimension == 1


def test_compile_requires_votes():
    definition = two_detectors()
    del definition["steps"][-1]["required_votes"]
    [error] = compile_errors(definition)
    assert (error.block_id, error.property_name) == ("vote", "required_votes")


def test_compile_accepts_predictions_alias():
    definition = two_detectors()
    step = definition["steps"][-1]
    step["type"] = "DetectionsConsensus"
    step["predictions"] = step.pop("predictions_batches")
    plan = build_plan(definition, "digest")
    assert [step.name for step in plan.steps][-1] == "vote"
