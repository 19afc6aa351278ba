"""Loading and saving weights: every format we read or write, and every key mapping, lives here.

    model = load_checkpoint("detr-r50")                 # a released name, a URL, a file or a directory
    ckpt = read_checkpoint(path)                        # weights in our layout + what the file says
    save_checkpoint(model, "model.safetensors")         # our format: safetensors + its JSON config
    convert_checkpoint("detr-r50.pth", "detr-r50.safetensors")

One module per concept:
- ``formats``: what a file holds (format sniffing, safe loading) and the errors that tell cases apart;
- ``ours``: our format (safetensors + JSON config; training checkpoints);
- ``reference``: the reference's layout (key names, ``args``) and the architecture a state dict's shapes tell;
- ``huggingface``: transformers' DETR (key names, config.json);
- ``reading``: ``read_checkpoint``, which tells them apart; ``loading``: from weights to a model;
- ``convert``: reference <-> ours; ``backbones``: ImageNet ResNet weights (torchvision, timm);
- ``downloads``: released weights by name, the cache folder, verified downloads.
"""

from __future__ import annotations

from .backbones import backbone_depth, read_backbone_weights
from .convert import convert_checkpoint
from .downloads import (
    DETR_HOST,
    NAMES,
    TORCHVISION_HOST,
    DownloadError,
    WeightsEntry,
    cache_dir,
    download,
    entry,
    hash_prefix_of,
    imagenet_name,
    is_url,
    locate,
    names_hint,
    resolve,
    source_url,
)
from .formats import (
    SAFE_GLOBALS,
    Checkpoint,
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    OtherModelError,
    UnsafeCheckpointError,
    safe_torch_load,
)
from .huggingface import hf_key_to_ours, hf_to_ours, read_hf_checkpoint
from .loading import load_checkpoint, load_weights, state_dict_for
from .ours import save_checkpoint, save_state_dict
from .reading import read_checkpoint
from .reference import (
    infer_config,
    infer_demo_config,
    ours_to_reference,
    reference_key_to_ours,
    reference_to_ours,
    save_reference_checkpoint,
)

__all__ = [
    "DETR_HOST",
    "NAMES",
    "SAFE_GLOBALS",
    "TORCHVISION_HOST",
    "Checkpoint",
    "CheckpointError",
    "CorruptCheckpointError",
    "DownloadError",
    "NotACheckpointError",
    "OtherModelError",
    "UnsafeCheckpointError",
    "WeightsEntry",
    "backbone_depth",
    "cache_dir",
    "convert_checkpoint",
    "download",
    "entry",
    "hash_prefix_of",
    "hf_key_to_ours",
    "hf_to_ours",
    "imagenet_name",
    "infer_config",
    "infer_demo_config",
    "is_url",
    "load_checkpoint",
    "load_weights",
    "locate",
    "names_hint",
    "ours_to_reference",
    "read_backbone_weights",
    "read_checkpoint",
    "read_hf_checkpoint",
    "reference_key_to_ours",
    "reference_to_ours",
    "resolve",
    "safe_torch_load",
    "save_checkpoint",
    "save_reference_checkpoint",
    "save_state_dict",
    "source_url",
    "state_dict_for",
]
