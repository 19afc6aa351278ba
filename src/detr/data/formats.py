"""The dataset layouts people have -- COCO, YOLO, Pascal VOC -- as one thing: COCO-format annotations.

``load_split(root, "train")`` detects the layout (or takes ``fmt``), reads a split and returns its
image folder and a pycocotools ``COCO``; training (``CocoDetection``), COCO evaluation and
``detr data convert`` all use that, so every format trains and scores the same way. ``convert``
writes any of them as any other (COCO json, YOLO labels, VOC XML).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from detr.data.coco import coco_api, coco_paths, load_coco
from detr.files import atomic_write, read_json

log = logging.getLogger(__name__)

FORMATS = ("coco", "yolo", "voc")
LAYOUTS = ("COCO (annotations/instances_{train,val}2017.json + train2017/ val2017/), YOLO (data.yaml or "
           "classes.txt, images/ + labels/) or Pascal VOC (Annotations/ + ImageSets/Main/ + JPEGImages/)")


def detect_format(root: str | os.PathLike[str]) -> str:
    """"coco", "yolo" or "voc" from a data folder's layout; an error when none or several fit."""
    from detr.data.yolo import find_yaml

    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    found = []
    if any((root / "annotations").glob("instances_*.json")):
        found.append("coco")
    # classes.txt alone is no mark: VOC folders may carry one too
    darknet = (root / "classes.txt").is_file() and (root / "images").is_dir()
    if find_yaml(root) is not None or (root / "labels").is_dir() or (root / "train" / "labels").is_dir() or darknet:
        found.append("yolo")
    if (root / "Annotations").is_dir():
        found.append("voc")
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{root}: no dataset layout recognized; expected {LAYOUTS}")
    raise ValueError(f"{root} fits more than one dataset layout ({', '.join(found)}): pass --dataset_format")


@dataclass
class LoadedSplit:
    """A split of any layout: its image folder and its annotations as a COCO api object."""

    format: str
    image_dir: Path
    coco: COCO
    source: str  # the annotation file, or the folder/split the annotations were read from
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> dict[str, Any]:
        return self.coco.dataset


def _default_voc_split(root: Path, split: str) -> str:
    main = root / "ImageSets" / "Main"
    for name in {"train": ("train", "trainval"), "val": ("val", "test")}.get(split, (split,)):
        if (main / f"{name}.txt").is_file():
            return name
    return split


def describe(counts: dict[str, Any]) -> str:
    """One line for the log: how many images and boxes, and what was clipped, dropped or skipped."""
    parts = [f"{counts.get('images', 0)} images", f"{counts.get('boxes', 0)} boxes"]
    if counts.get("background_images"):
        parts.append(f"{counts['background_images']} background images (no label file or no boxes)")
    if counts.get("difficult"):
        parts.append(f"{counts['difficult']} difficult boxes (ignored, as iscrowd)")
    if counts.get("clipped"):
        parts.append(f"{counts['clipped']} boxes clipped to their image (first: {counts['first_clipped']})")
    if counts.get("degenerate_dropped"):
        parts.append(f"{counts['degenerate_dropped']} empty boxes dropped (first: {counts['first_degenerate']})")
    if counts.get("unreadable_images"):
        parts.append(f"{counts['unreadable_images']} unreadable images skipped")
    return ", ".join(parts)


def load_split(root: str | os.PathLike[str], split: str | None, fmt: str | None = None, *,
               split_name: str | None = None, skip_bad_images: bool = False) -> LoadedSplit:
    """Read ``split`` ("train"/"val"; None: everything) of the dataset at ``root``.

    fmt: "coco", "yolo" or "voc"; None detects it. split_name: the layout's own name of the split
    (a YOLO folder or data.yaml key, a VOC ImageSets file), by default the split's.
    """
    from detr.data.voc import read_voc
    from detr.data.yolo import read_yolo

    root = Path(root)
    fmt = fmt or detect_format(root)
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose from {FORMATS}")
    if fmt == "coco":
        if split is None:
            raise ValueError("a COCO layout is read one split at a time (train or val)")
        image_dir, annotation_file = coco_paths(root, split)
        missing = [str(p) for p in (root, image_dir, annotation_file) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"COCO {split} split incomplete, missing: {', '.join(missing)}")
        coco = load_coco(annotation_file)
        return LoadedSplit("coco", image_dir, coco, str(annotation_file))
    name = split_name or split
    if fmt == "yolo":
        image_dir, dataset, counts = read_yolo(root, name, skip_bad_images=skip_bad_images)
    else:
        if name is not None and split_name is None:
            name = _default_voc_split(root, name)
        image_dir, dataset, counts = read_voc(root, name)
    source = f"{root} ({fmt}, {name or 'all images'})"
    log.info("%s: %s", source, describe(counts))
    return LoadedSplit(fmt, image_dir, coco_api(dataset, source), source, counts)


def load_any(source: str | os.PathLike[str], fmt: str | None, *, split: str | None = None,
             images: str | os.PathLike[str] | None = None) -> LoadedSplit:
    """What ``detr data convert`` reads: a COCO json (with ``images``, its image folder), or a YOLO/VOC
    folder (``split`` None: all of it)."""
    source = Path(source)
    if fmt == "coco" or (fmt is None and source.suffix == ".json"):
        if images is None:
            raise ValueError("converting from a COCO json needs --images (the image folder it describes)")
        return LoadedSplit("coco", Path(images), load_coco(source), str(source))
    return load_split(source, split, fmt, split_name=split)


def convert(source: str | os.PathLike[str], out: str | os.PathLike[str], *, from_format: str | None = None,
            to: str = "coco", split: str | None = None, images: str | os.PathLike[str] | None = None
            ) -> dict[str, Any]:
    """Write a dataset in another layout; returns a summary (what was written, counts).

    to="coco": ``out`` is the json file (written atomically; pair it with the printed image folder).
    to="yolo"/"voc": ``out`` is a folder; the images are linked (copied where links fail); the split is
    named ``split`` (default train).
    """
    from detr.data.voc import write_voc
    from detr.data.yolo import write_yolo

    loaded = load_any(source, from_format, split=split, images=images)
    out = Path(out)
    summary: dict[str, Any] = {"from": loaded.format, "to": to, "source": loaded.source, **loaded.counts}
    if to == "coco":
        text = json.dumps(loaded.dataset)
        atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        summary.update(annotations=str(out), images_dir=str(loaded.image_dir),
                       images=len(loaded.dataset["images"]), boxes=len(loaded.dataset.get("annotations", [])))
    elif to in ("yolo", "voc"):
        writer = write_yolo if to == "yolo" else write_voc
        summary.update(writer(loaded.dataset, loaded.image_dir, out, split or "train"), folder=str(out))
    else:
        raise ValueError(f"unknown target format {to!r}; choose from {FORMATS}")
    return summary


def category_count(path: str | os.PathLike[str]) -> int:
    """max category id + 1 of a COCO json (the reference's meaning of num_classes)."""
    categories = read_json(path).get("categories") or []
    if not categories:
        raise ValueError(f"{path}: no categories")
    return max(int(c["id"]) for c in categories) + 1
