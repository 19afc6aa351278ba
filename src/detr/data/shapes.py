"""A synthetic COCO-format dataset of coloured shapes: the CPU demo's default data.

``generate_shapes(out_dir, ...)`` writes

    out_dir/train2017/000000.png ...     RGB PNGs, image_size x image_size
    out_dir/val2017/000000.png ...
    out_dir/annotations/instances_{train,val}2017.json
    out_dir/shapes_params.json           the parameters, written last (marks a complete generation)

Each image has 1-4 filled shapes (1 rectangle, 2 ellipse, 3 triangle) of random size, colour and
position on a smooth, noisy background. Bounding boxes overlap little, so every shape stays mostly
visible. Annotations use polygon segmentations (ellipses as 32-gons), bbox xywh from the polygon's
extremes and area from pycocotools' rasterization of the polygon.

Generation is a pure function of the parameters: sample ``i`` of a split uses its own numpy
generator seeded with (seed, split, i), and files are bit-identical across runs.

``ShapesStream`` renders training samples on the fly instead, straight into model inputs: sample ``i``
of the stream is image ``i`` of the train split, so a run that takes batches at increasing indices
never sees the same image twice, and every run with the same seed sees the same images.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from detr.boxes import xyxy_to_cxcywh
from detr.data.batch import DetectionBatch, collate_detection
from detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr.files import atomic_write

SHAPES_CATEGORIES = (
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
)
PARAMS_FILE = "shapes_params.json"
_VERSION = 2  # bump when the drawing code changes, so old generations are redone
_SPLIT_CODES = {"train": 0, "val": 1}
_ELLIPSE_VERTICES = 32
_MAX_OVERLAP = 0.15  # max box intersection / smaller box area between two shapes
_PLACEMENT_TRIES = 30
_LOG_MAX_ASPECT = float(np.log(1.6))


@dataclass(frozen=True)
class ShapesParams:
    num_train: int
    num_val: int
    image_size: int
    seed: int
    min_objects: int
    max_objects: int
    min_object_size: float  # fraction of image_size
    max_object_size: float
    version: int = _VERSION


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # Concurrent generators (e.g. several ranks) never see a half-written file; no fsync for thousands of
    # small files that can be generated again.
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), durable=False)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted, smoothly varying colour field: [size, size, 3] float in [0, 255]."""
    base = rng.uniform(60, 190, size=3)
    coarse = rng.normal(0.0, 25.0, size=(4, 4, 3)) + base
    coarse = np.clip(coarse, 0, 255).astype(np.uint8)
    field = Image.fromarray(coarse, mode="RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(field, dtype=np.float64)


def _shape_polygon(rng: np.random.Generator, category: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Vertices [V, 2] (x, y) of a shape filling the box (x0, y0, x1, y1) edge to edge."""
    x0, y0, x1, y1 = box
    if category == 1:
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if category == 2:
        angles = np.linspace(0.0, 2 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)
    # Triangle: an apex on one edge, the base on the opposite one; the apex edge is random.
    apex = rng.uniform(0.2, 0.8)
    side = int(rng.integers(4))
    if side == 0:  # apex up
        return np.array([[x0 + apex * (x1 - x0), y0], [x1, y1], [x0, y1]])
    if side == 1:  # apex down
        return np.array([[x0, y0], [x1, y0], [x0 + apex * (x1 - x0), y1]])
    if side == 2:  # apex left
        return np.array([[x0, y0 + apex * (y1 - y0)], [x1, y0], [x1, y1]])
    return np.array([[x0, y0], [x1, y0 + apex * (y1 - y0)], [x0, y1]])  # apex right


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection of two xyxy boxes over the smaller one's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour, distinct from the muted backgrounds."""
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _render(params: ShapesParams, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """One image [S, S, 3] uint8 and its objects (category_id, polygon)."""
    rng = np.random.default_rng([params.seed, _SPLIT_CODES[split], index])
    size = params.image_size
    image = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[float, ...]] = []
    objects = []
    for _ in range(int(rng.integers(params.min_objects, params.max_objects + 1))):
        for _ in range(_PLACEMENT_TRIES):
            extent = rng.uniform(params.min_object_size, params.max_object_size) * size
            aspect = np.exp(rng.uniform(-_LOG_MAX_ASPECT, _LOG_MAX_ASPECT))
            # Bounded aspect keeps triangle tips at least a pixel wide within ~1.6 px of the apex.
            w, h = min(extent * np.sqrt(aspect), size - 4.0), min(extent / np.sqrt(aspect), size - 4.0)
            x0 = rng.uniform(1.0, size - 1.0 - w)
            y0 = rng.uniform(1.0, size - 1.0 - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_overlap(box, other) <= _MAX_OVERLAP for other in boxes):
                break
        else:
            break  # the image is full; fewer objects
        category = int(rng.integers(1, len(SHAPES_CATEGORIES) + 1))
        polygon = np.round(_shape_polygon(rng, category, box), 2)  # [V, 2]
        draw.polygon([tuple(p) for p in polygon.tolist()], fill=_colour(rng))
        boxes.append(box)
        objects.append({"category_id": category, "polygon": polygon})
    # Sensor-like noise over everything, shapes included.
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, 6.0, size=(size, size, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), objects


def _bbox_xyxy(polygon: np.ndarray) -> list[float]:
    """The box of a shape: its polygon's extremes."""
    (x_min, y_min), (x_max, y_max) = polygon.min(axis=0).tolist(), polygon.max(axis=0).tolist()
    return [x_min, y_min, x_max, y_max]


class ShapesStream:
    """Training samples rendered on demand: ``batch(first, count)`` -> a ``DetectionBatch`` of images
    ``first .. first + count - 1`` of the train split, normalized as the COCO pipeline does."""

    def __init__(self, params: ShapesParams) -> None:
        self.params = params
        size = params.image_size
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255
        self._scale = 1 / (np.asarray(IMAGENET_STD, dtype=np.float32) * 255)
        self._box_scale = torch.tensor([size, size, size, size], dtype=torch.float32)

    def sample(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(image [3, S, S] normalized, target with ``boxes`` normalized cxcywh and ``labels``)."""
        pixels, objects = _render(self.params, "train", index)
        image = torch.from_numpy(((pixels.astype(np.float32) - self._mean) * self._scale).transpose(2, 0, 1).copy())
        size = self.params.image_size
        boxes = torch.tensor([_bbox_xyxy(o["polygon"]) for o in objects], dtype=torch.float32).reshape(-1, 4)
        boxes = xyxy_to_cxcywh(boxes.clamp(0, size)) / self._box_scale
        labels = torch.tensor([o["category_id"] for o in objects], dtype=torch.int64)
        sizes = torch.tensor([size, size])
        return image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor([index]), "orig_size": sizes,
                       "size": sizes}

    def batch(self, first: int, count: int) -> DetectionBatch:
        return collate_detection([self.sample(first + i) for i in range(count)])


def _write_split(root: Path, params: ShapesParams, split: str, count: int) -> None:
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    size = params.image_size
    images, annotations = [], []
    for index in range(count):
        pixels, objects = _render(params, split, index)
        file_name = f"{index:06d}.png"
        buffer = _png_bytes(pixels)
        _atomic_write_bytes(image_dir / file_name, buffer)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            polygon = obj["polygon"]
            flat = [float(v) for v in polygon.reshape(-1)]
            x_min, y_min, x_max, y_max = _bbox_xyxy(polygon)
            bbox = [x_min, y_min, round(x_max - x_min, 2), round(y_max - y_min, 2)]  # xywh
            area = float(mask_utils.area(mask_utils.frPyObjects([flat], size, size))[0])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "segmentation": [flat],
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {"description": "synthetic shapes (detr.data.shapes)", "version": str(_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in SHAPES_CATEGORIES],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(root / "annotations" / f"instances_{split}2017.json", json.dumps(dataset).encode())


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def generate_shapes(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 128,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 4,
    min_object_size: float = 0.2,
    max_object_size: float = 0.5,
) -> Path:
    """Write the shapes dataset under ``out_dir`` (COCO layout) and return ``out_dir``.

    Idempotent: if ``out_dir/shapes_params.json`` records the same parameters and every file is
    there, nothing is written. Refuses to write into a folder holding COCO annotations it did not make.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0 < min_object_size <= max_object_size <= 0.7:
        sizes = f"{min_object_size}, {max_object_size}"
        raise ValueError(f"need 0 < min_object_size <= max_object_size <= 0.7, got {sizes}")
    params = ShapesParams(
        num_train, num_val, image_size, seed, min_objects, max_objects, min_object_size, max_object_size
    )
    root = Path(out_dir)
    params_path = root / PARAMS_FILE
    counts = {"train": num_train, "val": num_val}
    if params_path.is_file():
        if json.loads(params_path.read_text()) == asdict(params) and _complete(root, counts):
            return root
        params_path.unlink()  # regenerate; an interrupted run leaves no params file, so it is redone too
    elif any((root / "annotations" / f"instances_{s}2017.json").exists() for s in counts):
        raise FileExistsError(f"{root} holds COCO annotations not made by generate_shapes; refusing to overwrite")
    for split, count in counts.items():
        _write_split(root, params, split, count)
    _atomic_write_bytes(params_path, json.dumps(asdict(params), indent=1).encode())
    return root


def _complete(root: Path, counts: dict[str, int]) -> bool:
    for split, count in counts.items():
        if not (root / "annotations" / f"instances_{split}2017.json").is_file():
            return False
        if any(not (root / f"{split}2017" / f"{i:06d}.png").is_file() for i in range(count)):
            return False
    return True
