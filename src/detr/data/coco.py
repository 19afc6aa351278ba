"""COCO-format detection datasets: images plus targets in the reference's layout.

A sample is ``(image, target)``; without transforms ``image`` is an RGB PIL image and ``target`` holds

    boxes     float32 [N, 4]  absolute xyxy, clipped to the image
    labels    int64   [N]     category ids as in the json (may be non-contiguous)
    masks     bool    [N, H, W]  only with return_masks; one per annotation (polygons or RLE)
    image_id  int64   [1]
    area      float32 [N]     the annotation's ``area`` field (segment area), not the box area
    iscrowd   int64   [N]     always 0: crowd annotations are dropped
    orig_size int64   [2]     (h, w) as loaded
    size      int64   [2]     (h, w) after transforms

Boxes that are empty after clipping (x1 <= x0 or y1 <= y0) are dropped with their other fields.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from detr.data.images import ImageLoadError, exif_orientation, open_decoded, oriented_size, to_rgb
from detr.data.transforms import Target, Transform
from detr.files import read_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) -> bool mask [H, W].

    The parts of a multi-polygon object are OR-ed together.
    """
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; nothing we can act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_segmentation(segmentation, height, width)


def _decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, dict):
        if isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation  # compressed RLE decodes as is
        return mask_utils.decode(rle).astype(bool)
    if isinstance(segmentation, list) and len(segmentation) > 0:
        rles = mask_utils.frPyObjects(segmentation, height, width)
        decoded = mask_utils.decode(rles)  # [H, W, parts]
        if decoded.ndim == 2:
            decoded = decoded[..., None]
        return decoded.any(axis=2)
    return np.zeros((height, width), dtype=bool)


def coco_target(
    image_id: int, annotations: Sequence[dict], width: int, height: int, *, return_masks: bool = False
) -> Target:
    """Build a sample's target from its COCO annotations for an image of ``width`` x ``height``."""
    annotations = [a for a in annotations if a.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])

    target: Target = {
        "boxes": boxes[keep],
        "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)[keep],
    }
    if return_masks:
        if annotations:
            masks = np.stack([decode_segmentation(a["segmentation"], height, width) for a in annotations])
            target["masks"] = torch.from_numpy(masks)[keep]  # [N, H, W]
        else:
            target["masks"] = torch.zeros((0, height, width), dtype=torch.bool)
    target["image_id"] = torch.tensor([image_id], dtype=torch.int64)
    target["area"] = torch.tensor([a["area"] for a in annotations], dtype=torch.float32)[keep]
    target["iscrowd"] = torch.tensor([a.get("iscrowd", 0) for a in annotations], dtype=torch.int64)[keep]
    target["orig_size"] = torch.tensor([height, width], dtype=torch.int64)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return target


def load_annotated_image(path: Path, width: int | None, height: int | None) -> Image.Image:
    """Load an image so that it matches the annotation's (width, height).

    COCO annotations describe the stored pixels, so the EXIF orientation is applied only when the
    oriented size matches the json and the stored size does not. A mismatch either way is an error.
    """
    image = open_decoded(path)
    if width is None or height is None or image.size == (width, height):
        return to_rgb(image)
    orientation = exif_orientation(image)
    if orientation != 1 and oriented_size(image.size, orientation) == (width, height):
        return to_rgb(ImageOps.exif_transpose(image))
    oriented = oriented_size(image.size, orientation)
    raise ImageLoadError(
        f"image {path} is {image.size[0]}x{image.size[1]} (w x h) as stored and {oriented[0]}x{oriented[1]} "
        f"after EXIF orientation {orientation}, but the annotation says {width}x{height}",
        path,
    )


def coco_api(dataset: dict[str, Any], source: str | os.PathLike[str] = "<memory>") -> COCO:
    """A COCO-format dict as a pycocotools ``COCO`` (indexed), without its progress prints."""
    if not isinstance(dataset, dict):
        raise ValueError(f"{source}: a COCO annotation file holds a json object, not a {type(dataset).__name__}")
    for key in ("images", "annotations"):
        if key in dataset and not isinstance(dataset[key], list):
            raise ValueError(f"{source}: '{key}' must be a list")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: malformed COCO annotations (missing or wrong field {e})") from None
    return coco


def load_coco(path: str | os.PathLike[str]) -> COCO:
    """A COCO-format json as a pycocotools ``COCO``, without its progress prints."""
    return coco_api(read_json(path), path)


