"""Loading and saving weights. The mapping between the reference's key layout and ours lives here.

Recognized inputs (``load_checkpoint``):
- the reference's training/released files: ``{"model": state_dict, "args": Namespace, ...}``;
- a bare state dict in the reference layout (``backbone.0.body.*``), ours, or the demo model's;
- our format: a ``.safetensors`` file whose metadata holds the JSON config (or a directory with
  ``model.safetensors`` + ``config.json``);
- our training checkpoints (``{"model": ..., "config": {...}, "optimizer": ...}``).
- a Hugging Face transformers ``save_pretrained`` directory of ``DetrForObjectDetection`` or
  ``DetrForSegmentation`` with transformers' own ResNet (``use_timm_backbone=False``).

Nothing is ever unpickled beyond tensors, plain containers and ``argparse.Namespace``:
``torch.load(weights_only=True)`` refuses anything else, and we say so clearly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import (
    BackboneConfig,
    DetrConfig,
    LossConfig,
    MatcherConfig,
    TransformerConfig,
    from_reference_args,
    to_reference_args,
)
from .files import atomic_write
from .model.detr import DETR, build_detr
from .model.minimal import DemoConfig, DETRdemo
from .model.segmentation import DETRsegm

log = logging.getLogger(__name__)

FORMAT = "detr"
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the requested model."""


# --- key layouts -----------------------------------------------------------------------------

_REF_TO_OURS = (("backbone.0.body.", "backbone.body."), ("backbone.1.", "position."))


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    prefix = "detr." if key.startswith("detr.") else ""
    rest = key[len(prefix):]
    for old, new in pairs:
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return key


def reference_key_to_ours(key: str) -> str:
    return _rename(key, _REF_TO_OURS)


