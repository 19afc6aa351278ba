"""Typed configuration of a DETR model, its matcher and its loss.

Frozen dataclasses, one per concept, plus the presets of the paper and a tiny CPU preset. The CLI
parses flags into these and stops there; ``from_reference_args`` / ``to_reference_args`` translate
to and from the ``args`` namespace stored in the reference implementation's checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
POSITION_EMBEDDINGS = ("sine", "learned")
BACKBONE_NORMS = ("frozen_bn", "group_norm")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet50"
    dilation: bool = False  # DC5: dilation instead of stride in the last stage
    trainable: bool = True  # False freezes every stage (the reference's lr_backbone <= 0)
    # "frozen_bn" (the reference: ImageNet statistics, fixed) or "group_norm" (32 groups, trained):
    # a backbone trained from scratch has no statistics to freeze and needs a normalization that learns.
    norm: str = "frozen_bn"
    # Leading stages that never train: 1 = stem + layer1 (the reference), 0 = everything trains.
    frozen_stages: int = 1

    def __post_init__(self) -> None:
        if self.name not in BACKBONES:
            raise ValueError(f"backbone.name must be one of {BACKBONES}, got {self.name!r}")
        if self.norm not in BACKBONE_NORMS:
            raise ValueError(f"backbone.norm must be one of {BACKBONE_NORMS}, got {self.norm!r}")
        if not 0 <= self.frozen_stages <= 4:
            raise ValueError(f"backbone.frozen_stages must be in 0..4, got {self.frozen_stages}")


@dataclass(frozen=True)
class TransformerConfig:
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False

    def __post_init__(self) -> None:
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        if self.dec_layers < 1:
            raise ValueError("dec_layers must be >= 1")


@dataclass(frozen=True)
class MatcherConfig:
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


@dataclass(frozen=True)
class LossConfig:
    ce: float = 1.0
    bbox: float = 5.0
    giou: float = 2.0
    mask: float = 1.0
    dice: float = 1.0
    eos_coef: float = 0.1  # weight of the "no object" class in the classification loss
    aux_loss: bool = True


@dataclass(frozen=True)
class DetrConfig:
    num_classes: int = 91  # K: the class head has K + 1 outputs, the last one is "no object"
    num_queries: int = 100
    position_embedding: str = "sine"
    masks: bool = False  # panoptic variant: attention-map mask head on top of the detector
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if self.num_classes < 1 or self.num_queries < 1:
            raise ValueError("num_classes and num_queries must be >= 1")
        if self.masks and self.transformer.hidden_dim % 128:
            # the mask head narrows to hidden_dim / 16 channels under GroupNorm(8)
            raise ValueError(f"masks=True needs hidden_dim divisible by 128, got {self.transformer.hidden_dim}")

    # --- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetrConfig:
        parts = {
            "backbone": BackboneConfig,
            "transformer": TransformerConfig,
            "matcher": MatcherConfig,
            "loss": LossConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DetrConfig fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts and isinstance(value, dict):
                sub = parts[key]
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - sub_known
                if bad:
                    raise ValueError(f"unknown {sub.__name__} fields: {sorted(bad)}")
                value = sub(**value)
            kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> DetrConfig:
        return dataclasses.replace(self, **changes)

    def with_backbone(self, **changes: Any) -> DetrConfig:
        return dataclasses.replace(self, backbone=dataclasses.replace(self.backbone, **changes))

    def with_transformer(self, **changes: Any) -> DetrConfig:
        return dataclasses.replace(self, transformer=dataclasses.replace(self.transformer, **changes))


# --- the reference's argparse namespace ----------------------------------------------------

def _get(args: Any, name: str, default: Any) -> Any:
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def reference_num_classes(dataset_file: str) -> int:
    """The reference's class count for a dataset name (used only when no class head is available)."""
    if dataset_file == "coco":
        return 91
    if dataset_file == "coco_panoptic":
        return 250
    return 20


