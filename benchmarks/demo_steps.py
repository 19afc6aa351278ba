"""The demo's configuration (or a variant of it) trained by steps, with held-out COCO AP along the way.

    python benchmarks/demo_steps.py --minutes 15 [--device cuda] [--lr 1e-4] [--num_train 4096] ...

Generates the shapes data (``--num_train`` training images, ``--num_val`` held-out ones), trains the
``shapes-small`` preset with the demo's augmentation for ``--minutes`` (or ``--steps``) on random batches,
and prints one JSON line per ``--log_every`` steps (mean losses) and per evaluation (held-out AP, AP50).
This is how the README's table of demo variants was measured (11 variants side by side on one GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import torch

from detr.config import preset
from detr.data.batch import collate_detection
from detr.data.shapes import generate_shapes
from detr.engine.evaluate import evaluate
from detr.engine.optim import build_optimizer
from detr.engine.train import TrainOptions, build_dataset
from detr.loss import SetCriterion
from detr.model.detr import build_detr


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="outputs/demo_steps", help="where the shapes data is generated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--minutes", type=float, default=15.0, help="stop after this much training time")
    p.add_argument("--steps", type=int, default=1_000_000, help="... or after this many steps")
    p.add_argument("--eval_every", type=int, default=1000)
    p.add_argument("--log_every", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr_backbone", type=float, default=None, help="default: --lr")
    p.add_argument("--clip_max_norm", type=float, default=0.1)
    p.add_argument("--num_train", type=int, default=512)
    p.add_argument("--num_val", type=int, default=128)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--max_objects", type=int, default=4)
    p.add_argument("--min_object_size", type=float, default=0.2)
    p.add_argument("--num_queries", type=int, default=10)
    p.add_argument("--hidden_dim", type=int, default=128)
    p.add_argument("--enc_layers", type=int, default=2)
    p.add_argument("--dec_layers", type=int, default=2)
    p.add_argument("--dim_feedforward", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dilation", action="store_true")
    p.add_argument("--eos_coef", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    size = args.image_size
    name = f"shapes_{args.num_train}_{args.num_val}_{size}_{args.max_objects}_{args.min_object_size}"
    data = generate_shapes(
        Path(args.data_dir) / name, num_train=args.num_train, num_val=args.num_val, image_size=size, seed=args.seed,
        max_objects=args.max_objects, min_object_size=args.min_object_size,
    )
    # the demo's augmentation: scales around the image size, flips, the scaled crop branch
    options = TrainOptions(coco_path=str(data), train_scales=[size - 16, size, size + 16], max_size=2 * size,
                           val_scale=size, batch_size=args.batch_size, num_workers=0, seed=args.seed)
    train_set = build_dataset(options, "train", train_augment=True, masks=False)
    val_set = build_dataset(options, "val", train_augment=False, masks=False)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=32, collate_fn=collate_detection)
    config = preset("shapes-small", num_queries=args.num_queries).with_backbone(dilation=args.dilation)
    config = config.with_transformer(hidden_dim=args.hidden_dim, enc_layers=args.enc_layers, dec_layers=args.dec_layers,
                                     dim_feedforward=args.dim_feedforward, dropout=args.dropout)
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, eos_coef=args.eos_coef))
    model = build_detr(config).to(device)
    criterion = SetCriterion.from_config(config).to(device)
    optimizer = build_optimizer(model, lr=args.lr, lr_backbone=args.lr_backbone or args.lr, weight_decay=1e-4)
    print(json.dumps({"args": vars(args)}), flush=True)

    sampler = torch.Generator().manual_seed(args.seed)
    sums: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        indices = torch.randint(0, len(train_set), (args.batch_size,), generator=sampler).tolist()
        train_set.set_epoch(step)  # fresh augmentation draws per step
        batch = collate_detection([train_set[i] for i in indices]).to(device)
        result = criterion(model(batch.images), batch.targets)
        optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        if args.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()
        for name in ("loss_ce", "loss_bbox", "loss_giou"):
            sums[name] = sums.get(name, 0.0) + result.terms[name].item()
        elapsed = time.perf_counter() - start
        if step % args.log_every == 0:
            means = {k: round(v / args.log_every, 4) for k, v in sums.items()}
            print(json.dumps({"step": step, "seconds": round(elapsed, 1), **means}), flush=True)
            sums = {}
        done = elapsed > args.minutes * 60 or step == args.steps
        if step % args.eval_every == 0 or done:
            model.eval()
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
                metrics = evaluate(model, val_loader, coco_gt=val_set.coco, device=device, progress=False)
            model.train()
            print(json.dumps({"step": step, "seconds": round(elapsed, 1), "ap": metrics["bbox"]["AP"],
                              "ap50": metrics["bbox"]["AP50"]}), flush=True)
        if done:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
