"""Anchor-box queries with iterative box refinement (DAB-DETR; Deformable DETR's box refinement).

Each query owns a reference box (cx, cy, w, h). Its positional query is an MLP of the box's sine
embedding, so a query "looks" where its box is; each decoder layer predicts a correction in logit
space, ``box_l = sigmoid(delta_l + logit(box_{l-1}))``, and the next layer starts from ``box_l``
detached (with ``look_forward_twice``, DINO, the ``box_{l-1}`` inside ``box_l`` keeps its gradient).
The initial boxes are learned (``anchors``) or, with two-stage selection, come from the encoder's
proposals; the content half of a query starts from zeros or from a learned embedding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .mlp import MLP, predict


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), with x clamped to [eps, 1 - eps] so that boxes on the image border stay finite."""
    x = x.clamp(min=eps, max=1 - eps)
    return torch.log(x / (1 - x))


def sine_box_embedding(boxes: Tensor, feats_per_coord: int, temperature: float = 10000.0, *,
                       y_first: bool = True) -> Tensor:
    """[..., 4] boxes (cx, cy, w, h in [0, 1]) -> [..., 4 * feats_per_coord] sine embedding.

    The frequencies and the sin/cos interleaving of the feature map's sine encoding, in the order
    (cy, cx, w, h), so that the first half lines up with the keys' (y, x) encoding; ``y_first=False``
    keeps (cx, cy, w, h) (Deformable DETR's two-stage proposals).
    """
    i = torch.arange(feats_per_coord, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / feats_per_coord)  # [F]
    coords = (boxes[..., [1, 0, 2, 3]] if y_first else boxes) * (2 * math.pi)  # y first: the feature map's order
    pos = coords[..., None] / dim_t  # [..., 4, F]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # [..., 4, F]
    return pos.flatten(-2)  # [..., 4F]


class AnchorQueries(nn.Module):
    """Reference boxes, the positional MLP and one box head per decoder layer.

    ``anchors``: [G*Q, 4] learned initial boxes (logit space), absent with two-stage selection;
    ``content``: [G*Q, C] learned content queries, absent when the content starts from zeros.
    Implements the decoder's ``BoxRefiner``: ``position(reference)`` and ``refine(layer, decoded, reference)``.
    """

    positions_from_boxes = True
    refines = True

    def __init__(
        self, *, num_queries: int, hidden_dim: int, num_layers: int, learned_anchors: bool, learned_content: bool,
        anchor_size: float, look_forward_twice: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.look_forward_twice = look_forward_twice
        self.position_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)  # 4 coords x C/2 features in
        self.box_heads = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers))
        for head in self.box_heads:  # each layer starts by keeping its reference box
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        self.anchors: nn.Parameter | None = None
        if learned_anchors:
            centres = torch.rand(num_queries, 2) * 0.9 + 0.05
            sizes = torch.full((num_queries, 2), anchor_size)
            self.anchors = nn.Parameter(inverse_sigmoid(torch.cat([centres, sizes], dim=1)))  # [Q, 4]
        self.content = nn.Embedding(num_queries, hidden_dim) if learned_content else None

    def initial(self, batch_size: int, num_queries: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """The first ``num_queries`` queries: content [B, Q, C] and learned reference boxes [B, Q, 4]
        (None with two-stage selection, where the encoder supplies them)."""
        if self.content is None:
            content = like.new_zeros(batch_size, num_queries, self.hidden_dim)
        else:
            content = self.content.weight[:num_queries][None].expand(batch_size, -1, -1).to(like.dtype)
        if self.anchors is None:
            return content, None
        reference = self.anchors[:num_queries].sigmoid()[None].expand(batch_size, -1, -1)  # [B, Q, 4]
        return content, reference

    def position(self, reference: Tensor) -> Tensor:
        """Positional queries [B, Q, C] of reference boxes [B, Q, 4], in fp32 under autocast: they carry each
        query's box into every attention of its layer, and bf16 would round them to 8 bits (10 real images,
        183 epochs, two seeds: fp32 positions took the bf16 training's AP gap from -0.044 to -0.024)."""
        return predict(self.position_head, sine_box_embedding(reference, self.hidden_dim // 2))  # from [B, Q, 2C]

    def refine(self, layer: int, decoded: Tensor, reference: Tensor) -> Tensor:
        """Layer ``layer``'s boxes [B, Q, 4] from its normalized output [B, Q, C] and its reference."""
        delta = predict(self.box_heads[layer], decoded)
        return (delta.float() + inverse_sigmoid(reference.float())).sigmoid()
