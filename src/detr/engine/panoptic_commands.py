"""``detr eval-panoptic``, ``detr data panoptic-from-instances`` and ``detr eval --panoptic``.

Wired in by ``detr.cli``: ``add_panoptic_parsers(subparsers)`` adds the first two commands,
``add_panoptic_eval_flags(eval_parser)`` adds the flags of the third, and ``cmd_eval`` hands over to
``cmd_eval_panoptic(args)`` when ``args.panoptic`` is set.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("detr")


def _write_json(path: str | None, payload: Any) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))


def cmd_eval_panoptic_files(args: argparse.Namespace) -> int:
    """Score prediction files against ground-truth files; print the result as one json line."""
    from .panoptic_eval import pq_compute

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


def add_panoptic_parsers(subparsers: Any) -> Any:
    """Add ``eval-panoptic`` and ``data panoptic-from-instances`` to the ``detr`` subcommands; returns
    the ``data`` command's subparsers (for the other dataset tools)."""
    p = subparsers.add_parser(
        "eval-panoptic",
        help="panoptic quality (PQ, SQ, RQ) of COCO-panoptic prediction files against ground-truth files",
        description="Prints one json line: All/Things/Stuff {pq, sq, rq, n} and per_class {pq, sq, rq, tp, fp, fn} "
        "(fractions, COCO panoptic definition).",
    )
    p.add_argument("--gt-json", required=True, help="ground-truth panoptic json")
    p.add_argument("--gt-folder", required=True, help="ground-truth PNG folder")
    p.add_argument("--pred-json", required=True, help="predicted panoptic json (annotations with segments_info)")
    p.add_argument("--pred-folder", required=True, help="predicted PNG folder")
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
    return data_sub


def add_panoptic_eval_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``detr eval --panoptic`` (added to the ``eval`` parser)."""
    g = p.add_argument_group("panoptic (with --panoptic)")
    g.add_argument("--panoptic", action="store_true",
                   help="also compute PQ/SQ/RQ (COCO panoptic) of a panoptic checkpoint; AP needs an instances json")
    g.add_argument("--panoptic_json", default=None, help="custom data: ground-truth panoptic json")
    g.add_argument("--panoptic_folder", default=None, help="custom data: ground-truth PNG folder")
    g.add_argument("--panoptic_threshold", type=float, default=0.85,
                   help="class probability a query needs to become a segment (the reference's 0.85)")


def _panoptic_ground_truth(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.panoptic_json or args.panoptic_folder:
        if not (args.panoptic_json and args.panoptic_folder):
            raise ValueError("give both --panoptic_json and --panoptic_folder")
        return Path(args.panoptic_json), Path(args.panoptic_folder)
    root = args.coco_panoptic_path or args.coco_path
    if root is None:
        raise ValueError("--panoptic needs --coco_panoptic_path DIR (or --coco_path), "
                         "or --panoptic_json and --panoptic_folder")
    from ..data.panoptic import coco_panoptic_paths

    _, ann_json, seg_folder = coco_panoptic_paths(root, "val")
    return ann_json, seg_folder


def _instances_json(args: argparse.Namespace) -> Path | None:
    """The instances json for bbox/segm AP, if there is one."""
    if args.val_json:
        return Path(args.val_json)
    if args.coco_path:
        from ..data.coco import coco_paths

        path = coco_paths(args.coco_path, "val")[1]
        return path if path.is_file() else None
    return None


def cmd_eval_panoptic(args: argparse.Namespace) -> int:
    """``detr eval --panoptic``: PQ of a panoptic checkpoint, plus bbox/segm AP when an instances json exists.

    Images: --val_images, or --coco_path/val2017. Writes the predictions and metrics.json to --output_dir.
    """

    from ..checkpoint import load_checkpoint
    from ..data.coco import load_coco
    from ..data.panoptic import CocoPanoptic
    from ..data.transforms import make_coco_transforms
    from ..model.fuse import optimize_for_inference
    from ..model.segmentation import DETRsegm
    from ..runtime import amp_dtype
    from .distributed import init_distributed
    from .panoptic_eval import evaluate_panoptic
    from .train import TrainOptions, build_loader

    info = init_distributed(args.device)
    model = optimize_for_inference(load_checkpoint(args.checkpoint)).to(args.device)
    if not isinstance(model, DETRsegm):
        raise ValueError(f"--panoptic needs a panoptic checkpoint (with a mask head); {args.checkpoint} is a detector")
    gt_json, gt_folder = _panoptic_ground_truth(args)
    if args.val_images:
        image_dir = Path(args.val_images)
    elif args.coco_path:
        image_dir = Path(args.coco_path) / "val2017"
    else:
        raise ValueError("--panoptic needs the images: --val_images DIR or --coco_path DIR")
    scales = [args.val_scale] if args.val_scale else args.train_scales
    dataset = CocoPanoptic(image_dir, gt_json, gt_folder, return_masks=False, skip_bad_images=args.skip_bad_images,
                           transforms=make_coco_transforms("val", scales=scales, max_size=args.max_size))
    options = TrainOptions(batch_size=args.batch_size, num_workers=args.num_workers)
    loader = build_loader(dataset, options, info, train=False)

    coco_gt = None
    instances = _instances_json(args)
    if instances is not None:
        coco_gt = load_coco(instances)
    else:
        log.info("no instances json (--val_json or --coco_path/annotations/instances_val2017.json): PQ only")
    amp = amp_dtype(args.amp or getattr(args, "precision", None), args.device)
    out = Path(args.output_dir)
    result = evaluate_panoptic(model, loader, gt_json=gt_json, gt_folder=gt_folder, output_dir=out, coco_gt=coco_gt,
                               device=args.device, threshold=args.panoptic_threshold, amp_dtype=amp,
                               progress=args.progress)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    return 0
