"""Training checkpoints: everything to resume a run exactly (weights, optimizer, schedule, RNG states,
the EMA), written atomically; and the best evaluation's weights."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import SAFE_GLOBALS
from ..files import atomic_write
from .ema import ModelEMA
from .options import TrainOptions

# The validation metric that picks checkpoint_best.pth: PQ for panoptic runs, else box AP.
BEST_METRICS = ("panoptic_PQ", "bbox_AP")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                  for k, v in zip(("kind", "keys", "pos", "has_gauss", "cached"), np.random.get_state(), strict=True)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, epoch: int,
                             options: TrainOptions, *, best: dict[str, Any] | None = None,
                             ema: ModelEMA | None = None) -> None:
    model = unwrap(model)
    blob = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "input": options.data.input_config().to_dict(),
        "kind": "detr",
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "options": json.dumps(options.to_dict()),
    }
    if best is not None:
        blob["best"] = best
    if ema is not None:
        blob["ema"] = ema.state_dict()
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def save_best_checkpoint(path: Path, model: nn.Module, best: dict[str, Any], options: TrainOptions) -> None:
    """The weights of the best evaluation so far (no optimizer state: for eval, predict and --pretrained)."""
    model = unwrap(model)
    blob = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "input": options.data.input_config().to_dict(),
        "kind": "detr",
        "epoch": best["epoch"],
        "best": best,
        "options": json.dumps(options.to_dict()),
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def best_so_far(options: TrainOptions, out_dir: Path, start_epoch: int) -> dict[str, Any] | None:
    """On --resume: the best evaluation before ``start_epoch``, from the resumed checkpoint or from
    checkpoint_best.pth (which an evaluation after the last checkpoint.pth may have written)."""
    if not options.run.resume:
        return None
    candidates = []
    for path in (Path(options.run.resume), out_dir / "checkpoint_best.pth"):
        if not path.is_file():
            continue
        try:  # mmap: only the small pickle is parsed, the tensors are not read
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("best")
        except Exception:  # an unreadable best file only means no earlier best is known
            stored = None
        if isinstance(stored, dict) and stored.get("epoch", start_epoch) < start_epoch:
            candidates.append(stored)
    return max(candidates, key=lambda b: b["value"]) if candidates else None
