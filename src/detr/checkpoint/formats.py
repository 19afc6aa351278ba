"""What a checkpoint file holds: format sniffing, safe loading, and the errors that tell cases apart.

Errors (all ``CheckpointError``, a ``ValueError``): ``NotACheckpointError`` (an image, an HTML page,
random bytes...), ``CorruptCheckpointError`` (truncated or damaged), ``UnsafeCheckpointError`` (needs a
Python object beyond tensors, plain containers and ``argparse.Namespace``; names it) and
``OtherModelError`` (a readable checkpoint of another model: a classifier, YOLO, Deformable DETR...).

Nothing is ever unpickled beyond tensors, plain containers and ``argparse.Namespace``:
``torch.load(weights_only=True)`` refuses anything else, and we say so clearly.
"""

from __future__ import annotations

import argparse
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import DetrConfig
from ..model.minimal import DemoConfig
from ..preprocessing import InputConfig
from .downloads import hash_prefix_of, sha256_of

SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the requested model."""


class NotACheckpointError(CheckpointError):
    """The file is not a PyTorch checkpoint at all (an image, an HTML page, random bytes...)."""


class CorruptCheckpointError(CheckpointError):
    """The file looks like a checkpoint but is truncated or damaged."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs a Python object that loading with ``weights_only`` refuses to build."""

    def __init__(self, message: str, global_name: str | None) -> None:
        super().__init__(message)
        self.global_name = global_name


class OtherModelError(CheckpointError):
    """A readable checkpoint of another model type (a classifier, another detector...)."""


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
    # The resize and normalization the model was trained with (ours); None: the file does not say, and the
    # reference's 800 / 1333 with ImageNet statistics apply (the reference's and transformers' formats).
    input: InputConfig | None = None


# --- files -------------------------------------------------------------------------------------

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


def _container(path: Path) -> str:
    """"zip", "pickle" or "safetensors" for a file that can be a checkpoint; raises for one that cannot."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise NotACheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(512)
    kind = _sniff(head, size)
    if kind not in ("zip", "pickle", "safetensors"):
        raise NotACheckpointError(
            f"{path} is not a PyTorch checkpoint: its content is {kind} ({size} bytes, starting {head[:12]!r}); "
            "a checkpoint is a torch.save zip archive, a legacy torch.save pickle or a .safetensors file"
        )
    if kind == "zip":
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
    return kind


def _damage_hint(path: Path) -> str:
    prefix = hash_prefix_of(path.name)
    if prefix is None:
        return "Save or copy it again."
    actual = sha256_of(path)
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
    if _container(path) == "safetensors":  # safetensors content under another suffix: read it as such
        return read_safetensors(path)[0]
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, str(e)) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, struct.error) as e:
        raise CorruptCheckpointError(
            f"{path} is truncated or corrupt ({_first_line(str(e)) or type(e).__name__}). {_damage_hint(path)}"
        ) from None


def _unpickling_error(path: Path, text: str) -> CheckpointError:
    """What the refusal of ``weights_only`` loading means: an unsafe global (named), or damage."""
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = found.group(1)
        return UnsafeCheckpointError(
            f"refusing to load {path}: it needs the Python object {name}, which is not a tensor, a plain "
            f"container or argparse.Namespace{_known_owner(name)}. Unpickling it could run arbitrary code, so "
            "this loader never does; load the file where you trust it and save its state_dict() instead.",
            name,
        )
    if "truncated" in text or "EOF" in text:
        return CorruptCheckpointError(f"{path} is truncated or corrupt ({_first_line(text)}). "
                                      f"{_damage_hint(path)}")
    return UnsafeCheckpointError(
        f"refusing to load {path}: it contains pickled objects other than tensors and plain containers "
        f"({_first_line(text)}). Unpickling them could run arbitrary code, so this loader never does.",
        None,
    )


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


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's weights and metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


# --- state dicts -------------------------------------------------------------------------------

def state_dict_layout(state_dict: dict[str, Tensor]) -> str:
    """Whose names a state dict uses: "reference", "ours" or "demo"; raises for another model's."""
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
