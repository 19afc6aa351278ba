"""Hub-style factories: ``detr_resnet50(weights=...)`` and friends, named like the reference's torch.hub entries.

Each factory builds one of the paper's models. ``weights`` is None (random initialization),
``"coco"`` (the factory's released model: ``detr_resnet50(weights="coco")`` is the reference's
``pretrained=True``), a released name (``"detr-r50"``, see ``detr.checkpoint.NAMES``), a URL, or a
local file or directory in any format ``load_checkpoint`` reads (the reference's ``.pth``, our
``.safetensors``, a transformers ``save_pretrained`` directory). Names and URLs are downloaded once
into the cache (``DETR_CACHE``) and verified; model hub names (``facebook/detr-resnet-50``) are not
fetched: download that repository yourself and pass its directory.

With weights, the transformer's size, the query count and the position encoding come from the
file (as in ``load_checkpoint``); the factory fixes the backbone, DC5 and the mask head, and checks
the file agrees. A file with another class count than ``num_classes`` keeps everything but its
class head, which is re-initialized (as ``load_checkpoint(reinit_heads=True)`` does).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import CheckpointError, infer_config, load_weights, locate, names_hint, read_checkpoint
from .config import preset
from .model import build_detr

log = logging.getLogger(__name__)

Weights = str | Path | None

_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")  # e.g. facebook/detr-resnet-50

# The released COCO model of each factory (weights="coco").
COCO_WEIGHTS = {
    "r50": "detr-r50", "r50-dc5": "detr-r50-dc5", "r101": "detr-r101", "r101-dc5": "detr-r101-dc5",
    "panoptic": "detr-r50-panoptic", "panoptic-dc5": "detr-r50-dc5-panoptic", "panoptic-r101": "detr-r101-panoptic",
}


def _local_weights(weights: str | Path, preset_name: str) -> Path:
    text = str(weights)
    if text == "coco":
        text = COCO_WEIGHTS[preset_name]
    path = locate(text)
    if not path.exists():
        hint = (
            " It looks like a model hub name: hub repositories are not fetched; download the repository "
            "(config.json + model.safetensors) yourself and pass its local directory."
            if _HUB_NAME.match(text)
            else f" Pass a local file, a URL or a known name ({names_hint()})."
        )
        raise FileNotFoundError(f"weights not found: {path}.{hint}")
    return path


def _factory(name: str, weights: Weights, num_classes: int, overrides: dict[str, Any]) -> nn.Module:
    base, _, variant = name.partition(":")  # "panoptic:dc5" -> the panoptic preset with DC5
    target = preset(base, num_classes=num_classes, **overrides)
    if variant == "dc5":
        target = target.with_backbone(dilation=True)
    elif variant == "r101":
        target = target.with_backbone(name="resnet101")
    if weights is None:
        return build_detr(target).eval()
    path = _local_weights(weights, base + (f"-{variant}" if variant else ""))
    ckpt = read_checkpoint(path)
    if ckpt.kind != "detr":
        raise CheckpointError(f"{path}: holds the {ckpt.kind} model, not a DETR")
    found = ckpt.config or infer_config(ckpt.state_dict)
    # The file's backbone depth and mask head must be the factory's; DC5 and the head count leave no trace
    # in the weights, so they are checked only where the file records its configuration.
    checks = [("backbone", found.backbone.name, target.backbone.name), ("masks", found.masks, target.masks)]
    if ckpt.config is not None:
        checks.append(("dilation (DC5)", found.backbone.dilation, target.backbone.dilation))
    for what, theirs, ours in checks:
        if theirs != ours:
            raise CheckpointError(
                f"{path}: the file's {what} is {theirs!r} but this factory builds {ours!r}; "
                "use the matching factory or detr.load_checkpoint"
            )
    config = found.with_backbone(dilation=target.backbone.dilation).replace(num_classes=num_classes, **overrides)
    model = build_detr(config)
    fresh = load_weights(model, ckpt.state_dict, reinit_heads=True)
    if fresh:
        log.warning(
            "%s: re-initialized %s: the file has %d classes, %d were requested",
            path, ", ".join(sorted(fresh)), found.num_classes, num_classes,
        )
    return model.eval()


def detr_resnet50(weights: Weights = None, num_classes: int = 91, **overrides: Any) -> nn.Module:
    """DETR with a ResNet-50 backbone (41.3M trainable parameters with 91 classes); eval mode.

    ``overrides`` replace DetrConfig fields (e.g. ``num_queries=50``). Outputs as ``DETR.forward``:
    ``pred_logits`` [B, Q, K+1], ``pred_boxes`` [B, Q, 4] (normalized cx, cy, w, h).
    """
    return _factory("r50", weights, num_classes, overrides)


def detr_resnet50_dc5(weights: Weights = None, num_classes: int = 91, **overrides: Any) -> nn.Module:
    """DETR-DC5, ResNet-50: the last stage dilated instead of strided (features at 1/16)."""
    return _factory("r50-dc5", weights, num_classes, overrides)


def detr_resnet101(weights: Weights = None, num_classes: int = 91, **overrides: Any) -> nn.Module:
    """DETR with a ResNet-101 backbone (60.2M trainable parameters with 91 classes)."""
    return _factory("r101", weights, num_classes, overrides)


def detr_resnet101_dc5(weights: Weights = None, num_classes: int = 91, **overrides: Any) -> nn.Module:
    """DETR-DC5 with a ResNet-101 backbone."""
    return _factory("r101-dc5", weights, num_classes, overrides)


def detr_resnet50_panoptic(weights: Weights = None, num_classes: int = 250, **overrides: Any) -> nn.Module:
    """Panoptic DETR, ResNet-50: DETR plus the mask head (``DETRsegm``); outputs add ``pred_masks``
    [B, Q, H/4, W/4]. COCO panoptic uses 250 class slots."""
    return _factory("panoptic", weights, num_classes, overrides)


def detr_resnet50_dc5_panoptic(weights: Weights = None, num_classes: int = 250, **overrides: Any) -> nn.Module:
    """Panoptic DETR-DC5, ResNet-50 (the reference's ``detr_resnet50_dc5_panoptic``)."""
    return _factory("panoptic:dc5", weights, num_classes, overrides)


def detr_resnet101_panoptic(weights: Weights = None, num_classes: int = 250, **overrides: Any) -> nn.Module:
    """Panoptic DETR, ResNet-101 (the reference's ``detr_resnet101_panoptic``)."""
    return _factory("panoptic:r101", weights, num_classes, overrides)


__all__ = [
    "detr_resnet50", "detr_resnet50_dc5", "detr_resnet101", "detr_resnet101_dc5", "detr_resnet50_panoptic",
    "detr_resnet50_dc5_panoptic", "detr_resnet101_panoptic",
]
