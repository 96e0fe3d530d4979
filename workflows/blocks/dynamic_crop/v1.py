"""Dynamic crop: one crop per detection, so later steps can run on each object."""

from typing import Any

import numpy as np

from workflows.blocks.absolute_static_crop.v1 import crop_image
from workflows.blocks.base import DETECTIONS, IMAGE, Block, Field, StepContext
from workflows.detections import Detections
from workflows.images import WorkflowImage


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
    outputs = {"crops": IMAGE}
    adds_dimension = 1

    def run(
        self, context: StepContext, *, images: WorkflowImage, predictions: Detections
    ) -> dict[str, Any]:
        crops = []
        # Box edges round to the nearest pixel (half to even), as in
        # Roboflow's block.
        boxes = np.round(predictions.xyxy).astype(int)
        for detection_id, (x1, y1, x2, y2) in zip(
            predictions.detection_ids, boxes, strict=True
        ):
            # As in Roboflow's workflows, a crop's parent is the detection it
            # was cut from, and what is found in it names that parent.
            crop = crop_image(images, int(x1), int(y1), int(x2), int(y2), detection_id)
            # A box narrower than a pixel once rounded gives a null crop, as
            # in Roboflow's block, so crop i still belongs to detection i.
            # Steps fed by a null crop are skipped, and their outputs are null.
            crops.append(crop if crop.width and crop.height else None)
        return {"crops": crops}
