"""Collated detection batches: padded images (an ``ImageBatch``) with their targets, for the data loaders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from detr.structures import ImageBatch


@dataclass(frozen=True)
class DetectionBatch:
    """A collated batch: ``images, targets = batch`` unpacks it; ``skipped`` counts dropped items.

    images: the padded batch, or None when every item of the batch was dropped (skip it).
    targets: one dict per image, in the same order.
    skipped: how many items were None (unreadable images under ``skip_bad_images``).
    """

    images: ImageBatch | None
    targets: list[dict]
    skipped: int = 0

    def __iter__(self):  # so that `images, targets = batch` works as for a plain tuple
        yield self.images
        yield self.targets

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DetectionBatch:
        """Move images and every tensor of every target to ``device``."""
        images = None if self.images is None else self.images.to(device, non_blocking=non_blocking)
        targets = [
            {k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v for k, v in t.items()}
            for t in self.targets
        ]
        return DetectionBatch(images, targets, self.skipped)

    def pin_memory(self) -> DetectionBatch:
        """Called by DataLoader(pin_memory=True)."""
        images = self.images
        if images is not None:
            images = ImageBatch(images.pixels.pin_memory(), images.padding_mask.pin_memory())
        targets = [{k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in t.items()} for t in self.targets]
        return DetectionBatch(images, targets, self.skipped)


def collate_detection(items: Sequence[tuple[Tensor, dict] | None], size_divisibility: int = 0) -> DetectionBatch:
    """DataLoader collate_fn for (CHW image, target) items: pads images into an ImageBatch.

    None items (images skipped by the dataset) are dropped and counted in ``skipped``.
    """
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return DetectionBatch(None, [], skipped)
    images = ImageBatch.from_images([image for image, _ in kept], size_divisibility)
    return DetectionBatch(images, [target for _, target in kept], skipped)
