"""Where a training starts: --resume > --frozen_weights > --pretrained > --backbone_weights (ImageNet, the
default for a frozen-BatchNorm backbone, as in the reference); a frozen BatchNorm without pretrained weights
is refused."""

from __future__ import annotations

import logging

from torch import nn

from ..checkpoint import CheckpointError, load_weights, read_checkpoint, state_dict_for
from ..config import DetrConfig
from ..model.segmentation import DETRsegm
from .options import RunOptions

log = logging.getLogger(__name__)


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
    from ..checkpoint import backbone_depth, imagenet_name, read_backbone_weights

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


def init_weights(model: nn.Module, config: DetrConfig, options: RunOptions) -> dict[str, str]:
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
        load_weights(model.detr, state_dict_for(model.detr, detector.state_dict))
        return {"detector (frozen)": f"{options.frozen_weights} (--frozen_weights)",
                "mask head": "random initialization"}
    if options.pretrained:
        if explicit:
            log.warning("--backbone_weights %s is not used: --pretrained %s holds the backbone too",
                        options.backbone_weights, options.pretrained)
        pretrained = read_checkpoint(options.pretrained).state_dict
        fresh = load_weights(model, state_dict_for(model, pretrained), reinit_heads=True)
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
    from ..checkpoint import DownloadError

    try:
        source = load_backbone_weights(model, spec, config)
    except DownloadError as e:
        if explicit:
            raise
        hint = f"The default --backbone_weights imagenet could not be had; {FROZEN_BN_NEEDS_WEIGHTS}."
        raise DownloadError(f"{e} {hint}") from None
    return {"backbone": source, "transformer and heads": rest}
