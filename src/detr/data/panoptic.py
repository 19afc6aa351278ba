"""COCO panoptic segmentation data: the dataset, its standard layout, and a converter from instances.

The file format (json, PNG id encoding, folder layout) is read and written by ``detr.coco_panoptic``.

A ``CocoPanoptic`` sample is ``(image, target)`` with the keys of the reference's panoptic dataset:

    masks     bool    [N, H, W]  one per listed segment (pixels whose PNG id is the segment's id)
    labels    int64   [N]        category ids as in the json
    boxes     float32 [N, 4]     absolute xyxy around each mask (the reference's pixel-index
                                 convention: a mask over columns a..b gives x0=a, x1=b)
    iscrowd   int64   [N]        crowd segments are kept (the reference trains on them too)
    area      float32 [N]        the json's ``area``
    image_id  int64   [1]
    orig_size int64   [2]        (h, w) as loaded
    size      int64   [2]        (h, w) after transforms

and goes through the same transforms as detection (``t(image, target, rng)``, see
``detr.data.transforms``), with the same per-sample rng rule as ``CocoDetection``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detr.boxes import masks_to_boxes_xyxy
from detr.coco_panoptic import coco_panoptic_paths, read_segment_ids, require_keys, segment_ids_to_png
from detr.data.coco import AnnotatedImages, decode_segmentation, load_annotated_image
from detr.data.images import ImageLoadError
from detr.data.transforms import Target, Transform
from detr.files import read_json

logger = logging.getLogger(__name__)

__all__ = [
    "CocoPanoptic",
    "build_coco_panoptic",
    "panoptic_from_instances",
    "panoptic_target",
]


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


def panoptic_target(
    image_id: int, segments_info: Sequence[dict], segment_ids: Tensor, *, return_masks: bool = True
) -> Target:
    """Build a sample's target from its ``segments_info`` and PNG id map ``segment_ids`` [H, W]."""
    height, width = segment_ids.shape
    ids = torch.tensor([int(s["id"]) for s in segments_info], dtype=torch.int64)
    masks = segment_ids.to(torch.int64)[None] == ids[:, None, None]  # [N, H, W]
    target: Target = {}
    if return_masks:
        target["masks"] = masks
    target["labels"] = torch.tensor([int(s["category_id"]) for s in segments_info], dtype=torch.int64)
    target["boxes"] = masks_to_boxes_xyxy(masks).to(torch.float32).reshape(-1, 4)
    target["iscrowd"] = torch.tensor([int(s.get("iscrowd", 0)) for s in segments_info], dtype=torch.int64)
    target["area"] = torch.tensor([float(s.get("area", 0)) for s in segments_info], dtype=torch.float32)
    target["image_id"] = torch.tensor([image_id], dtype=torch.int64)
    target["orig_size"] = torch.tensor([height, width], dtype=torch.int64)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return target


