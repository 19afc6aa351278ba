"""YOLO-format datasets (Ultralytics/Darknet layout) as COCO-format annotations, and back.

Layout read::

    ROOT/data.yaml              names (list or {id: name}); train/val: folders, lists of folders, or
                                .txt files listing images (relative to ``path`` or the yaml's folder)
    ROOT/images/train/*.jpg     (or ROOT/train/images/, as Roboflow exports; or images/ without splits)
    ROOT/labels/train/*.txt     one line per object: ``class cx cy w h`` normalized to [0, 1], or a
                                polygon ``class x1 y1 x2 y2 x3 y3 ...`` (segmentation labels)

Without a yaml, class names come from ``classes.txt`` (one per line, as labelImg and Darknet write).
An image's label file is its path with the last ``images`` folder replaced by ``labels`` and the
suffix by ``.txt`` (Ultralytics' rule), or a ``.txt`` beside it when there is no ``images`` folder.

Category ids are the YOLO class indices (0-based), so a model's labels are the file's classes. Boxes
are absolute xywh of the image as shown (EXIF orientation applied, as Ultralytics reads it); images
with an EXIF orientation are marked ``"exif_oriented": true`` so that loading orients them too. Input
that cannot be read is an error naming the file and line; boxes reaching outside the image are
clipped and counted, degenerate ones dropped and counted; images without a label file are kept as
background images and counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from detr.data.images import ImageLoadError, exif_orientation, oriented_size

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm"})
YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def find_yaml(root: Path) -> Path | None:
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return root
    return next((root / n for n in YAML_NAMES if (root / n).is_file()), None)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml  # PyYAML: only YOLO datasets need it
    except ImportError:
        raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml "
                          "(or pip install 'detr-pytorch[yolo]')") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with names/train/val, found {type(data).__name__}")
    return data


def class_names(root: Path, config: dict[str, Any] | None, config_path: Path | None) -> tuple[list[str], str]:
    """The class names (index = class id) and where they came from."""
    if config is not None and "names" in config:
        names = config["names"]
        if isinstance(names, dict):
            try:
                ids = sorted(int(k) for k in names)
            except (TypeError, ValueError):
                raise ValueError(f"{config_path}: 'names' keys must be class ids (0, 1, ...)") from None
            if ids != list(range(len(ids))):
                raise ValueError(f"{config_path}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {ids[:10]}")
            return [str(names[k] if k in names else names[str(k)]) for k in ids], str(config_path)
        if isinstance(names, list) and names:
            return [str(n) for n in names], str(config_path)
        raise ValueError(f"{config_path}: 'names' must be a list of class names or a mapping id -> name")
    for file_name in ("classes.txt", "obj.names", "classes.names"):
        path = root / file_name
        if path.is_file():
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not names:
                raise ValueError(f"{path}: no class names")
            return names, str(path)
    raise FileNotFoundError(
        f"{root}: no YOLO class names: expected data.yaml with 'names:' or classes.txt (one name per line)"
    )


def _list_images(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if source.is_file() and source.suffix == ".txt":  # a list of image paths, relative to the list's folder
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [(source.parent / line).resolve() if not os.path.isabs(line) else Path(line) for line in lines]
    raise FileNotFoundError(f"YOLO image source not found: {source}")


def split_images(root: Path, split: str | None, config: dict[str, Any] | None, config_path: Path | None
                 ) -> tuple[list[Path], str]:
    """The image files of ``split`` (None: every image under images/) and a description of the source."""
    if config is not None and split is not None:
        keys = [k for k in SPLIT_ALIASES.get(split, (split,)) if config.get(k)]
        if not keys:
            raise ValueError(f"{config_path}: no '{split}' entry (expected e.g. {split}: images/{split})")
        base = Path(config.get("path") or config_path.parent)
        if not base.is_absolute():
            base = (config_path.parent / base).resolve()
        entries = config[keys[0]]
        images: list[Path] = []
        for item in entries if isinstance(entries, list) else [entries]:
            source = base / str(item)
            if not source.exists() and str(item).startswith("../"):  # Roboflow's exports (as Ultralytics reads them)
                source = base / str(item)[3:]
            images += _list_images(source)
        return images, f"{config_path} '{keys[0]}'"
    if split is None:
        folder = root / "images"
        if not folder.is_dir():
            raise FileNotFoundError(f"{root}: no images/ folder")
        return _list_images(folder), str(folder)
    for name in SPLIT_ALIASES.get(split, (split,)):
        for folder in (root / "images" / name, root / name / "images"):
            if folder.is_dir():
                return _list_images(folder), str(folder)
    raise FileNotFoundError(
        f"{root}: no '{split}' split: expected images/{split}/ (or {split}/images/), or a data.yaml naming it"
    )


def label_path(image: Path) -> Path:
    parts = list(image.parts)
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        parts[i] = "labels"
        return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def image_size(path: Path) -> tuple[int, int, int]:
    """(width, height) as the image is shown (EXIF orientation applied) and the EXIF orientation, read from
    the header only."""
    try:
        with Image.open(path) as image:
            orientation = exif_orientation(image)
            return (*oriented_size(image.size, orientation), orientation)
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}", path) from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageLoadError(f"not a readable image: {path} ({e})", path) from None


def _numbers(path: Path, lineno: int, fields: Sequence[str]) -> list[float]:
    values = []
    for field in fields:
        try:
            values.append(float(field))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: {field!r} is not a number") from None
    return values


def read_labels(path: Path, width: int, height: int, names: Sequence[str], names_source: str,
                counts: dict[str, Any]) -> list[dict[str, Any]]:
    """One label file -> COCO annotations (without ids) in absolute pixels."""
    annotations = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise ValueError(f"{path}:{lineno}: expected 5 numbers (class cx cy w h) or a polygon "
                             f"(class x1 y1 x2 y2 x3 y3 ...), found {len(fields)}: {line.strip()!r}")
        values = _numbers(path, lineno, fields)
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < len(names):
            raise ValueError(f"{path}:{lineno}: class id {fields[0]} is not one of the {len(names)} classes of "
                             f"{names_source} (0..{len(names) - 1})")
        coords = values[1:]
        if len(fields) == 5:
            cx, cy, w, h = coords
            xs, ys = [cx - w / 2, cx + w / 2], [cy - h / 2, cy + h / 2]
        else:
            xs, ys = coords[0::2], coords[1::2]
        outside = min(xs) < 0 or min(ys) < 0 or max(xs) > 1 or max(ys) > 1
        xs = [min(max(x, 0.0), 1.0) * width for x in xs]
        ys = [min(max(y, 0.0), 1.0) * height for y in ys]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        if x1 <= x0 or y1 <= y0:
            counts["degenerate_dropped"] += 1
            counts.setdefault("first_degenerate", f"{path}:{lineno}")
            continue
        if outside:
            counts["clipped"] += 1
            counts.setdefault("first_clipped", f"{path}:{lineno}")
        annotation: dict[str, Any] = {"category_id": int(cls), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
        if len(fields) == 5:
            annotation["area"] = (x1 - x0) * (y1 - y0)
        else:
            annotation["segmentation"] = [[v for xy in zip(xs, ys, strict=True) for v in xy]]
            # shoelace area of the (clipped) polygon
            annotation["area"] = abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
        annotations.append(annotation)
    return annotations


def read_yolo(root: str | os.PathLike[str], split: str | None, *, skip_bad_images: bool = False
              ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A YOLO split -> (image folder, COCO-format dict, counts). ``split`` None: every image under images/."""
    root = Path(root)
    config_path = find_yaml(root)
    config = read_yaml(config_path) if config_path is not None else None
    if config_path is not None and root.is_file():
        root = config_path.parent
    names, names_source = class_names(root, config, config_path)
    images, source = split_images(root, split, config, config_path)
    if not images:
        raise FileNotFoundError(f"{source}: no images")
    image_dir = Path(os.path.commonpath([str(p.parent) for p in images]))
    counts: dict[str, Any] = {"images": 0, "boxes": 0, "background_images": 0, "clipped": 0,
                              "degenerate_dropped": 0, "unreadable_images": 0}
    coco_images, annotations = [], []
    for path in images:
        try:
            width, height, orientation = image_size(path)
        except ImageLoadError:
            if not skip_bad_images:
                raise
            counts["unreadable_images"] += 1
            log.warning("skipping unreadable image %s", path)
            continue
        image_id = len(coco_images) + 1
        info: dict[str, Any] = {"id": image_id, "file_name": path.relative_to(image_dir).as_posix(),
                                "width": width, "height": height}
        if orientation != 1:  # the labels describe the image as shown: CocoDetection orients it on loading
            info["exif_oriented"] = True
        coco_images.append(info)
        labels = label_path(path)
        found = read_labels(labels, width, height, names, names_source, counts) if labels.is_file() else []
        if not found:
            counts["background_images"] += 1
        for annotation in found:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    counts["images"], counts["boxes"] = len(coco_images), len(annotations)
    categories = [{"id": i, "name": name} for i, name in enumerate(names)]
    dataset = {"info": {"description": f"converted from YOLO labels: {source}"}, "images": coco_images,
               "annotations": annotations, "categories": categories}
    return image_dir, dataset, counts


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks here (some filesystems, Windows without privileges)
        import shutil

        shutil.copy2(src, dst)


