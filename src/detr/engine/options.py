"""What a run needs besides the model: the data, the optimization and the run itself, one part each.

Training takes all three (``TrainOptions``); evaluation takes the data part alone. Field names are the
reference's flag names where it has one, so the command line fills each part by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..preprocessing import InputConfig

DATASET_FILES = ("coco", "coco_panoptic")


@dataclass
class DataOptions:
    """Where the images and annotations are, and how they are loaded and resized."""

    # COCO (train2017/ val2017/ annotations/instances_*.json), YOLO or Pascal VOC folder (see dataset_format)
    coco_path: str | None = None
    dataset_format: str | None = None  # "coco", "yolo" or "voc"; None: detected from the data folder
    train_split: str | None = None  # yolo/voc split names (default: train, then trainval)
    val_split: str | None = None  # (default: val, then test)
    dataset_file: str = "coco"  # "coco" (instances) or "coco_panoptic" (panoptic json + PNGs), as in the reference
    coco_panoptic_path: str | None = None  # panoptic layout: annotations/panoptic_{split}2017(.json); default coco_path
    train_images: str | None = None  # or any COCO-format json + image folder
    train_json: str | None = None
    val_images: str | None = None
    val_json: str | None = None
    batch_size: int = 2
    num_workers: int = 2
    train_scales: list[int] | None = None  # short sides of the multi-scale augmentation (None: 480..800)
    max_size: int | None = None  # cap on the long side (None: the reference's 1333; at evaluation, the checkpoint's)
    val_scale: int | None = None  # short side at evaluation (None: max of train_scales, 800 by default)
    skip_bad_images: bool = False
    augment: bool = True  # False: training images get the evaluation resize only (no flip, crop, scales)

    def __post_init__(self) -> None:
        if self.dataset_file not in DATASET_FILES:
            raise ValueError(f"unknown dataset_file {self.dataset_file!r}; choose from {DATASET_FILES}")

    def input_config(self) -> InputConfig:
        """The input a model trained with these options sees: stored in its checkpoints."""
        return InputConfig.for_training(train_scales=self.train_scales, val_scale=self.val_scale,
                                        max_size=self.max_size)


@dataclass
class OptimOptions:
    """The optimizer and its schedule (the paper's: AdamW 1e-4, backbone 1e-5, x0.1 at epoch 200 of 300)."""

    epochs: int = 300
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: int = 200
    clip_max_norm: float = 0.1
    amp: str | None = None  # None, "bf16" or "fp16"
    ema: float | None = None  # decay of an exponential moving average of the weights, evaluated and saved


@dataclass
class RunOptions:
    """Where the run writes, what it starts from, and how it reports."""

    output_dir: str = "outputs"
    seed: int = 42
    device: str = "cpu"
    resume: str | None = None
    pretrained: str | None = None  # start from these weights; a class head of another size is re-initialized
    frozen_weights: str | None = None  # panoptic stage 2: detector weights, frozen; only the mask head trains
    # ImageNet weights for the backbone: "imagenet" (torchvision's, of the configured depth), a name
    # (resnet50), a torchvision/timm file, a URL, or "none". None: "imagenet" for a frozen-BatchNorm
    # backbone (the reference), "none" for a trained normalization. --pretrained/--resume take precedence.
    backbone_weights: str | None = None
    eval_every: int = 1  # epochs between evaluations (0: only at the end)
    progress: bool = True
    skip_memory_check: bool = False  # train even when the step's estimated peak memory exceeds the free memory
    tensorboard: bool = False  # also write log.jsonl's scalars as TensorBoard events (OUTPUT/tensorboard)
    class_names: dict[int, str] = field(default_factory=dict)


PARTS = {"data": DataOptions, "optim": OptimOptions, "run": RunOptions}


@dataclass
class TrainOptions:
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def from_flat(cls, **values: Any) -> TrainOptions:
        """Each keyword goes to the part with a field of that name: ``from_flat(coco_path=..., epochs=...)``."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in PARTS}
        for key, value in values.items():
            owner = next((name for name, part in PARTS.items() if key in part.__dataclass_fields__), None)
            if owner is None:
                raise TypeError(f"TrainOptions has no field {key!r}")
            parts[owner][key] = value
        return cls(**{name: PARTS[name](**fields) for name, fields in parts.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pick(cls: type, source: Any) -> Any:
    """An options part filled from the same-named attributes of ``source`` (e.g. parsed flags); fields the
    source lacks keep their defaults."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if hasattr(source, f.name)})
