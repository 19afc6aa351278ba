"""``detr predict`` and ``detr attention``: flags -> ``Detector`` -> files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a point as X,Y (image pixels), got {text!r}") from None
    return x, y


def _detector(args: argparse.Namespace, threshold: float):
    from ..inference.predictor import Detector

    return Detector.from_checkpoint(
        args.checkpoint, device=args.device, threshold=threshold, class_names_from=args.class_names_from,
        size=args.size, max_size=args.max_size, batch_size=getattr(args, "batch_size", 1),
        nms_iou=getattr(args, "nms", None), panoptic_threshold=getattr(args, "panoptic_threshold", 0.85),
        compile=getattr(args, "compile", False), precision=getattr(args, "precision", "fp32"),
    )


def cmd_predict(args: argparse.Namespace) -> int:
    """Detect objects in every input image (see ``detr.inference.files.detect_files``); the exit status
    is 1 if any input could not be read."""
    from ..inference.files import detect_files, expand_inputs

    if not expand_inputs(args.inputs)[0]:
        for item in args.inputs:
            print(f"error: no image file matches {item}", file=sys.stderr)
        print("error: nothing to predict", file=sys.stderr)
        return 1
    summary = detect_files(_detector(args, args.threshold), args.inputs, args.out, batch_size=args.batch_size,
                           draw=args.draw, progress=args.progress)
    print(json.dumps(summary))
    if summary["failed"]:
        print(f"error: {len(summary['failed'])} input(s) could not be read: " + ", ".join(summary["failed"]),
              file=sys.stderr)
        return 1
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    """Draw the decoder attention of the top detections and the encoder self-attention at a few
    reference points of one image; for a deformable-attention model, the sampling points of the top
    detections' queries, per feature level."""
    from ..inference.attention import save_attention_figures
    from ..inference.sampling import sampling_points, save_sampling_figure

    detector = _detector(args, args.threshold if args.threshold is not None else 0.0)
    if getattr(detector.detection_model, "deformable", False):
        sampled = sampling_points(detector, args.image, top_k=args.top_k, threshold=args.threshold)
        path = save_sampling_figure(sampled, args.out, Path(args.image).stem)
        print(json.dumps({"written": [str(path)], "detections": [d.to_dict() for d in sampled.detections],
                          "feature_levels": [list(s) for s in sampled.level_sizes]}))
        return 0
    maps = detector.attention(args.image, top_k=args.top_k, points=args.points, threshold=args.threshold)
    written = save_attention_figures(maps, args.out, Path(args.image).stem)
    print(json.dumps({"written": [str(p) for p in written], "detections": [d.to_dict() for d in maps.detections],
                      "points": maps.points, "feature_size": list(maps.feature_size)}))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="any checkpoint `detr convert` reads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--size", type=int, default=None,
                   help="short side of the resize (default: the checkpoint's training size; 800 for the "
                        "reference's and transformers' checkpoints)")
    p.add_argument("--max_size", type=int, default=None,
                   help="cap on the long side (default: the checkpoint's; 1333 for the reference's)")
    p.add_argument("--class_names_from", default=None, metavar="JSON",
                   help="take class names from this dataset json's categories (default: the checkpoint's "
                        "metadata, or COCO's for 91-class models)")


def add_parsers(subparsers: Any) -> None:
    """Add the ``predict`` and ``attention`` subcommands."""
    p = subparsers.add_parser("predict", help="detect objects in images; write predictions.json and drawings")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    _add_common(p)
    p.add_argument("--threshold", type=float, default=0.7, help="keep detections with score > this (default 0.7)")
    p.add_argument("--out", default="outputs/predict", help="output folder")
    p.add_argument("--nms", type=float, default=None, metavar="IOU",
                   help="class-wise non-maximum suppression at this IoU (off by default: DETR needs none)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="images per forward pass (batches pad images, which slightly changes results)")
    p.add_argument("--panoptic_threshold", type=float, default=0.85, help="panoptic checkpoints: class threshold")
    p.add_argument("--no_draw", dest="draw", action="store_false", help="only write predictions.json")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16: autocast the model (pays with bf16 hardware or a GPU; boxes move ~1e-3)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: faster per image, ~1 min of compilation per new image shape")
    p.add_argument("--no_progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("attention", help="draw decoder and encoder attention maps of one image (deformable "
                                                "attention: the sampling points of the top detections)")
    p.add_argument("image")
    _add_common(p)
    p.add_argument("--out", default="outputs/attention", help="output folder")
    p.add_argument("--top_k", type=int, default=4, help="number of top detections to show (default 4)")
    p.add_argument("--threshold", type=float, default=None, help="only detections with score > this")
    p.add_argument("--points", type=_point, nargs="+", default=None, metavar="X,Y",
                   help="encoder reference points in image pixels (default: the top detections' box centres)")
    p.set_defaults(func=cmd_attention)
