"""Our format: safetensors weights with the JSON config in the file's metadata.

A ``.safetensors`` file whose metadata holds ``{"format": "detr", "model": "detr"|"demo", "config":
json, "input": json, ...}`` (further entries, e.g. ``class_names``, are JSON values); or a directory with
``model.safetensors`` + ``config.json`` (the same fields). Our training checkpoints are torch files
``{"model": state_dict, "config": {...}, "input": {...}, "optimizer": ..., ...}``. ``input`` is the
``InputConfig`` the model was trained and validated with (older files without it read as the reference's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import DetrConfig
from ..files import atomic_write, read_json
from ..model.detr import DETR
from ..model.minimal import DemoConfig, DETRdemo
from ..model.segmentation import DETRsegm
from ..preprocessing import InputConfig
from .formats import Checkpoint, CheckpointError, read_safetensors

FORMAT = "detr"


# --- writing -----------------------------------------------------------------------------------

def _model_kind_and_config(model: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(model, DETRdemo):
        return "demo", model.config.to_dict()
    if isinstance(model, DETR | DETRsegm):
        return "detr", model.config.to_dict()
    raise TypeError(f"cannot save a {type(model).__name__}: expected DETR, DETRsegm or DETRdemo")


def contiguous(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors: what safetensors (and a portable torch.save) can write."""
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def save_checkpoint(model: nn.Module, path: str | Path, *, metadata: dict[str, Any] | None = None,
                    input: InputConfig | None = None) -> Path:
    """Save ``model`` in our format: safetensors weights with the JSON config in the file's metadata.

    ``input``: the resize and normalization the model was trained with (default: the model's
    ``input_config`` attribute, which ``load_checkpoint`` sets, so a loaded model saves what it read).
    ``metadata`` (JSON-serializable values, e.g. ``class_names``) is stored alongside.
    """
    if getattr(model, "optimized_for_inference", False):
        raise ValueError("this model went through optimize_for_inference (norms folded into convolutions); "
                         "save the original model instead")
    kind, config = _model_kind_and_config(model)
    input = input if input is not None else getattr(model, "input_config", None)
    return save_state_dict(contiguous(model.state_dict()), path, kind=kind, config=config, metadata=metadata,
                           input=input)


def save_state_dict(
    state_dict: dict[str, Tensor], path: str | Path, *, kind: str, config: dict[str, Any],
    metadata: dict[str, Any] | None = None, input: InputConfig | None = None,
) -> Path:
    """Write ``state_dict`` (our layout) in our format, with the model ``kind`` ("detr" or "demo") and its
    ``config`` dict; ``metadata`` and ``input`` as in ``save_checkpoint``."""
    from safetensors.torch import save_file  # here: tests replace it to simulate a failing write

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"our checkpoint format is a .safetensors file, got {path}")
    meta = {"format": FORMAT, "model": kind, "config": json.dumps(config)}
    if input is not None:
        meta["input"] = json.dumps(input.to_dict())
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_file(contiguous(state_dict), tmp, metadata=meta))
    return path


# --- reading -----------------------------------------------------------------------------------

def config_from_metadata(meta: dict[str, Any], path: Path) -> tuple[str, DetrConfig | None, DemoConfig | None]:
    """(kind, config, demo config) from our metadata's "model" and "config" entries."""
    try:
        config = json.loads(meta["config"]) if isinstance(meta["config"], str) else meta["config"]
        kind = meta.get("model", "detr")
        if kind == "demo":
            return kind, None, DemoConfig(**config)
        return kind, DetrConfig.from_dict(config), None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid 'config' in checkpoint metadata: {e}") from None


def input_from_metadata(meta: dict[str, Any], path: Path) -> InputConfig | None:
    """The stored ``InputConfig`` (a dict, or its JSON text in safetensors metadata); None when absent."""
    if meta.get("input") is None:
        return None
    try:
        value = json.loads(meta["input"]) if isinstance(meta["input"], str) else meta["input"]
        return InputConfig.from_dict(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid 'input' in checkpoint metadata: {e}") from None


def from_metadata(state_dict: dict[str, Tensor], meta: dict[str, str], path: Path) -> Checkpoint:
    """The checkpoint of our ``.safetensors`` file, from its weights and metadata."""
    kind, config, demo = config_from_metadata(meta, path)
    extra_meta = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "config", "model", "input")}
    return Checkpoint(state_dict, kind, "ours", config, demo, metadata=extra_meta,
                      input=input_from_metadata(meta, path))


def read_directory(path: Path) -> Checkpoint:
    """Our checkpoint directory: ``model.safetensors`` + ``config.json``."""
    weights, cfg_file = path / "model.safetensors", path / "config.json"
    if not weights.exists() or not cfg_file.exists():
        raise CheckpointError(f"{path}: a checkpoint directory needs model.safetensors and config.json")
    try:
        meta = read_json(cfg_file, "checkpoint config")
    except ValueError as e:  # names the file, line and column
        raise CheckpointError(str(e)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: not a detr config (no \"format\": \"detr\")")
    sd, _ = read_safetensors(weights)
    kind, config, demo = config_from_metadata(meta, cfg_file)
    return Checkpoint(sd, kind, "ours", config, demo, metadata=meta, input=input_from_metadata(meta, cfg_file))


def from_training_checkpoint(obj: dict[str, Any], path: Path) -> Checkpoint:
    """Our training checkpoint (``{"model", "config", "optimizer", ...}``); the rest goes to ``extra``."""
    kind, config, demo = config_from_metadata(obj, path)
    extra = {k: v for k, v in obj.items() if k not in ("model", "config", "input")}
    return Checkpoint(obj["model"], kind, "training", config, demo, extra=extra, input=input_from_metadata(obj, path))
