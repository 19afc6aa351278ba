"""Datasets, transforms and batching."""

from detr.data.batch import DetectionBatch, collate_detection
from detr.data.coco import CocoDetection, build_coco, coco_target, decode_segmentation
from detr.data.images import ImageLoadError, load_image
from detr.data.shapes import SHAPES_CATEGORIES, generate_shapes
from detr.data.transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    make_coco_transforms,
)

__all__ = [
    "SHAPES_CATEGORIES",
    "CocoDetection",
    "Compose",
    "DetectionBatch",
    "ImageLoadError",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "ToTensor",
    "build_coco",
    "coco_target",
    "collate_detection",
    "decode_segmentation",
    "generate_shapes",
    "load_image",
    "make_coco_transforms",
]
