"""``detr demo``: the main job on a fresh machine, with nothing to download.

Trains a detector from scratch on coloured shapes rendered on the fly (every training image is new),
for a wall-clock budget, then scores COCO AP on a fixed held-out split written to disk and draws the
predictions of a few held-out images. The model is DETR with the convergence options that make this
possible in minutes on a CPU (``preset("shapes-fast")``): a small stride-8 GroupNorm CNN instead of a
stride-32 ResNet (16x16 encoder tokens instead of 4x4), anchor-box queries refined layer by layer, and
two-stage query selection from the encoder's proposals, whose features become the queries' content.

``shapes_task`` is shared with ``benchmarks/convergence.py``: the same stream, held-out split and scoring.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import save_checkpoint
from .config import DetrConfig, preset
from .data.shapes import SHAPES_CATEGORIES, ShapesParams, ShapesStream, generate_shapes
from .engine.log import JsonLog
from .engine.stream import StreamResult, StreamSchedule, train_on_stream
from .loss import SetCriterion
from .model import build_detr
from .preprocessing import InputConfig
from .runtime import native_bf16

log = logging.getLogger(__name__)

IMAGE_SIZE = 128
# How the demo's model sees: trained and validated on 128-pixel images (stored in its checkpoint).
DEMO_INPUT = InputConfig(size=IMAGE_SIZE, max_size=2 * IMAGE_SIZE, train_scales=(IMAGE_SIZE,))
VAL_IMAGES = 128
VAL_SEED = 0  # the held-out split is the same for every training seed
# Shapes per image and their size (a fraction of the image side), for training and held-out images alike.
SHAPES = {"min_objects": 1, "max_objects": 4, "min_object_size": 0.2, "max_object_size": 0.5}
# The small-objects variant (benchmarks/convergence.py --small): 4-24 px shapes, 3-10 of them, on 256 px images:
# every object is COCO "small" (area < 32^2), so its AP is the APs that multi-scale features are for.
SMALL_IMAGE_SIZE = 256
SMALL_SHAPES = {"min_objects": 3, "max_objects": 10, "min_object_size": 4 / SMALL_IMAGE_SIZE,
                "max_object_size": 24 / SMALL_IMAGE_SIZE}
# The demo's schedule: what ``make demo`` runs (the budget counts training time; the whole run, with the
# held-out evaluation and the drawings, stays within 10 minutes on 2 cores).
DEMO_SCHEDULE = StreamSchedule(minutes=9.0, batch_size=16, lr=4e-4, lr_drop=0.8, ema=0.999)


@dataclass
class ShapesTask:
    """Fresh training images, a fixed held-out split on disk and its COCO scoring."""

    stream: ShapesStream
    root: Path  # the held-out split: root/val2017/*.png and root/annotations/instances_val2017.json
    evaluator: ShapesEvaluator

    @property
    def val_images(self) -> Path:
        return self.root / "val2017"


class ShapesEvaluator:
    """COCO AP of a model on the held-out split (the package's evaluation path: dataset, loader, COCOeval)."""

    def __init__(self, root: Path, batch_size: int = 32, input_config: InputConfig = DEMO_INPUT) -> None:
        from .data.coco import CocoDetection
        from .data.transforms import val_transform

        self.dataset = CocoDetection(root / "val2017", root / "annotations" / "instances_val2017.json",
                                     transforms=val_transform(input_config))
        self.batch_size = batch_size
        self._batches: list[Any] | None = None

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from .data.batch import collate_detection
        from .engine.evaluate import evaluate

        if self._batches is None:  # 128 small images: decode once, score many times
            items = [self.dataset[i] for i in range(len(self.dataset))]
            self._batches = [collate_detection(items[i:i + self.batch_size])
                             for i in range(0, len(items), self.batch_size)]
        device = next(model.parameters()).device
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its table
            result = evaluate(model, self._batches, coco_gt=self.dataset.coco, device=device, progress=False)
        return {k: round(result["bbox"][k], 4) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def shapes_task(data_dir: str | Path, seed: int = 0, *, small: bool = False) -> ShapesTask:
    """The training stream of ``seed`` and the held-out split (written once under ``data_dir``); ``small``:
    the small-objects variant (``SMALL_SHAPES`` on ``SMALL_IMAGE_SIZE`` images) instead of the demo's."""
    size, shapes = (SMALL_IMAGE_SIZE, SMALL_SHAPES) if small else (IMAGE_SIZE, SHAPES)
    root = generate_shapes(data_dir, num_train=0, num_val=VAL_IMAGES, image_size=size, seed=VAL_SEED, **shapes)
    # The train split of any seed never meets the val split: each image's generator is seeded by its split.
    stream = ShapesStream(ShapesParams(num_train=0, num_val=0, image_size=size, seed=seed, **shapes))
    input_config = InputConfig(size=size, max_size=2 * size, train_scales=(size,))
    return ShapesTask(stream, Path(root), ShapesEvaluator(Path(root), input_config=input_config))


def train_shapes(config: DetrConfig, task: ShapesTask, schedule: StreamSchedule, *, seed: int = 0,
                 log_file: JsonLog | None = None, progress: bool = True) -> StreamResult:
    """Train ``config`` from scratch on the task's stream (seeded), evaluating as the schedule says."""
    torch.manual_seed(seed)
    model = build_detr(config)
    criterion = SetCriterion.from_config(config)
    return train_on_stream(model, criterion, task.stream.batch, schedule, evaluate=task.evaluator,
                           log_file=log_file, progress=progress)


def demo_precision(amp: str = "auto") -> str:
    """The demo's training precision: ``auto`` is bf16 autocast where the CPU has bf16 instructions
    (``detr.runtime.native_bf16``) and fp32 elsewhere; ``fp32`` / ``bf16`` force one. At equal images bf16
    reaches the fp32 AP (docs/experiments/convergence.md) and trains more images a second."""
    if amp not in ("auto", "fp32", "bf16"):
        raise ValueError(f"demo precision must be auto, fp32 or bf16, got {amp!r}")
    if amp == "auto":
        return "bf16" if native_bf16("cpu") else "fp32"
    return amp


def run_demo(output_dir: str | Path = "outputs/demo", *, minutes: float | None = None, seed: int = 0,
             progress: bool = True, draw: int = 6, amp: str = "auto") -> dict[str, Any]:
    """Train, evaluate and draw; returns (and writes to ``demo_result.json``) the numbers."""
    start = time.perf_counter()
    out = Path(output_dir)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    task = shapes_task(out / "shapes", seed)
    config = preset("shapes-fast")
    precision = demo_precision(amp)
    schedule = StreamSchedule(**{**DEMO_SCHEDULE.__dict__, "amp": precision,
                                 **({} if minutes is None else {"minutes": minutes})})
    if amp == "auto":
        reason = "this CPU has bf16 instructions" if precision == "bf16" else "no bf16 instructions on this CPU"
    else:
        reason = f"--amp {amp}"
    log.info("training precision: %s (%s)", "bf16 autocast" if precision == "bf16" else "fp32", reason)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = JsonLog(run_dir / "log.jsonl")
    try:
        log_file.write({"type": "config", "seed": seed, "model": config.to_dict(), "schedule": schedule.__dict__})
        result = train_shapes(config, task, schedule, seed=seed, log_file=log_file, progress=progress)
    finally:
        log_file.close()
    names = {str(c["id"]): c["name"] for c in SHAPES_CATEGORIES}
    checkpoint = save_checkpoint(result.evaluated, run_dir / "model.safetensors", metadata={"class_names": names},
                                 input=DEMO_INPUT)
    drawn = draw_predictions(checkpoint, task.val_images, out / "predictions", draw)
    final = result.evaluations[-1]
    summary = {
        "AP": final["AP"], "AP50": final["AP50"], "AP75": final["AP75"], "seed": seed, "precision": precision,
        "steps": result.steps, "images": result.images, "train_seconds": round(result.train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1), "checkpoint": str(checkpoint),
        "predictions": [str(p) for p in drawn],
    }
    (out / "demo_result.json").write_text(json.dumps(summary, indent=1))
    return summary


def draw_predictions(checkpoint: Path, image_dir: Path, out_dir: Path, count: int,
                     threshold: float = 0.5) -> list[Path]:
    """Run the trained model on the first ``count`` images of ``image_dir`` and save drawings."""
    from .inference.predictor import Detector
    from .inference.visualize import draw_detections

    detector = Detector.from_checkpoint(checkpoint, threshold=threshold)  # at the size the checkpoint stores
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(image_dir.glob("*.png"))[:count]:
        image = detector.load(path)
        found = detector(image)
        drawn = draw_detections(image, [d.box for d in found], [d.label for d in found], [d.score for d in found],
                                detector.class_names)
        target = out_dir / f"{path.stem}.png"
        drawn.resize((image.width * 3, image.height * 3)).save(target)
        written.append(target)
    return written
