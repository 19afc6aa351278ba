"""The COCO panoptic file format, read and written in one place: the PNG id encoding, the json, and the
standard folder layout. Data loading, post-processing, evaluation and the converters all use it.

A panoptic annotation is a json plus one PNG per image. The PNG stores a segment id per pixel as
``id = R + 256 * G + 256^2 * B`` (0 = unlabeled, "void"); the json lists each image's segments:

    {"images": [...], "categories": [{"id", "name", "isthing", ...}],
     "annotations": [{"image_id", "file_name": "<png>", "segments_info":
                      [{"id", "category_id", "iscrowd", "area", "bbox" (xywh)}, ...]}, ...]}
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from detr.data.images import ImageLoadError

SPLITS = ("train", "val")


def segment_ids_to_rgb(segment_ids: Tensor) -> Tensor:
    """Segment id map [...] (ids < 2^24) -> uint8 RGB [..., 3] with id = R + 256 G + 256^2 B."""
    ids = segment_ids.long()
    channels = [(ids >> shift) & 255 for shift in (0, 8, 16)]
    return torch.stack(channels, dim=-1).to(torch.uint8)  # [..., 3]


def rgb_to_segment_ids(rgb: Tensor) -> Tensor:
    """uint8 RGB [..., 3] -> int32 segment id map [...] (inverse of :func:`segment_ids_to_rgb`)."""
    rgb = rgb.to(torch.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def segment_ids_to_png(segment_ids: Tensor) -> bytes:
    """Segment id map [H, W] -> PNG bytes in the COCO panoptic RGB encoding."""
    rgb = segment_ids_to_rgb(segment_ids.cpu()).numpy()  # [H, W, 3]
    with io.BytesIO() as buffer:
        Image.fromarray(rgb).save(buffer, format="PNG")
        return buffer.getvalue()


def read_panoptic_json(
    path: str | os.PathLike[str], what: str = "panoptic json",
    keys: Sequence[str] = ("images", "annotations", "categories"),
) -> dict[str, Any]:
    """A panoptic json, checked for its top-level ``keys``; errors name the file (and line, for bad json)."""
    from detr.files import read_json

    data = read_json(path, what)
    require_keys(data, keys, Path(path))
    return data


def require_keys(data: Any, keys: Sequence[str], path: Path) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a json object at the top level")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: missing top-level key(s) {missing}")


def read_segment_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """A COCO panoptic PNG -> int32 segment id map [H, W] (id = R + 256 G + 256^2 B).

    RGB, RGBA (alpha ignored) and palette PNGs are accepted; other modes (grey, 16-bit) cannot hold
    the encoding and raise ImageLoadError naming the file, as do missing or corrupt files.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"segment PNG not found: {path}", path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("RGB", "RGBA", "P"):
                raise ImageLoadError(f"{path}: segment PNG has mode {image.mode}, expected RGB", path)
            rgb = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageLoadError):
            raise
        raise ImageLoadError(f"cannot read segment PNG {path}: {err}", path) from err
    return rgb_to_segment_ids(torch.from_numpy(rgb.copy())).numpy()


def coco_panoptic_paths(
    root: str | os.PathLike[str], split: str, panoptic_root: str | os.PathLike[str] | None = None
) -> tuple[Path, Path, Path]:
    """(image folder, panoptic json, PNG folder) of the standard layout.

    Images: root/{split}2017. Json: P/annotations/panoptic_{split}2017.json with P = panoptic_root
    (default: root). PNGs: P/annotations/panoptic_{split}2017/ (where the official zip unpacks), or
    P/panoptic_{split}2017/ (the reference's README layout) when only that one exists.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    root = Path(root)
    pan = root if panoptic_root is None else Path(panoptic_root)
    seg_folder = pan / "annotations" / f"panoptic_{split}2017"
    alternative = pan / f"panoptic_{split}2017"
    if not seg_folder.is_dir() and alternative.is_dir():
        seg_folder = alternative
    return root / f"{split}2017", pan / "annotations" / f"panoptic_{split}2017.json", seg_folder


def panoptic_root(coco_panoptic_path: str | os.PathLike[str] | None, coco_path: str | os.PathLike[str] | None,
                  flag: str = "--dataset_file coco_panoptic") -> Path:
    """Where the panoptic annotations live: ``--coco_panoptic_path``, else ``--coco_path``."""
    root = coco_panoptic_path or coco_path
    if root is None:
        raise ValueError(f"{flag} needs --coco_panoptic_path DIR (or --coco_path DIR)")
    return Path(root)
