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

from ..checkpoint import (
    SAFE_GLOBALS,
    CheckpointError,
    atomic_write,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from ..config import DetrConfig
from ..data.batch import DetectionBatch, collate_detection
from ..data.coco import CocoDetection, build_coco
from ..data.formats import detect_format, load_split
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
    # ImageNet weights for the backbone: "imagenet" (torchvision's, of the configured depth), a name
    # (resnet50), a torchvision/timm file, a URL, or "none". None: "imagenet" for a frozen-BatchNorm
    # backbone (the reference), "none" for a trained normalization. --pretrained/--resume take precedence.
    backbone_weights: str | None = None
    dataset_format: str | None = None  # "coco", "yolo" or "voc"; None: detected from the data folder
    train_split: str | None = None  # yolo/voc split names (default: train, then trainval)
    val_split: str | None = None  # (default: val, then test)
    tensorboard: bool = False  # also write log.jsonl's scalars as TensorBoard events (OUTPUT/tensorboard)

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
    custom = options.train_images if split == "train" else options.val_images
    if options.coco_path and not custom:
        fmt = options.dataset_format or detect_format(options.coco_path)
        if fmt == "coco":
            return build_coco(options.coco_path, split, transforms=transforms, return_masks=masks,
                              skip_bad_images=options.skip_bad_images, seed=options.seed)
        # YOLO / VOC: read into COCO-format annotations once, then the same dataset as COCO's
        loaded = load_split(options.coco_path, split, fmt, skip_bad_images=options.skip_bad_images,
                            split_name=options.train_split if split == "train" else options.val_split)
        return CocoDetection(loaded.image_dir, loaded.source, coco=loaded.coco, transforms=transforms,
                             return_masks=masks, skip_bad_images=options.skip_bad_images, seed=options.seed)
    images, ann = _split_paths(options, split)
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
                             options: TrainOptions, *, best: dict[str, Any] | None = None,
                             ema: ModelEMA | None = None) -> None:
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
    if best is not None:
        blob["best"] = best
    if ema is not None:
        blob["ema"] = ema.state_dict()
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


# The validation metric that picks checkpoint_best.pth: PQ for panoptic runs, else box AP.
BEST_METRICS = ("panoptic_PQ", "bbox_AP")


def save_best_checkpoint(path: Path, model: nn.Module, best: dict[str, Any], options: TrainOptions) -> None:
    """The weights of the best evaluation so far (no optimizer state: for eval, predict and --pretrained)."""
    model = _unwrap(model)
    blob = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "kind": "detr",
        "epoch": best["epoch"],
        "best": best,
        "options": json.dumps(options.to_dict()),
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def _best_so_far(options: TrainOptions, out_dir: Path, start_epoch: int) -> dict[str, Any] | None:
    """On --resume: the best evaluation before ``start_epoch``, from the resumed checkpoint or from
    checkpoint_best.pth (which an evaluation after the last checkpoint.pth may have written)."""
    if not options.resume:
        return None
    candidates = []
    for path in (Path(options.resume), out_dir / "checkpoint_best.pth"):
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


# --- the loop --------------------------------------------------------------------------------

