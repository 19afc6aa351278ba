"""The reference's layout (facebookresearch/detr): key names, training ``args``, and the architecture
that a state dict's shapes tell.

Its files are ``{"model": state_dict, "args": argparse.Namespace, ...}``; its names differ from ours only
in the backbone (``backbone.0.body.*`` -> ``backbone.body.*``, ``backbone.1.*`` -> ``position.*``), with a
``detr.`` prefix in panoptic models. The notebook's ``DETRdemo`` (``linear_class``, ``query_pos``) is
read too. The head count and DC5 leave no trace in the weights: a bare file says DC5 in its name.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import REFERENCE_ARGS, DetrConfig
from ..files import atomic_write
from ..model.minimal import DemoConfig
from .formats import CheckpointError

# --- key names ---------------------------------------------------------------------------------


# --- the reference's argparse namespace ------------------------------------------------------

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
    """Build a config from the reference's ``args`` (argparse.Namespace or dict); arguments it lacks keep
    our defaults, which are the reference's.

    ``num_classes`` should come from the checkpoint's class head; the dataset-name rule of the
    reference is only a fallback.
    """
    if num_classes is None:
        num_classes = reference_num_classes(_get(args, "dataset_file", "coco"))
    base = DetrConfig(num_classes=num_classes)
    sections: dict[str, dict[str, Any]] = {"": {}, "backbone": {}, "transformer": {}, "matcher": {}, "loss": {}}
    for arg, (section, name) in REFERENCE_ARGS.items():
        default = getattr(getattr(base, section) if section else base, name)
        value = _get(args, arg, default)
        sections[section][name] = type(default)(value)  # the reference stores some numbers as str or int
    lr_backbone = _get(args, "lr_backbone", 1e-5)
    sections["backbone"]["trainable"] = lr_backbone is None or float(lr_backbone) > 0
    parts = {name: dataclasses.replace(getattr(base, name), **fields) for name, fields in sections.items() if name}
    return dataclasses.replace(base, **sections[""], **parts)


def to_reference_args(config: DetrConfig) -> dict[str, Any]:
    """The reference's argument names and values for ``config`` (a plain dict).

    Raises ValueError for a configuration the reference cannot build (the convergence options, the small
    backbone, the ablations): its checkpoints would load as another model.
    """
    if not config.is_vanilla:
        raise ValueError("the reference implementation has no flags for this configuration (convergence options, "
                         "the small or a GroupNorm backbone, other frozen stages, or a transformer ablation); "
                         "keep it in our .safetensors format")
    args = {arg: getattr(getattr(config, section) if section else config, name)
            for arg, (section, name) in REFERENCE_ARGS.items()}
    return {**args, "lr_backbone": 1e-5 if config.backbone.trainable else 0.0, "num_classes": config.num_classes,
            "dataset_file": "coco_panoptic" if config.masks else "coco"}


_REF_TO_OURS = (("backbone.0.body.", "backbone.body."), ("backbone.1.", "position."))


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    prefix = "detr." if key.startswith("detr.") else ""
    rest = key[len(prefix):]
    for old, new in pairs:
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return key


def reference_key_to_ours(key: str) -> str:
    """Our name for a reference-layout weight (``backbone.0.body.conv1.weight`` -> ``backbone.body.conv1.weight``)."""
    return _rename(key, _REF_TO_OURS)


def reference_to_ours(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename reference-layout keys to ours (num_batches_tracked counters are dropped)."""
    return {
        reference_key_to_ours(k): v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    }


