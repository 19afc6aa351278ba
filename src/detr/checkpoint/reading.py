"""``read_checkpoint``: any supported file, directory, released name or URL -> weights in our layout.

Recognized inputs:
- the reference's training/released files: ``{"model": state_dict, "args": Namespace, ...}``;
- a bare state dict in the reference layout (``backbone.0.body.*``), ours, or the demo model's;
- our format: a ``.safetensors`` file whose metadata holds the JSON config (or a directory with
  ``model.safetensors`` + ``config.json``);
- our training checkpoints (``{"model": ..., "config": {...}, "optimizer": ...}``);
- a Hugging Face transformers ``save_pretrained`` directory of ``DetrForObjectDetection`` or
  ``DetrForSegmentation`` with transformers' own ResNet (``use_timm_backbone=False``), or of
  ``DeformableDetrForObjectDetection`` (either backbone layout).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from .downloads import locate
from .formats import Checkpoint, OtherModelError, read_safetensors, safe_torch_load, state_dict_layout
from .huggingface import is_hf_directory, read_hf_checkpoint
from .huggingface_deformable import HF_DEFORMABLE_MODEL_TYPE, read_hf_deformable_checkpoint
from .ours import FORMAT, from_metadata, from_training_checkpoint, read_directory
from .reference import config_from_args, infer_demo_config, reference_to_ours


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint into our layout without building a model.

    ``path``: a file or directory, a released name (``detr-r50``, see ``detr.checkpoint.NAMES``) or a URL;
    names and URLs are downloaded into the cache on first use.
    """
    path = locate(path)
    if path.is_dir():
        if is_hf_directory(path):  # transformers' save_pretrained: config.json names a model_type
            hf = json.loads((path / "config.json").read_text())
            if hf.get("model_type") == HF_DEFORMABLE_MODEL_TYPE:
                return read_hf_deformable_checkpoint(path, hf)
            return read_hf_checkpoint(path)
        return read_directory(path)
    if path.suffix == ".safetensors":
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        sd, meta = read_safetensors(path)
        if meta.get("format") == FORMAT:
            return from_metadata(sd, meta, path)
        return _from_state_dict(sd, path)
    return _read_torch_file(path)


def _read_torch_file(path: Path) -> Checkpoint:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise OtherModelError(f"{path}: a checkpoint holds a dict of weights; this file holds a {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        if "config" in obj:  # our training checkpoint
            return from_training_checkpoint(obj, path)
        ckpt = _from_state_dict(obj["model"], path)
        if ckpt.kind == "detr" and "args" in obj:  # the reference's training or released file
            ckpt.config = config_from_args(obj["args"], ckpt.state_dict)
            ckpt.source = "reference"
        ckpt.extra = {k: v for k, v in obj.items() if k != "model"}
        return ckpt
    if all(isinstance(v, Tensor) for v in obj.values()):
        return _from_state_dict(obj, path)
    raise OtherModelError(f"{path}: unrecognized checkpoint (top-level keys {sorted(map(str, obj))[:8]})")


def _from_state_dict(sd: dict[str, Tensor], path: Path) -> Checkpoint:
    """A bare state dict in the reference's layout, ours or the demo model's."""
    try:
        layout = state_dict_layout(sd)
    except OtherModelError as e:
        raise OtherModelError(f"{path}: {e}") from None
    if layout == "demo":
        return Checkpoint(dict(sd), "demo", "demo", demo_config=infer_demo_config(sd))
    ours = reference_to_ours(sd) if layout == "reference" else dict(sd)
    return Checkpoint(ours, "detr", f"{layout}-bare")
