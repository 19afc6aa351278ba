"""Can the whole pipeline learn real COCO images? Train on the first N train images, evaluate on them.

    python benchmarks/overfit.py --coco_path ../shared/data/coco-mini --images 10 --json

prints one JSON line: {"ap", "ap50", "seconds", "epochs", "images", "objects", ...}. "First" means
the order of ``images`` in ``annotations/instances_train2017.json``. The model trains from scratch
(no downloads): a ResNet-18 with trained GroupNorm, no augmentation, evaluation at the training size.

    python benchmarks/overfit.py --coco_path ../shared/data/coco-mini --images 10 --masks --json

does the paper's two-stage panoptic recipe on the same images: they are converted to COCO panoptic
(``detr data panoptic-from-instances``: things only, no overlaps), a detector trains on the panoptic
boxes (``--epochs``), then the mask head trains on top of the frozen detector (``--mask_epochs``), and
PQ is computed on the same images; the line adds {"pq", "pq_things", "sq_things", "rq_things", "segm_ap",
"mask_seconds"}. ``--detector CKPT`` skips the first stage (e.g. a previous run's ``--output_dir``
``/detector/checkpoint.pth``), and with it ``--resume OUT/masks/checkpoint.pth`` continues a mask stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from detr.cli import add_model_flags, model_config_from_args
from detr.config import DetrConfig, preset
from detr.data.coco import coco_paths
from detr.data.panoptic import panoptic_from_instances
from detr.engine.options import TrainOptions
from detr.engine.train import train


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


def drop(epochs: int) -> int:
    """The learning rate drops 10x after two thirds of the epochs (the reference's 200 of 300)."""
    return max(1, round(epochs * 2 / 3))


def overfit_config(num_queries: int, masks: bool = False, variant: str = "") -> DetrConfig:
    """A from-scratch ResNet-18 (trained GroupNorm, every stage trains) under a DETR of width 256, with the
    model flags of ``variant`` (``detr train``'s, e.g. "--anchor_queries --two_stage") applied on top."""
    config = preset("shapes-small", num_queries=num_queries, num_classes=91, masks=masks)
    config = config.with_backbone(name="resnet18", norm="group_norm", frozen_stages=0)
    config = config.with_transformer(hidden_dim=256, nheads=8, enc_layers=3, dec_layers=3, dim_feedforward=512)
    if not variant:
        return config
    parser = argparse.ArgumentParser(prog="--variant", add_help=False)
    add_model_flags(parser)
    return model_config_from_args(parser.parse_args(shlex.split(variant)), base=config)


def panoptic_subset(coco_path: str, count: int, root: Path) -> tuple[Path, int, int]:
    """Convert the first ``count`` train images to the COCO panoptic layout under ``root``, as both its
    train and val split; return (instances subset json, images, segments)."""
    images_dir, ann_file = coco_paths(coco_path, "train")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    subset = root / "annotations" / "instances_subset.json"
    n_images, _ = subset_annotations(Path(ann_file), count, subset)
    for split in ("train", "val"):  # the same images on both sides: train on them, evaluate on them
        summary = panoptic_from_instances(subset, root / "annotations" / f"panoptic_{split}2017.json",
                                          root / "annotations" / f"panoptic_{split}2017", image_dir=images_dir)
    return subset, n_images, summary["segments"]


def panoptic_main(args: argparse.Namespace) -> dict:
    images_dir, _ = coco_paths(args.coco_path, "train")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir or tmp)
        subset, n_images, n_segments = panoptic_subset(args.coco_path, args.images, out / "panoptic")
        common = dict(
            dataset_file="coco_panoptic", coco_panoptic_path=str(out / "panoptic"), train_images=str(images_dir),
            val_images=str(images_dir), val_json=str(subset), batch_size=args.batch_size, seed=args.seed,
            num_workers=0, augment=False, train_scales=[args.size], val_scale=args.size, max_size=args.max_size,
            eval_every=0, progress=not args.json, device=args.device,
        )
        detector = args.detector
        box_record: dict = {}
        if detector is None:  # stage 1: boxes of every segment
            box_record = train(overfit_config(args.num_queries), TrainOptions.from_flat(
                output_dir=str(out / "detector"), epochs=args.epochs, lr_drop=drop(args.epochs), lr=args.lr,
                lr_backbone=args.lr, **common))
            detector = str(out / "detector" / "checkpoint.pth")
        box_seconds = time.perf_counter() - start
        # stage 2: the mask head alone, on top of the frozen detector (--unfrozen: everything trains on, from
        # the detector's weights or --pretrained's)
        frozen = None if args.unfrozen else detector
        pretrained = args.pretrained or (detector if args.unfrozen else None)
        record = train(overfit_config(args.num_queries, masks=True), TrainOptions.from_flat(
            output_dir=str(out / "masks"), epochs=args.mask_epochs, lr_drop=drop(args.mask_epochs),
            lr=args.mask_lr or args.lr, lr_backbone=args.mask_lr_backbone or args.mask_lr or args.lr,
            frozen_weights=frozen, pretrained=pretrained, resume=args.resume, **common))
    result = {
        "pq": record["panoptic_PQ"], "pq_things": record["panoptic_PQ_th"], "sq_things": record["panoptic_SQ_th"],
        "rq_things": record["panoptic_RQ_th"], "segm_ap": record.get("segm_AP"), "ap": box_record.get("bbox_AP"),
        "ap50": box_record.get("bbox_AP50"), "seconds": round(time.perf_counter() - start, 1),
        "mask_seconds": round(time.perf_counter() - start - box_seconds, 1), "epochs": args.epochs,
        "mask_epochs": args.mask_epochs, "images": n_images, "segments": n_segments, "size": args.size,
        "detector": args.detector, "threads": torch.get_num_threads(), "device": args.device,
        "mask_lr": args.mask_lr or args.lr, "mask_lr_backbone": args.mask_lr_backbone, "pretrained": args.pretrained,
        "resumed_from": args.resume, "unfrozen": args.unfrozen,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco_path", required=True)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--size", type=int, default=320, help="short side for training and evaluation")
    p.add_argument("--max_size", type=int, default=480)
    p.add_argument("--num_queries", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr_drop", type=int, default=None,
                   help="detection: the epoch at which the learning rate drops 10x (default: two thirds of --epochs)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--resume", default=None,
                   help="continue a previous run's checkpoint.pth (same flags) up to --epochs in total; with "
                        "--masks and --detector, the mask stage's (up to --mask_epochs)")
    p.add_argument("--masks", action="store_true", help="two-stage panoptic training, then PQ on the same images")
    p.add_argument("--mask_epochs", type=int, default=100, help="epochs of the mask head (with --masks)")
    p.add_argument("--detector", default=None, help="with --masks: a trained detector; skips the first stage")
    p.add_argument("--mask_lr", type=float, default=None, help="with --masks: the mask head's lr (default --lr)")
    p.add_argument("--mask_lr_backbone", type=float, default=None,
                   help="with --masks --unfrozen: the backbone's lr in the mask stage (default --mask_lr)")
    p.add_argument("--pretrained", default=None,
                   help="with --masks: start the mask head from a previous mask run's model.safetensors")
    p.add_argument("--unfrozen", action="store_true",
                   help="with --masks: the second stage trains the detector too (the one-stage variant, started from "
                        "the trained detector)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--variant", default="", metavar="FLAGS",
                   help='model flags of detr train on top of the overfit model, e.g. "--anchor_queries --two_stage"')
    p.add_argument("--ema", type=float, default=None, help="evaluate an EMA of the weights with this decay")
    p.add_argument("--eval_every", type=int, default=0, help="epochs between evaluations (0: at the end)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="detection: train under autocast")
    args = p.parse_args(argv)
    if (args.pretrained or args.unfrozen) and not args.masks:
        p.error("--pretrained and --unfrozen are for the mask stage: they need --masks")
    if args.mask_lr_backbone is not None and not args.unfrozen:
        p.error("--mask_lr_backbone needs --unfrozen (the two-stage recipe freezes the backbone)")
    if args.masks and args.resume and not args.detector:
        p.error("with --masks, --resume continues the mask stage: give its trained detector as --detector")
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(message)s")
    run = panoptic_main if args.masks else detection_main
    # With --json the evaluation tables go to stderr: stdout carries only the JSON line.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        result = run(args)
    print(json.dumps(result))
    return 0


def detection_main(args: argparse.Namespace) -> dict:
    images_dir, ann_file = coco_paths(args.coco_path, "train")
    config = overfit_config(args.num_queries, variant=args.variant)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "subset.json"
        n_images, n_objects = subset_annotations(Path(ann_file), args.images, subset)
        options = TrainOptions.from_flat(
            train_images=str(images_dir), train_json=str(subset), val_images=str(images_dir), val_json=str(subset),
            output_dir=args.output_dir or str(Path(tmp) / "run"), epochs=args.epochs,
            lr_drop=args.lr_drop or drop(args.epochs),
            resume=args.resume,
            batch_size=args.batch_size, lr=args.lr, lr_backbone=args.lr, seed=args.seed, num_workers=0,
            augment=False, train_scales=[args.size], val_scale=args.size, max_size=args.max_size,
            eval_every=args.eval_every, progress=not args.json, device=args.device, ema=args.ema, amp=args.amp,
        )
        record = train(config, options)
    result = {
        "ap": record["bbox_AP"], "ap50": record["bbox_AP50"], "seconds": round(time.perf_counter() - start, 1),
        "epochs": args.epochs, "lr_drop": options.optim.lr_drop,
        "images": n_images, "objects": n_objects, "size": args.size,
        "final_loss": record["train_loss"], "threads": torch.get_num_threads(), "resumed_from": args.resume,
        "device": args.device, "variant": args.variant, "ema": args.ema, "amp": args.amp,
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
