"""Pascal VOC datasets as COCO-format annotations, and back.

Layout read::

    ROOT/Annotations/ID.xml        <annotation><filename/><size><width/><height/></size>
                                   <object><name/><difficult/><bndbox><xmin/><ymin/><xmax/><ymax/></bndbox></object>
    ROOT/ImageSets/Main/SPLIT.txt  the image ids of a split (train, val, trainval, test)
    ROOT/JPEGImages/               the images (<filename>, or ID.jpg)

Class names: ``classes.txt`` / ``labels.txt`` at the root (one per line) if present; else VOC's 20
classes in their usual order when every name in Annotations/ is one of them; else the names found in
Annotations/, sorted. Category ids are the class indices (0-based).

Coordinates: VOC's are 1-based pixel indices with inclusive corners, so a box becomes COCO
``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (the convention Detectron2 reads them
with). ``<difficult>1</difficult>`` objects become ``iscrowd: 1``: COCO evaluation ignores them, as
VOC's does, and training drops them. Errors name the file and line; boxes reaching outside the
image are clipped and counted, degenerate ones dropped and counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


@dataclass
class Node:
    """An XML element with the line it starts on (ElementTree keeps no line numbers)."""

    tag: str
    line: int
    text: str = ""
    children: list[Node] = field(default_factory=list)

    def find(self, tag: str) -> Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list[Node]:
        return [c for c in self.children if c.tag == tag]


def parse_xml(path: Path) -> Node:
    parser = expat.ParserCreate()
    stack: list[Node] = [Node("#document", 0)]

    def start(tag: str, _attrs: dict[str, str]) -> None:
        node = Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        node = stack.pop()
        node.text = node.text.strip()

    def text(data: str) -> None:
        stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except expat.ExpatError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.offset + 1}: not well-formed XML ({expat.errors.messages[e.code]})"
                         ) from None
    if not stack[0].children:
        raise ValueError(f"{path}: empty XML document")
    return stack[0].children[0]


def _number(path: Path, parent: Node, tag: str) -> float:
    node = parent.find(tag)
    if node is None:
        raise ValueError(f"{path}:{parent.line}: <{parent.tag}> has no <{tag}>")
    try:
        return float(node.text)
    except ValueError:
        raise ValueError(f"{path}:{node.line}: <{tag}> is {node.text!r}, not a number") from None


@dataclass
class VocRecord:
    """One parsed annotation file."""

    xml: Path
    file_name: str
    width: int
    height: int
    objects: list[tuple[str, float, float, float, float, bool, int]]  # name, xmin, ymin, xmax, ymax, difficult, line


def read_annotation(path: Path, image_id: str) -> VocRecord:
    root = parse_xml(path)
    if root.tag != "annotation":
        raise ValueError(f"{path}:{root.line}: expected an <annotation> element, found <{root.tag}>")
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}:{root.line}: no <size> element; VOC annotations give the image's size as "
                         "<size><width>W</width><height>H</height></size>")
    width, height = _number(path, size, "width"), _number(path, size, "height")
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise ValueError(f"{path}:{size.line}: <size> says {width:g} x {height:g}, not a positive whole image size")
    name_node = root.find("filename")
    file_name = name_node.text if name_node is not None and name_node.text else f"{image_id}.jpg"
    objects = []
    for obj in root.findall("object"):
        name = obj.find("name")
        if name is None or not name.text:
            raise ValueError(f"{path}:{obj.line}: <object> has no <name>")
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{path}:{obj.line}: <object> ({name.text}) has no <bndbox>")
        coords = [_number(path, box, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        difficult = obj.find("difficult")
        flag = difficult is not None and difficult.text not in ("", "0")
        objects.append((name.text, *coords, flag, box.line))
    return VocRecord(path, file_name, int(width), int(height), objects)


def split_ids(root: Path, split: str | None) -> tuple[list[str], str]:
    """The image ids of a split (None: every annotation file) and the file they came from."""
    if split is None:
        return sorted(p.stem for p in (root / "Annotations").glob("*.xml")), str(root / "Annotations")
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise FileNotFoundError(f"VOC split file not found: {path} (splits here: {have or 'none'})")
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return ids, str(path)


def class_names(root: Path, all_names: set[str]) -> tuple[list[str], str]:
    for file_name in ("classes.txt", "labels.txt"):
        path = root / file_name
        if path.is_file():
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return names, str(path)
    if all_names <= set(VOC_CLASSES):
        return list(VOC_CLASSES), "the 20 Pascal VOC classes"
    return sorted(all_names), f"the names in {root / 'Annotations'}"


def read_voc(root: str | os.PathLike[str], split: str | None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A VOC split -> (image folder, COCO-format dict, counts)."""
    root = Path(root)
    annotations_dir = root / "Annotations"
    if not annotations_dir.is_dir():
        raise FileNotFoundError(f"{root}: no Annotations/ folder (Pascal VOC layout)")
    ids, source = split_ids(root, split)
    records = []
    for image_id in ids:
        xml = annotations_dir / f"{image_id}.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"{source} lists {image_id}, but {xml} does not exist")
        records.append(read_annotation(xml, image_id))
    # Without a classes file, the names of every annotation file (not only this split's), so that train
    # and val agree on the class ids.
    every = {o[0] for r in records for o in r.objects}
    if not any((root / n).is_file() for n in ("classes.txt", "labels.txt")):
        seen = {r.xml.name for r in records}
        every |= {o[0] for xml in sorted(annotations_dir.glob("*.xml")) if xml.name not in seen
                  for o in read_annotation(xml, xml.stem).objects}
    names, names_source = class_names(root, every)
    index = {name: i for i, name in enumerate(names)}
    counts: dict[str, Any] = {"images": len(records), "boxes": 0, "difficult": 0, "background_images": 0,
                              "clipped": 0, "degenerate_dropped": 0}
    images, annotations = [], []
    for number, record in enumerate(records, start=1):
        images.append({"id": number, "file_name": record.file_name, "width": record.width, "height": record.height})
        kept = 0
        for name, xmin, ymin, xmax, ymax, difficult, line in record.objects:
            if name not in index:
                raise ValueError(f"{record.xml}:{line}: class {name!r} is not one of the {len(names)} classes of "
                                 f"{names_source}")
            x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax  # 1-based inclusive -> 0-based edges
            cx0, cy0 = min(max(x0, 0.0), record.width), min(max(y0, 0.0), record.height)
            cx1, cy1 = min(max(x1, 0.0), record.width), min(max(y1, 0.0), record.height)
            if cx1 <= cx0 or cy1 <= cy0:
                counts["degenerate_dropped"] += 1
                counts.setdefault("first_degenerate", f"{record.xml}:{line}")
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                counts["clipped"] += 1
                counts.setdefault("first_clipped", f"{record.xml}:{line}")
            w, h = cx1 - cx0, cy1 - cy0
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": index[name],
                                "bbox": [cx0, cy0, w, h], "area": w * h, "iscrowd": int(difficult)})
            counts["difficult"] += int(difficult)
            kept += 1
        counts["background_images"] += kept == 0
    counts["boxes"] = len(annotations)
    dataset = {"info": {"description": f"converted from Pascal VOC: {source}"}, "images": images,
               "annotations": annotations, "categories": [{"id": i, "name": n} for i, n in enumerate(names)]}
    return root / "JPEGImages", dataset, counts


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _coordinate(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_voc(dataset: dict[str, Any], image_dir: str | os.PathLike[str], out: str | os.PathLike[str],
              split: str) -> dict[str, int]:
    """COCO-format annotations -> OUT/Annotations/*.xml, OUT/ImageSets/Main/SPLIT.txt, OUT/JPEGImages (links)
    and OUT/classes.txt (the categories in id order). Crowd annotations become difficult objects."""
    from .yolo import _link_or_copy

    out, image_dir = Path(out), Path(image_dir)
    categories = sorted(dataset.get("categories", []), key=lambda c: int(c["id"]))
    name_of = {int(c["id"]): str(c["name"]) for c in categories}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in dataset.get("annotations", []):
        by_image.setdefault(int(a["image_id"]), []).append(a)
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids, counts = [], {"images": 0, "boxes": 0, "difficult": 0}
    for info in dataset["images"]:
        name = Path(info["file_name"])
        if len(name.parts) > 1:
            raise ValueError(f"VOC keeps every image in JPEGImages/: {name} is in a subfolder")
        _link_or_copy(image_dir / name, out / "JPEGImages" / name.name)
        objects = []
        for a in by_image.get(int(info["id"]), []):
            x, y, w, h = (float(v) for v in a["bbox"])
            crowd = int(bool(a.get("iscrowd", 0)))
            objects.append(
                f"  <object>\n    <name>{_xml_escape(name_of[int(a['category_id'])])}</name>\n"
                f"    <difficult>{crowd}</difficult>\n    <bndbox>\n"
                f"      <xmin>{_coordinate(x + 1)}</xmin>\n      <ymin>{_coordinate(y + 1)}</ymin>\n"
                f"      <xmax>{_coordinate(x + w)}</xmax>\n      <ymax>{_coordinate(y + h)}</ymax>\n"
                "    </bndbox>\n  </object>\n"
            )
            counts["difficult"] += crowd
        xml = (f"<annotation>\n  <filename>{_xml_escape(name.name)}</filename>\n  <size>\n"
               f"    <width>{int(info['width'])}</width>\n    <height>{int(info['height'])}</height>\n"
               f"    <depth>3</depth>\n  </size>\n{''.join(objects)}</annotation>\n")
        (out / "Annotations" / f"{name.stem}.xml").write_text(xml, encoding="utf-8")
        ids.append(name.stem)
        counts["images"] += 1
        counts["boxes"] += len(objects)
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    (out / "classes.txt").write_text("".join(c["name"] + "\n" for c in categories), encoding="utf-8")
    return counts
