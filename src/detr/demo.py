"""``detr demo``: the main job on a fresh machine, with nothing to download.

Generates the synthetic shapes dataset, trains the small CPU configuration, evaluates COCO AP on the
held-out split and draws the predictions of a few held-out images.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .config import preset
from .data.shapes import generate_shapes
from .engine.train import TrainOptions, train

log = logging.getLogger(__name__)

# The tuned small configuration (see README, "The demo"): ResNet-18 trained from scratch on 128 px
# images, 10 queries, a 2+2 layer transformer of width 128.
DEMO_DATA = {"num_train": 512, "num_val": 64, "image_size": 128}
DEMO_SCHEDULE = {"epochs": 24, "lr_drop": 18, "batch_size": 8, "lr": 2e-4, "lr_backbone": 2e-4}


def run_demo(output_dir: str | Path = "outputs/demo", *, epochs: int | None = None, seed: int = 0,
             num_workers: int = 1, progress: bool = True, draw: int = 6) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(output_dir)
    data = generate_shapes(out / "shapes", seed=seed, **DEMO_DATA)
    config = preset("shapes-small")
    size = DEMO_DATA["image_size"]
    schedule = dict(DEMO_SCHEDULE, **({"epochs": epochs} if epochs else {}))
    options = TrainOptions(
        coco_path=str(data), output_dir=str(out / "run"), seed=seed, num_workers=num_workers, progress=progress,
        train_scales=[size - 16, size, size + 16], max_size=2 * size, val_scale=size, eval_every=5,
        **schedule,
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    record = train(config, options)
    drawn = draw_predictions(out / "run" / "model.safetensors", data / "val2017", out / "predictions", draw)
    result = {
        "AP": record.get("bbox_AP"), "AP50": record.get("bbox_AP50"), "epochs": schedule["epochs"],
        "seconds": round(time.perf_counter() - start, 1), "checkpoint": str(out / "run" / "model.safetensors"),
        "predictions": [str(p) for p in drawn],
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=1))
    return result


def draw_predictions(checkpoint: Path, image_dir: Path, out_dir: Path, count: int,
                     threshold: float = 0.5) -> list[Path]:
    """Run the trained model on the first ``count`` images of ``image_dir`` and save drawings."""
    from .inference.predictor import Detector
    from .inference.visualize import draw_detections

    size = DEMO_DATA["image_size"]
    detector = Detector.from_checkpoint(checkpoint, threshold=threshold, size=size, max_size=2 * size)
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
