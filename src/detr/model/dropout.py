"""Dropout with masks the CPU draws at half the cost.

On the CPU, ``torch.nn.functional.dropout`` draws its mask with ``bernoulli_``, which runs serially and
spends two 32-bit Mersenne-Twister draws per element (a double-precision uniform): ~6 ns an element on a
2-core AVX-512 machine, 60 masks and ~7% of a DETR-R50 training step in fp32, ~13% under bf16 autocast
(docs/performance.md). Here the CPU draws one float32 uniform an element (``torch.rand``, one 32-bit draw)
and keeps the element when it is at least ``p``: the same Bernoulli(1 - p) keep mask and 1 / (1 - p)
scaling, with P(keep) exact to 2**-24, from the same seeded generator (``torch.manual_seed`` and the
exact-resume RNG state cover it). Elsewhere (CUDA's fused kernels) ``F.dropout`` runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the CPU mask drawn as float32 uniforms >= p."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not 0 < p < 1:
        return F.dropout(x, p, training)  # CUDA's fused kernel; F.dropout's own checks of p
    # float32 draws whatever x's dtype: bf16 uniforms would have 8 bits of resolution
    keep = torch.rand(x.shape, device=x.device) >= p
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same state dict, same ``p``) drawing its CPU masks with :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
