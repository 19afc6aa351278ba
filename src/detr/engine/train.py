"""Training: data loaders, the epoch loop, checkpoints that survive a kill, and exact resume.

One ``train(model_config, options)`` call runs single-process or under torchrun (DDP, gloo on CPU,
NCCL on CUDA). Rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..checkpoint import CheckpointError, atomic_write, load_weights, read_checkpoint, save_checkpoint
from ..config import DetrConfig
from ..data.batch import DetectionBatch, collate_detection
from ..data.coco import CocoDetection, build_coco
from ..data.panoptic import CocoPanoptic, coco_panoptic_paths
from ..data.transforms import make_coco_transforms
from ..loss import SetCriterion
from ..model.detr import build_detr
from ..model.segmentation import DETRsegm
from ..runtime import amp_dtype
from . import distributed as dist_utils
from .ema import ModelEMA
from .optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before touching the last checkpoint."""


@dataclass
class TrainOptions:
    """Everything about a run that is not the model (the reference's flag names where it has one)."""

    coco_path: str | None = None  # standard layout: train2017/ val2017/ annotations/instances_*.json
    dataset_file: str = "coco"  # "coco" (instances) or "coco_panoptic" (panoptic json + PNGs), as in the reference
    coco_panoptic_path: str | None = None  # panoptic layout: annotations/panoptic_{split}2017(.json); default coco_path
    train_images: str | None = None  # or any COCO-format json + image folder
    train_json: str | None = None
    val_images: str | None = None
    val_json: str | None = None
    output_dir: str = "outputs"
    epochs: int = 300
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: int = 200
    clip_max_norm: float = 0.1
    seed: int = 42
    num_workers: int = 2
    device: str = "cpu"
    amp: str | None = None  # None, "bf16" or "fp16"
    resume: str | None = None
    pretrained: str | None = None  # start from these weights; a class head of another size is re-initialized
    frozen_weights: str | None = None  # panoptic stage 2: detector weights, frozen; only the mask head trains
    train_scales: list[int] | None = None  # short sides of the multi-scale augmentation (None: 480..800)
    max_size: int = 1333
    val_scale: int | None = None  # short side at evaluation (None: max of train_scales, 800 by default)
    eval_every: int = 1  # epochs between evaluations (0: only at the end)
    skip_bad_images: bool = False
    progress: bool = True
    augment: bool = True  # False: training images get the evaluation resize only (no flip, crop, scales)
    ema: float | None = None  # decay of an exponential moving average of the weights, evaluated and saved
    class_names: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- data ------------------------------------------------------------------------------------

def _split_paths(options: TrainOptions, split: str) -> tuple[str, str]:
    images = options.train_images if split == "train" else options.val_images
    ann = options.train_json if split == "train" else options.val_json
    if images and ann:
        return images, ann
    if options.coco_path is None:
        raise ValueError(f"no {split} data: give --coco_path DIR or --{split}_images and --{split}_json")
    from ..data.coco import coco_paths

    image_dir, ann_file = coco_paths(options.coco_path, split)
    return str(image_dir), str(ann_file)


DATASET_FILES = ("coco", "coco_panoptic")


def _build_panoptic(options: TrainOptions, split: str, transforms, masks: bool) -> CocoPanoptic:
    root = options.coco_panoptic_path or options.coco_path
    if root is None:
        raise ValueError("--dataset_file coco_panoptic needs --coco_panoptic_path DIR (or --coco_path DIR)")
    image_dir, ann_json, seg_folder = coco_panoptic_paths(options.coco_path or root, split, root)
    custom_images = options.train_images if split == "train" else options.val_images
    if custom_images:
        image_dir = Path(custom_images)
    missing = [str(p) for p in (image_dir, ann_json, seg_folder) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"COCO panoptic {split} split incomplete, missing: {', '.join(missing)}")
    return CocoPanoptic(image_dir, ann_json, seg_folder, transforms=transforms, return_masks=masks,
                        skip_bad_images=options.skip_bad_images, seed=options.seed)


def build_dataset(
    options: TrainOptions, split: str, *, train_augment: bool, masks: bool
) -> CocoDetection | CocoPanoptic:
    """The ``split`` dataset of ``options.dataset_file``, with training or evaluation transforms."""
    if options.dataset_file not in DATASET_FILES:
        raise ValueError(f"unknown dataset_file {options.dataset_file!r}; choose from {DATASET_FILES}")
    scales = options.train_scales
    if train_augment and options.augment:
        transforms = make_coco_transforms("train", scales=scales, max_size=options.max_size)
    else:
        val_scales = [options.val_scale] if options.val_scale else scales
        transforms = make_coco_transforms("val", scales=val_scales, max_size=options.max_size)
    if options.dataset_file == "coco_panoptic":
        return _build_panoptic(options, split, transforms, masks)
    images, ann = _split_paths(options, split)
    if options.coco_path and not (options.train_images or options.val_images):
        return build_coco(options.coco_path, split, transforms=transforms, return_masks=masks,
                          skip_bad_images=options.skip_bad_images, seed=options.seed)
    return CocoDetection(images, ann, transforms=transforms, return_masks=masks,
                         skip_bad_images=options.skip_bad_images, seed=options.seed)