def from_reference_args(args: Any, num_classes: int | None = None) -> DetrConfig:
    """Build a config from the reference's ``args`` (argparse.Namespace or dict).

    ``num_classes`` should come from the checkpoint's class head; the dataset-name rule of the
    reference is only a fallback.
    """
    if num_classes is None:
        num_classes = reference_num_classes(_get(args, "dataset_file", "coco"))
    lr_backbone = _get(args, "lr_backbone", 1e-5)
    return DetrConfig(
        num_classes=num_classes,
        num_queries=int(_get(args, "num_queries", 100)),
        position_embedding=_get(args, "position_embedding", "sine"),
        masks=bool(_get(args, "masks", False)),
        backbone=BackboneConfig(
            name=_get(args, "backbone", "resnet50"),
            dilation=bool(_get(args, "dilation", False)),
            trainable=lr_backbone is None or float(lr_backbone) > 0,
        ),
        transformer=TransformerConfig(
            hidden_dim=int(_get(args, "hidden_dim", 256)),
            nheads=int(_get(args, "nheads", 8)),
            enc_layers=int(_get(args, "enc_layers", 6)),
            dec_layers=int(_get(args, "dec_layers", 6)),
            dim_feedforward=int(_get(args, "dim_feedforward", 2048)),
            dropout=float(_get(args, "dropout", 0.1)),
            pre_norm=bool(_get(args, "pre_norm", False)),
        ),
        matcher=MatcherConfig(
            cost_class=float(_get(args, "set_cost_class", 1.0)),
            cost_bbox=float(_get(args, "set_cost_bbox", 5.0)),
            cost_giou=float(_get(args, "set_cost_giou", 2.0)),
        ),
        loss=LossConfig(
            ce=1.0,
            bbox=float(_get(args, "bbox_loss_coef", 5.0)),
            giou=float(_get(args, "giou_loss_coef", 2.0)),
            mask=float(_get(args, "mask_loss_coef", 1.0)),
            dice=float(_get(args, "dice_loss_coef", 1.0)),
            eos_coef=float(_get(args, "eos_coef", 0.1)),
            aux_loss=bool(_get(args, "aux_loss", True)),
        ),
    )


def to_reference_args(config: DetrConfig) -> dict[str, Any]:
    """The reference's argument names and values for ``config`` (a plain dict)."""
    t, b = config.transformer, config.backbone
    return {
        "backbone": b.name,
        "dilation": b.dilation,
        "lr_backbone": 1e-5 if b.trainable else 0.0,
        "position_embedding": config.position_embedding,
        "hidden_dim": t.hidden_dim,
        "nheads": t.nheads,
        "enc_layers": t.enc_layers,
        "dec_layers": t.dec_layers,
        "dim_feedforward": t.dim_feedforward,
        "dropout": t.dropout,
        "pre_norm": t.pre_norm,
        "num_queries": config.num_queries,
        "masks": config.masks,
        "aux_loss": config.loss.aux_loss,
        "set_cost_class": config.matcher.cost_class,
        "set_cost_bbox": config.matcher.cost_bbox,
        "set_cost_giou": config.matcher.cost_giou,
        "bbox_loss_coef": config.loss.bbox,
        "giou_loss_coef": config.loss.giou,
        "mask_loss_coef": config.loss.mask,
        "dice_loss_coef": config.loss.dice,
        "eos_coef": config.loss.eos_coef,
        "num_classes": config.num_classes,
        "dataset_file": "coco_panoptic" if config.masks else "coco",
    }


# --- presets -------------------------------------------------------------------------------

def preset(name: str, **overrides: Any) -> DetrConfig:
    """Named configurations: r50, r50-dc5, r101, r101-dc5, panoptic (R50), shapes-small (CPU demo)."""
    presets: dict[str, DetrConfig] = {
        "r50": DetrConfig(),
        "r50-dc5": DetrConfig(backbone=BackboneConfig(dilation=True)),
        "r101": DetrConfig(backbone=BackboneConfig(name="resnet101")),
        "r101-dc5": DetrConfig(backbone=BackboneConfig(name="resnet101", dilation=True)),
        "panoptic": DetrConfig(num_classes=250, masks=True),
        "shapes-small": DetrConfig(
            num_classes=4,
            num_queries=10,
            # trained from scratch: no ImageNet statistics to freeze, so a trained GroupNorm and every stage trains
            backbone=BackboneConfig(name="resnet18", norm="group_norm", frozen_stages=0),
            transformer=TransformerConfig(
                hidden_dim=128, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=256, dropout=0.0
            ),
        ),
    }
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
    return dataclasses.replace(presets[name], **overrides)
