"""Agreement between the detections of several models on one image.

The algorithm is Roboflow's DetectionsConsensus (``detections_consensus/v1.py``
in roboflow/inference, read at its commit of 2026-08-21), for boxes:

- Sources are visited in order, and the detections of each in order. A
  detection that is already part of a merged detection is passed over.
- For a detection, each other source contributes the one detection of
  greatest IoU with it, above ``iou_threshold`` (of the same class when
  ``class_aware``), among those not yet merged. Equal IoUs keep the first.
- With at least ``required_votes - 1`` such matches, the detection and its
  matches merge into one, unless the merged confidence is below
  ``confidence``. Only a merge marks its detections as used.
- ``object_present`` and ``presence_confidence`` summarise the merged
  detections per class (or as "any_object" without ``class_aware``),
  checked against ``required_objects``.
"""

import statistics
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from workflows.deadline import current_call_deadline
from workflows.detections import Detections

AGGREGATIONS = ("average", "max", "min")
MASK_AGGREGATIONS = ("union", "intersection", "min", "max")

FIELD_AGGREGATORS: dict[str, Callable[[list[float]], float]] = {
    "average": statistics.mean,
    "max": max,
    "min": min,
}


@dataclass(frozen=True)
class ConsensusSettings:
    required_votes: int
    class_aware: bool
    iou_threshold: float
    confidence: float
    classes_to_consider: list[str] | None
    required_objects: int | dict[str, int] | None
    presence_confidence_aggregation: str
    merge_confidence_aggregation: str
    merge_coordinates_aggregation: str


@dataclass
class ConsensusResult:
    predictions: Detections
    object_present: bool
    presence_confidence: dict[str, float]


class ConsensusInputError(ValueError):
    """Detections that cannot be merged, such as ones from different images."""


def agree(sources: list[Detections], settings: ConsensusSettings) -> ConsensusResult:
    """Return the consensus of ``sources``, the detections of one image each."""
    non_empty = [source for source in sources if len(source)]
    if not non_empty:
        first = sources[0]
        return ConsensusResult(
            Detections.empty(first.image_size, first.parent_id), False, {}
        )

    _check_same_image(sources)
    # Only sources with detections are checked to be of one image, so the
    # output takes its image from one of them, never from an empty source.
    template = non_empty[0]

    if settings.classes_to_consider:
        allowed = set(settings.classes_to_consider)
        sources = _once_per_object(
            sources,
            lambda source: source.select(
                np.array([n in allowed for n in source.class_names], dtype=bool)
            ),
        )

    # Each detection is compared with every detection of the other sources,
    # so a call does work of the order of (sources x detections) squared,
    # which max_detections allows to take hours. The run's time limit stops
    # it between detections.
    deadline = current_call_deadline()
    used = [np.zeros(len(source), dtype=bool) for source in sources]
    class_names = _once_per_object(
        sources, lambda source: np.array(source.class_names, dtype=object)
    )
    boxes = _once_per_object(sources, lambda source: source.xyxy.astype(np.float64))
    merged: list[tuple[np.ndarray, float, int, str]] = []
    for source_index, source in enumerate(sources):
        for index in range(len(source)):
            if deadline is not None and deadline.passed():
                deadline.stop(
                    f"detection {index} of predictions_batches[{source_index}]"
                )
            if used[source_index][index]:
                continue
            members = _matches(
                boxes, class_names, used, (source_index, index), settings
            )
            if len(members) < settings.required_votes - 1:
                continue
            group = [(source_index, index), *members]
            box, confidence, class_id, class_name = _merge(sources, group, settings)
            if confidence < settings.confidence:
                continue
            merged.append((box, confidence, class_id, class_name))
            for member_source, member in group:
                used[member_source][member] = True

    predictions = _detections(template, merged)
    present, presence = _presence(predictions, settings)
    return ConsensusResult(predictions, present, presence)


def _once_per_object(sources: list[Detections], convert: Callable) -> list:
    """Return ``convert(source)`` for each source, computed once per object.

    A definition may list the same selector thousands of times in
    predictions_batches, and a copy of its detections per entry would take
    gigabytes.
    """
    converted: dict[int, Any] = {}
    results = []
    for source in sources:
        if id(source) not in converted:
            converted[id(source)] = convert(source)
        results.append(converted[id(source)])
    return results


def _check_same_image(sources: list[Detections]) -> None:
    parents = {source.parent_id for source in sources if len(source)}
    if len(parents) != 1:
        raise ConsensusInputError(
            "the detections to merge come from different images "
            f"({', '.join(sorted(parents))}); every selector of "
            "predictions_batches must name detections of the same image"
        )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Return the intersection over union of two xyxy boxes; 0 for empty ones."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    union -= intersection
    return float(intersection / union) if union > 0 else 0.0