def build_loader(dataset: Dataset, options: TrainOptions, info: dist_utils.DistInfo, *, train: bool) -> DataLoader:
    # The same sampler for one process and many: rank r of W takes every W-th index of one seeded
    # permutation, so W processes with batch b see exactly the batches of one process with W*b.
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=train,
                                 seed=options.seed, drop_last=False)
    generator = torch.Generator().manual_seed(options.seed)
    return DataLoader(
        dataset,
        batch_size=options.batch_size,
        sampler=sampler,
        collate_fn=collate_detection,
        num_workers=options.num_workers,
        persistent_workers=False,
        generator=generator,
    )


# --- checkpoints -----------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
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
                             options: TrainOptions, ema: ModelEMA | None = None) -> None:
    model = _unwrap(model)
    blob = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "kind": "detr",
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "options": json.dumps(options.to_dict()),
    }
    if ema is not None:
        blob["ema"] = ema.state_dict()
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


# --- the loop --------------------------------------------------------------------------------

class JsonLog:
    """Append-only JSON-lines log (rank 0 only); one object per step and per epoch."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _reduced_terms(result, names: list[str]) -> dict[str, float]:
    """Loss terms and metrics averaged over processes, as Python floats (one transfer)."""
    values = [result.total.detach()] + [
        (result.terms.get(n) if n in result.terms else result.metrics[n]).detach() for n in names
    ]
    stacked = dist_utils.all_reduce_mean(torch.stack([v.float() for v in values])).tolist()
    return {"loss": stacked[0], **dict(zip(names, stacked[1:], strict=True))}


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
            self.ema.update(_unwrap(self.model))
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
    info = dist_utils.init_distributed(options.device)
    device = torch.device(options.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    torch.manual_seed(options.seed + info.rank)
    random.seed(options.seed + info.rank)
    np.random.seed(options.seed + info.rank)
    out_dir = Path(options.output_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    autocast_dtype = amp_dtype(options.amp, device)

    train_set = build_dataset(options, "train", train_augment=True, masks=model_config.masks)
    class_names = options.class_names or train_set.category_names
    val_set = build_dataset(options, "val", train_augment=False, masks=model_config.masks)
    # A panoptic model is also scored (bbox/segm AP) against the instances json, read once.
    instances = _panoptic_instances(options) if isinstance(val_set, CocoPanoptic) and model_config.masks else None
    train_loader = build_loader(train_set, options, info, train=True)
    val_loader = build_loader(val_set, options, info, train=False)

    model = build_detr(model_config, freeze_detr=options.frozen_weights is not None)
    if isinstance(model, DETRsegm):
        model.masks_on_demand = True  # the loss needs the matched queries' masks only: compute only those
    if options.frozen_weights:
        detector = read_checkpoint(options.frozen_weights)
        if not isinstance(model, DETRsegm):
            raise ValueError("--frozen_weights trains the mask head: it needs --masks")
        sd = {k.removeprefix("detr."): v for k, v in detector.state_dict.items()
              if not k.startswith(("bbox_attention.", "mask_head."))}
        load_weights(model.detr, sd)
        log.info("loaded frozen detector weights from %s", options.frozen_weights)
    if options.pretrained:
        fresh = load_weights(model, _pretrained_state(options.pretrained, model), reinit_heads=True)
        if fresh:
            log.warning("fine-tuning: re-initialized %s (the checkpoint has another class count or query count)",
                        ", ".join(fresh))
        log.info("initialized from %s", options.pretrained)
    model.to(device)
    optimizer = build_optimizer(model, lr=options.lr, lr_backbone=options.lr_backbone,
                                weight_decay=options.weight_decay)
    scheduler = build_scheduler(optimizer, options.lr_drop)
    criterion = SetCriterion.from_config(model_config).to(device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    ema = ModelEMA(model, options.ema) if options.ema else None

    start_epoch = 0
    if options.resume:
        ckpt = read_checkpoint(options.resume)
        if "optimizer" not in ckpt.extra:
            raise CheckpointError(f"{options.resume} is not a training checkpoint (no optimizer state); "
                                  "use --pretrained to start from its weights")
        load_weights(model, ckpt.state_dict)
        optimizer.load_state_dict(ckpt.extra["optimizer"])
        scheduler.load_state_dict(ckpt.extra["lr_scheduler"])
        start_epoch = int(ckpt.extra["epoch"]) + 1
        if "rng" in ckpt.extra and not info.enabled:
            set_rng_state(ckpt.extra["rng"])
        if ema is not None:
            if "ema" not in ckpt.extra:
                raise CheckpointError(f"{options.resume} has no EMA weights: resume it without --ema")
            ema.load_state_dict(ckpt.extra["ema"])
        log.info("resumed from %s at epoch %d", options.resume, start_epoch)

    train_model: nn.Module = model
    if info.enabled:
        # Denoising queries exist only when a batch has objects: their label embedding may sit out a step.
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=model_config.queries.denoising_groups > 0)
    stepper = Stepper(train_model, criterion, optimizer, device, options.clip_max_norm, autocast_dtype, scaler, ema)
    evaluated = ema.module if ema is not None else model  # what evaluation scores

    log_file = JsonLog(out_dir / "log.jsonl" if info.is_main else None)
    record: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, options.epochs):
            train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
            train_set.set_epoch(epoch)
            stats = train_one_epoch(
                stepper, train_loader, epoch=epoch, log_file=log_file, progress=options.progress and info.is_main,
                step_offset=epoch * len(train_loader),
            )
            scheduler.step()
            if info.is_main:
                save_training_checkpoint(out_dir / "checkpoint.pth", model, optimizer, scheduler, epoch, options, ema)
            record = {"type": "epoch", "epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
            last = epoch == options.epochs - 1
            if last or (options.eval_every and (epoch + 1) % options.eval_every == 0):
                record.update(_evaluate(evaluated, val_loader, val_set, device, autocast_dtype, options, info,
                                        out_dir, instances))
            log_file.write(record)
            if info.is_main:
                log.info("epoch %d: %s", epoch, _summary(record))
        if info.is_main:
            names = {"class_names": {str(k): v for k, v in class_names.items()}}
            save_checkpoint(model, out_dir / "model.safetensors", metadata=names)
            if ema is not None:
                save_checkpoint(ema.module, out_dir / "model_ema.safetensors", metadata=names)
    finally:
        log_file.close()
        dist_utils.barrier()
    return record


def _pretrained_state(path: str, model: nn.Module) -> dict[str, torch.Tensor]:
    ckpt = read_checkpoint(path)
    sd = ckpt.state_dict
    # A detector checkpoint can seed a panoptic model and vice versa: align the "detr." prefix.
    if isinstance(model, DETRsegm) and not any(k.startswith("detr.") for k in sd):
        sd = {f"detr.{k}": v for k, v in sd.items()}
    if not isinstance(model, DETRsegm):
        sd = {k.removeprefix("detr."): v for k, v in sd.items() if not k.startswith(("bbox_attention.", "mask_head."))}
    return sd


def _panoptic_instances(options: TrainOptions) -> Any:
    """The val instances json as a pycocotools COCO (for bbox/segm AP of a panoptic model), or None."""
    from ..data.coco import coco_paths, load_coco

    path = options.val_json or (coco_paths(options.coco_path, "val")[1] if options.coco_path else None)
    return load_coco(path) if path is not None and Path(path).is_file() else None


def _evaluate(model, loader, dataset, device, amp_dtype, options: TrainOptions, info, out_dir: Path,
              instances: Any = None) -> dict[str, Any]:
    from .evaluate import evaluate

    if isinstance(dataset, CocoPanoptic) and isinstance(model, DETRsegm):
        # The reference's panoptic evaluation: PQ on the panoptic ground truth, plus bbox/segm AP
        # against the instances json when there is one.
        from .panoptic_eval import evaluate_panoptic

        result = evaluate_panoptic(
            model, loader, gt_json=dataset.annotation_file, gt_folder=dataset.seg_folder,
            output_dir=out_dir / "eval_panoptic", coco_gt=instances,
            device=device, amp_dtype=amp_dtype, progress=options.progress and info.is_main,
        )
        out = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for metric in ("pq", "sq", "rq"):
                out[f"panoptic_{metric.upper()}{suffix}"] = result["panoptic"][group][metric]
        for iou_type in ("bbox", "segm"):
            out.update({f"{iou_type}_{k}": v for k, v in result.get(iou_type, {}).items()})
        return out
    iou_types = ("bbox", "segm") if isinstance(model, DETRsegm) else ("bbox",)
    coco_gt = dataset.coco
    result = evaluate(model, loader, coco_gt=coco_gt, device=device, iou_types=iou_types, amp_dtype=amp_dtype,
                      progress=options.progress and info.is_main)
    out: dict[str, Any] = {}
    for iou_type in iou_types:
        out.update({f"{iou_type}_{k}": v for k, v in result[iou_type].items()})
    return out


def _summary(record: dict[str, Any]) -> str:
    keys = ["train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_loss_mask", "train_loss_dice",
            "bbox_AP", "bbox_AP50", "segm_AP", "panoptic_PQ", "panoptic_PQ_th", "panoptic_PQ_st"]
    return " ".join(f"{k}={record[k]:.4f}" for k in keys if k in record)
