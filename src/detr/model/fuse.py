"""Inference-only rewrites that keep the outputs (to float rounding) and save time.

``optimize_for_inference(model)`` returns a frozen copy of a DETR (or panoptic DETR) with

- every frozen BatchNorm folded into the convolution before it (one pass over each activation less,
  and no temporary per norm): conv(x) * scale + shift == conv'(x) with W' = W * scale, b' = shift;
- convolution weights in channels-last layout, which oneDNN runs without reordering activations
  around every convolution.

``compile_for_inference(model)`` adds ``torch.compile`` (Inductor, weights frozen into the graph):
another 5-13% on a 2-core CPU for R50 at 800x1066 (measured), at the price of a compilation per new input shape
(about a minute on 2 cores, twice more until shapes become dynamic) and a C++ compiler on the machine;
worth it for long evaluations, not for a few images.

Trained GroupNorm trunks keep their norms (a GroupNorm depends on its input's statistics). The copy
cannot be trained, and its state dict no longer has the reference layout (no ``bn`` entries, conv
biases), so it is never what ``save_checkpoint`` writes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .backbone import BasicBlock, Bottleneck, FrozenBatchNorm2d, ResNet


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    """Make ``conv`` compute norm(conv(x)); ``norm`` must then be skipped (replaced by Identity)."""
    scale, shift = norm.scale_and_shift()  # [C_out] each
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))  # [C_out, C_in, k, k]
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.bias = nn.Parameter(bias.clone(), requires_grad=False)


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d of the ResNet trunks in ``model`` into its convolution, in place.

    Returns the number of norms folded.
    """
    folded = 0
    for module in list(model.modules()):
        pairs: list[tuple[nn.Module, str, str]] = []
        if isinstance(module, (ResNet, BasicBlock, Bottleneck)):
            pairs = [(module, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        elif isinstance(module, nn.Sequential) and len(module) == 2:  # a downsample: conv, norm
            pairs = [(module, "0", "1")]
        for owner, conv_name, norm_name in pairs:
            conv, norm = getattr(owner, conv_name, None), getattr(owner, norm_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d):
                fold_conv_norm(conv, norm)
                setattr(owner, norm_name, nn.Identity())
                folded += 1
    return folded


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """A frozen, eval-mode copy of ``model`` with frozen norms folded and channels-last convolutions."""
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    fold_frozen_batchnorm(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    fast.optimized_for_inference = True  # save_checkpoint refuses such a model
    return fast


def compile_for_inference(model: nn.Module) -> nn.Module:
    """``torch.compile`` an :func:`optimize_for_inference` model with frozen weights (Inductor's
    ``freezing``: constants folded, convolution weights pre-packed). Compiles lazily, at the first call
    with a new input shape."""
    return torch.compile(model, options={"freezing": True})
