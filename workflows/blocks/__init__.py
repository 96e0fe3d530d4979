"""Every block the engine supports, looked up by full type name or alias."""

from workflows.blocks.absolute_static_crop.v1 import AbsoluteStaticCropBlock
from workflows.blocks.base import Block
from workflows.blocks.bounding_box_visualization.v1 import BoundingBoxVisualizationBlock
from workflows.blocks.continue_if.v1 import ContinueIfBlock
from workflows.blocks.detection_offset.v1 import DetectionOffsetBlock
from workflows.blocks.detections_consensus.v1 import DetectionsConsensusBlock
from workflows.blocks.detections_filter.v1 import DetectionsFilterBlock
from workflows.blocks.detections_transformation.v1 import DetectionsTransformationBlock
from workflows.blocks.dynamic_crop.v1 import DynamicCropBlock
from workflows.blocks.expression.v1 import ExpressionBlock
from workflows.blocks.object_detection.v1 import ObjectDetectionBlock
from workflows.blocks.property_definition.v1 import PropertyDefinitionBlock

BLOCKS: tuple[type[Block], ...] = (
    ObjectDetectionBlock,
    PropertyDefinitionBlock,
    AbsoluteStaticCropBlock,
    DynamicCropBlock,
    DetectionsFilterBlock,
    BoundingBoxVisualizationBlock,
    DetectionOffsetBlock,
    DetectionsTransformationBlock,
    ContinueIfBlock,
    DetectionsConsensusBlock,
    ExpressionBlock,
)


def _index() -> dict[str, type[Block]]:
    index: dict[str, type[Block]] = {}
    for block in BLOCKS:
        short = block.type.split("/", 1)[1]
        for name in (block.type, short, *block.aliases):
            index[name] = block
    return index


_BY_NAME = _index()


def find_block(type_name: str) -> type[Block] | None:
    """Return the block for a full type name, a name without namespace, or an alias."""
    return _BY_NAME.get(type_name)


def known_type_names() -> list[str]:
    return [block.type for block in BLOCKS]