def ious(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Return ``iou(box, other)`` for each row of ``others``, as float64.

    The steps are iou's, with Python's ``min`` and ``max`` spelled as
    ``np.where`` so that NaN coordinates give the same values as there.
    """
    right = np.where(others[:, 2] < box[2], others[:, 2], box[2])
    left = np.where(others[:, 0] > box[0], others[:, 0], box[0])
    bottom = np.where(others[:, 3] < box[3], others[:, 3], box[3])
    top = np.where(others[:, 1] > box[1], others[:, 1], box[1])
    width, height = right - left, bottom - top
    intersection = np.where(0.0 > width, 0.0, width) * np.where(
        0.0 > height, 0.0, height
    )
    union = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (
        others[:, 3] - others[:, 1]
    )
    union -= intersection
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(union > 0, intersection / union, 0.0)


def _matches(
    boxes: list[np.ndarray],
    class_names: list[np.ndarray],
    used: list[np.ndarray],
    detection: tuple[int, int],
    settings: ConsensusSettings,
) -> list[tuple[int, int]]:
    """Return, per other source, its unused detection of greatest IoU with this one.

    ``boxes``, ``class_names`` and ``used`` hold each source's xyxy boxes,
    class names and merged flags.
    """
    source_index, index = detection
    box = boxes[source_index][index]
    found = []
    for other_index, other_boxes in enumerate(boxes):
        if other_index == source_index or not len(other_boxes):
            continue
        overlaps = ious(box, other_boxes)
        # NaN is kept, as ``overlap <= iou_threshold`` is false for it.
        eligible = ~used[other_index] & ~(overlaps <= settings.iou_threshold)
        if settings.class_aware:
            eligible &= class_names[other_index] == class_names[source_index][index]
        candidates = np.flatnonzero(eligible)
        if len(candidates):
            found.append((other_index, _best(candidates, overlaps[candidates])))
    return found


def _best(candidates: np.ndarray, overlaps: np.ndarray) -> int:
    """Return the candidate that a scan keeping the first strictly greater IoU keeps.

    Equal IoUs keep the first. A NaN never replaces the best so far, and a
    first candidate's NaN is never replaced, because NaN compares false.
    """
    if np.isnan(overlaps[0]):
        return int(candidates[0])
    return int(candidates[np.argmax(np.where(np.isnan(overlaps), -np.inf, overlaps))])


def _merge(
    sources: list[Detections],
    group: list[tuple[int, int]],
    settings: ConsensusSettings,
) -> tuple[np.ndarray, float, int, str]:
    boxes = np.array([sources[s].xyxy[i] for s, i in group], dtype=np.float64).reshape(
        -1, 4
    )
    confidences = [float(sources[s].confidence[i]) for s, i in group]
    classes = [
        (sources[s].class_names[i], int(sources[s].class_id[i])) for s, i in group
    ]
    mode = settings.merge_confidence_aggregation
    if mode == "average":
        # The most common (class, id) pair, the first seen among equals.
        class_name, class_id = Counter(classes).most_common(1)[0][0]
    else:
        pick = confidences.index(
            max(confidences) if mode == "max" else min(confidences)
        )
        class_name, class_id = classes[pick]
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
    coordinates = settings.merge_coordinates_aggregation
    if coordinates == "average":
        box = boxes.mean(axis=0)
    elif coordinates == "max":
        box = boxes[areas.index(max(areas))]
    else:
        box = boxes[areas.index(min(areas))]
    return box, FIELD_AGGREGATORS[mode](confidences), class_id, class_name


def _detections(
    template: Detections, merged: list[tuple[np.ndarray, float, int, str]]
) -> Detections:
    """Return the merged detections, in the image and crop of ``template``."""
    return Detections(
        xyxy=np.array([box for box, *_ in merged], dtype=np.float32).reshape(-1, 4),
        confidence=np.array([c for _, c, *_ in merged], dtype=np.float32),
        class_id=np.array([i for _, _, i, _ in merged], dtype=np.int64),
        class_names=[name for *_, name in merged],
        image_size=template.image_size,
        parent_id=template.parent_id,
        detection_ids=[str(uuid.uuid4()) for _ in merged],
        root_id=template.root_id,
        origin=template.origin,
        parent_size=template.parent_size,
        parent_origin=template.parent_origin,
    )


def _presence(
    predictions: Detections, settings: ConsensusSettings
) -> tuple[bool, dict[str, float]]:
    if len(predictions) == 0:
        return False, {}
    required = settings.required_objects or 0
    if isinstance(required, dict) and not settings.class_aware:
        required = sum(required.values())
    if isinstance(required, int) and len(predictions) < required:
        return False, {}
    aggregate = FIELD_AGGREGATORS[settings.presence_confidence_aggregation]
    if not settings.class_aware:
        return True, {"any_object": aggregate(predictions.confidence.tolist())}
    by_class: dict[str, list[float]] = {}
    for name, confidence in zip(
        predictions.class_names, predictions.confidence.tolist(), strict=True
    ):
        by_class.setdefault(name, []).append(float(confidence))
    if isinstance(required, dict):
        for name, count in required.items():
            if len(by_class.get(name, [])) < count:
                return False, {}
    return True, {name: aggregate(values) for name, values in by_class.items()}