class CocoPanoptic(AnnotatedImages):
    """A COCO panoptic json, its PNG folder and the image folder.

    transforms, skip_bad_images, seed: as in ``CocoDetection`` (a missing or unreadable segment PNG
    counts as a bad image too).
    return_masks: put ``masks`` into the target (boxes are computed from the masks either way).

    Samples are the images with an entry in ``annotations``, in increasing image id order. The image
    file comes from the ``images`` entry of the same id (not from the PNG's name), and must have the
    size the json states, as must the PNG.
    """

    def __init__(self, image_dir: str | os.PathLike[str], ann_json: str | os.PathLike[str],
                 seg_folder: str | os.PathLike[str], *, transforms: Transform | None = None, return_masks: bool = True,
                 skip_bad_images: bool = False, seed: int | None = None) -> None:
        super().__init__(image_dir, ann_json, transforms=transforms, return_masks=return_masks,
                         skip_bad_images=skip_bad_images, seed=seed)
        self.seg_folder = Path(seg_folder)
        if not self.seg_folder.is_dir():
            raise FileNotFoundError(f"panoptic PNG folder not found: {self.seg_folder}")
        data = read_json(self.annotation_file, "panoptic annotation file")
        require_keys(data, ("images", "annotations", "categories"), self.annotation_file)
        self.dataset: dict[str, Any] = data
        self.images: dict[int, dict] = {int(info["id"]): info for info in data["images"]}
        self.categories: dict[int, dict] = {int(c["id"]): c for c in data["categories"]}
        if not self.categories:
            raise ValueError(f"{self.annotation_file}: no categories")
        self.annotations: dict[int, dict] = {}
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            if image_id not in self.images:
                raise ValueError(f"{self.annotation_file}: annotation for image id {image_id}, which is not in images")
            if image_id in self.annotations:
                raise ValueError(f"{self.annotation_file}: image id {image_id} has two annotation entries")
            unknown = {int(s["category_id"]) for s in ann["segments_info"]} - set(self.categories)
            if unknown:
                raise ValueError(
                    f"{self.annotation_file}: image {image_id} uses undeclared category ids {sorted(unknown)}"
                )
            self.annotations[image_id] = ann
        self.ids = sorted(self.annotations)
        self.category_names: dict[int, str] = {k: str(c.get("name", k)) for k, c in self.categories.items()}
        # Categories without the field count as things (instance-style jsons have no "isthing").
        self.is_thing: dict[int, bool] = {k: int(c.get("isthing", 1)) == 1 for k, c in self.categories.items()}

    @functools.cached_property
    def coco(self) -> Any:
        """The segments as a pycocotools COCO with boxes only (bbox AP of a detector trained on panoptic data).

        Boxes, areas and crowd flags come from the json's ``segments_info``; every segment, thing or
        stuff, is an object, as in the paper's first (box) stage of panoptic training.
        """
        from pycocotools.coco import COCO

        annotations = []
        for image_id in self.ids:
            for segment in self.annotations[image_id]["segments_info"]:
                if "bbox" not in segment:
                    where = f"image {image_id} segment {segment.get('id')}"
                    raise ValueError(f"{self.annotation_file}: {where} has no bbox")
                x, y, w, h = (float(v) for v in segment["bbox"])
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": int(segment["category_id"]),
                    "bbox": [x, y, w, h], "area": float(segment.get("area", w * h)),
                    "iscrowd": int(segment.get("iscrowd", 0)),
                })
        coco = COCO()
        coco.dataset = {"images": [self.images[i] for i in self.ids], "annotations": annotations,
                        "categories": list(self.categories.values())}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[self.ids[index]]["file_name"]

    def segments_path(self, index: int) -> Path:
        return self.seg_folder / self.annotations[self.ids[index]]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        info = self.images[self.ids[index]]
        return load_annotated_image(self.image_dir / info["file_name"], info.get("width"), info.get("height"))

    def load_segment_ids(self, index: int) -> Tensor:
        """The PNG's id map [H, W] (int32)."""
        return torch.from_numpy(read_segment_ids(self.segments_path(index)))

    def load_sample(self, index: int) -> tuple[Image.Image, Target]:
        image_id = self.ids[index]
        image = self.load_image(index)
        segment_ids = self.load_segment_ids(index)
        if tuple(segment_ids.shape) != (image.size[1], image.size[0]):
            raise ImageLoadError(
                f"segment PNG {self.segments_path(index)} is {segment_ids.shape[1]}x{segment_ids.shape[0]} "
                f"(w x h) but image {self.image_path(index)} is {image.size[0]}x{image.size[1]}",
                self.segments_path(index),
            )
        segments = self.annotations[image_id]["segments_info"]
        return image, panoptic_target(image_id, segments, segment_ids, return_masks=self.return_masks)


