"""What a detector returns: detections and panoptic segmentations, and what it takes (``ImageInput``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch import Tensor

ImageInput = Image.Image | str | os.PathLike[str]


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` = (x0, y0, x1, y1) in the original image's pixels."""

    box: tuple[float, float, float, float]
    score: float
    label: int
    name: str

    @property
    def box_xywh(self) -> tuple[float, float, float, float]:
        """(x, y, width, height): the COCO json layout."""
        x0, y0, x1, y1 = self.box
        return x0, y0, x1 - x0, y1 - y0

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "score": self.score, "label": self.label, "name": self.name}


@dataclass(frozen=True)
class PanopticSegmentation:
    """``segment_ids`` int32 [H, W] at the original size; each value is the ``id`` of one of ``segments``
    (dicts with "id", "category_id", "isthing", "area", "name")."""

    segment_ids: Tensor
    segments: list[dict[str, Any]]