class AnnotatedImages(Dataset):
    """What every annotated-image dataset here shares: the image folder, the transforms, bad-image
    skipping and the per-sample augmentation rng (see ``CocoDetection``). Subclasses set ``ids``
    (sample index -> image id) and ``category_names``."""

    ids: list[int]
    category_names: dict[int, str]

    def __init__(self, image_dir: str | os.PathLike[str], annotation_file: str | os.PathLike[str], *,
                 transforms: Transform | None, return_masks: bool, skip_bad_images: bool, seed: int | None) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.transforms = transforms
        self.return_masks = return_masks
        self.skip_bad_images = skip_bad_images
        self.seed = seed
        self.epoch = 0
        self.skipped = 0

    @property
    def num_classes(self) -> int:
        """max category id + 1: the class head has num_classes + 1 outputs (the last is no-object)."""
        return max(self.category_names) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_rng(self, index: int) -> random.Random:
        """The augmentation rng of sample ``index`` (see ``CocoDetection``)."""
        if self.seed is not None:
            return random.Random(f"{self.seed}:{self.epoch}:{index}")  # str seeds hash stably (sha512)
        return random.Random(int(torch.randint(0, 2**62, (1,)).item()))

    def load_sample(self, index: int) -> tuple[Image.Image, Target]:
        """The image and its target, before transforms; ImageLoadError when the image cannot be used."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, Target] | None:
        try:
            image, target = self.load_sample(index)
        except ImageLoadError as err:
            if not self.skip_bad_images:
                raise
            self.skipped += 1
            logger.warning("skipping image %d: %s", self.ids[index], err)
            return None
        if self.transforms is not None:
            image, target = self.transforms(image, target, self.sample_rng(index))
        return image, target


class CocoDetection(AnnotatedImages):
    """Any COCO-format annotation json plus its image folder.

    transforms: called as ``transforms(image, target, rng)`` (see ``detr.data.transforms``).
    return_masks: decode instance masks into ``target["masks"]``.
    skip_bad_images: a missing/corrupt image yields None (dropped by ``collate_detection``) and
        increments ``self.skipped`` (per process: each DataLoader worker counts its own), instead of
        raising ImageLoadError.
    seed: with a seed, the augmentation of sample ``index`` is a function of (seed, epoch, index) only,
        whichever worker loads it. Call ``set_epoch`` each epoch before iterating (workers started with
        ``persistent_workers`` keep the epoch they started with). Without a seed, each sample draws its
        rng seed from torch's default generator, which DataLoader seeds per worker from its base seed.
    """

    def __init__(self, image_dir: str | os.PathLike[str], annotation_file: str | os.PathLike[str], *,
                 transforms: Transform | None = None, return_masks: bool = False, skip_bad_images: bool = False,
                 seed: int | None = None, coco: COCO | None = None) -> None:
        # with ``coco``: annotation_file says where those annotations came from
        super().__init__(image_dir, annotation_file, transforms=transforms, return_masks=return_masks,
                         skip_bad_images=skip_bad_images, seed=seed)
        self.coco = coco if coco is not None else load_coco(self.annotation_file)
        self.ids = sorted(self.coco.imgs.keys())

        self.category_names: dict[int, str] = {
            int(c["id"]): str(c.get("name", c["id"])) for c in self.coco.dataset.get("categories", [])
        }
        unknown = {int(a["category_id"]) for a in self.coco.anns.values()} - set(self.category_names)
        if unknown:
            raise ValueError(f"{self.annotation_file}: annotations use undeclared category ids {sorted(unknown)}")
        if not self.category_names:
            raise ValueError(f"{self.annotation_file}: no categories")

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        info = self.coco.imgs[self.ids[index]]
        path = self.image_dir / info["file_name"]
        if info.get("exif_oriented"):  # annotations of the image as shown (YOLO's convention): always orient
            image = ImageOps.exif_transpose(open_decoded(path))
            if image.size != (info.get("width"), info.get("height")):
                raise ImageLoadError(f"image {path} is {image.size[0]}x{image.size[1]} (w x h) after EXIF "
                                     f"orientation, but the annotation says {info.get('width')}x{info.get('height')}",
                                     path)
            return to_rgb(image)
        return load_annotated_image(path, info.get("width"), info.get("height"))

    def load_sample(self, index: int) -> tuple[Image.Image, Target]:
        image_id = self.ids[index]
        image = self.load_image(index)
        width, height = image.size
        annotations = self.coco.imgToAnns.get(image_id, [])
        return image, coco_target(image_id, annotations, width, height, return_masks=self.return_masks)


def coco_paths(root: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """(image folder, annotation json) of the standard layout root/{split}2017 + root/annotations."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    root = Path(root)
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


def build_coco(
    root: str | os.PathLike[str],
    split: str,
    *,
    transforms: Transform | None = None,
    return_masks: bool = False,
    skip_bad_images: bool = False,
    seed: int | None = None,
) -> CocoDetection:
    """CocoDetection over root/{train,val}2017 with root/annotations/instances_{split}2017.json."""
    image_dir, annotation_file = coco_paths(root, split)
    missing = [str(p) for p in (Path(root), image_dir, annotation_file) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"COCO {split} split incomplete, missing: {', '.join(missing)}")
    return CocoDetection(
        image_dir,
        annotation_file,
        transforms=transforms,
        return_masks=return_masks,
        skip_bad_images=skip_bad_images,
        seed=seed,
    )