def build_coco_panoptic(
    root: str | os.PathLike[str],
    split: str,
    *,
    panoptic_root: str | os.PathLike[str] | None = None,
    transforms: Transform | None = None,
    return_masks: bool = True,
    skip_bad_images: bool = False,
    seed: int | None = None,
) -> CocoPanoptic:
    """CocoPanoptic over the standard layout (see :func:`coco_panoptic_paths`)."""
    image_dir, ann_json, seg_folder = coco_panoptic_paths(root, split, panoptic_root)
    missing = [str(p) for p in (image_dir, ann_json, seg_folder) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"COCO panoptic {split} split incomplete, missing: {', '.join(missing)}")
    return CocoPanoptic(
        image_dir, ann_json, seg_folder, transforms=transforms, return_masks=return_masks,
        skip_bad_images=skip_bad_images, seed=seed,
    )


# ----------------------------------------------------------------------------------------------
# Converter: instances json -> panoptic json + PNGs (things only)
# ----------------------------------------------------------------------------------------------


def _bbox_xywh(mask: np.ndarray) -> list[int]:
    """Tight [x, y, w, h] around a non-empty bool mask [H, W], in whole pixels (w = x_max - x_min + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _image_size(info: dict, image_dir: Path | None, json_path: Path) -> tuple[int, int]:
    """(width, height) of an images entry: from the json, checked against the file when image_dir is given."""
    width, height = info.get("width"), info.get("height")
    if image_dir is not None:
        image = load_annotated_image(image_dir / info["file_name"], width, height)  # ImageLoadError if bad
        return image.size
    if width is None or height is None:
        raise ValueError(
            f"{json_path}: image {info['id']} ({info.get('file_name')}) has no width/height; "
            "pass the image folder so that the sizes can be read from the files"
        )
    return int(width), int(height)


def _paint_image(
    annotations: Sequence[dict], width: int, height: int, skip: dict[str, int], json_path: Path
) -> tuple[np.ndarray, list[dict]]:
    """Paint one image's annotations into a segment id map [H, W] and list its segments."""
    crowd: dict[int, tuple[np.ndarray, list[int]]] = {}
    things: list[tuple[np.ndarray, int, dict]] = []
    for ann in annotations:
        try:
            mask = decode_segmentation(ann.get("segmentation"), height, width)
        except Exception as err:  # pycocotools raises assorted types on malformed polygons/RLE
            skip["skipped_annotations"] += 1
            logger.warning("%s: annotation %s has an undecodable segmentation (%s); skipped", json_path,
                           ann.get("id"), err)
            continue
        if not mask.any():
            skip["dropped_empty"] += 1
            continue
        if int(ann.get("iscrowd", 0)) == 1:
            # One crowd region per category and image: the PQ definition looks crowd regions up by category.
            category = int(ann["category_id"])
            union, ids = crowd.get(category, (np.zeros_like(mask), []))
            crowd[category] = (union | mask, [*ids, ann.get("id")])
        else:
            things.append((mask, int(mask.sum()), ann))

    # Paint order (later paint wins where masks overlap): crowd regions first, by category id; then
    # instances from the largest to the smallest mask (pixel count; ties by annotation id), so that a
    # small object lying on a larger one keeps its pixels.
    things.sort(key=lambda t: (-t[1], t[2].get("id", 0)))
    layers: list[tuple[np.ndarray, int, int, list]] = [(m, c, 1, ids) for c, (m, ids) in sorted(crowd.items())]
    layers += [(m, int(ann["category_id"]), 0, [ann.get("id")]) for m, _, ann in things]
    segment_ids = np.zeros((height, width), dtype=np.int32)
    for seg_id, (mask, _, _, _) in enumerate(layers, start=1):
        segment_ids[mask] = seg_id
    areas = np.bincount(segment_ids.ravel(), minlength=len(layers) + 1)

    segments = []
    for seg_id, (_, category, iscrowd, ann_ids) in enumerate(layers, start=1):
        if areas[seg_id] == 0:  # entirely covered by later (smaller) masks
            skip["dropped_covered"] += 1
            continue
        segments.append({
            "id": seg_id, "category_id": category, "iscrowd": iscrowd, "area": int(areas[seg_id]),
            "bbox": _bbox_xywh(segment_ids == seg_id), "annotation_ids": ann_ids,
        })
    return segment_ids, segments


