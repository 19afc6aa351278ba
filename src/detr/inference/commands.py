"""``detr predict`` and ``detr attention``: flags -> Detector -> files. Wired in by ``detr.cli``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
PREDICTIONS_FILE = "predictions.json"


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their image files by suffix, sorted, not recursive) and glob patterns -> image
    paths in order without repeats; and the inputs that matched nothing."""
    import glob

    paths: list[Path] = []
    unmatched: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        elif any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            found = []
        if not found:
            unmatched.append(item)
        paths.extend(found)
    unique = list(dict.fromkeys(paths))
    return unique, unmatched


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per input: its stem, with _2, _3... for repeated stems."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return stems


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a point as X,Y (image pixels), got {text!r}") from None
    return x, y


def _detector(args: argparse.Namespace, threshold: float):
    from .predictor import Detector

    return Detector.from_checkpoint(
        args.checkpoint, device=args.device, threshold=threshold, class_names_from=args.class_names_from,
        size=args.size, max_size=args.max_size, batch_size=getattr(args, "batch_size", 1),
        nms_iou=getattr(args, "nms", None), panoptic_threshold=getattr(args, "panoptic_threshold", 0.85),
        compile=getattr(args, "compile", False), precision=getattr(args, "precision", "fp32"),
    )


def cmd_predict(args: argparse.Namespace) -> int:
    """Detect objects in every input image: predictions.json (COCO results layout, with the image's
    file name instead of an id) plus, per image, a PNG with the boxes drawn; for panoptic checkpoints
    also the segments (coloured PNG, COCO-panoptic id PNG, segments JSON). Unreadable images are
    reported on stderr and skipped; the exit status is 1 if any input failed."""
    from tqdm import tqdm

    from ..data.images import ImageLoadError
    from ..postprocess import segment_ids_to_png
    from .visualize import draw_detections, draw_segments

    paths, unmatched = expand_inputs(args.inputs)
    for item in unmatched:
        print(f"error: no image file matches {item}", file=sys.stderr)
    if not paths:
        print("error: nothing to predict", file=sys.stderr)
        return 1
    detector = _detector(args, args.threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = dict(zip(paths, output_stems(paths), strict=True))
    rows: list[dict[str, Any]] = []
    failed: list[Path] = []
    start = time.perf_counter()
    with tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not args.progress or len(paths) < 2) as bar:
        for offset in range(0, len(paths), args.batch_size):
            loaded = []
            for path in paths[offset : offset + args.batch_size]:
                try:
                    loaded.append((path, detector.load(path)))
                except ImageLoadError as e:
                    failed.append(path)
                    tqdm.write(f"error: {e}", file=sys.stderr)
            results = detector.predict([image for _, image in loaded]) if loaded else []
            for (path, image), (detections, segmentation) in zip(loaded, results, strict=True):
                stem = stems[path]
                rows.extend(
                    {"file_name": path.name, "path": str(path), "category_id": d.label, "category_name": d.name,
                     "bbox": list(d.box_xywh), "score": d.score}
                    for d in detections
                )
                if args.draw:
                    draw_detections(image, [d.box for d in detections], [d.label for d in detections],
                                    [d.score for d in detections], detector.class_names).save(out / f"{stem}.png")
                if segmentation is not None:
                    draw_segments(image, segmentation.segment_ids, segmentation.segments,
                                  detector.class_names).save(out / f"{stem}_panoptic.png")
                    (out / f"{stem}_segments.png").write_bytes(segment_ids_to_png(segmentation.segment_ids))
                    (out / f"{stem}_segments.json").write_text(json.dumps(
                        {"file_name": path.name, "segments_info": segmentation.segments}, indent=1))
            bar.update(len(paths[offset : offset + args.batch_size]))
    seconds = time.perf_counter() - start
    (out / PREDICTIONS_FILE).write_text(json.dumps(rows))
    done = len(paths) - len(failed)
    print(json.dumps({
        "images": done, "failed": [str(p) for p in failed] + unmatched, "detections": len(rows),
        "predictions": str(out / PREDICTIONS_FILE), "seconds": round(seconds, 3),
        "images_per_s": round(done / seconds, 3) if seconds > 0 else None,
    }))
    if failed or unmatched:
        print(f"error: {len(failed) + len(unmatched)} input(s) could not be read: "
              + ", ".join([str(p) for p in failed] + unmatched), file=sys.stderr)
        return 1
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    """Draw the decoder attention of the top detections and the encoder self-attention at a few
    reference points of one image."""
    from .attention import save_attention_figures

    detector = _detector(args, args.threshold if args.threshold is not None else 0.0)
    maps = detector.attention(args.image, top_k=args.top_k, points=args.points, threshold=args.threshold)
    written = save_attention_figures(maps, args.out, Path(args.image).stem)
    print(json.dumps({"written": [str(p) for p in written], "detections": [d.to_dict() for d in maps.detections],
                      "points": maps.points, "feature_size": list(maps.feature_size)}))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="any checkpoint `detr convert` reads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--size", type=int, default=800, help="short side of the resize (default 800)")
    p.add_argument("--max_size", type=int, default=1333, help="cap on the long side (default 1333)")
    p.add_argument("--class_names_from", default=None, metavar="JSON",
                   help="take class names from this dataset json's categories (default: the checkpoint's "
                        "metadata, or COCO's for 91-class models)")


def add_inference_parsers(subparsers: argparse._SubParsersAction) -> None:
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

    p = subparsers.add_parser("attention", help="draw decoder and encoder attention maps of one image")
    p.add_argument("image")
    _add_common(p)
    p.add_argument("--out", default="outputs/attention", help="output folder")
    p.add_argument("--top_k", type=int, default=4, help="number of top detections to show (default 4)")
    p.add_argument("--threshold", type=float, default=None, help="only detections with score > this")
    p.add_argument("--points", type=_point, nargs="+", default=None, metavar="X,Y",
                   help="encoder reference points in image pixels (default: the top detections' box centres)")
    p.set_defaults(func=cmd_attention)
