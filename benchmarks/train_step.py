"""One DETR-R50 training step (forward, matching, loss, backward, clip, step) at batch 2 of ~512x683 images.

    python benchmarks/train_step.py --json [--runs 5]

One JSON line: images/s and the median seconds of each phase; ``matcher_loss_share`` is the share of
the step spent in the Hungarian matcher and the losses (the issue's goal: under 5%). The process
reuses large freed blocks as ``detr train`` does (``detr.runtime.keep_freed_memory``); ``--baseline``
leaves malloc alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from detr import build_detr, preset
from detr.engine.optim import build_optimizer
from detr.loss import SetCriterion
from detr.runtime import keep_freed_memory

SIZES = ((512, 683), (512, 640))


def targets(generator: torch.Generator, count: int, num_objects: int = 7) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(count):
        centers = torch.rand(num_objects, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(num_objects, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(1, 91, (num_objects,), generator=generator)
        out.append({"boxes": torch.cat([centers, sizes], dim=1), "labels": labels})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--baseline", action="store_true", help="leave malloc alone (before the speed work)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    malloc_tuned = False if args.baseline else keep_freed_memory()
    torch.manual_seed(0)
    config = preset("r50")
    model = build_detr(config).train()
    criterion = SetCriterion.from_config(config)
    optimizer = build_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, *size, generator=g) for size in SIZES]
    batch_targets = targets(g, len(images))
    phases: dict[str, list[float]] = {"forward": [], "matcher_loss": [], "backward": [], "clip_step": [], "total": []}
    for run in range(args.runs + 1):  # the first step is a warm-up
        t0 = time.perf_counter()
        outputs = model(images)
        t1 = time.perf_counter()
        result = criterion(outputs, batch_targets)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        t4 = time.perf_counter()
        if run:
            for name, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                phases[name].append(value)
    med = {name: statistics.median(values) for name, values in phases.items()}
    result_json = {
        "batch": len(images), "sizes": SIZES, "runs": args.runs, "threads": torch.get_num_threads(),
        "malloc_tuned": malloc_tuned,
        "images_per_s": round(len(images) / med["total"], 3),
        **{f"{name}_seconds": round(value, 4) for name, value in med.items()},
        "matcher_loss_share": round(med["matcher_loss"] / med["total"], 4),
    }
    print(json.dumps(result_json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