class JsonLog:
    """Append-only JSON-lines log (rank 0 only); one object per step and per epoch.

    With ``tensorboard`` (a folder), every numeric value also goes to TensorBoard: step records as
    ``train/<key>`` at their global step, epoch records as ``epoch/<key>`` at their epoch.
    """

    def __init__(self, path: Path | None, *, tensorboard: Path | None = None) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115
        self._writer = None
        if tensorboard is not None and path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's writer needs the tensorboard package
                self.close()
                raise ImportError("--tensorboard needs the tensorboard package: pip install "
                                  f"'detr-pytorch[tensorboard]' (or pip install tensorboard); {e}") from None
            self._writer = SummaryWriter(log_dir=str(tensorboard))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step_record = record.get("type") == "step"
            group, step = ("train", record["step"]) if step_record else ("epoch", record["epoch"])
            for key, value in record.items():
                if key in ("type", "step", "epoch") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                self._writer.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
    for part, source in init_weights(model, model_config, options).items():
        log.info("weights: %s <- %s", part, source)
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

    best = _best_so_far(options, out_dir, start_epoch)
    log_file = JsonLog(out_dir / "log.jsonl" if info.is_main else None,
                       tensorboard=out_dir / "tensorboard" if options.tensorboard else None)
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
                save_training_checkpoint(out_dir / "checkpoint.pth", model, optimizer, scheduler, epoch, options,
                                         best=best, ema=ema)
            record = {"type": "epoch", "epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
            last = epoch == options.epochs - 1
            if last or (options.eval_every and (epoch + 1) % options.eval_every == 0):
                record.update(_evaluate(evaluated, val_loader, val_set, device, autocast_dtype, options, info,
                                        out_dir, instances))
                metric = BEST_METRICS[0] if BEST_METRICS[0] in record else BEST_METRICS[1]
                if metric in record and (best is None or record[metric] > best["value"]):
                    best = {"metric": metric, "value": float(record[metric]), "epoch": epoch}
                    if info.is_main:
                        save_best_checkpoint(out_dir / "checkpoint_best.pth", evaluated, best, options)
                        log.info("epoch %d: best %s so far, %.4f -> %s", epoch, metric, best["value"],
                                 out_dir / "checkpoint_best.pth")
                if best is not None:
                    record["best_epoch"], record[f"best_{best['metric']}"] = best["epoch"], best["value"]
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


FROZEN_BN_NEEDS_WEIGHTS = (
    "a frozen-BatchNorm backbone (--backbone_norm frozen_bn, the reference's) must start from pretrained weights: "
    "its norms never learn and its stem and layer1 never train, so random weights would stay random. Either give "
    "pretrained backbone weights (--backbone_weights imagenet, a name such as resnet50, or a torchvision/timm "
    "ImageNet file; or --pretrained CHECKPOINT for a whole DETR), or train the normalization: --backbone_norm "
    "group_norm --frozen_stages 0 (or the small from-scratch backbone, --preset shapes-small)"
)


def _detector(model: nn.Module) -> nn.Module:
    return model.detr if isinstance(model, DETRsegm) else model


def load_backbone_weights(model: nn.Module, spec: str, config: DetrConfig) -> str:
    """Load ImageNet weights (``"imagenet"``, a name, a file or a URL) into the model's ResNet; returns
    where they came from."""
    from ..checkpoint import backbone_depth, read_backbone_weights
    from ..weights import imagenet_name

    if config.backbone.norm != "frozen_bn":
        raise ValueError(
            f"--backbone_weights {spec}: ImageNet weights carry BatchNorm statistics, which a {config.backbone.norm} "
            "backbone has no place for; use --backbone_norm frozen_bn (the reference's), or drop --backbone_weights "
            "to train this backbone from scratch"
        )
    name = imagenet_name(config.backbone.name) if spec == "imagenet" else spec
    state_dict, path, what = read_backbone_weights(name)
    found = backbone_depth(state_dict)
    if found != config.backbone.name:
        raise CheckpointError(f"{path} holds {found} weights, but the model's backbone is {config.backbone.name}; "
                              f"pass --backbone {found}, or weights of a {config.backbone.name}")
    body = _detector(model).backbone.body
    missing, unexpected = body.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the ResNet weights do not fit the backbone: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return f"{path} ({what})"


def init_weights(model: nn.Module, config: DetrConfig, options: TrainOptions) -> dict[str, str]:
    """Load the starting weights the options name; returns {part of the model: where its weights came from}.

    Precedence: --resume (loaded later, with the optimizer) > --frozen_weights (panoptic stage 2) >
    --pretrained (a whole DETR) > --backbone_weights (ImageNet, the default for a frozen-BatchNorm backbone).
    """
    explicit = options.backbone_weights not in (None, "none")
    if options.resume:
        return {"everything": f"{options.resume} (--resume)"}
    if options.frozen_weights:
        if not isinstance(model, DETRsegm):
            raise ValueError("--frozen_weights trains the mask head: it needs --masks")
        detector = read_checkpoint(options.frozen_weights)
        sd = {k.removeprefix("detr."): v for k, v in detector.state_dict.items()
              if not k.startswith(("bbox_attention.", "mask_head."))}
        load_weights(model.detr, sd)
        return {"detector (frozen)": f"{options.frozen_weights} (--frozen_weights)",
                "mask head": "random initialization"}
    if options.pretrained:
        if explicit:
            log.warning("--backbone_weights %s is not used: --pretrained %s holds the backbone too",
                        options.backbone_weights, options.pretrained)
        fresh = load_weights(model, _pretrained_state(options.pretrained, model), reinit_heads=True)
        sources = {"everything": f"{options.pretrained} (--pretrained)"}
        if fresh:
            log.warning("fine-tuning: re-initialized %s (the checkpoint has another class count or query count)",
                        ", ".join(fresh))
            sources = {"everything else": sources["everything"], ", ".join(fresh): "random initialization"}
        return sources
    frozen_bn = config.backbone.norm == "frozen_bn"
    spec = options.backbone_weights or ("imagenet" if frozen_bn else "none")
    rest = "random initialization"
    if spec == "none":
        if frozen_bn:
            raise ValueError(f"refusing to train: {FROZEN_BN_NEEDS_WEIGHTS}")
        return {"backbone": f"random initialization ({config.backbone.norm}, trained)", "transformer and heads": rest}
    from ..weights import DownloadError

    try:
        source = load_backbone_weights(model, spec, config)
    except DownloadError as e:
        if explicit:
            raise
        hint = f"The default --backbone_weights imagenet could not be had; {FROZEN_BN_NEEDS_WEIGHTS}."
        raise DownloadError(f"{e} {hint}") from None
    return {"backbone": source, "transformer and heads": rest}


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
