"""Denoising training (DN-DETR): noised ground truth as extra queries, and the attention mask that
keeps them from leaking the answer to the matching queries.

Each of ``groups`` denoising groups holds one query per ground-truth object of the image (padded to
the batch's largest count): its reference box is the true box with its centre moved and its size
scaled, its content the embedding of the true label, flipped to a random class with probability
``label_noise``. The decoder must reconstruct the true box and label: no matching needed, so the
boxes get a clean, dense gradient from the first step. Training only: inference never builds these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class DenoisingQueries:
    content: Tensor  # [B, N, C] label embeddings, N = groups * max objects per image
    reference: Tensor  # [B, N, 4] noised boxes (cxcywh)
    labels: Tensor  # [B, N] int64 true labels (padding: num_classes)
    boxes: Tensor  # [B, N, 4] true boxes
    valid: Tensor  # [B, N] bool, False on padding
    groups: int

    @property
    def size(self) -> int:
        return self.content.shape[1]


@dataclass
class DenoisingOutputs:
    """What the decoder made of the denoising queries, every layer: ``pred_logits`` [L, B, N, K+1],
    ``pred_boxes`` [L, B, N, 4], with the truth to reconstruct (``SetCriterion`` scores it)."""

    pred_logits: Tensor
    pred_boxes: Tensor
    queries: DenoisingQueries


def noised_queries(
    targets: Sequence[Mapping[str, Tensor]], *, groups: int, num_classes: int, label_noise: float,
    box_noise: float, label_embedding: nn.Embedding,
) -> DenoisingQueries | None:
    """The denoising queries of a batch, or None when no image has an object."""
    counts = [len(t["labels"]) for t in targets]
    most = max(counts, default=0)
    if most == 0:
        return None
    device = label_embedding.weight.device
    b, n = len(targets), groups * most
    labels = torch.full((b, n), num_classes, dtype=torch.int64, device=device)
    boxes = torch.full((b, n, 4), 0.5, device=device)  # padding: a harmless box, masked out of the loss
    valid = torch.zeros(b, n, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        for g in range(groups):
            slot = slice(g * most, g * most + counts[i])
            labels[i, slot] = t["labels"].to(device)
            boxes[i, slot] = t["boxes"].to(device, torch.float32)
            valid[i, slot] = True
    flip = (torch.rand(b, n, device=device) < label_noise) & valid
    noisy_labels = torch.where(flip, torch.randint_like(labels, num_classes), labels)
    # centres move up to box_noise * half the size, sizes scale by a factor in [1 - box_noise, 1 + box_noise]
    spread = torch.cat([boxes[..., 2:] / 2, boxes[..., 2:]], dim=-1)  # [B, N, 4]
    noisy = boxes + (torch.rand_like(boxes) * 2 - 1) * spread * box_noise
    noisy = noisy.clamp(1e-3, 1 - 1e-3)
    return DenoisingQueries(label_embedding(noisy_labels), noisy, labels, boxes, valid, groups)


def group_attention_mask(sizes: Sequence[int], dn_groups: int, device: torch.device) -> Tensor:
    """Self-attention mask [T, T] (True = may attend) over consecutive query segments of ``sizes``:
    the first ``dn_groups`` are denoising groups, the rest matching groups (Group DETR).

    A query sees its own segment; a denoising query also sees the first matching group (as in DN-DETR),
    while no matching query ever sees a denoising one: that would hand it the ground truth.
    """
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    allowed = segment[:, None] == segment[None, :]  # [T, T]
    if dn_groups:
        is_dn = segment < dn_groups
        first_match = segment == dn_groups
        allowed |= is_dn[:, None] & first_match[None, :]
    return allowed
