"""Two-stage query selection (Deformable DETR's two-stage, DINO's mixed query selection).

Between encoder and decoder: every encoder token proposes a box, relative to its own cell, and a
class; the top-Q tokens by objectness give the decoder its reference boxes (detached: the decoder
refines them, the proposal heads learn from their own set loss). The content queries stay learned,
or (``encoder_content``) are the selected tokens' projected features, detached (RT-DETR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .mlp import MLP, predict
from .queries import inverse_sigmoid

PRIOR = 0.01  # initial object probability of a focal-trained proposal


@dataclass
class Proposals:
    """One proposal per encoder token: ``pred_logits`` [B, HW, K+1], ``pred_boxes`` [B, HW, 4] (cxcywh),
    ``valid`` [B, HW] (False on padding: never selected, never matched). Supervised like a decoder
    layer's output (``SetCriterion`` reads it from ``outputs["enc_outputs"]``)."""

    pred_logits: Tensor
    pred_boxes: Tensor
    valid: Tensor
    hidden: Tensor  # [B, HW, C] the projected tokens the heads read
    class_agnostic: bool = False  # trained as one class (class 0) whatever the objects' labels (Deformable DETR)

    def __getitem__(self, key: str) -> Tensor:  # the matcher reads outputs["pred_logits"] / ["pred_boxes"]
        return getattr(self, key)


def cell_boxes(padding_mask: Tensor, size: float) -> Tensor:
    """The box of every feature cell, [B, h*w, 4] cxcywh normalized by each image's unpadded size:
    centred on the cell, ``size`` wide and high. padding_mask: [B, h, w]."""
    valid = ~padding_mask
    valid_h = valid[:, :, 0].sum(1, keepdim=True).float()  # [B, 1]
    valid_w = valid[:, 0, :].sum(1, keepdim=True).float()
    h, w = padding_mask.shape[-2:]
    cy = (torch.arange(h, device=padding_mask.device, dtype=torch.float32) + 0.5)[None] / valid_h  # [B, h]
    cx = (torch.arange(w, device=padding_mask.device, dtype=torch.float32) + 0.5)[None] / valid_w  # [B, w]
    cy = cy[:, :, None].expand(-1, -1, w)  # [B, h, w]
    cx = cx[:, None, :].expand(-1, h, -1)
    wh = torch.full_like(cx, size)
    return torch.stack([cx, cy, wh, wh], dim=-1).flatten(1, 2)  # [B, h*w, 4]


class EncoderProposals(nn.Module):
    """Class and box heads on the encoder's tokens, and the top-Q selection.

    ``focal``: the class head is trained with sigmoid focal loss over the K classes (objectness = the
    largest class probability); otherwise with DETR's cross-entropy (objectness = 1 - p(no object)).
    """

    def __init__(self, *, hidden_dim: int, num_classes: int, cell_size: float, focal: bool) -> None:
        super().__init__()
        self.project = nn.Linear(hidden_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        if focal:  # every token starts as background with probability 0.99 (RetinaNet's prior): otherwise
            # hundreds of background tokens x K classes at p = 0.5 swamp the first steps' loss
            nn.init.constant_(self.class_head.bias, -math.log((1 - PRIOR) / PRIOR))
        self.box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(self.box_head.layers[-1].weight)  # each proposal starts as its cell's box
        nn.init.zeros_(self.box_head.layers[-1].bias)
        self.cell_size = cell_size
        self.focal = focal

    def forward(self, memory: Tensor, padding_masks: Sequence[Tensor]) -> Proposals:
        """memory [B, S, C] (the levels' tokens one after the other), padding_masks [B, h_l, w_l] per level
        -> one proposal per token; a cell's box doubles in size at every coarser level."""
        hidden = self.norm(self.project(memory))
        cells = torch.cat([cell_boxes(m, self.cell_size * 2**level) for level, m in enumerate(padding_masks)], 1)
        boxes = (predict(self.box_head, hidden).float() + inverse_sigmoid(cells)).sigmoid()  # [B, S, 4]
        valid = ~torch.cat([m.flatten(1) for m in padding_masks], 1)
        return Proposals(predict(self.class_head, hidden), boxes, valid, hidden)

    def objectness(self, proposals: Proposals) -> Tensor:
        """[B, HW] scores whose order ranks the proposals (padding: -inf)."""
        logits = proposals.pred_logits.detach().float()
        if self.focal:
            score = logits[..., :-1].max(-1).values  # sigmoid is monotonic: rank by the logit
        else:
            score = -logits.log_softmax(-1)[..., -1]  # ranks as 1 - p(no object)
        return score.masked_fill(~proposals.valid, float("-inf"))

    def select(self, proposals: Proposals, count: int) -> tuple[Tensor, Tensor]:
        """The boxes [B, count, 4] and projected features [B, count, C] of the ``count`` most object-like
        proposals, detached."""
        score = self.objectness(proposals)
        if score.shape[1] < count:
            raise ValueError(f"two-stage selection needs at least {count} encoder tokens (num_queries), the "
                             f"feature map has {score.shape[1]}: use larger images or fewer queries")
        top = score.topk(count, dim=1).indices[..., None]  # [B, count, 1]
        boxes = torch.gather(proposals.pred_boxes.detach(), 1, top.expand(-1, -1, 4))
        hidden = proposals.hidden.detach()
        return boxes, torch.gather(hidden, 1, top.expand(-1, -1, hidden.shape[-1]))