def reference_to_ours(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename reference-layout keys to ours (num_batches_tracked counters are dropped)."""
    return {
        reference_key_to_ours(k): v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    }


def ours_to_reference(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    reverse = tuple((new, old) for old, new in _REF_TO_OURS)
    return {_rename(k, reverse): v for k, v in state_dict.items()}


def _layout(state_dict: dict[str, Tensor]) -> str:
    keys = state_dict.keys()
    if "linear_class.weight" in keys and "query_pos" in keys:
        return "demo"
    bare = {k.removeprefix("detr.") for k in keys}
    other = _other_model(bare)  # first: Deformable DETR and kin share DETR's backbone names
    if other is not None:
        raise OtherModelError(f"this is {other}")
    if any(k.startswith("backbone.0.") for k in bare):
        return "reference"
    if any(k.startswith("backbone.body.") for k in bare):
        return "ours"
    if "class_labels_classifier.weight" in bare:
        raise CheckpointError(
            "this is a Hugging Face transformers DETR state dict: pass the directory that holds it and its config.json"
        )
    raise OtherModelError(
        "state dict is not a DETR model: expected keys like 'backbone.0.body.conv1.weight' (reference), "
        f"'backbone.body.conv1.weight' (ours) or 'linear_class.weight' (demo); got e.g. {sorted(keys)[:4]}"
    )


class OtherModelError(CheckpointError):
    """A readable checkpoint of another model type (a classifier, another detector...)."""


def _other_model(keys: set[str]) -> str | None:
    """What a non-DETR state dict holds, when its keys tell."""
    keys = {k.removeprefix("module.") for k in keys}
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return ("an ImageNet ResNet classifier (torchvision/timm layout), not a DETR checkpoint; as backbone "
                "weights it goes to `detr train --backbone_weights FILE`")
    if any("sampling_offsets" in k or k.endswith("level_embed") for k in keys):
        return "a Deformable-DETR-family checkpoint (multi-scale deformable attention), another model type than DETR"
    if any("ref_point_head" in k for k in keys):
        return "a Conditional/DAB-DETR checkpoint (reference-point queries), another model type than DETR"
    if any(k.startswith(("model.22.", "model.24.")) for k in keys):
        return "a YOLO checkpoint (Ultralytics/YOLOv5 layout), another model type than DETR"
    return None


# --- architecture from weights ---------------------------------------------------------------

def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


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
    blocks = _count(keys, r"backbone\.body\.layer3\.(\d+)\.")
    bottleneck = "backbone.body.layer1.0.conv3.weight" in sd
    backbones = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}
    if (blocks, bottleneck) not in backbones:
        raise CheckpointError(f"unrecognized ResNet: {blocks} blocks in layer3, bottleneck={bottleneck}")
    enc = _count(keys, r"transformer\.encoder\.layers\.(\d+)\.")
    dec = _count(keys, r"transformer\.decoder\.layers\.(\d+)\.")
    ffn_key = "transformer.encoder.layers.0.linear1.weight" if enc else "transformer.decoder.layers.0.linear1.weight"
    config = base.replace(
        num_classes=classes.shape[0] - 1,
        num_queries=queries.shape[0],
        position_embedding="learned" if "position.row_embed.weight" in sd else "sine",
        masks=masks,
    )
    # A trained (group) norm has an affine scale but no running statistics.
    norm = "group_norm" if "backbone.body.bn1.running_mean" not in sd else "frozen_bn"
    return config.with_backbone(name=backbones[(blocks, bottleneck)], norm=norm).with_transformer(
        hidden_dim=queries.shape[1],
        enc_layers=enc,
        dec_layers=dec,
        dim_feedforward=sd[ffn_key].shape[0],
        # a pre-norm encoder ends with a norm; without encoder layers there is nothing to tell
        pre_norm="transformer.encoder.norm.weight" in sd or (enc == 0 and base.transformer.pre_norm),
    )


def infer_demo_config(state_dict: dict[str, Tensor], nheads: int = 8) -> DemoConfig:
    keys = list(state_dict)
    return DemoConfig(
        num_classes=state_dict["linear_class.weight"].shape[0] - 1,
        hidden_dim=state_dict["conv.weight"].shape[0],
        nheads=nheads,
        num_encoder_layers=_count(keys, r"transformer\.encoder\.layers\.(\d+)\."),
        num_decoder_layers=_count(keys, r"transformer\.decoder\.layers\.(\d+)\."),
        num_queries=state_dict["query_pos"].shape[0],
    )


# --- reading ---------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """Weights in our layout plus what is known of the architecture."""

    state_dict: dict[str, Tensor]
    kind: str  # "detr" or "demo"
    source: str  # "ours", "reference", "reference-bare", "ours-bare", "demo", "training"
    config: DetrConfig | None = None  # for kind "detr"; None when the file does not say
    demo_config: DemoConfig | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # optimizer, epoch... of training checkpoints


class NotACheckpointError(CheckpointError):
    """The file is not a PyTorch checkpoint at all (an image, an HTML page, random bytes...)."""


class CorruptCheckpointError(CheckpointError):
    """The file looks like a checkpoint but is truncated or damaged."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs a Python object that loading with ``weights_only`` refuses to build."""

    def __init__(self, message: str, global_name: str | None) -> None:
        super().__init__(message)
        self.global_name = global_name


# What a file that is not a checkpoint usually turns out to be (first bytes -> what to tell the user).
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"version https://git-lfs", "a Git LFS pointer (run `git lfs pull` to fetch the real file)"),
    (b"<!doctype html", "an HTML page (a login or error page saved in place of the file?)"),
    (b"<html", "an HTML page (a login or error page saved in place of the file?)"),
    (b"<?xml", "an XML document"),
    (b"\x89png", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"\x89hdf", "an HDF5 file (Keras/TensorFlow weights?)"),
    (b"{", "JSON text"),
    (b"[", "JSON text"),
)


