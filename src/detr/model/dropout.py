"""Dropout with masks the CPU draws at a third of the cost.

On the CPU, ``torch.nn.functional.dropout`` draws its mask with ``bernoulli_``, which runs serially and
spends two 32-bit Mersenne-Twister draws per element (a double-precision uniform): ~6 ns an element on a
2-core AVX-512 machine, 60 masks and ~7% of a DETR-R50 training step in fp32, ~13% under bf16 autocast
(docs/performance.md). Here the CPU mask comes from float32 uniforms (24 random bits, as ``torch.rand``)
drawn by numpy's PCG64 (~1.8 ns an element against ``torch.rand``'s ~3), seeded by one draw from torch's
CPU generator: the element is kept when its uniform is at least ``p``, so the keep mask is Bernoulli(1 - p)
with P(keep) exact to 2**-24, the kept elements scaled by 1 / (1 - p), and ``torch.manual_seed`` and the
exact-resume RNG state decide every mask (within one numpy version: numpy, like torch, does not promise the same
stream across versions). Elsewhere (CUDA's fused kernels) and inside ``torch.compile`` (whose
generated code draws its own masks) ``F.dropout`` runs unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cpu_uniforms(shape: torch.Size | tuple[int, ...]) -> Tensor:
    """float32 uniforms on [0, 1) (24 random bits each) of ``shape``, a function of torch's CPU generator state."""
    seed = int(torch.empty((), dtype=torch.int64).random_())  # one draw: seeding follows torch's RNG state
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.random(math.prod(shape), dtype=np.float32)).view(shape)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the CPU mask drawn as float32 uniforms >= p."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not 0 < p < 1 or torch.compiler.is_compiling():
        # CUDA's fused kernel; under torch.compile the compiler's own generator (numpy cannot be traced);
        # F.dropout's own checks of p
        return F.dropout(x, p, training)
    # float32 draws whatever x's dtype (bf16 uniforms would have 8 bits of resolution), turned in place
    # into the scaled mask: 0 or 1 / (1 - p)
    mask = cpu_uniforms(x.shape).ge_(p).mul_(1.0 / (1.0 - p))
    return x * (mask if x.dtype == torch.float32 else mask.to(x.dtype))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same state dict, same ``p``) drawing its CPU masks with :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
