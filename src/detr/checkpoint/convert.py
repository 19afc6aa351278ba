"""``convert_checkpoint``: the reference's ``.pth`` <-> our ``.safetensors``, losslessly."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DetrConfig
from ..files import atomic_write
from .ours import contiguous, save_state_dict
from .reading import read_checkpoint
from .reference import guess_config, infer_demo_config, save_reference_checkpoint


def convert_checkpoint(src: str | Path, dst: str | Path, *, config: DetrConfig | None = None) -> Path:
    """Convert between the reference layout (.pth/.pt) and ours (.safetensors), losslessly.

    Tensors keep their dtype and values bit for bit; only names and the container change. Our format keeps
    the input transform a checkpoint of ours stores; the reference's has no place for it (its 800 / 1333).
    """
    ckpt = read_checkpoint(src)
    dst = Path(dst)
    if ckpt.kind == "demo":
        demo = ckpt.demo_config or infer_demo_config(ckpt.state_dict)
        if dst.suffix == ".safetensors":
            return save_state_dict(ckpt.state_dict, dst, kind="demo", config=demo.to_dict(), input=ckpt.input)
        atomic_write(dst, lambda tmp: torch.save(contiguous(ckpt.state_dict), tmp))
        return dst
    cfg = config or ckpt.config
    if cfg is None:
        cfg = guess_config(ckpt.state_dict, src)
    if dst.suffix == ".safetensors":
        return save_state_dict(ckpt.state_dict, dst, kind="detr", config=cfg.to_dict(), input=ckpt.input)
    return save_reference_checkpoint(ckpt.state_dict, dst, config=cfg)