def _sniff(head: bytes, size: int) -> str:
    """"zip" (torch.save), "pickle" (legacy torch.save / plain pickle), "safetensors", or a description."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    lowered = head.lstrip().lower()
    for magic, what in _OTHER_FORMATS:
        if lowered.startswith(magic):
            return what
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (unpack it first)"
    return "not a format PyTorch writes"


def _damage_hint(path: Path) -> str:
    from .weights import _sha256, hash_prefix_of

    prefix = hash_prefix_of(path.name)
    if prefix is None:
        return "Save or copy it again."
    actual = _sha256(path)
    if actual.startswith(prefix):
        return f"Its sha256 ({actual[:12]}...) matches the {prefix} its name promises, so it was written damaged."
    return (f"Its sha256 starts with {actual[:8]}, not the {prefix} its name promises: delete it and download "
            "it again.")


def safe_torch_load(path: str | Path) -> Any:
    """torch.load that only ever reconstructs tensors, containers and argparse.Namespace.

    Tells apart, each with its own error: a file that is no checkpoint (NotACheckpointError), a truncated
    or damaged one (CorruptCheckpointError) and one that needs an unsafe Python object
    (UnsafeCheckpointError, naming it).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise NotACheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(512)
    kind = _sniff(head, size)
    if kind == "safetensors":  # safetensors content under another suffix: read it as such
        return _read_safetensors(path)[0]
    if kind not in ("zip", "pickle"):
        raise NotACheckpointError(
            f"{path} is not a PyTorch checkpoint: its content is {kind} ({size} bytes, starting {head[:12]!r}); "
            "a checkpoint is a torch.save zip archive, a legacy torch.save pickle or a .safetensors file"
        )
    if kind == "zip":
        import zipfile

        if not zipfile.is_zipfile(path):  # the end of the archive (its directory) is missing
            raise CorruptCheckpointError(
                f"{path} is truncated or corrupt: a zip archive ({size} bytes) without its end. {_damage_hint(path)}"
            )
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise NotACheckpointError(
                f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl; it holds e.g. {names[:4]})"
            )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            name = found.group(1)
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it needs the Python object {name}, which is not a tensor, a plain "
                f"container or argparse.Namespace{_known_owner(name)}. Unpickling it could run arbitrary code, so "
                "this loader never does; load the file where you trust it and save its state_dict() instead.",
                name,
            ) from None
        if "truncated" in text or "EOF" in text:
            raise CorruptCheckpointError(f"{path} is truncated or corrupt ({_first_line(text)}). "
                                         f"{_damage_hint(path)}") from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors and plain containers "
            f"({_first_line(text)}). Unpickling them could run arbitrary code, so this loader never does.",
            None,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, struct.error) as e:
        raise CorruptCheckpointError(
            f"{path} is truncated or corrupt ({_first_line(str(e)) or type(e).__name__}). {_damage_hint(path)}"
        ) from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    interesting = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (interesting or lines or [""])[0]


# Libraries whose pickled classes mark a checkpoint of another model type.
_OWNERS = {
    "ultralytics": "an Ultralytics YOLO checkpoint",
    "models.yolo": "a YOLOv5 checkpoint",
    "mmdet": "an MMDetection checkpoint",
    "mmengine": "an MMDetection/MMEngine checkpoint",
    "detectron2": "a Detectron2 checkpoint",
    "numpy": "a pickle holding NumPy arrays",
    "pytorch_lightning": "a PyTorch Lightning checkpoint",
    "lightning": "a PyTorch Lightning checkpoint",
    "sklearn": "a scikit-learn model",
}


def _known_owner(global_name: str) -> str:
    for prefix, what in _OWNERS.items():
        if global_name == prefix or global_name.startswith(prefix + "."):
            return f"; this looks like {what}, not a DETR"
    return ""


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def _config_from_metadata(meta: dict[str, Any], path: Path) -> tuple[str, DetrConfig | None, DemoConfig | None]:
    try:
        config = json.loads(meta["config"]) if isinstance(meta["config"], str) else meta["config"]
        kind = meta.get("model", "detr")
        if kind == "demo":
            return kind, None, DemoConfig(**config)
        return kind, DetrConfig.from_dict(config), None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid 'config' in checkpoint metadata: {e}") from None


