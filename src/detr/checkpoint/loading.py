"""From weights to a model: ``load_checkpoint`` builds the model a checkpoint describes, ``load_weights``
copies weights into a model that exists, ``state_dict_for`` fits a detector's weights to a panoptic
model and back."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor, nn

from ..config import DetrConfig
from ..model import build_detr
from ..model.minimal import DemoConfig, DETRdemo
from ..model.segmentation import DETRsegm
from .formats import Checkpoint, CheckpointError
from .reading import read_checkpoint
from .reference import guess_config, infer_demo_config

log = logging.getLogger(__name__)


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


def state_dict_for(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` (our layout) with the ``detr.`` prefix ``model`` expects: a detector checkpoint seeds
    a panoptic model (``DETRsegm``, whose mask head it lacks), and a panoptic one a detector (its mask
    head, ``bbox_attention.*`` and ``mask_head.*``, is dropped)."""
    if isinstance(model, DETRsegm):
        if any(k.startswith("detr.") for k in state_dict):
            return state_dict
        return {f"detr.{k}": v for k, v in state_dict.items()}
    return {
        k.removeprefix("detr."): v for k, v in state_dict.items() if not k.startswith(("bbox_attention.", "mask_head."))
    }


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

    The model's ``input_config`` attribute is the checkpoint's ``InputConfig`` (the resize and
    normalization it was trained with; None when the file does not say: the reference's 800 / 1333).

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
        model.input_config = ckpt.input
        return model.eval()
    target = config or ckpt.config
    if target is None:  # a bare state dict: the shapes tell most of the architecture
        target = guess_config(ckpt.state_dict, path)
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
    model.input_config = ckpt.input
    return model.eval()
