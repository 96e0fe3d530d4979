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

import numpy as np

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
        sources = [
            source.select(np.array([n in allowed for n in source.class_names]))
            for source in sources
        ]

    used: set[tuple[int, int]] = set()
    merged: list[tuple[np.ndarray, float, int, str]] = []
    for source_index, source in enumerate(sources):
        for index in range(len(source)):
            if (source_index, index) in used:
                continue
            members = _matches(sources, source_index, index, settings, used)
            if len(members) < settings.required_votes - 1:
                continue
            group = [(source_index, index), *members]
            box, confidence, class_id, class_name = _merge(sources, group, settings)
            if confidence < settings.confidence:
                continue
            merged.append((box, confidence, class_id, class_name))
            used.update(group)

    predictions = _detections(template, merged)
    present, presence = _presence(predictions, settings)
    return ConsensusResult(predictions, present, presence)


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


def _matches(
    sources: list[Detections],
    source_index: int,
    index: int,
    settings: ConsensusSettings,
    used: set[tuple[int, int]],
) -> list[tuple[int, int]]:
    """Return, per other source, its unused detection of greatest IoU with this one."""
    source = sources[source_index]
    box = source.xyxy[index].astype(np.float64)
    found = []
    for other_index, other in enumerate(sources):
        if other_index == source_index:
            continue
        best: tuple[int, float] | None = None
        for candidate in range(len(other)):
            if (other_index, candidate) in used:
                continue
            if (
                settings.class_aware
                and other.class_names[candidate] != source.class_names[index]
            ):
                continue
            overlap = iou(box, other.xyxy[candidate].astype(np.float64))
            if overlap <= settings.iou_threshold:
                continue
            if best is None or best[1] < overlap:
                best = (candidate, overlap)
        if best is not None:
            found.append((other_index, best[0]))
    return found


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
