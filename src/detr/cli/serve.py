"""``detr serve``: flags -> ``Detector`` + ``ServeOptions`` -> ``detr.serve.serve`` (needs the [serve] extra)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..serve import ServeOptions, serve
        from ..serve.server import serve as _  # noqa: F401  (fails here if the ASGI stack is missing)
    except ImportError as err:
        raise ValueError(f"detr serve needs the serve extra: pip install 'detr-pytorch[serve]' ({err})") from None
    from ..inference.predictor import Detector

    options = ServeOptions(
        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout_s,
        max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, threshold=args.threshold,
        max_detections=args.max_detections, api_key=args.api_key or os.environ.get("DETR_API_KEY") or None,
        images_dir=Path(args.images) if args.images else None, drain_s=args.drain_s,
    )
    detector = Detector.from_checkpoint(
        args.checkpoint, device=args.device, threshold=args.threshold, class_names_from=args.class_names_from,
        size=args.size, max_size=args.max_size, batch_size=args.max_batch, precision=args.precision,
    )
    name = args.model_name or Path(str(args.checkpoint).rstrip("/")).name.split("?")[0]
    serve(detector, options, host=args.host, port=args.port, model_name=name, log_level=args.log_level)
    return 0


def add_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="an HTTP detection service with an attention explorer at /")
    p.add_argument("--checkpoint", required=True, help="a checkpoint name, file or URL (any `detr predict` reads)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 warns)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--size", type=int, default=None,
                   help="short side of the resize (default: the size the checkpoint was trained at, else 800)")
    p.add_argument("--max_size", type=int, default=None,
                   help="cap on the long side (default: the checkpoint's, else 1333)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--class_names_from", default=None, metavar="JSON", help="class names from a dataset json")
    p.add_argument("--model_name", default=None, help="the name answers carry (default: the checkpoint's)")
    p.add_argument("--threshold", type=float, default=0.7, help="default score threshold of /v1/detect")
    p.add_argument("--max_detections", type=int, default=100, help="default and cap of detections per image")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max_batch", type=int, default=8, help="images per forward pass (1: no batching)")
    g.add_argument("--batch_wait_ms", type=float, default=10.0,
                   help="after a batch's first request, wait this long for more (default 10)")
    g.add_argument("--max_queue", type=int, default=64, help="waiting requests; beyond: 503 + Retry-After")
    g.add_argument("--timeout_s", type=float, default=30.0, help="per-request deadline; beyond: 504")
    g.add_argument("--max_image_bytes", type=int, default=20 * 1024 * 1024, help="body limit (413)")
    g.add_argument("--max_pixels", type=int, default=40_000_000,
                   help="width x height limit, checked on the header before decoding (413)")
    g.add_argument("--drain_s", type=float, default=60.0, help="on SIGTERM, wait this long for in-flight requests")
    g = p.add_argument_group("access")
    g.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $DETR_API_KEY)")
    g.add_argument("--images", default=None, metavar="DIR", help="let the explorer browse this folder (only it)")
    g.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