def locate(spec: str | Path) -> Path:
    """A local path as is; a released name (``detr-r50``) or a URL -> the cached file, downloaded on
    first use (see ``detr.weights``)."""
    from .weights import is_url, names_hint, resolve

    path = resolve(spec)
    if not path.exists() and not is_url(spec) and os.sep not in str(spec) and "." not in str(spec):
        raise FileNotFoundError(f"checkpoint not found: {spec} is neither a file nor a known name ({names_hint()})")
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint into our layout without building a model.

    ``path``: a file or directory, a released name (``detr-r50``, see ``detr.weights.NAMES``) or a URL;
    names and URLs are downloaded into the cache on first use.
    """
    path = locate(path)
    if path.is_dir():
        if _is_hf_directory(path):  # transformers' save_pretrained: config.json names a model_type
            return read_hf_checkpoint(path)
        weights, cfg_file = path / "model.safetensors", path / "config.json"
        if not weights.exists() or not cfg_file.exists():
            raise CheckpointError(f"{path}: a checkpoint directory needs model.safetensors and config.json")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{cfg_file}: not a detr config (no \"format\": \"detr\")")
        sd, _ = _read_safetensors(weights)
        kind, config, demo = _config_from_metadata(meta, cfg_file)
        return Checkpoint(sd, kind, "ours", config, demo, metadata=meta)
    if path.suffix == ".safetensors":
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        sd, meta = _read_safetensors(path)
        if meta.get("format") == FORMAT:
            kind, config, demo = _config_from_metadata(meta, path)
            extra_meta = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "config", "model")}
            return Checkpoint(sd, kind, "ours", config, demo, metadata=extra_meta)
        return _from_state_dict(sd, path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise OtherModelError(f"{path}: a checkpoint holds a dict of weights; this file holds a {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        if "config" in obj:  # our training checkpoint
            kind, config, demo = _config_from_metadata(obj, path)
            extra = {k: v for k, v in obj.items() if k not in ("model", "config")}
            return Checkpoint(obj["model"], kind, "training", config, demo, extra=extra)
        ckpt = _from_state_dict(obj["model"], path)
        if ckpt.kind == "detr" and "args" in obj:
            args = obj["args"]
            ckpt.config = from_reference_args(args, num_classes=infer_config(ckpt.state_dict).num_classes)
            ckpt.source = "reference"
        ckpt.extra = {k: v for k, v in obj.items() if k != "model"}
        return ckpt
    if all(isinstance(v, Tensor) for v in obj.values()):
        return _from_state_dict(obj, path)
    raise OtherModelError(f"{path}: unrecognized checkpoint (top-level keys {sorted(map(str, obj))[:8]})")


def _from_state_dict(sd: dict[str, Tensor], path: Path) -> Checkpoint:
    try:
        layout = _layout(sd)
    except OtherModelError as e:
        raise OtherModelError(f"{path}: {e}") from None
    if layout == "demo":
        return Checkpoint(dict(sd), "demo", "demo", demo_config=infer_demo_config(sd))
    ours = reference_to_ours(sd) if layout == "reference" else dict(sd)
    return Checkpoint(ours, "detr", f"{layout}-bare")


# --- ImageNet backbones -------------------------------------------------------------------------

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
    obj: Any = _read_safetensors(path)[0] if path.suffix == ".safetensors" else safe_torch_load(path)
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
    keys = list(state_dict)
    blocks = _count(keys, r"layer3\.(\d+)\.")
    bottleneck = "layer1.0.conv3.weight" in state_dict
    known = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}
    return known.get((blocks, bottleneck), f"a ResNet with {blocks} blocks in layer3 (bottleneck={bottleneck})")


# --- Hugging Face transformers DETR ------------------------------------------------------------
#
# A ``save_pretrained`` directory of ``DetrForObjectDetection`` / ``DetrForSegmentation`` built on
# transformers' own ResNet (``use_timm_backbone=False``). Files keep transformers' v4 names
# (``conv_encoder``, ``out_proj``, ``fc1``, the mask head's ``lay1``...) while v5 models name some
# differently in memory (``o_proj``, ``mlp.fc1``, ``mask_head.conv1.conv``...); both are read. The
# computation is the same as ours (post-norm layers, positions added to queries and keys only, frozen
# BatchNorm with eps 1e-5, the same sine encoding, a final decoder LayerNorm): only the names and the
# separate q/k/v projections (packed here into ``in_proj_weight``) differ.

HF_MODEL_TYPE = "detr"
_HF_BACKBONE = r"model\.backbone\.(?:conv_encoder\.)?model\."
_HF_STAGE = _HF_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
_HF_MASK_HEAD = {
    "conv1.conv": "lay1", "conv1.norm": "gn1", "conv2.conv": "lay2", "conv2.norm": "gn2", "output_conv": "out_lay",
    **{f"fpn_stages.{i}.fpn_adapter": f"adapter{i + 1}" for i in range(3)},
    **{f"fpn_stages.{i}.refine.conv": f"lay{i + 3}" for i in range(3)},
    **{f"fpn_stages.{i}.refine.norm": f"gn{i + 3}" for i in range(3)},
}


def _hf_block(m: re.Match[str]) -> str:
    # transformers counts stages from 0 and names a block's convs layer.0..2; torchvision: layer1.., conv1..
    return f"backbone.body.layer{int(m[1]) + 1}.{m[2]}."


def _hf_layer(m: re.Match[str]) -> str | None:
    kind, index, part = m[1], m[2], m[3]
    part = part.removeprefix("mlp.").replace(".o_proj", ".out_proj")
    names = {"fc1": "linear1", "fc2": "linear2", "self_attn_layer_norm": "norm1"}
    if kind == "encoder":
        names["final_layer_norm"] = "norm2"
    else:  # the decoder's cross-attention ("encoder_attn") is our multihead_attn
        names.update(encoder_attn_layer_norm="norm2", final_layer_norm="norm3")
    attn = re.fullmatch(r"(self_attn|encoder_attn)\.([qkv]_proj|out_proj)", part)
    if attn and (kind == "decoder" or attn[1] == "self_attn"):  # q/k/v are packed into in_proj_* afterwards
        new = ("self_attn" if attn[1] == "self_attn" else "multihead_attn") + "." + attn[2]
    elif part in names:
        new = names[part]
    else:
        return None
    return f"transformer.{kind}.layers.{index}.{new}"


def _hf_mask_head(m: re.Match[str]) -> str | None:
    part = m[1]
    if re.fullmatch(r"lay[1-5]|gn[1-5]|adapter[1-3]|out_lay", part):  # the file layout: the reference's names
        return f"mask_head.{part}"
    return f"mask_head.{_HF_MASK_HEAD[part]}" if part in _HF_MASK_HEAD else None


# (module path pattern, our module path): matched against the name without its last part (weight, bias...)
_HF_RULES: tuple[tuple[str, str | Callable[[re.Match[str]], str | None]], ...] = (
    (_HF_BACKBONE + r"embedder\.embedder\.convolution", "backbone.body.conv1"),
    (_HF_BACKBONE + r"embedder\.embedder\.normalization", "backbone.body.bn1"),
    (_HF_STAGE + r"layer\.(\d)\.convolution", lambda m: f"{_hf_block(m)}conv{int(m[3]) + 1}"),
    (_HF_STAGE + r"layer\.(\d)\.normalization", lambda m: f"{_hf_block(m)}bn{int(m[3]) + 1}"),
    (_HF_STAGE + r"shortcut\.convolution", lambda m: f"{_hf_block(m)}downsample.0"),
    (_HF_STAGE + r"shortcut\.normalization", lambda m: f"{_hf_block(m)}downsample.1"),
    # v4 kept the learned encoding inside the backbone wrapper, v5 beside it
    (r"model\.(?:backbone\.)?position_embedding\.row_embeddings", "position.row_embed"),
    (r"model\.(?:backbone\.)?position_embedding\.column_embeddings", "position.col_embed"),
    (r"model\.input_projection", "input_proj"),
    (r"model\.query_position_embeddings", "query_embed"),
    (r"model\.decoder\.layernorm", "transformer.decoder.norm"),
    (r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", _hf_layer),
    (r"class_labels_classifier", "class_embed"),
    (r"bbox_predictor\.layers\.(\d+)", r"bbox_embed.layers.\1"),
    (r"bbox_attention\.([qk])_(?:linear|proj)", r"bbox_attention.\1_linear"),
    (r"mask_head\.(.+)", _hf_mask_head),
)


def hf_key_to_ours(key: str) -> str | None:
    """Our name for a transformers DETR weight (q/k/v projections keep ``q_proj``... until packed),
    or None when the key is not part of a DETR with transformers' ResNet."""
    prefix = "detr." if key.startswith("detr.") else ""  # DetrForSegmentation wraps the detector as .detr
    module, _, param = key[len(prefix):].rpartition(".")
    for pattern, new in _HF_RULES:
        if m := re.fullmatch(pattern, module):
            mapped = new(m) if callable(new) else m.expand(new)
            if mapped is None:
                return None
            # the mask head sits beside the detector in both layouts
            return f"{'' if mapped.startswith(('mask_head.', 'bbox_attention.')) else prefix}{mapped}.{param}"
    return None


