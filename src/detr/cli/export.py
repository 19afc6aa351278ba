"""``detr export``: a checkpoint -> an ONNX graph (see ``detr.export``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..export import DEFAULT_OPSET, FORMATS, MIN_OPSET, export_onnx


def cmd_export(args: argparse.Namespace) -> int:
    """``detr export``: a checkpoint file -> OUT.onnx."""
    if args.format not in FORMATS:  # argparse already refuses other choices; this guards direct calls
        raise ValueError(f"unknown export format {args.format!r}; supported: {', '.join(FORMATS)}")
    if (args.height is None) != (args.width is None):
        raise SystemExit("error: give both --height and --width, or neither (the checkpoint's input size)")
    image_size = (args.height, args.width) if args.height is not None else None
    out = export_onnx(args.checkpoint, args.output, opset=args.opset, image_size=image_size,
                      dynamic=not args.static, padding_mask=args.padding_mask, verify=args.verify)
    print(f"wrote {out}")
    return 0


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``detr export --checkpoint C --format onnx OUT.onnx [--opset N] [--height H --width W]``."""
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX (dynamic batch and image size)")
    p.add_argument("output", help="the file to write, e.g. detr.onnx")
    p.add_argument("--checkpoint", required=True, help="any checkpoint `detr eval` accepts")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--height", type=int, default=None,
                   help="image height traced (with --static, the only height the graph accepts; default: the "
                        "checkpoint's input size, 800 for the reference's checkpoints)")
    p.add_argument("--width", type=int, default=None,
                   help="image width traced (default: a 4:3 landscape width at that height, a multiple of 32)")
    p.add_argument("--padding_mask", action="store_true",
                   help="add a padding_mask [B, H, W] input (True = padding) for padded batches")
    p.add_argument("--static", action="store_true", help="fix batch 1 and --height x --width in the graph")
    p.add_argument("--no_verify", dest="verify", action="store_false",
                   help="skip comparing onnxruntime with PyTorch on an input of another size")
    p.set_defaults(func=cmd_export)
    return p