def panoptic_from_instances(
    instances_json: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    out_folder: str | os.PathLike[str],
    *,
    image_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build COCO panoptic annotations (things only) from a COCO instances json.

    Every image of the json gets a PNG (its file name with a .png suffix) in ``out_folder`` and an
    entry in ``out_json``; pixels of no annotation are 0 (void). The rules:

    - overlapping instances are made disjoint by painting crowd regions first, then instances from
      the largest mask to the smallest (ties: lower annotation id first), later paint winning; so an
      instance keeps every pixel that no smaller instance covers;
    - the crowd annotations of one category in one image become a single segment with iscrowd=1;
    - segments with no pixel left (empty masks, or fully covered) are dropped and counted;
    - ``area`` and ``bbox`` are those of the painted segment; ``annotation_ids`` lists the source
      annotation(s); every category is copied with ``isthing`` = 1.

    image_dir: if given, each image is opened (fully decoded) to take its size when the json has none
        and to check it otherwise; missing, unreadable or mis-sized images are skipped and counted.
    Annotations of unknown images and annotations whose segmentation cannot be decoded are skipped
    and counted; an undeclared category id is an error.

    Returns a summary: images, segments, crowd_segments, dropped_empty, dropped_covered,
    skipped_annotations, skipped_images, out_json, out_folder.
    """
    json_path = Path(instances_json)
    data = read_json(json_path, "instances annotation file")
    require_keys(data, ("images", "annotations", "categories"), json_path)
    out_json, out_folder = Path(out_json), Path(out_folder)
    folder = None if image_dir is None else Path(image_dir)
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")

    categories = [{**c, "isthing": 1} for c in data["categories"]]
    category_ids = {int(c["id"]) for c in categories}
    unknown = {int(a["category_id"]) for a in data["annotations"]} - category_ids
    if unknown:
        raise ValueError(f"{json_path}: annotations use undeclared category ids {sorted(unknown)}")
    images = sorted(data["images"], key=lambda info: int(info["id"]))
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[int(ann["image_id"])].append(ann)

    counts = dict.fromkeys(("dropped_empty", "dropped_covered", "skipped_annotations", "skipped_images"), 0)
    known_images = {int(info["id"]) for info in images}
    orphans = sum(len(anns) for image_id, anns in by_image.items() if image_id not in known_images)
    if orphans:
        logger.warning("%s: %d annotation(s) refer to images not in the json; skipped", json_path, orphans)
    counts["skipped_annotations"] = orphans
    png_names: dict[str, int] = {}
    kept_images, entries = [], []
    out_folder.mkdir(parents=True, exist_ok=True)
    for info in images:
        image_id = int(info["id"])
        png_name = Path(info["file_name"]).with_suffix(".png").as_posix()
        if png_name in png_names:
            raise ValueError(f"{json_path}: images {png_names[png_name]} and {image_id} map to the same PNG {png_name}")
        png_names[png_name] = image_id
        try:
            width, height = _image_size(info, folder, json_path)
        except ImageLoadError as err:
            counts["skipped_images"] += 1
            counts["skipped_annotations"] += len(by_image.get(image_id, []))
            logger.warning("skipping image %d: %s", image_id, err)
            continue
        segment_ids, segments = _paint_image(by_image.get(image_id, []), width, height, counts, json_path)
        png_path = out_folder / png_name
        png_path.parent.mkdir(parents=True, exist_ok=True)
        png_path.write_bytes(segment_ids_to_png(torch.from_numpy(segment_ids)))
        kept_images.append({**info, "width": width, "height": height})
        entries.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})

    result = {k: data[k] for k in ("info", "licenses") if k in data}
    result.update({"images": kept_images, "annotations": entries, "categories": categories})
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result))
    segments = [s for e in entries for s in e["segments_info"]]
    return {
        "images": len(entries),
        "segments": len(segments),
        "crowd_segments": sum(s["iscrowd"] for s in segments),
        **counts,
        "out_json": str(out_json),
        "out_folder": str(out_folder),
    }
