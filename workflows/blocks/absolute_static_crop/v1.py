"""Absolute static crop: cut a fixed rectangle, given in pixels, from each image."""

import uuid
from typing import Any

from workflows.blocks.base import (
    IMAGE,
    VALUE,
    Block,
    Field,
    StepContext,
    number_between,
)
from workflows.images import WorkflowImage

# No image side is this long (the pixel limit is far lower), and larger
# numbers overflow when converted to floats.
MAX_COORDINATE = 1_000_000


def crop_image(
    image: WorkflowImage, x1: int, y1: int, x2: int, y2: int, crop_id: str
) -> WorkflowImage:
    """Return the pixels inside (x1, y1, x2, y2), clipped to the image.

    ``crop_id`` becomes the crop's ``parent_id``, which detections found in
    it carry, as in Roboflow's workflows.
    """
    x1, x2 = max(0, x1), min(image.width, x2)
    y1, y2 = max(0, y1), min(image.height, y2)
    pixels = image.pixels[y1:y2, x1:x2].copy()
    ox, oy = image.origin
    return WorkflowImage.from_pixels(
        pixels,
        parent_id=crop_id,
        origin=(ox + x1, oy + y1),
        root_size=image.root_size or (image.width, image.height),
        root_id=image.root,
        parent_origin=(x1, y1, image.width, image.height),
    )


class AbsoluteStaticCropBlock(Block):
    type = "roboflow_core/absolute_static_crop@v1"
    aliases = ("AbsoluteStaticCrop",)
    title = "Static crop"
    description = (
        "Crops a fixed rectangle given by its centre and size in pixels; "
        "null where the rectangle lies outside the image."
    )
    _number = (int, float)
    fields = (
        Field("images", IMAGE, "Image to crop.", aliases=("image",)),
        Field(
            "x_center",
            VALUE,
            "Centre x in pixels.",
            types=_number,
            check=number_between(0, MAX_COORDINATE),
        ),
        Field(
            "y_center",
            VALUE,
            "Centre y in pixels.",
            types=_number,
            check=number_between(0, MAX_COORDINATE),
        ),
        Field(
            "width",
            VALUE,
            "Crop width in pixels, at least 1.",
            types=_number,
            check=number_between(1, MAX_COORDINATE),
        ),
        Field(
            "height",
            VALUE,
            "Crop height in pixels, at least 1.",
            types=_number,
            check=number_between(1, MAX_COORDINATE),
        ),
    )
    outputs = {"crops": IMAGE}

    def run(
        self,
        context: StepContext,
        *,
        images: WorkflowImage,
        x_center: float,
        y_center: float,
        width: float,
        height: float,
    ) -> dict[str, Any]:
        x1 = round(x_center - width / 2)
        y1 = round(y_center - height / 2)
        x2, y2 = x1 + round(width), y1 + round(height)
        if x2 <= 0 or y2 <= 0 or x1 >= images.width or y1 >= images.height:
            # Roboflow's block gives no crop here, and the steps that would
            # read it are skipped, so one small image in a batch does not
            # fail the others.
            return {"crops": None}
        crop_id = f"absolute_static_crop.{uuid.uuid4()}"
        return {"crops": crop_image(images, x1, y1, x2, y2, crop_id)}
