"""Running a detector over image files: predictions.json (COCO results layout, with each image's file name
in place of an id) and, per image, the boxes drawn (plus the segments of panoptic checkpoints).

``detect_files(detector, inputs, out)`` is what ``detr predict`` runs.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..coco_panoptic import segment_ids_to_png
from ..data.images import ImageLoadError
from .predictor import Detector
from .results import PanopticSegmentation
from .visualize import draw_detections, draw_segments

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
PREDICTIONS_FILE = "predictions.json"


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their image files by suffix, sorted, not recursive) and glob patterns -> image
    paths in order without repeats; and the inputs that matched nothing."""
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


def detect_files(detector: Detector, inputs: Sequence[str], out: str | Path, *, batch_size: int = 1,
                 draw: bool = True, progress: bool = True) -> dict[str, Any]:
    """Detect objects in every image the inputs name (files, folders, glob patterns); write ``out``/
    predictions.json and, with ``draw``, one PNG per image (panoptic checkpoints add a coloured segment
    PNG, the COCO-panoptic id PNG and a segments JSON). Unreadable images are reported on stderr and
    skipped. Returns a summary: images, failed (paths and unmatched inputs), detections, seconds."""
    from tqdm import tqdm

    paths, unmatched = expand_inputs(inputs)
    for item in unmatched:
        print(f"error: no image file matches {item}", file=sys.stderr)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = dict(zip(paths, output_stems(paths), strict=True))
    rows: list[dict[str, Any]] = []
    failed: list[Path] = []
    start = time.perf_counter()
    with tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not progress or len(paths) < 2) as bar:
        for offset in range(0, len(paths), batch_size):
            batch = paths[offset : offset + batch_size]
            loaded = []
            for path in batch:
                try:
                    loaded.append((path, detector.load(path)))
                except ImageLoadError as e:
                    failed.append(path)
                    tqdm.write(f"error: {e}", file=sys.stderr)
            results = detector.predict([image for _, image in loaded]) if loaded else []
            for (path, image), (detections, segmentation) in zip(loaded, results, strict=True):
                rows.extend({"file_name": path.name, "path": str(path), "category_id": d.label, "category_name": d.name,
                             "bbox": list(d.box_xywh), "score": d.score} for d in detections)
                if draw:
                    drawn = draw_detections(image, [d.box for d in detections], [d.label for d in detections],
                                            [d.score for d in detections], detector.class_names)
                    drawn.save(out / f"{stems[path]}.png")
                if segmentation is not None:
                    _write_segments(detector, out, stems[path], path, image, segmentation)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    (out / PREDICTIONS_FILE).write_text(json.dumps(rows))
    done = len(paths) - len(failed)
    return {"images": done, "failed": [str(p) for p in failed] + unmatched, "detections": len(rows),
            "predictions": str(out / PREDICTIONS_FILE), "seconds": round(seconds, 3),
            "images_per_s": round(done / seconds, 3) if seconds > 0 else None}


def _write_segments(detector: Detector, out: Path, stem: str, path: Path, image: Any,
                    segmentation: PanopticSegmentation) -> None:
    """A panoptic result: drawn, as the COCO-panoptic id PNG, and its segments JSON."""
    draw_segments(image, segmentation.segment_ids, segmentation.segments,
                  detector.class_names).save(out / f"{stem}_panoptic.png")
    (out / f"{stem}_segments.png").write_bytes(segment_ids_to_png(segmentation.segment_ids))
    (out / f"{stem}_segments.json").write_text(json.dumps(
        {"file_name": path.name, "segments_info": segmentation.segments}, indent=1))
