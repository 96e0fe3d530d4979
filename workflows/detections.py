"""Object detections and their serialization in Roboflow's shape."""

import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(eq=False)
class Detections:
    """Boxes found in one image, in that image's pixel coordinates.

    ``origin`` is where the image's top-left corner lies in the root input
    image (non-zero for crops); ``parent_size`` is the root image's size.
    ``parent_id`` names the image the boxes were found in: the input, or for
    a crop the detection it was cut from. ``root_id`` names the input.
    ``parent_origin`` is, for a crop, its offset in the image it was cut
    from and that image's size: (offset_x, offset_y, width, height).
    """

    xyxy: np.ndarray  # float32, shape (N, 4)
    confidence: np.ndarray  # float32, shape (N,)
    class_id: np.ndarray  # int64, shape (N,)
    class_names: list[str]
    image_size: tuple[int, int]  # (width, height)
    parent_id: str
    detection_ids: list[str] = field(default_factory=list)
    root_id: str | None = None
    origin: tuple[int, int] = (0, 0)
    parent_size: tuple[int, int] | None = None
    inference_id: str | None = None
    parent_origin: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if not self.detection_ids:
            self.detection_ids = [str(uuid.uuid4()) for _ in range(len(self))]

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def __eq__(self, other: object) -> bool:
        # By value, as supervision's Detections compare in the conditions of
        # Roboflow's inference 1.8.3. The generated dataclass method compared
        # the arrays with ``==``, whose array result has no truth value.
        if not isinstance(other, Detections):
            return NotImplemented
        return all(
            _values_equal(getattr(self, attribute.name), getattr(other, attribute.name))
            for attribute in fields(self)
        )

    @classmethod
    def empty(cls, image_size: tuple[int, int], parent_id: str) -> "Detections":
        return cls(
            xyxy=np.zeros((0, 4), dtype=np.float32),
            confidence=np.zeros((0,), dtype=np.float32),
            class_id=np.zeros((0,), dtype=np.int64),
            class_names=[],
            image_size=image_size,
            parent_id=parent_id,
        )

    def select(self, mask: np.ndarray) -> "Detections":
        """Return the detections where ``mask`` is true, keeping their ids."""
        return self.take(np.flatnonzero(mask))

    def take(self, indices: np.ndarray) -> "Detections":
        """Return the detections at ``indices``, in that order, keeping their ids."""
        return Detections(
            xyxy=self.xyxy[indices],
            confidence=self.confidence[indices],
            class_id=self.class_id[indices],
            class_names=[self.class_names[i] for i in indices],
            image_size=self.image_size,
            parent_id=self.parent_id,
            detection_ids=[self.detection_ids[i] for i in indices],
            root_id=self.root_id,
            origin=self.origin,
            parent_size=self.parent_size,
            inference_id=self.inference_id,
            parent_origin=self.parent_origin,
        )

    def to_roboflow(self, coordinates: str = "own") -> dict[str, Any]:
        """Serialize as ``{"image": {...}, "predictions": [...]}``.

        ``coordinates="parent"`` shifts boxes by ``origin`` and reports the
        root image's size and id, as Roboflow's ``coordinates_system`` does.
        """
        dx, dy = (0, 0)
        width, height = self.image_size
        parent_id = self.parent_id
        if coordinates == "parent":
            dx, dy = self.origin
            if self.parent_size is not None:
                width, height = self.parent_size
            parent_id = self.root_id or self.parent_id
        crop_origins = {}
        if coordinates == "own":
            crop_origins = self._crop_origins()
        predictions = []
        # NOTE: boxes are rounded to 2 decimals and confidences to 4.
        # Roboflow's workflow serializer writes the unrounded floats
        # (docs/api.md).
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.xyxy[i])
            predictions.append(
                {
                    "width": round(x2 - x1, 2),
                    "height": round(y2 - y1, 2),
                    "x": round((x1 + x2) / 2 + dx, 2),
                    "y": round((y1 + y2) / 2 + dy, 2),
                    "confidence": round(float(self.confidence[i]), 4),
                    "class_id": int(self.class_id[i]),
                    "class": self.class_names[i],
                    "detection_id": self.detection_ids[i],
                    "parent_id": parent_id,
                    **crop_origins,
                }
            )
        return {"image": {"width": width, "height": height}, "predictions": predictions}

    def _crop_origins(self) -> dict[str, Any]:
        """Return the origins of the crop the boxes were found in, or {} for an input.

        Roboflow adds these keys to each detection found in a crop, in the
        crop's own coordinates.
        """
        if self.parent_origin is None or self.parent_size is None:
            return {}
        offset_x, offset_y, parent_width, parent_height = self.parent_origin
        root_width, root_height = self.parent_size
        return {
            "parent_origin": {
                "offset_x": offset_x,
                "offset_y": offset_y,
                "width": parent_width,
                "height": parent_height,
            },
            "root_parent_id": self.root_id or self.parent_id,
            "root_parent_origin": {
                "offset_x": self.origin[0],
                "offset_y": self.origin[1],
                "width": root_width,
                "height": root_height,
            },
        }


def _values_equal(first: Any, second: Any) -> bool:
    if isinstance(first, np.ndarray) or isinstance(second, np.ndarray):
        return bool(np.array_equal(first, second))
    return bool(first == second)
