"""DETR (Carion et al., 2020) in pure PyTorch, numerically identical to the reference implementation."""

from __future__ import annotations

from .checkpoint import CheckpointError, convert_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .config import DetrConfig, preset
from .data.batch import ImageBatch
from .model.detr import DETR, build_detr
from .model.minimal import DETRdemo
from .model.segmentation import DETRsegm

__version__ = "0.1.0"

__all__ = [
    "DETR",
    "DETRdemo",
    "DETRsegm",
    "CheckpointError",
    "DetrConfig",
    "ImageBatch",
    "build_detr",
    "convert_checkpoint",
    "load_checkpoint",
    "preset",
    "read_checkpoint",
    "save_checkpoint",
]