def hf_to_ours(state_dict: dict[str, Tensor], *, where: str | Path = "state dict") -> dict[str, Tensor]:
    """Rename a transformers DETR state dict to our layout and pack each attention's q/k/v."""
    if any(re.match(r"(detr\.)?" + _HF_BACKBONE + r"(conv1|bn1|layer\d)\.", k) for k in state_dict):
        raise CheckpointError(
            f"{where}: the backbone is in the timm layout (use_timm_backbone=True), which is not supported; "
            "use weights saved with transformers' own ResNet (use_timm_backbone=False, the hub's 'no_timm' revisions)"
        )
    ours: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = hf_key_to_ours(key)
        if new is None:
            unknown.append(key)
        elif m := re.fullmatch(r"(.+\.(?:self_attn|multihead_attn))\.([qkv])_proj\.(weight|bias)", new):
            qkv.setdefault(f"{m[1]}.in_proj_{m[3]}", {})[m[2]] = value
        else:
            ours[new] = value
    if unknown:
        raise CheckpointError(f"{where}: weights that are not part of a transformers DETR: {unknown[:6]}")
    for key, parts in qkv.items():
        if parts.keys() != {"q", "k", "v"}:
            raise CheckpointError(f"{where}: {key} needs q, k and v projections, found only {sorted(parts)}")
        # nn.MultiheadAttention's packing: rows [0, C) project queries, [C, 2C) keys, [2C, 3C) values
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # [3C, C] or [3C]
    return ours


