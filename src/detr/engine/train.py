"""Training: the epoch loop, one optimization step, and evaluation along the way.

One ``train(model_config, options)`` call runs single-process or under torchrun (DDP, gloo on CPU,
NCCL on CUDA). Rank 0 alone writes checkpoints and logs; every epoch's checkpoint survives a kill and
``--resume`` continues the run exactly.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist_utils
from ..checkpoint import CheckpointError, load_weights, read_checkpoint, save_checkpoint
from ..config import DetrConfig
from ..data.batch import DetectionBatch
from ..data.panoptic import CocoPanoptic
from ..loss import SetCriterion
from ..model import build_detr
from ..model.segmentation import DETRsegm
from ..runtime import amp_dtype
from .checkpoints import (
    BEST_METRICS,
    best_so_far,
    save_best_checkpoint,
    save_training_checkpoint,
    set_rng_state,
    unwrap,
)
from .data import build_dataset, build_loader, panoptic_instances
from .ema import ModelEMA
from .initial_weights import init_weights
from .log import JsonLog
from .memory import PeakMemory, check_run_memory
from .optim import build_optimizer, build_scheduler
from .options import TrainOptions

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before touching the last checkpoint."""


def _reduced_terms(result, names: list[str]) -> dict[str, float]:
    """Loss terms and metrics averaged over processes, as Python floats (one transfer)."""
    values = [result.total.detach()] + [
        (result.terms.get(n) if n in result.terms else result.metrics[n]).detach() for n in names
    ]
    stacked = dist_utils.all_reduce_mean(torch.stack([v.float() for v in values])).tolist()
    return {"loss": stacked[0], **dict(zip(names, stacked[1:], strict=True))}


