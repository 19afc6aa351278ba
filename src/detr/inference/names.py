"""Class names for a detector's label ids: built-in COCO tables, checkpoint metadata, dataset jsons.

A model with K classes predicts label ids 0..K-1 (the K-th output is "no object"). COCO-trained
checkpoints use the COCO category ids directly: 91 classes for detection (ids 1..90 with gaps, 0
unused) and 250 for panoptic (things 1..90, stuff 92..200).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ClassNames = Mapping[int, str] | Sequence[str]

# COCO 2017 instance categories by id. The ids 1..90 come from the original 91-category list; the
# 10 ids that never got annotations (and id 0) are "N/A", as in the reference's notebooks.
NA = "N/A"
COCO_CATEGORY_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 12: NA, 13: "stop sign", 14: "parking meter",
    15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant",
    23: "bear", 24: "zebra", 25: "giraffe", 26: NA, 27: "backpack", 28: "umbrella", 29: NA, 30: NA,
    31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball",
    38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard", 42: "surfboard",
    43: "tennis racket", 44: "bottle", 45: NA, 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli",
    57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch",
    64: "potted plant", 65: "bed", 66: NA, 67: "dining table", 68: NA, 69: NA, 70: "toilet", 71: NA,
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 83: NA, 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

# COCO panoptic 2017 stuff categories (ids 92..200; merged classes carry a "-merged" suffix).
COCO_PANOPTIC_STUFF_NAMES: dict[int, str] = {
    92: "banner", 93: "blanket", 95: "bridge", 100: "cardboard", 107: "counter", 109: "curtain",
    112: "door-stuff", 118: "floor-wood", 119: "flower", 122: "fruit", 125: "gravel", 128: "house",
    130: "light", 133: "mirror-stuff", 138: "net", 141: "pillow", 144: "platform", 145: "playingfield",
    147: "railroad", 148: "river", 149: "road", 151: "roof", 154: "sand", 155: "sea", 156: "shelf",
    159: "snow", 161: "stairs", 166: "tent", 168: "towel", 171: "wall-brick", 175: "wall-stone",
    176: "wall-tile", 177: "wall-wood", 178: "water-other", 180: "window-blind", 181: "window-other",
    184: "tree-merged", 185: "fence-merged", 186: "ceiling-merged", 187: "sky-other-merged",
    188: "cabinet-merged", 189: "table-merged", 190: "floor-other-merged", 191: "pavement-merged",
    192: "mountain-merged", 193: "grass-merged", 194: "dirt-merged", 195: "paper-merged",
    196: "food-other-merged", 197: "building-other-merged", 198: "rock-merged", 199: "wall-other-merged",
    200: "rug-merged",
}

COCO_NUM_CLASSES = 91  # detection checkpoints: max category id + 1
COCO_PANOPTIC_NUM_CLASSES = 250  # the reference's panoptic head size
COCO_LAST_THING_ID = 90  # panoptic: ids <= 90 are things, the rest stuff


def coco_class_names(num_classes: int) -> dict[int, str] | None:
    """The built-in COCO names for a 91-class (detection) or 250-class (panoptic) head, else None."""
    if num_classes == COCO_NUM_CLASSES:
        return {0: NA, **COCO_CATEGORY_NAMES}
    if num_classes == COCO_PANOPTIC_NUM_CLASSES:
        return {0: NA, **COCO_CATEGORY_NAMES, **COCO_PANOPTIC_STUFF_NAMES}
    return None


def as_class_names(names: ClassNames | Any) -> dict[int, str]:
    """A {id: name} mapping from a mapping with int or numeric-string keys, or a list indexed by id."""
    if isinstance(names, Mapping):
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, Sequence) and not isinstance(names, str):
        return {i: str(v) for i, v in enumerate(names)}
    raise TypeError(f"class names must be a mapping id -> name or a list of names, got {type(names).__name__}")


def class_names_from_json(path: str | os.PathLike[str]) -> dict[int, str]:
    """{id: name} from a COCO-style json's ``categories``, or from a json that is itself a mapping or list."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read class names from {path}: {e}") from None
    if isinstance(data, dict) and "categories" in data:
        try:
            return {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed 'categories' ({e})") from None
    try:
        return as_class_names(data)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: expected a COCO json with 'categories', a mapping id -> name or a list") from None


def resolve_class_names(
    num_classes: int,
    *,
    explicit: ClassNames | None = None,
    json_path: str | os.PathLike[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[int, str]:
    """Names by priority: ``explicit``, then ``json_path``, then ``metadata["class_names"]`` (how
    ``save_checkpoint`` and the trainer store them), then the COCO tables for 91/250-class heads.
    Ids without a name are left out (callers show ``str(id)``)."""
    if explicit is not None:
        return as_class_names(explicit)
    if json_path is not None:
        return class_names_from_json(json_path)
    if metadata and metadata.get("class_names") is not None:
        return as_class_names(metadata["class_names"])
    return coco_class_names(num_classes) or {}
