"""Joint image + target transforms with the reference's semantics.

Every transform is called as ``transform(image, target, rng)`` and returns ``(image, target)``.
``target`` is a dict as ``CocoDetection`` builds it (``boxes`` absolute xyxy float32 [N, 4],
``labels`` [N], ``area`` [N], ``iscrowd`` [N], optional ``masks`` bool [N, H, W], ``size`` (h, w), ...)
and may be None. Geometric transforms take PIL images (flip and crop also take CHW tensors); ``ToTensor``
and ``Normalize`` end the pipeline, after which ``boxes`` are normalized cxcywh.

Randomness comes only from ``rng`` (a ``random.Random``), never from global state: ``Compose`` passes
the one it was given, or its own (``Compose(..., seed=s)``) when called without one. The datasets
create one ``rng`` per sample (see ``CocoDetection``), so a sample's augmentation depends on
(seed, epoch, index) and not on which DataLoader worker loads it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from detr.boxes import xyxy_to_cxcywh
from detr.preprocessing import COCO_TRAIN_SCALES, IMAGENET_MEAN, IMAGENET_STD, InputConfig

Target = dict[str, Any]


class Transform(Protocol):
    def __call__(
        self, image: Any, target: Target | None, rng: random.Random | None = None
    ) -> tuple[Any, Target | None]: ...


def _image_size(image: Image.Image | Tensor) -> tuple[int, int]:
    """(w, h) of a PIL image or a CHW tensor."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    raise TypeError(f"expected a PIL image or a CHW tensor, got {type(image).__name__}")


def _rng(rng: random.Random | None) -> random.Random:
    # A transform used on its own without an rng gets fresh OS entropy (not the global `random` module).
    return rng if rng is not None else random.Random()


# ---------------------------------------------------------------------------------------------
# Functional forms
# ---------------------------------------------------------------------------------------------


def hflip(image: Image.Image | Tensor, target: Target | None) -> tuple[Image.Image | Tensor, Target | None]:
    """Mirror left-right: x -> w - x for boxes (x0 and x1 swap roles), masks flipped."""
    w, _ = _image_size(image)
    if isinstance(image, Image.Image):
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        flipped = image.flip(-1)
    if target is None:
        return flipped, None
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor(
            [w, 0, w, 0]
        )
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return flipped, target


def resized_hw(image_size: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) for a short side of ``size`` (w, h input), capped so the long side stays <= max_size.

    The reference's rule: if the long side would exceed ``max_size`` the short side becomes
    round(max_size * short / long); a short side already equal to ``size`` leaves the image as is;
    otherwise the long side is int(size * long / short) (truncated).
    """
    w, h = image_size
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(
    image: Image.Image, target: Target | None, size: int | tuple[int, int], max_size: int | None = None
) -> tuple[Image.Image, Target | None]:
    """Bilinear resize to a short side of ``size`` (or to an exact (h, w) tuple) and rescale the target.

    Boxes scale by (w'/w, h'/h), area by their product; masks use nearest interpolation.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"resize expects a PIL image (resize before ToTensor), got {type(image).__name__}")
    if isinstance(size, (tuple, list)):
        oh, ow = int(size[0]), int(size[1])
    else:
        oh, ow = resized_hw(image.size, size, max_size)
    resized = image.resize((ow, oh), Image.Resampling.BILINEAR)
    if target is None:
        return resized, None
    ratio_w, ratio_h = (float(new) / float(old) for new, old in zip(resized.size, image.size, strict=True))
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([oh, ow])
    if "masks" in target:
        masks = target["masks"]
        if masks.shape[0] == 0:
            target["masks"] = torch.zeros((0, oh, ow), dtype=torch.bool)
        else:
            target["masks"] = F.interpolate(masks[:, None].float(), (oh, ow), mode="nearest")[:, 0] > 0.5
    return resized, target


def crop(
    image: Image.Image | Tensor, target: Target | None, region: tuple[int, int, int, int]
) -> tuple[Image.Image | Tensor, Target | None]:
    """Crop ``region`` = (top, left, height, width); boxes are shifted and clipped to the crop.

    As in the reference, ``area`` becomes the clipped box area, and objects whose clipped box has zero
    width or height (or, without boxes, an empty mask) are removed with all their fields.
    """
    top, left, height, width = region
    if isinstance(image, Image.Image):
        cropped = image.crop((left, top, left + width, top + height))
    else:
        cropped = image[..., top : top + height, left : left + width]
    if target is None:
        return cropped, None
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        corners = target["boxes"] - torch.as_tensor([left, top, left, top])
        corners = torch.min(corners.reshape(-1, 2, 2), torch.as_tensor([width, height], dtype=torch.float32))
        corners = corners.clamp(min=0)  # [N, 2 corners, (x, y)]
        target["boxes"] = corners.reshape(-1, 4)
        target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
    if "masks" in target:
        target["masks"] = target["masks"][:, top : top + height, left : left + width]
    if "boxes" in target:
        corners = target["boxes"].reshape(-1, 2, 2)
        keep = torch.all(corners[:, 1, :] > corners[:, 0, :], dim=1)
    elif "masks" in target:
        keep = target["masks"].flatten(1).any(1)
    else:
        return cropped, target
    for name in ("labels", "area", "iscrowd", "boxes", "masks"):
        if name in target:
            target[name] = target[name][keep]
    return cropped, target


