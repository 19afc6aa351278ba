"""``detr convert`` (checkpoints), ``detr data ...`` (dataset tools) and ``detr eval-panoptic`` (PQ of files)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import convert_checkpoint

    print(f"wrote {convert_checkpoint(args.input, args.output)}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from ..data.formats import convert

    summary = convert(args.source, args.out, from_format=args.from_format, to=args.to, split=args.split,
                      images=args.images)
    print(json.dumps(summary))
    return 0


def _write_json(path: str | None, payload: Any) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))


def cmd_eval_panoptic_files(args: argparse.Namespace) -> int:
    """Score prediction files against ground-truth files; print the result as one json line."""
    from ..engine.panoptic_eval import pq_compute

    result = pq_compute(args.gt_json, args.gt_folder, args.pred_json, args.pred_folder)
    _write_json(args.output, result)
    print(json.dumps(result))
    return 0


def cmd_panoptic_from_instances(args: argparse.Namespace) -> int:
    """Convert an instances json to panoptic PNGs + json; print the conversion summary as json."""
    from ..data.panoptic import panoptic_from_instances

    summary = panoptic_from_instances(args.instances, args.out_json, args.out_folder, image_dir=args.images)
    print(json.dumps(summary))
    return 0


def add_parsers(subparsers: Any) -> None:
    """``eval-panoptic``, ``convert`` and the ``data`` tools (panoptic-from-instances, convert)."""
    p = subparsers.add_parser(
        "eval-panoptic",
        help="panoptic quality (PQ, SQ, RQ) of COCO-panoptic prediction files against ground-truth files",
        description="Prints one json line: All/Things/Stuff {pq, sq, rq, n} and per_class {pq, sq, rq, tp, fp, fn} "
        "(fractions, COCO panoptic definition).",
    )
    for side, what in (("gt", "ground-truth"), ("pred", "predicted")):
        p.add_argument(f"--{side}-json", required=True, help=f"{what} panoptic json (annotations with segments_info)")
        p.add_argument(f"--{side}-folder", required=True, help=f"{what} PNG folder")
    p.add_argument("--output", default=None, help="also write the result to this json file")
    p.set_defaults(func=cmd_eval_panoptic_files)

    data = subparsers.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "panoptic-from-instances",
        help="COCO instances json -> COCO panoptic json + PNGs (things only, non-overlapping, crowd marked)",
        description="Overlaps are resolved by painting crowd regions first, then instances from the largest "
        "to the smallest (smaller on top); crowd annotations of one category and image become one segment.",
    )
    p.add_argument("--instances", required=True, help="COCO instances json")
    p.add_argument("--out-json", required=True, help="panoptic json to write")
    p.add_argument("--out-folder", required=True, help="folder for the PNG segment maps")
    p.add_argument("--images", default=None,
                   help="image folder: read sizes missing from the json and skip missing/unreadable images")
    p.set_defaults(func=cmd_panoptic_from_instances)

    p = data_sub.add_parser(
        "convert", help="a YOLO or Pascal VOC dataset -> COCO json (or any of coco/yolo/voc -> another)",
        description="Reads the dataset as `detr train --dataset_format` does (same class ids, clipping and counts) "
                    "and writes it: a COCO json (pair it with the image folder it prints), or a YOLO/VOC folder "
                    "whose images link to the originals.",
    )
    p.add_argument("source", help="the dataset folder (yolo, voc), or the COCO json (coco, with --images)")
    p.add_argument("--from", dest="from_format", choices=("yolo", "voc", "coco"), default=None,
                   help="the source layout (default: detected; a .json file is coco)")
    p.add_argument("--to", choices=("coco", "yolo", "voc"), default="coco")
    p.add_argument("--out", required=True, help="the json file to write (--to coco) or the folder (yolo, voc)")
    p.add_argument("--split", default=None,
                   help="the split to read (yolo: images/SPLIT or a data.yaml key; voc: ImageSets/Main/SPLIT.txt; "
                        "default: every image) and, --to yolo|voc, the split name written (default train)")
    p.add_argument("--images", default=None, help="--from coco: the image folder the json describes")
    p.set_defaults(func=cmd_data_convert)

    p = subparsers.add_parser("convert", help="convert a checkpoint: .pth (reference layout) <-> .safetensors (ours)")
    p.add_argument("input", help="a file, a released name (detr-r50) or a URL")
    p.add_argument("output")
    p.set_defaults(func=cmd_convert)