def ours_to_reference(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename our-layout keys to the reference's."""
    reverse = tuple((new, old) for old, new in _REF_TO_OURS)
    return {_rename(k, reverse): v for k, v in state_dict.items()}


# --- architecture from weights ---------------------------------------------------------------

def count_indexed(keys: list[str], pattern: str) -> int:
    """How many numbered modules (``layers.0.``, ``layers.1.``...) ``pattern``'s group finds in ``keys``."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# torchvision's ResNets by (blocks in layer3, bottleneck blocks)
RESNETS = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}


def resnet_shape(state_dict: dict[str, Tensor], prefix: str = "") -> tuple[int, bool]:
    """(blocks in layer3, bottleneck blocks) of the ResNet whose weights are named ``prefix + "layer1..."``."""
    blocks = count_indexed(list(state_dict), re.escape(prefix) + r"layer3\.(\d+)\.")
    return blocks, f"{prefix}layer1.0.conv3.weight" in state_dict


def infer_config(state_dict: dict[str, Tensor], base: DetrConfig | None = None) -> DetrConfig:
    """Read the shape-determined architecture from an our-layout state dict.

    Everything but ``nheads`` and ``dilation`` (which leave no trace in the shapes) is read from the
    weights; those two, the dropout and the loss settings come from ``base`` (defaults otherwise).
    """
    base = base or DetrConfig()
    masks = any(k.startswith("detr.") for k in state_dict)
    sd = {k.removeprefix("detr."): v for k, v in state_dict.items()}
    keys = list(sd)
    try:
        queries = sd["query_embed.weight"]
        classes = sd["class_embed.weight"]
    except KeyError as e:
        raise CheckpointError(f"state dict lacks {e.args[0]!r}; is it a DETR checkpoint?") from None
    blocks, bottleneck = resnet_shape(sd, "backbone.body.")
    if (blocks, bottleneck) not in RESNETS:
        raise CheckpointError(f"unrecognized ResNet: {blocks} blocks in layer3, bottleneck={bottleneck}")
    enc = count_indexed(keys, r"transformer\.encoder\.layers\.(\d+)\.")
    dec = count_indexed(keys, r"transformer\.decoder\.layers\.(\d+)\.")
    ffn_key = "transformer.encoder.layers.0.linear1.weight" if enc else "transformer.decoder.layers.0.linear1.weight"
    config = base.replace(
        num_classes=classes.shape[0] - 1,
        num_queries=queries.shape[0],
        position_embedding="learned" if "position.row_embed.weight" in sd else "sine",
        masks=masks,
    )
    # A trained (group) norm has an affine scale but no running statistics.
    norm = "group_norm" if "backbone.body.bn1.running_mean" not in sd else "frozen_bn"
    return config.with_backbone(name=RESNETS[(blocks, bottleneck)], norm=norm).with_transformer(
        hidden_dim=queries.shape[1],
        enc_layers=enc,
        dec_layers=dec,
        dim_feedforward=sd[ffn_key].shape[0],
        # a pre-norm encoder ends with a norm; without encoder layers there is nothing to tell
        pre_norm="transformer.encoder.norm.weight" in sd or (enc == 0 and base.transformer.pre_norm),
    )


def config_from_args(args: Any, state_dict: dict[str, Tensor]) -> DetrConfig:
    """The architecture a reference file's ``args`` describe; the class count is read from the class
    head's shape, not guessed from the dataset name."""
    return from_reference_args(args, num_classes=infer_config(state_dict).num_classes)


def guess_config(state_dict: dict[str, Tensor], path: str | Path) -> DetrConfig:
    """The architecture of a file that does not record one: the shapes tell all but the head count (the
    default, 8) and DC5, which the released files say in their name (``detr-r50-dc5-f0fb7ef5.pth``)."""
    return infer_config(state_dict).with_backbone(dilation="dc5" in Path(path).name.lower())


def infer_demo_config(state_dict: dict[str, Tensor], nheads: int = 8) -> DemoConfig:
    """The notebook's ``DETRdemo`` architecture from its state dict's shapes (the head count leaves no trace)."""
    keys = list(state_dict)
    return DemoConfig(
        num_classes=state_dict["linear_class.weight"].shape[0] - 1,
        hidden_dim=state_dict["conv.weight"].shape[0],
        nheads=nheads,
        num_encoder_layers=count_indexed(keys, r"transformer\.encoder\.layers\.(\d+)\."),
        num_decoder_layers=count_indexed(keys, r"transformer\.decoder\.layers\.(\d+)\."),
        num_queries=state_dict["query_pos"].shape[0],
    )


# --- writing -----------------------------------------------------------------------------------

def save_reference_checkpoint(
    state_dict: dict[str, Tensor], path: str | Path, *, config: DetrConfig | None
) -> Path:
    """Write an our-layout state dict as the reference's ``{"model", "args"}`` file."""
    blob: dict[str, Any] = {"model": ours_to_reference(state_dict) if config is not None else state_dict}
    if config is not None:
        blob["args"] = argparse.Namespace(**to_reference_args(config))
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return Path(path)