def _is_hf_directory(path: Path) -> bool:
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and meta.get("format") != FORMAT


def _read_hf_weights(path: Path) -> tuple[dict[str, Tensor], Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    pickled = path / "pytorch_model.bin"
    if single.exists():
        return _read_safetensors(single)[0], single
    if index.exists():  # sharded: the index maps every weight to its shard file
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(_read_safetensors(path / shard)[0])
        return sd, index
    if pickled.exists():
        obj = safe_torch_load(pickled)  # weights_only: tensors and plain containers, nothing else
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{pickled}: expected a state dict of tensors")
        return obj, pickled
    raise CheckpointError(f"{path}: a transformers model directory needs model.safetensors or pytorch_model.bin")


def _check_hf_backbone(hf: dict[str, Any], where: Path) -> None:
    backbone = hf.get("backbone_config")
    kind = backbone.get("model_type") if isinstance(backbone, dict) else None
    # v4 files say use_timm_backbone (default True); v5 files name the backbone's model_type
    if kind == "timm_backbone" or (kind is None and hf.get("use_timm_backbone", True)):
        raise CheckpointError(
            f"{where}: use_timm_backbone / a timm backbone_config is not supported; use weights saved with "
            "transformers' own ResNet (use_timm_backbone=False, the hub's 'no_timm' revisions)"
        )
    if kind is None:  # transformers' default ResNetConfig: the weights tell its depth
        return
    if kind != "resnet":
        raise CheckpointError(f"{where}: backbone_config.model_type {kind!r} is not supported (only 'resnet')")
    # what a torchvision-style ResNet (v1.5: stride on the 3x3 convolution) needs; absent = transformers' default
    expected = {
        "num_channels": 3, "embedding_size": 64, "hidden_act": "relu",
        "downsample_in_first_stage": False, "downsample_in_bottleneck": False,
    }
    for name, value in expected.items():
        if backbone.get(name, value) != value:
            raise CheckpointError(
                f"{where}: backbone_config.{name} = {backbone[name]!r} is not supported (a torchvision-style "
                f"ResNet needs {value!r})"
            )
    out = backbone.get("out_features") or ["stage4"]
    if out[-1] != "stage4":
        raise CheckpointError(f"{where}: backbone_config.out_features {out} must end with 'stage4'")


def _hf_base_config(hf: dict[str, Any], where: Path) -> DetrConfig:
    """The fields the weights cannot tell (head count, dilation, dropout, loss settings)."""
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(enc) != hf.get(dec):
            raise CheckpointError(f"{where}: {enc} ({hf.get(enc)}) != {dec} ({hf.get(dec)}); ours shares one value")
    if hf.get("activation_function", "relu") != "relu":
        raise CheckpointError(f"{where}: activation_function {hf['activation_function']!r} is not supported (relu)")
    position = hf.get("position_embedding_type", "sine")
    if position not in ("sine", "learned"):
        raise CheckpointError(f"{where}: position_embedding_type {position!r} is not supported (sine, learned)")
    d_model = int(hf.get("d_model", 256))
    if hf.get("dilation"):
        log.warning(
            "%s: dilation=True: building the DC5 model the config describes, although transformers' own ResNet "
            "ignores this flag (it acts only on timm backbones); pass dilation=False to reproduce transformers",
            where,
        )
    if hf.get("auxiliary_loss"):
        log.warning(
            "%s: auxiliary_loss=True: transformers then feeds each decoder layer the normalized output of the "
            "previous one, unlike DETR; this model follows DETR, so its outputs differ from transformers'",
            where,
        )
    return DetrConfig(
        position_embedding=position,
        backbone=BackboneConfig(dilation=bool(hf.get("dilation", False))),
        transformer=TransformerConfig(
            hidden_dim=d_model, nheads=int(hf.get("encoder_attention_heads", 8)), dropout=float(hf.get("dropout", 0.1))
        ),
        matcher=MatcherConfig(
            cost_class=float(hf.get("class_cost", 1)),
            cost_bbox=float(hf.get("bbox_cost", 5)),
            cost_giou=float(hf.get("giou_cost", 2)),
        ),
        loss=LossConfig(
            bbox=float(hf.get("bbox_loss_coefficient", 5)),
            giou=float(hf.get("giou_loss_coefficient", 2)),
            mask=float(hf.get("mask_loss_coefficient", 1)),
            dice=float(hf.get("dice_loss_coefficient", 1)),
            eos_coef=float(hf.get("eos_coefficient", 0.1)),
        ),
    )


def read_hf_checkpoint(path: str | Path) -> Checkpoint:
    """Read a transformers ``save_pretrained`` directory (config.json + model.safetensors, or
    pytorch_model.bin loaded with weights_only) of ``DetrForObjectDetection`` or ``DetrForSegmentation``
    with transformers' ResNet backbone. ``id2label`` becomes ``metadata["class_names"]`` ({"id": name})."""
    path = Path(path)
    cfg_file = path / "config.json"
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_file}: {e}") from None
    if hf.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(
            f"{cfg_file}: model_type {hf.get('model_type')!r} is not supported; only transformers' DETR "
            f"(model_type 'detr': DetrForObjectDetection, DetrForSegmentation) is read"
        )
    _check_hf_backbone(hf, cfg_file)
    base = _hf_base_config(hf, cfg_file)
    raw, weights_file = _read_hf_weights(path)
    sd = hf_to_ours(raw, where=weights_file)
    config = infer_config(sd, base=base)  # depth, sizes, queries and classes from the weights
    metadata: dict[str, Any] = {}
    if isinstance(hf.get("id2label"), dict):
        metadata["class_names"] = {str(int(k)): str(v) for k, v in hf["id2label"].items()}
    return Checkpoint(sd, "detr", "huggingface", config, metadata=metadata)


