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

    @property
    def per_group(self) -> int:
        return self.size // self.groups


@dataclass
class DenoisingOutputs:
    """What the decoder made of the denoising queries, every layer: ``pred_logits`` [L, B, N, K+1],
    ``pred_boxes`` [L, B, N, 4], with the truth to reconstruct (``SetCriterion`` scores it)."""

    pred_logits: Tensor
    pred_boxes: Tensor
    queries: DenoisingQueries


@dataclass(frozen=True)
class QueryLayout:
    """Where each kind of query sits on the decoder's query axis: ``[denoising | main | extra groups]``.

    Built once per forward from what that forward decodes; the model's slicing, its heads and the
    self-attention mask all read it, so no one re-derives the layout by arithmetic.
    """

    num_queries: int  # Q, the main group
    groups: int = 1  # matching groups (Group DETR), the main one included
    dn_groups: int = 0  # denoising groups in this forward
    dn_per_group: int = 0  # queries per denoising group: the batch's largest object count (may be 0)

    @property
    def dn_size(self) -> int:
        return self.dn_groups * self.dn_per_group

    @property
    def main(self) -> slice:
        return slice(self.dn_size, self.dn_size + self.num_queries)

    @property
    def sizes(self) -> list[int]:
        """Consecutive segment sizes along the axis: each denoising group, then each matching group."""
        return [self.dn_per_group] * self.dn_groups + [self.num_queries] * self.groups

    @property
    def has_training_queries(self) -> bool:
        return self.dn_groups > 0 or self.groups > 1

    def training_only(self, x: Tensor, dim: int) -> Tensor:
        """The training-only queries of ``x`` along ``dim``: the denoising ones, then the extra groups
        (the main group cut out), so that one head call scores them all."""
        before, after = x.narrow(dim, 0, self.dn_size), x.narrow(dim, self.main.stop, x.shape[dim] - self.main.stop)
        return torch.cat([before, after], dim=dim)

    @property
    def denoising_in_training_only(self) -> slice:
        return slice(0, self.dn_size)

    @property
    def groups_in_training_only(self) -> list[slice]:
        """Each extra group's slice of ``training_only``'s result."""
        q, dn = self.num_queries, self.dn_size
        return [slice(dn + g * q, dn + (g + 1) * q) for g in range(self.groups - 1)]


def noised_queries(
    targets: Sequence[Mapping[str, Tensor]], *, groups: int, num_classes: int, label_noise: float,
    box_noise: float, label_embedding: nn.Embedding,
) -> DenoisingQueries:
    """The denoising queries of a batch; none (N = 0) when no image has an object, so that every process of
    a distributed run still decodes, and reports, the same denoising terms."""
    counts = [len(t["labels"]) for t in targets]
    most = max(counts, default=0)
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