def grad_scaler(autocast_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16 autocast (CUDA) needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None


@dataclass
class Stepper:
    """Everything one optimization step needs (shared by the epoch loop and the stream trainer)."""

    model: nn.Module  # possibly DDP-wrapped
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    device: torch.device
    clip_max_norm: float = 0.1
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEMA | None = None

    def step(self, batch: DetectionBatch, where: str) -> dict[str, float]:
        """Forward, loss, backward, clip, update (and the EMA); returns the loss terms and metrics averaged
        over processes. ``where`` names the step in the error raised when the loss is not finite."""
        batch = batch.to(self.device, non_blocking=True)
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            outputs = self.model(batch.images, batch.targets)  # targets: denoising queries are built from them
        result = self.criterion(outputs, batch.targets)  # matching and losses run in fp32
        names = sorted(result.terms) + sorted(result.metrics)
        stats = _reduced_terms(result, names)
        if not math.isfinite(stats["loss"]):
            bad = {k: v for k, v in stats.items() if not math.isfinite(v)}
            raise NonFiniteLossError(f"loss is {stats['loss']} at {where} (non-finite: {bad})")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(result.total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            result.total.backward()
        if self.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(unwrap(self.model))
        return stats


def train_one_epoch(
    stepper: Stepper, loader: Iterable, *, epoch: int, log_file: JsonLog, progress: bool, step_offset: int = 0,
) -> dict[str, float]:
    stepper.model.train()
    stepper.criterion.train()
    sums: dict[str, float] = {}
    count, skipped, images_seen = 0, 0, 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)  # type: ignore[arg-type]
    for step, batch in enumerate(loader):
        skipped += batch.skipped
        if batch.images is None:
            continue
        stats = stepper.step(batch, f"epoch {epoch}, step {step}")
        images_seen += len(batch.targets)
        count += 1
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        elapsed = time.perf_counter() - start
        log_file.write({"type": "step", "epoch": epoch, "step": step_offset + step,
                        "lr": stepper.optimizer.param_groups[0]["lr"], "images_per_s": images_seen / elapsed, **stats})
        if bar is not None:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{images_seen / elapsed:.1f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    averages = {k: v / max(count, 1) for k, v in sums.items()}
    averages["seconds"] = time.perf_counter() - start
    averages["skipped_images"] = skipped
    return averages


def train(model_config: DetrConfig, options: TrainOptions) -> dict[str, Any]:
    """Train (or resume) and evaluate; returns the last epoch's record."""
    run = _Run.start(model_config, options)
    record: dict[str, Any] = {}
    try:
        for epoch in range(run.resume(), options.optim.epochs):
            record = run.epoch(epoch)
        run.finish()
    finally:
        run.log_file.close()
        dist_utils.barrier()
    return record


@dataclass
class _Run:
    """One training run's pieces, built from the options (data, model, optimization, logging)."""

    config: DetrConfig
    options: TrainOptions
    info: dist_utils.DistInfo
    device: torch.device
    out_dir: Path
    train_set: Any
    val_set: Any
    train_loader: Any
    val_loader: Any
    instances: Any  # a panoptic run's instances json (bbox/segm AP), or None
    model: nn.Module
    stepper: Stepper
    scheduler: Any
    log_file: JsonLog
    best: dict[str, Any] | None = None

    @classmethod
    def start(cls, config: DetrConfig, options: TrainOptions) -> _Run:
        data, optim, run = options.data, options.optim, options.run
        info = dist_utils.init_distributed(run.device)
        device = torch.device(run.device)
        if device.type == "cuda" and info.enabled:
            device = torch.device("cuda", info.local_rank)
        for seed in (torch.manual_seed, random.seed, np.random.seed):
            seed(run.seed + info.rank)
        out_dir = Path(run.output_dir)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        train_set = build_dataset(data, "train", train_augment=True, masks=config.masks, seed=run.seed)
        val_set = build_dataset(data, "val", train_augment=False, masks=config.masks, seed=run.seed)
        # A panoptic model is also scored (bbox/segm AP) against the instances json, read once.
        instances = panoptic_instances(data) if isinstance(val_set, CocoPanoptic) and config.masks else None

        model = build_detr(config, freeze_detr=run.frozen_weights is not None)
        if isinstance(model, DETRsegm):
            model.masks_on_demand = True  # the loss needs the matched queries' masks only: compute only those
        for part, source in init_weights(model, config, run).items():
            log.info("weights: %s <- %s", part, source)
        model.to(device)
        optimizer = build_optimizer(model, lr=optim.lr, lr_backbone=optim.lr_backbone, weight_decay=optim.weight_decay)
        autocast_dtype = amp_dtype(optim.amp, device)
        if not run.skip_memory_check:  # before any step: a configuration that cannot fit is refused, not killed
            check_run_memory(model, config.backbone.output_stride, data.batch_size, data.max_size, device,
                             autocast_dtype, config.transformer.dropout)
        train_model = dist_utils.wrap_for_training(model, device)
        stepper = Stepper(
            train_model, SetCriterion.from_config(config).to(device), optimizer, device, optim.clip_max_norm,
            autocast_dtype, grad_scaler(autocast_dtype),
            ModelEMA(model, optim.ema) if optim.ema else None,
        )
        log_file = JsonLog(out_dir / "log.jsonl" if info.is_main else None,
                           tensorboard=out_dir / "tensorboard" if run.tensorboard else None)
        return cls(config, options, info, device, out_dir, train_set, val_set,
                   build_loader(train_set, data, info, train=True, seed=run.seed, device=device),
                   build_loader(val_set, data, info, train=False, seed=run.seed, device=device), instances,
                   model, stepper, build_scheduler(optimizer, optim.lr_drop), log_file)

    @property
    def evaluated(self) -> nn.Module:
        """What evaluation scores: the EMA of the weights when there is one."""
        return self.stepper.ema.module if self.stepper.ema is not None else self.model

    def resume(self) -> int:
        """Load --resume's checkpoint (weights, optimizer, schedule, RNG, EMA); returns the first epoch to run."""
        path = self.options.run.resume
        if not path:
            return 0
        ckpt = read_checkpoint(path)
        if "optimizer" not in ckpt.extra:
            raise CheckpointError(f"{path} is not a training checkpoint (no optimizer state); "
                                  "use --pretrained to start from its weights")
        load_weights(self.model, ckpt.state_dict)
        self.stepper.optimizer.load_state_dict(ckpt.extra["optimizer"])
        self.scheduler.load_state_dict(ckpt.extra["lr_scheduler"])
        start_epoch = int(ckpt.extra["epoch"]) + 1
        if "rng" in ckpt.extra and not self.info.enabled:
            set_rng_state(ckpt.extra["rng"])
        if self.stepper.ema is not None:
            if "ema" not in ckpt.extra:
                raise CheckpointError(f"{path} has no EMA weights: resume it without --ema")
            self.stepper.ema.load_state_dict(ckpt.extra["ema"])
        self.best = best_so_far(self.options, self.out_dir, start_epoch)
        log.info("resumed from %s at epoch %d", path, start_epoch)
        return start_epoch

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, checkpoint, evaluate when due; returns the epoch's record (also logged)."""
        run, main = self.options.run, self.info.is_main
        self.train_loader.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        peak = PeakMemory(self.device)
        peak.reset()
        stats = train_one_epoch(self.stepper, self.train_loader, epoch=epoch, log_file=self.log_file,
                                progress=run.progress and main, step_offset=epoch * len(self.train_loader))
        self.scheduler.step()
        if main:
            save_training_checkpoint(self.out_dir / "checkpoint.pth", self.model, self.stepper.optimizer,
                                     self.scheduler, epoch, self.options, best=self.best, ema=self.stepper.ema)
        record = {"type": "epoch", "epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                  "peak_memory_mib": round(peak.read() / 2**20, 1)}
        if epoch == self.options.optim.epochs - 1 or (run.eval_every and (epoch + 1) % run.eval_every == 0):
            record.update(self.evaluate(epoch))
        self.log_file.write(record)
        if main:
            log.info("epoch %d: %s", epoch, _summary(record))
        return record

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Score the val split; keep checkpoint_best.pth when the metric beats the best so far."""
        record = _evaluate(self.evaluated, self.val_loader, self.val_set, self.device, self.stepper.amp_dtype,
                           self.options.run.progress and self.info.is_main, self.out_dir, self.instances)
        metric = BEST_METRICS[0] if BEST_METRICS[0] in record else BEST_METRICS[1]
        if metric in record and (self.best is None or record[metric] > self.best["value"]):
            self.best = {"metric": metric, "value": float(record[metric]), "epoch": epoch}
            if self.info.is_main:
                path = self.out_dir / "checkpoint_best.pth"
                save_best_checkpoint(path, self.evaluated, self.best, self.options)
                log.info("epoch %d: best %s so far, %.4f -> %s", epoch, metric, self.best["value"], path)
        if self.best is not None:
            record["best_epoch"], record[f"best_{self.best['metric']}"] = self.best["epoch"], self.best["value"]
        return record

    def finish(self) -> None:
        """The final weights in our format: model.safetensors, and model_ema.safetensors with --ema."""
        if not self.info.is_main:
            return
        class_names = self.options.run.class_names or self.train_set.category_names
        names = {"class_names": {str(k): v for k, v in class_names.items()}}
        spec = self.options.data.input_config()
        save_checkpoint(self.model, self.out_dir / "model.safetensors", metadata=names, input=spec)
        if self.stepper.ema is not None:
            save_checkpoint(self.stepper.ema.module, self.out_dir / "model_ema.safetensors", metadata=names,
                            input=spec)


def _evaluate(model: nn.Module, loader: Iterable, dataset: Any, device: torch.device, amp: torch.dtype | None,
              progress: bool, out_dir: Path, instances: Any = None) -> dict[str, Any]:
    from .evaluate import evaluate

    if isinstance(dataset, CocoPanoptic) and isinstance(model, DETRsegm):
        # The reference's panoptic evaluation: PQ on the panoptic ground truth, plus bbox/segm AP
        # against the instances json when there is one.
        from .panoptic_eval import evaluate_panoptic

        result = evaluate_panoptic(
            model, loader, gt_json=dataset.annotation_file, gt_folder=dataset.seg_folder,
            output_dir=out_dir / "eval_panoptic", coco_gt=instances, device=device, amp_dtype=amp, progress=progress,
        )
        out = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for metric in ("pq", "sq", "rq"):
                out[f"panoptic_{metric.upper()}{suffix}"] = result["panoptic"][group][metric]
        for iou_type in ("bbox", "segm"):
            out.update({f"{iou_type}_{k}": v for k, v in result.get(iou_type, {}).items()})
        return out
    iou_types = ("bbox", "segm") if isinstance(model, DETRsegm) else ("bbox",)
    result = evaluate(model, loader, coco_gt=dataset.coco, device=device, iou_types=iou_types, amp_dtype=amp,
                      progress=progress)
    out: dict[str, Any] = {}
    for iou_type in iou_types:
        out.update({f"{iou_type}_{k}": v for k, v in result[iou_type].items()})
    return out


def _summary(record: dict[str, Any]) -> str:
    keys = ["train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_loss_mask", "train_loss_dice",
            "bbox_AP", "bbox_AP50", "segm_AP", "panoptic_PQ", "panoptic_PQ_th", "panoptic_PQ_st"]
    text = " ".join(f"{k}={record[k]:.4f}" for k in keys if k in record)
    return f"{text} peak_memory={record['peak_memory_mib']:.0f}MiB" if "peak_memory_mib" in record else text