# --- building and loading ---------------------------------------------------------------------

def _head_keys(model: nn.Module) -> tuple[str, ...]:
    prefix = "detr." if isinstance(model, DETRsegm) else ""
    return (prefix + "class_embed.weight", prefix + "class_embed.bias")


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], *, reinit_heads: bool = False) -> list[str]:
    """Copy ``state_dict`` (our layout) into ``model``. Returns the keys that were re-initialized.

    Shapes must agree; with ``reinit_heads`` a class head (or query set) of another size keeps the
    model's fresh initialization instead, which is how fine-tuning to a new class count starts.
    """
    own = model.state_dict()
    fresh: list[str] = []
    sd = {}
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            resizable = key in _head_keys(model) or key.endswith("query_embed.weight")
            if reinit_heads and resizable:
                fresh.append(key)
                continue
            raise CheckpointError(
                f"weight {key!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} "
                f"in the model; "
                + (
                    "the class counts differ: pass reinit_heads=True (--reinit_heads) to fine-tune a new head"
                    if key in _head_keys(model)
                    else "the architectures differ"
                )
            )
        sd[key] = value
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    return fresh


def load_checkpoint(
    path: str | Path,
    *,
    config: DetrConfig | None = None,
    num_classes: int | None = None,
    dilation: bool | None = None,
    nheads: int | None = None,
    reinit_heads: bool = False,
    checkpoint: Checkpoint | None = None,
) -> nn.Module:
    """Build the model a checkpoint describes and load its weights; eval mode, on the CPU.

    ``config`` gives the architecture for files that don't carry one (bare state dicts); for files
    that do, it overrides theirs. ``num_classes`` / ``dilation`` / ``nheads`` override single fields
    (DC5 and the head count leave no trace in the weights: for bare reference files they default to
    "dc5 in the file name" and 8). With ``reinit_heads``, a class head of another size is re-initialized.
    ``checkpoint``: ``read_checkpoint(path)`` when the caller has it already (saves reading the file twice).
    """
    ckpt = checkpoint if checkpoint is not None else read_checkpoint(path)
    if ckpt.kind == "demo":
        demo_config = ckpt.demo_config or infer_demo_config(ckpt.state_dict)
        if nheads is not None:
            demo_config = DemoConfig(**{**demo_config.to_dict(), "nheads": nheads})
        model: nn.Module = DETRdemo(demo_config)
        load_weights(model, ckpt.state_dict)
        return model.eval()
    target = config or ckpt.config
    if target is None:  # a bare state dict: the shapes tell most of the architecture
        guessed_dc5 = "dc5" in Path(path).name.lower()
        target = infer_config(ckpt.state_dict).with_backbone(dilation=guessed_dc5)
    if num_classes is not None:
        target = target.replace(num_classes=num_classes)
    if dilation is not None:
        target = target.with_backbone(dilation=dilation)
    if nheads is not None:
        target = target.with_transformer(nheads=nheads)
    model = build_detr(target)
    fresh = load_weights(model, ckpt.state_dict, reinit_heads=reinit_heads)
    if fresh:
        log.info("re-initialized %s (checkpoint shapes differ from the requested model)", ", ".join(fresh))
    return model.eval()


