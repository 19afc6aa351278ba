"""Training memory: an estimate of a step's peak before the first step, and the peak each epoch reached.

Full attention over a feature map's N tokens keeps N x N weights per head, image and encoder layer for
the backward pass: at stride 8 and 800 px that alone is tens of GB. ``estimate_training_memory`` does not
model this by hand; it measures. The model runs forward on the training device at three small input
sizes while a saved-tensor hook counts what autograd keeps for the backward pass, and a quadratic in the
token count (attention: N^2; convolutions, feed-forwards, cross-attention: N) is fitted through them and
read at the training size. Whatever the configuration does (dropout or not, which attention kernel the
device picks, anchors, denoising, frozen stages) is in the measurement. Weights, gradients and the two
AdamW moments come from the parameter count; the backward pass briefly holds gradients as large as the
largest saved tensors on top.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

GIB = 1 << 30
# Probe feature maps of 3k x 4k tokens: small enough to run in about a second; not square, so that no
# convolution's activation map is mistaken for a tokens x tokens attention map.
PROBE_STEPS = (2, 3, 4)
TRANSIENT_MAPS = 6  # attention-map-sized gradients alive at once in the backward pass (measured)
HEADROOM = 0.9  # refuse above this share of the available memory: the allocator and the data loader need room


class MemoryEstimateError(ValueError):
    """A training configuration whose estimated peak memory exceeds what the device has."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of one training step, by part."""

    batch_size: int
    image_hw: tuple[int, int]
    tokens: int  # feature-map tokens of one image at image_hw
    state_bytes: int  # weights, gradients, AdamW moments
    activation_bytes: int  # what autograd keeps for the backward pass, whole batch
    attention_bytes: int  # of activation_bytes: the part that grows with tokens^2
    transient_bytes: int  # gradients alive at once in the backward pass

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes + self.transient_bytes

    def describe(self) -> str:
        h, w = self.image_hw
        return (f"{self.total_bytes / GIB:.1f} GiB for a batch of {self.batch_size} at {h}x{w} "
                f"({self.tokens} tokens an image; attention maps {self.attention_bytes / GIB:.1f} GiB, "
                f"other activations {(self.activation_bytes - self.attention_bytes) / GIB:.1f} GiB, "
                f"weights+gradients+AdamW {self.state_bytes / GIB:.2f} GiB)")


class _SavedBytes:
    """Bytes autograd saves for backward inside the context, each storage once, parameters excluded; and
    the largest token x token map (attention weights) and the largest other saved tensor."""

    def __init__(self, model: nn.Module, tokens: int) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.tokens = tokens
        self.seen: dict[int, int] = {}
        self.largest_map = self.largest_other = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
            if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == self.tokens:
                self.largest_map = max(self.largest_map, t.numel() * t.element_size())
            else:
                self.largest_other = max(self.largest_other, storage.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _probe(model: nn.Module, device: torch.device, grid: tuple[int, int], stride: int,
           amp: torch.dtype | None) -> _SavedBytes:
    """What one training forward of one image of a feature map of ``grid`` tokens saves for backward."""
    counter = _SavedBytes(model, grid[0] * grid[1])
    image = torch.rand(3, grid[0] * stride, grid[1] * stride, device=device)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), \
            torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model([image])
    del out
    return counter


def largest_batch_hw(max_size: int | None) -> tuple[int, int]:
    """The largest padded batch the training resize can make: every side of a resized image is at most
    the long-side cap, and a batch that mixes portrait and landscape images (or the crop branch's
    crops of either orientation) pads to cap x cap."""
    cap = 1333 if max_size is None else max_size  # the reference's cap, also ours in training
    return cap, cap


