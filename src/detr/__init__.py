"""DETR (Carion et al., 2020) in pure PyTorch, numerically identical to the reference implementation.

The names below load on first use, so that ``import detr.model`` (or ``detr.config``) pulls in torch
alone, not the data pipeline's Pillow and pycocotools.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "checkpoint", "convert_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "DetrConfig": "config", "preset": "config",
    "export_onnx": "export",
    **{name: "hub" for name in ("detr_resnet50", "detr_resnet50_dc5", "detr_resnet50_dc5_panoptic",
                                "detr_resnet50_panoptic", "detr_resnet101", "detr_resnet101_dc5",
                                "detr_resnet101_panoptic")},
    "Detection": "inference.predictor", "Detector": "inference.predictor",
    "PanopticSegmentation": "inference.predictor",
    "DETR": "model", "DETRsegm": "model", "build_detr": "model", "DETRdemo": "model.minimal",
    "ImageBatch": "structures",
}

__all__ = [
    "CheckpointError",
    "DETR",
    "DETRdemo",
    "DETRsegm",
    "Detection",
    "Detector",
    "DetrConfig",
    "ImageBatch",
    "PanopticSegmentation",
    "build_detr",
    "convert_checkpoint",
    "detr_resnet101",
    "detr_resnet101_dc5",
    "detr_resnet101_panoptic",
    "detr_resnet50",
    "detr_resnet50_dc5",
    "detr_resnet50_dc5_panoptic",
    "detr_resnet50_panoptic",
    "export_onnx",
    "load_checkpoint",
    "preset",
    "read_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .checkpoint import CheckpointError, convert_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
    from .config import DetrConfig, preset
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
    from .model import DETR, DETRsegm, build_detr
    from .model.minimal import DETRdemo
    from .structures import ImageBatch