# ---------------------------------------------------------------------------------------------
# Transform objects
# ---------------------------------------------------------------------------------------------


class Compose:
    """Apply transforms in order, threading one ``rng`` through all of them.

    seed: the rng used when the call passes none (a fresh OS-seeded one when seed is None).
    """

    def __init__(self, transforms: Sequence[Transform], *, seed: int | None = None) -> None:
        self.transforms = list(transforms)
        self.rng = random.Random(seed)

    def __call__(
        self, image: Any, target: Target | None, rng: random.Random | None = None
    ) -> tuple[Any, Target | None]:
        rng = self.rng if rng is None else rng
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Any, target: Target | None, rng: random.Random | None = None):
        if _rng(rng).random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize to a short side drawn uniformly from ``sizes`` (long side capped at ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if len(sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def __call__(self, image: Any, target: Target | None, rng: random.Random | None = None):
        size = self.sizes[0] if len(self.sizes) == 1 else _rng(rng).choice(self.sizes)
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region of width and height each drawn from [min_size, min(image side, max_size)].

    The reference fails when an image side is below ``min_size``; here the lower bound shrinks to the
    side instead (matters only for small images, e.g. CPU configs).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        if min_size > max_size:
            raise ValueError(f"min_size {min_size} > max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Any, target: Target | None, rng: random.Random | None = None):
        rng = _rng(rng)
        img_w, img_h = _image_size(image)
        w_high, h_high = min(img_w, self.max_size), min(img_h, self.max_size)
        w = rng.randint(min(self.min_size, w_high), w_high)
        h = rng.randint(min(self.min_size, h_high), h_high)
        top = rng.randint(0, img_h - h)
        left = rng.randint(0, img_w - w)
        return crop(image, target, (top, left, h, w))

    def __repr__(self) -> str:
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, else ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Any, target: Target | None, rng: random.Random | None = None):
        rng = _rng(rng)
        if rng.random() < self.p:
            return self.first(image, target, rng)
        return self.second(image, target, rng)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


def to_tensor(image: Image.Image) -> Tensor:
    """HWC uint8 PIL image -> CHW float32 in [0, 1] (the same arithmetic as torchvision's to_tensor)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_tensor expects a PIL image, got {type(image).__name__}")
    array = np.array(image, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)  # [C, H, W]


class ToTensor:
    def __call__(self, image: Any, target: Target | None, rng: random.Random | None = None):
        return to_tensor(image), target

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Standardize channels, and turn absolute xyxy boxes into cxcywh normalized by the image size."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Tensor, target: Target | None, rng: random.Random | None = None):
        mean = torch.as_tensor(self.mean, dtype=image.dtype)[:, None, None]
        std = torch.as_tensor(self.std, dtype=image.dtype)[:, None, None]
        image = (image - mean) / std
        if target is None:
            return image, None
        target = dict(target)
        h, w = image.shape[-2:]
        if "boxes" in target:
            target["boxes"] = xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def make_coco_transforms(split: str, *, scales: Sequence[int] | None = None, max_size: int | None = 1333,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Compose:
    """The reference's COCO augmentation.

    train: horizontal flip, then either a resize to a short side in ``scales`` or
    (resize to 400/500/600, random crop 384..600, resize to ``scales``), then normalize.
    val: resize to a short side of max(scales) (800), then normalize.
    ``scales=None`` is the reference's 480..800 step 32. Smaller ``scales`` (CPU configs) shrink the
    crop branch's sizes by max(scales) / 800 so it keeps its proportions.
    """
    scales = list(COCO_TRAIN_SCALES if scales is None else scales)
    if not scales:
        raise ValueError("scales must not be empty")
    normalize = [ToTensor(), Normalize(mean, std)]
    if split == "train":
        ratio = max(scales) / 800
        crop_resizes = [400, 500, 600] if ratio == 1 else [max(1, round(s * ratio)) for s in (400, 500, 600)]
        crop_min, crop_max = (384, 600) if ratio == 1 else (max(1, round(384 * ratio)), max(1, round(600 * ratio)))
        return Compose(
            [
                RandomHorizontalFlip(),
                RandomSelect(
                    RandomResize(scales, max_size=max_size),
                    Compose(
                        [
                            RandomResize(crop_resizes),
                            RandomSizeCrop(crop_min, crop_max),
                            RandomResize(scales, max_size=max_size),
                        ]
                    ),
                ),
                *normalize,
            ]
        )
    if split == "val":
        return Compose([RandomResize([max(scales)], max_size=max_size), *normalize])
    raise ValueError(f"unknown split {split!r}: expected 'train' or 'val'")


def val_transform(spec: InputConfig) -> Compose:
    """The evaluation resize and normalization of ``spec`` (what a checkpoint says it was validated with)."""
    return make_coco_transforms("val", scales=[spec.size], max_size=spec.max_size, mean=spec.mean, std=spec.std)