def estimate_training_memory(
    model: nn.Module, *, stride: int, batch_size: int, image_hw: tuple[int, int], device: torch.device | str,
    amp: torch.dtype | None = None,
) -> MemoryEstimate:
    """Estimated peak memory of one training step of ``model`` (on ``device``) at a batch of
    ``batch_size`` images padded to ``image_hw``, with AdamW."""
    device = torch.device(device)
    was_training = model.training
    model.train()
    # two-stage selection needs at least as many tokens as queries (of every group)
    config = getattr(model, "config", None)  # DETR and DETRsegm both carry it
    queries = config.num_queries * config.queries.groups if config is not None else 0
    first = max(PROBE_STEPS[0], math.ceil(math.sqrt(queries / 12)))
    grids = [(3 * k, 4 * k) for k in range(first, first + len(PROBE_STEPS))]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNG stays as seeded
            probes = [_probe(model, device, grid, stride, amp) for grid in grids]
    finally:
        model.train(was_training)
    tokens = np.array([h * w for h, w in grids], dtype=np.float64)
    saved = np.array([p.total for p in probes], dtype=np.float64)
    if any(p.largest_map for p in probes):  # saved(N) = a N^2 + b N + c, exact through the three probes
        a, b, c = np.polyfit(tokens, saved, 2)
    else:
        # No token x token map is kept (deformable attention, a fused attention kernel): a line. A parabola
        # through three small probes would read the levels' rounding of odd map sizes as N^2 growth and
        # extrapolate it to GiB at the training size.
        a, (b, c) = 0.0, np.polyfit(tokens, saved, 1)
    n = -(-image_hw[0] // stride) * -(-image_hw[1] // stride)
    quadratic = max(a, 0.0) * n * n
    per_image = quadratic + max(b, 0.0) * n + max(c, 0.0)
    # The backward pass holds the gradients of a layer's attention map (and the math kernel's temporaries)
    # while every earlier layer's saved tensors are alive; measured on the CPU: about 6 maps at once.
    last, scale = probes[-1], n / tokens[-1]
    transient = TRANSIENT_MAPS * last.largest_map * scale**2 + 2 * last.largest_other * scale
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return MemoryEstimate(
        batch_size=batch_size, image_hw=(int(image_hw[0]), int(image_hw[1])), tokens=n,
        state_bytes=4 * trainable + frozen,  # weight + gradient + exp_avg + exp_avg_sq
        activation_bytes=int(per_image * batch_size), attention_bytes=int(quadratic * batch_size),
        transient_bytes=int(transient * batch_size),
    )


def available_memory(device: torch.device | str) -> int | None:
    """Bytes this process may still allocate on ``device``: free GPU memory, or on the CPU the kernel's
    MemAvailable, lowered to the cgroup's limit when the process runs under one (None: not known here)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                candidates.append(int(text) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return min(candidates) if candidates else None


def ways_out(estimate: MemoryEstimate, stride: int, dropout: float = 0.0) -> list[str]:
    """What lowers the estimate, largest lever first."""
    h, w = estimate.image_hw
    out = []
    if estimate.attention_bytes > estimate.total_bytes / 2:
        if dropout > 0:
            out.append("--dropout 0: without attention dropout PyTorch's fused attention kernel keeps no "
                       "attention maps for the backward pass (the maps are most of this estimate)")
        out.append(f"smaller images: --train_scales/--max_size (attention grows with the 4th power of the side; "
                   f"{h}x{w} -> {h // 2}x{w // 2} divides it by 16)")
        if stride < 32:
            out.append(f"a coarser feature map: this backbone has stride {stride}; stride 32 has "
                       f"{(32 // stride) ** 4}x fewer attention entries")
        out.append("fewer encoder layers (--enc_layers): each keeps its own attention maps")
    if estimate.batch_size > 1:
        out.append(f"--batch_size {max(1, estimate.batch_size // 2)} (memory is proportional to the batch)")
    if estimate.attention_bytes > estimate.total_bytes / 2:
        out.append("--attention deformable (with --num_feature_levels 4 for small objects): a few sampling points "
                   "per token instead of an attention map, so memory grows linearly with the tokens")
    return out


def check_training_memory(estimate: MemoryEstimate, available: int, stride: int, *, processes: int = 1,
                          dropout: float = 0.0) -> None:
    """Raise MemoryEstimateError when ``processes`` copies of the step would not fit in ``available``."""
    need = estimate.total_bytes * processes
    if need <= HEADROOM * available:
        return
    lines = "\n".join(f"  - {w}" for w in ways_out(estimate, stride, dropout))
    who = f"{processes} processes on this device x " if processes > 1 else ""
    raise MemoryEstimateError(
        f"this training configuration does not fit in memory: a step needs about {who}{estimate.describe()}; "
        f"{available / GIB:.1f} GiB are available. Ways out:\n{lines}\n"
        "(--skip_memory_check trains anyway)"
    )


class PeakMemory:
    """The peak memory of the process between ``reset()`` and ``read()``: CUDA's allocator peak on a GPU;
    on Linux the resident set's high-water mark (reset through /proc/self/clear_refs), elsewhere the
    lifetime peak."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.resettable = self.device.type == "cuda"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
            self.resettable = True
        except OSError:
            self.resettable = False

    def read(self) -> int:
        """Peak bytes since the last reset."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def local_processes() -> int:
    """Training processes that share this machine's memory (torchrun's LOCAL_WORLD_SIZE, else 1)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_run_memory(model: nn.Module, stride: int, batch_size: int, max_size: int | None,
                     device: torch.device, amp: torch.dtype | None, dropout: float = 0.0) -> MemoryEstimate:
    """Estimate a training step at the largest batch ``detr train`` can see and refuse (MemoryEstimateError)
    what would not fit; where this device's free memory is not known, the estimate is only logged."""
    estimate = estimate_training_memory(model, stride=stride, batch_size=batch_size,
                                        image_hw=largest_batch_hw(max_size), device=device, amp=amp)
    available = available_memory(device)
    if available is None:
        log.info("memory: a step needs about %s; free memory unknown here, not checked", estimate.describe())
        return estimate
    # the weights are already resident: they count against the estimate, not against what is left
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    processes = 1 if device.type == "cuda" else local_processes()
    check_training_memory(estimate, available + resident, stride, processes=processes, dropout=dropout)
    log.info("memory: a step needs about %s; %.1f GiB available", estimate.describe(), (available + resident) / GIB)
    return estimate