def write_yolo(dataset: dict[str, Any], image_dir: str | os.PathLike[str], out: str | os.PathLike[str],
               split: str) -> dict[str, int]:
    """COCO-format annotations -> OUT/images/SPLIT (links to the images), OUT/labels/SPLIT/*.txt and
    OUT/data.yaml. Class ids are the categories in id order (0-based); YOLO has no crowd flag, so crowd
    annotations are left out (counted)."""
    out, image_dir = Path(out), Path(image_dir)
    categories = sorted(dataset.get("categories", []), key=lambda c: int(c["id"]))
    class_of = {int(c["id"]): i for i, c in enumerate(categories)}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in dataset.get("annotations", []):
        by_image.setdefault(int(a["image_id"]), []).append(a)
    counts = {"images": 0, "boxes": 0, "crowd_left_out": 0}
    for info in dataset["images"]:
        name = Path(info["file_name"])
        _link_or_copy(image_dir / name, out / "images" / split / name)
        width, height = float(info["width"]), float(info["height"])
        lines = []
        for a in by_image.get(int(info["id"]), []):
            if a.get("iscrowd", 0):
                counts["crowd_left_out"] += 1
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            lines.append(f"{class_of[int(a['category_id'])]} {(x + w / 2) / width!r} {(y + h / 2) / height!r} "
                         f"{w / width!r} {h / height!r}")
        label = out / "labels" / split / name.with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines))
        counts["images"] += 1
        counts["boxes"] += len(lines)
    import yaml

    # no "path:" key: readers take the yaml's folder (Ultralytics would resolve a relative one elsewhere)
    splits = sorted(p.name for p in (out / "images").iterdir() if p.is_dir())
    config = {**{s: f"images/{s}" for s in splits}, "names": {i: str(c["name"]) for i, c in enumerate(categories)}}
    (out / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return counts
