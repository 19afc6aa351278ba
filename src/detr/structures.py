"""The model's input container, below both the model and the data pipeline.

``ImageBatch``: images padded to a common size with a ``padding_mask`` (True = padding), which the
backbone carries down to every feature level (``downsample_mask``) so that padding never counts as image.
``nearest_source_index`` is PyTorch's nearest-neighbour rule, shared with the mask post-processing.
"""

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


def nearest_source_index(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """Source index of each output position of F.interpolate(mode="nearest") along one axis: [out_size].

    PyTorch computes floor(i * float32(in / out)). ONNX's Resize divides by float32(out / in)
    instead, which rounds the other way at exact integers (e.g. 150 -> 5), so the ONNX export would
    pick other mask pixels; spelling out PyTorch's arithmetic keeps both identical.
    """
    # A tensor, not a Python float: the traced graph keeps the sizes dynamic.
    scale = torch.full((), in_size, dtype=torch.float32, device=device) / out_size
    index = torch.arange(out_size, dtype=torch.float32, device=device) * scale
    return index.floor().long().clamp(max=in_size - 1)


def downsample_mask(padding_mask: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a [B, H, W] padding mask to a feature map's (h, w): exactly
    F.interpolate(mode="nearest"), written as an index selection so that ONNX exports agree too."""
    h, w = padding_mask.shape[-2:]
    rows = nearest_source_index(h, size[0], padding_mask.device)
    cols = nearest_source_index(w, size[1], padding_mask.device)
    return padding_mask.index_select(1, rows).index_select(2, cols)  # [B, h, w]
