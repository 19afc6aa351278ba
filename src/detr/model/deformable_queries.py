"""Deformable DETR's queries: learned positions with reference points, box refinement, two-stage.

Each query is a learned pair (position, content); its reference point is ``sigmoid(Linear(position))``
(cx, cy), where its cross-attention samples. Its box is predicted relative to that point:
``sigmoid(head(h) + [logit(cx), logit(cy), 0, 0])``. With ``box_refine`` every decoder layer has its own
box head and the box it predicts becomes the next layer's reference (4-d from then on), detached; the
positional queries stay the learned ones (anchor-box queries recompute them from the box instead).

Two-stage (needs ``box_refine``): every encoder token of every level proposes a box relative to its cell
(``0.05 * 2**level`` wide, as Deformable DETR), scored by one more class head; the top-Q tokens by the
first class's logit (the proposals are trained class-agnostic, all as class 0) give the reference boxes,
and the sine embedding of those boxes, projected, gives the positions and contents of the queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .levels import FeatureLevels
from .mlp import MLP, predict
from .proposals import Proposals, cell_boxes
from .queries import inverse_sigmoid, sine_box_embedding

PROPOSAL_CELL = 0.05  # width and height of a stride-8 cell's proposal; doubled at every coarser level


def init_box_head(head: MLP, *, size_bias: float) -> None:
    """Deformable DETR's box head start: no offset from the reference, sizes at sigmoid(size_bias)."""
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    nn.init.constant_(head.layers[-1].bias[2:], size_bias)


@dataclass
class SelectedProposals:
    proposals: Proposals  # every token's proposal, for the criterion (class-agnostic)
    reference: Tensor  # [B, Q, 4] the selected boxes, detached
    position: Tensor  # [B, Q, C]
    content: Tensor  # [B, Q, C]


class DeformableQueries(nn.Module):
    """Reference points, the box heads and, with two-stage, the proposal heads of Deformable DETR.

    Implements the decoder's ``BoxRefiner`` (``refine(layer, decoded, reference)``); the positional
    queries stay fixed across layers.
    """

    look_forward_twice = False
    positions_from_boxes = False

    def __init__(self, *, num_queries: int, hidden_dim: int, num_layers: int, num_classes: int,
                 box_refine: bool, two_stage: bool, class_prior: float) -> None:
        super().__init__()
        self.hidden_dim, self.refines, self.two_stage = hidden_dim, box_refine, two_stage
        heads = num_layers if box_refine else 1
        self.box_heads = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(heads))
        for head in self.box_heads:  # two-stage proposals start at their cells' sizes, learned points at 0.12
            init_box_head(head, size_bias=0.0 if two_stage else -2.0)
        self.query_embed: nn.Embedding | None = None
        self.reference_points: nn.Linear | None = None
        if two_stage:
            self.enc_output = nn.Linear(hidden_dim, hidden_dim)
            self.enc_output_norm = nn.LayerNorm(hidden_dim)
            self.pos_trans = nn.Linear(2 * hidden_dim, 2 * hidden_dim)
            self.pos_trans_norm = nn.LayerNorm(2 * hidden_dim)
            self.proposal_class = nn.Linear(hidden_dim, num_classes)
            nn.init.constant_(self.proposal_class.bias, -math.log((1 - class_prior) / class_prior))
            self.proposal_box = MLP(hidden_dim, hidden_dim, 4, 3)
            init_box_head(self.proposal_box, size_bias=0.0)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * hidden_dim)  # (position, content) per query
            self.reference_points = nn.Linear(hidden_dim, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)

    def initial(self, batch_size: int, num_queries: int) -> tuple[Tensor, Tensor, Tensor]:
        """Learned queries: content [B, Q, C], positions [B, Q, C], reference points [B, Q, 2]."""
        assert self.query_embed is not None and self.reference_points is not None
        position, content = self.query_embed.weight[:num_queries].split(self.hidden_dim, dim=1)  # [Q, C] each
        position = position[None].expand(batch_size, -1, -1)
        content = content[None].expand(batch_size, -1, -1)
        return content, position, self.reference_points(position).sigmoid()

    def propose(self, memory: Tensor, levels: FeatureLevels, count: int) -> SelectedProposals:
        """Two-stage: memory [B, S, C] -> one proposal per token and the ``count`` selected queries."""
        masks = levels.masks()
        cells = torch.cat([cell_boxes(m, PROPOSAL_CELL * 2**level) for level, m in enumerate(masks)], 1)  # [B, S, 4]
        cells = cells.to(memory.dtype)
        inside = ((cells > 0.01) & (cells < 0.99)).all(-1)  # [B, S]: cells near the border propose nothing
        padding = levels.padding_mask
        cell_logits = torch.log(cells / (1 - cells))
        cell_logits = cell_logits.masked_fill(padding[..., None] | ~inside[..., None], float("inf"))
        tokens = memory.masked_fill(padding[..., None] | ~inside[..., None], 0.0)
        hidden = self.enc_output_norm(self.enc_output(tokens))
        logits = predict(self.proposal_class, hidden)  # [B, S, K]
        box_logits = predict(self.proposal_box, hidden) + cell_logits  # [B, S, 4]
        if logits.shape[1] < count:
            raise ValueError(f"two-stage selection needs at least {count} encoder tokens (num_queries), the "
                             f"feature levels have {logits.shape[1]}: use larger images or fewer queries")
        # ranked by the first class: the proposals are trained class-agnostic, every object as class 0
        top = logits[..., 0].topk(count, dim=1).indices  # [B, Q]
        selected = torch.gather(box_logits, 1, top[..., None].expand(-1, -1, 4)).detach()  # [B, Q, 4]
        reference = selected.sigmoid()
        embedded = sine_box_embedding(reference, self.hidden_dim // 2, y_first=False)  # [B, Q, 2C]
        position, content = self.pos_trans_norm(self.pos_trans(embedded.to(memory.dtype))).split(self.hidden_dim, -1)
        proposals = Proposals(logits, box_logits.sigmoid(), ~padding & inside, hidden, class_agnostic=True)
        return SelectedProposals(proposals, reference, position, content)

    def position(self, reference: Tensor) -> Tensor:
        raise NotImplementedError("Deformable DETR's positional queries do not follow the boxes")

    def refine(self, layer: int, decoded: Tensor, reference: Tensor) -> Tensor:
        """Layer ``layer``'s boxes [B, Q, 4] from its output [B, Q, C] and its reference [B, Q, 2 or 4]."""
        delta = predict(self.box_heads[layer if self.refines else 0], decoded).float()
        logit = inverse_sigmoid(reference.float())
        if logit.shape[-1] == 2:  # a reference point: the head predicts the size itself
            logit = torch.cat([logit, torch.zeros_like(logit)], -1)
        return (delta + logit).sigmoid()
