"""DETR's modules: backbone, positions, transformer, the convergence options' queries, the mask head.

``build_detr(config)`` is the one place a config becomes a model.
"""

from __future__ import annotations

from torch import nn

from ..config import DetrConfig
from .detr import DETR
from .segmentation import DETRsegm


def build_detr(config: DetrConfig, *, freeze_detr: bool = False) -> nn.Module:
    """The model for ``config``: DETR, or DETR with the mask head when ``config.masks``."""
    if config.masks:
        return DETRsegm(DETR(config), freeze_detr=freeze_detr)
    if freeze_detr:
        raise ValueError("freeze_detr only makes sense with masks=True (it trains the mask head alone)")
    return DETR(config)


__all__ = ["DETR", "DETRsegm", "build_detr"]
