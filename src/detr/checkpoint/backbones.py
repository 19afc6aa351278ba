"""ImageNet backbone weights: a ResNet trunk in torchvision's names, from torchvision's or timm's files.

What ``detr train --backbone_weights`` (``imagenet``, a name such as ``resnet50``, a file, a folder or a
URL) loads into the model's ResNet before training, as the reference starts from torchvision's
IMAGENET1K_V1 weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from .downloads import locate
from .formats import CheckpointError, read_safetensors, safe_torch_load
from .reference import RESNETS, resnet_shape

_BACKBONE_PREFIXES = ("backbone.0.body.", "backbone.body.", "detr.backbone.0.body.", "detr.backbone.body.")


def read_backbone_weights(spec: str | Path) -> tuple[dict[str, Tensor], Path, str]:
    """ResNet trunk weights in torchvision's names, from a torchvision or timm ImageNet file.

    ``spec``: a file (``.pth``/``.pt``/``.bin``/``.safetensors``), a folder with ``model.safetensors`` or
    ``pytorch_model.bin`` (a timm hub download), a name (``resnet50``) or a URL. Read: torchvision's
    state dicts, timm's (the same names; the ``fc`` head is dropped), training files that wrap them
    (``{"state_dict": ...}``, ``module.`` / ``model.`` prefixes) and the backbone of a DETR checkpoint.
    Returns (state dict, the local file, what it was).
    """
    path = locate(spec)
    if path.is_dir():
        inner = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not inner:
            raise CheckpointError(f"{path}: a weights folder needs model.safetensors or pytorch_model.bin")
        path = inner[0]
    obj: Any = read_safetensors(path)[0] if path.suffix == ".safetensors" else safe_torch_load(path)
    for key in ("state_dict", "model", "module"):  # timm/Lightning training files; DETR files
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (ImageNet ResNet weights)")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    what = "torchvision/timm ResNet layout"
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            what = "the backbone of a DETR checkpoint"
            break
    else:
        if sd and all(k.startswith("model.") for k in sd):  # Lightning-style wrapper
            sd = {k.removeprefix("model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    if "conv1.weight" not in sd or not any(k.startswith("layer4.") for k in sd):
        hint = (" (transformers' ResNetModel layout is not read: use torchvision's or timm's file)"
                if any("embedder" in k for k in sd) else "")
        raise CheckpointError(
            f"{path}: not ResNet weights in torchvision/timm layout: expected conv1.weight, bn1.*, layer1..layer4.*; "
            f"got e.g. {sorted(sd)[:4]}{hint}"
        )
    return sd, path, what


def backbone_depth(state_dict: dict[str, Tensor]) -> str:
    """The torchvision ResNet a trunk state dict fits (resnet18/34/50/101), or a description."""
    blocks, bottleneck = resnet_shape(state_dict)
    return RESNETS.get((blocks, bottleneck), f"a ResNet with {blocks} blocks in layer3 (bottleneck={bottleneck})")