# --- writing ---------------------------------------------------------------------------------

def _model_kind_and_config(model: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(model, DETRdemo):
        return "demo", model.config.to_dict()
    if isinstance(model, DETR | DETRsegm):
        return "detr", model.config.to_dict()
    raise TypeError(f"cannot save a {type(model).__name__}: expected DETR, DETRsegm or DETRdemo")


def _contiguous(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def save_checkpoint(model: nn.Module, path: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Save ``model`` in our format: safetensors weights with the JSON config in the file's metadata.

    ``metadata`` (JSON-serializable values, e.g. ``class_names``) is stored alongside.
    """
    if getattr(model, "optimized_for_inference", False):
        raise ValueError("this model went through optimize_for_inference (norms folded into convolutions); "
                         "save the original model instead")
    kind, config = _model_kind_and_config(model)
    return save_state_dict(_contiguous(model.state_dict()), path, kind=kind, config=config, metadata=metadata)


def save_state_dict(
    state_dict: dict[str, Tensor], path: str | Path, *, kind: str, config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"our checkpoint format is a .safetensors file, got {path}")
    meta = {"format": FORMAT, "model": kind, "config": json.dumps(config)}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_file(_contiguous(state_dict), tmp, metadata=meta))
    return path


def save_reference_checkpoint(
    state_dict: dict[str, Tensor], path: str | Path, *, config: DetrConfig | None
) -> Path:
    """Write an our-layout state dict as the reference's ``{"model", "args"}`` file."""
    blob: dict[str, Any] = {"model": ours_to_reference(state_dict) if config is not None else state_dict}
    if config is not None:
        blob["args"] = argparse.Namespace(**to_reference_args(config))
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return Path(path)


def convert_checkpoint(src: str | Path, dst: str | Path, *, config: DetrConfig | None = None) -> Path:
    """Convert between the reference layout (.pth/.pt) and ours (.safetensors), losslessly.

    Tensors keep their dtype and values bit for bit; only names and the container change.
    """
    ckpt = read_checkpoint(src)
    dst = Path(dst)
    if ckpt.kind == "demo":
        demo = ckpt.demo_config or infer_demo_config(ckpt.state_dict)
        if dst.suffix == ".safetensors":
            return save_state_dict(ckpt.state_dict, dst, kind="demo", config=demo.to_dict())
        atomic_write(dst, lambda tmp: torch.save(_contiguous(ckpt.state_dict), tmp))
        return dst
    cfg = config or ckpt.config
    if cfg is None:
        cfg = infer_config(ckpt.state_dict).with_backbone(dilation="dc5" in Path(src).name.lower())
    if dst.suffix == ".safetensors":
        return save_state_dict(ckpt.state_dict, dst, kind="detr", config=cfg.to_dict())
    return save_reference_checkpoint(ckpt.state_dict, dst, config=cfg)
