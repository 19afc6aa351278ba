"""DETR (Carion et al., 2020) in pure PyTorch, numerically identical to the reference implementation."""

from __future__ import annotations

from .checkpoint import CheckpointError, convert_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .config import DetrConfig, preset
from .data.batch import ImageBatch
from .export import export_onnx
from .hub import (
    detr_resnet50,
    detr_resnet50_dc5,
    detr_resnet50_dc5_panoptic,
    detr_resnet50_panoptic,
    detr_resnet101,
    detr_resnet101_dc5,
    detr_resnet101_panoptic,
)
from .inference.predictor import Detection, Detector, PanopticSegmentation
from .model.detr import DETR, build_detr
from .model.minimal import DETRdemo
from .model.segmentation import DETRsegm

__version__ = "0.1.0"

__all__ = [
    "DETR",
    "DETRdemo",
    "DETRsegm",
    "CheckpointError",
    "Detection",
    "Detector",
    "DetrConfig",
    "ImageBatch",
    "PanopticSegmentation",
    "build_detr",
    "convert_checkpoint",
    "detr_resnet50",
    "export_onnx",
    "detr_resnet50_dc5",
    "detr_resnet50_dc5_panoptic",
    "detr_resnet50_panoptic",
    "detr_resnet101",
    "detr_resnet101_dc5",
    "detr_resnet101_panoptic",
    "load_checkpoint",
    "preset",
    "read_checkpoint",
    "save_checkpoint",
]
