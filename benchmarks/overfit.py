"""Can the whole pipeline learn real COCO images? Train on the first N train images, evaluate on them.

    python benchmarks/overfit.py --coco_path ../shared/data/coco-mini --images 10 --json

prints one JSON line: {"ap", "ap50", "seconds", "epochs", "images", "objects", ...}. "First" means
the order of ``images`` in ``annotations/instances_train2017.json``. The model trains from scratch
(no downloads): a ResNet-18 with trained GroupNorm, no augmentation, evaluation at the training size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from detr.config import preset
from detr.data.coco import coco_paths
from detr.engine.train import TrainOptions, train


def subset_annotations(ann_file: Path, count: int, out_file: Path) -> tuple[int, int]:
    """Write the first ``count`` images of a COCO json (and their annotations); return (images, objects)."""
    data = json.loads(ann_file.read_text())
    if count < 1 or count > len(data["images"]):
        raise ValueError(f"--images must be in 1..{len(data['images'])} for {ann_file}, got {count}")
    images = data["images"][:count]
    keep = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    out_file.write_text(json.dumps({**data, "images": images, "annotations": anns}))
    return len(images), sum(1 for a in anns if not a.get("iscrowd", 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco_path", required=True)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--size", type=int, default=320, help="short side for training and evaluation")
    p.add_argument("--max_size", type=int, default=480)
    p.add_argument("--num_queries", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(message)s")

    images_dir, ann_file = coco_paths(args.coco_path, "train")
    # A from-scratch ResNet-18 (trained GroupNorm, every stage trains) under a DETR of width 256.
    config = preset("shapes-small", num_queries=args.num_queries, num_classes=91)
    config = config.with_backbone(name="resnet18", norm="group_norm", frozen_stages=0)
    config = config.with_transformer(hidden_dim=256, nheads=8, enc_layers=3, dec_layers=3, dim_feedforward=512)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "subset.json"
        n_images, n_objects = subset_annotations(Path(ann_file), args.images, subset)
        options = TrainOptions(
            train_images=str(images_dir), train_json=str(subset), val_images=str(images_dir), val_json=str(subset),
            output_dir=args.output_dir or str(Path(tmp) / "run"), epochs=args.epochs, lr_drop=args.epochs,
            batch_size=args.batch_size, lr=args.lr, lr_backbone=args.lr, seed=args.seed, num_workers=0,
            augment=False, train_scales=[args.size], val_scale=args.size, max_size=args.max_size, eval_every=0,
            progress=not args.json,
        )
        record = train(config, options)
    result = {
        "ap": record["bbox_AP"], "ap50": record["bbox_AP50"], "seconds": round(time.perf_counter() - start, 1),
        "epochs": args.epochs, "images": n_images, "objects": n_objects, "size": args.size,
        "final_loss": record["train_loss"], "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
