"""Padded image batches: the container the model takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """Images padded to a common size, with ``padding_mask`` True where a pixel is padding.

    pixels: [B, 3, H, W] float; padding_mask: [B, H, W] bool.
    """

    pixels: Tensor
    padding_mask: Tensor

    @classmethod
    def from_images(cls, images: Sequence[Tensor], size_divisibility: int = 0) -> ImageBatch:
        """Pad CHW images (bottom/right, with zeros) to the largest height and width in the list."""
        if len(images) == 0:
            raise ValueError("cannot batch an empty list of images")
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"image {i} must be CHW, got shape {tuple(image.shape)}")
        channels = images[0].shape[0]
        height = max(int(img.shape[1]) for img in images)
        width = max(int(img.shape[2]) for img in images)
        if size_divisibility > 1:
            height = -(-height // size_divisibility) * size_divisibility
            width = -(-width // size_divisibility) * size_divisibility
        first = images[0]
        pixels = first.new_zeros((len(images), channels, height, width))
        padding_mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
        for i, image in enumerate(images):
            h, w = image.shape[1:]
            pixels[i, :, :h, :w].copy_(image)
            padding_mask[i, :h, :w] = False
        return cls(pixels, padding_mask)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(
            self.pixels.to(device, non_blocking=non_blocking),
            self.padding_mask.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of each image before padding."""
        valid = ~self.padding_mask
        heights = valid[:, :, 0].sum(dim=1).tolist()
        widths = valid[:, 0, :].sum(dim=1).tolist()
        return [(int(h), int(w)) for h, w in zip(heights, widths, strict=True)]


def as_image_batch(images: ImageBatch | Tensor | Sequence[Tensor]) -> ImageBatch:
    """Accept an ImageBatch, a [B, 3, H, W] tensor (no padding), a CHW tensor or a list of CHW tensors."""
    if isinstance(images, ImageBatch):
        return images
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise ValueError(f"expected a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
        mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        return ImageBatch(images, mask)
    return ImageBatch.from_images(list(images))


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
