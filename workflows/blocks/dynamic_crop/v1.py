"""Dynamic crop: one crop per detection, so later steps can run on each object."""

from typing import Any

import numpy as np

from workflows.blocks.absolute_static_crop.v1 import crop_image
from workflows.blocks.base import DETECTIONS, IMAGE, Block, Field, StepContext
from workflows.detections import Detections
from workflows.images import WorkflowImage
from workflows.pixel_budget import current_call_pixel_budget


class DynamicCropBlock(Block):
    type = "roboflow_core/dynamic_crop@v1"
    aliases = ("DynamicCrop", "Crop")
    title = "Dynamic crop"
    description = "Cuts out each detected box; following steps run once per crop."
    fields = (
        Field(
            "images",
            IMAGE,
            "Image the detections were found in.",
            aliases=("image",),
        ),
        Field(
            "predictions",
            DETECTIONS,
            "Detections whose boxes are cut out.",
            aliases=("detections",),
        ),
    )
    # Each crop, and the detection it was cut for in the crop's coordinates.
    outputs = {"crops": IMAGE, "predictions": DETECTIONS}
    adds_dimension = 1

    def run(
        self, context: StepContext, *, images: WorkflowImage, predictions: Detections
    ) -> dict[str, Any]:
        crops, found = [], []
        # Every box may cover the whole image, so the crops of one call can
        # take max_detections times the image's memory. Each crop is
        # checked against the run's pixel budget as soon as it is cut.
        budget = current_call_pixel_budget()
        # Box edges round to the nearest pixel (half to even), as in
        # Roboflow's block.
        boxes = np.round(predictions.xyxy).astype(int)
        for index, (detection_id, (x1, y1, x2, y2)) in enumerate(
            zip(predictions.detection_ids, boxes, strict=True)
        ):
            # As in Roboflow's workflows, a crop's parent is the detection it
            # was cut from, and what is found in it names that parent.
            crop = crop_image(images, int(x1), int(y1), int(x2), int(y2), detection_id)
            # A box narrower than a pixel once rounded gives a null crop, as
            # in Roboflow's block, so crop i still belongs to detection i.
            # Steps fed by a null crop are skipped, and their outputs are null.
            if crop.width and crop.height:
                if budget is not None:
                    budget.check(crop, f"crop {index} of {len(boxes)}")
                crops.append(crop)
                found.append(_detection_in_crop(predictions, index, crop))
            else:
                crops.append(None)
                found.append(None)
        return {"crops": crops, "predictions": found}


def _detection_in_crop(
    predictions: Detections, index: int, crop: WorkflowImage
) -> Detections:
    """Return detection ``index`` alone, in the coordinates of its ``crop``.

    It keeps its id and class, and names the crop as the image it is in,
    as detections that a model finds in the crop do.
    """
    offset_x, offset_y = crop.parent_origin[:2]
    shift = np.array([offset_x, offset_y, offset_x, offset_y], dtype=np.float32)
    return Detections(
        xyxy=(predictions.xyxy[index : index + 1] - shift).astype(np.float32),
        confidence=predictions.confidence[index : index + 1],
        class_id=predictions.class_id[index : index + 1],
        class_names=[predictions.class_names[index]],
        image_size=(crop.width, crop.height),
        parent_id=crop.parent_id,
        detection_ids=[predictions.detection_ids[index]],
        root_id=crop.root,
        origin=crop.origin,
        parent_size=crop.root_size,
        inference_id=predictions.inference_id,
        parent_origin=crop.parent_origin,
    )
