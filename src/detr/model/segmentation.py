"""The panoptic variant: an attention-map mask head on top of a (possibly frozen) DETR.

Each query's decoder output attends over the encoder memory (multi-head, one map per head); the
maps, concatenated with the projected backbone features, go through an FPN-like convolutional
head that upsamples with backbone stages 3, 2, 1 to stride 4, giving one mask logit map per query.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detr import DETR, Images, Targets


class MHAttentionMap(nn.Module):
    """Softmax attention weights (no values) of queries over a feature map, per head.

    forward(q [B, Q, C], k [B, C, h, w], padding_mask [B, h, w]) -> [B, Q, heads, h, w]
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        for lin in (self.q_linear, self.k_linear):
            nn.init.zeros_(lin.bias)
            nn.init.xavier_uniform_(lin.weight)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        b, _, h, w = k.shape
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)  # the linear, per pixel
        qh = q.view(b, q.shape[1], self.num_heads, -1)  # [B, Q, n, d]
        kh = k.view(b, self.num_heads, -1, h, w)  # [B, n, d, h, w]
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if padding_mask is not None:
            weights = weights.masked_fill(padding_mask[:, None, None], float("-inf"))
        weights = weights.flatten(2).softmax(-1).view(weights.shape)  # softmax jointly over heads and pixels
        return self.dropout(weights)


def _repeat_per_query(x: Tensor, num_queries: int) -> Tensor:
    """[B, C, h, w] -> [B*Q, C, h, w], each image repeated for each of its queries."""
    return x[:, None].expand(-1, num_queries, -1, -1, -1).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """FPN-like head: 3x3 convs with GroupNorm(8), upsampled by nearest interpolation and added
    to 1x1-adapted backbone stages 3, 2 and 1."""

    def __init__(self, dim: int, fpn_dims: list[int], context_dim: int) -> None:
        super().__init__()
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, inter[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(8, inter[1])
        self.lay3 = nn.Conv2d(inter[1], inter[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(8, inter[2])
        self.lay4 = nn.Conv2d(inter[2], inter[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(8, inter[3])
        self.lay5 = nn.Conv2d(inter[3], inter[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(8, inter[4])
        self.out_lay = nn.Conv2d(inter[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, attention: Tensor, fpns: list[Tensor]) -> Tensor:
        """x [B, C, h, w], attention [B, Q, heads, h, w], fpns: stages 3, 2, 1 -> [B*Q, 1, H/4, W/4]."""
        num_queries = attention.shape[1]
        adapted = [adapter(fpn) for adapter, fpn in zip(self._adapters(), fpns, strict=True)]
        laterals = [_repeat_per_query(a, num_queries) for a in adapted]
        x = torch.cat([_repeat_per_query(x, num_queries), attention.flatten(0, 1)], dim=1)  # [B*Q, C+n, h, w]
        return self._head(x, laterals)

    def forward_rows(self, x: Tensor, attention_rows: Tensor, fpns: list[Tensor], image: Tensor) -> Tensor:
        """The masks of M chosen queries only: attention_rows [M, heads, h, w] are their maps and
        image [M] (int64) their images' indices into x [B, C, h, w] and fpns -> [M, 1, H/4, W/4].
        Each row is computed as in forward (GroupNorm and the convolutions are per row)."""
        laterals = [adapter(fpn)[image] for adapter, fpn in zip(self._adapters(), fpns, strict=True)]
        return self._head(torch.cat([x[image], attention_rows], dim=1), laterals)

    def _adapters(self) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
        return self.adapter1, self.adapter2, self.adapter3

    def _head(self, x: Tensor, laterals: list[Tensor]) -> Tensor:
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        steps = ((self.lay3, self.gn3), (self.lay4, self.gn4), (self.lay5, self.gn5))
        for lateral, (conv, norm) in zip(laterals, steps, strict=True):
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return self.out_lay(x)


class QueryMasks:
    """Mask logits computed on demand, for the (image, query) pairs asked for.

    Training supervises only the matched queries' masks, a few of the Q per image; computing the head for
    those alone gives the same losses and gradients for a fraction of the work.
    ``query_masks(batch, query)`` with int64 index tensors [M] -> mask logits [M, H/4, W/4].
    """

    def __init__(self, head: MaskHeadSmallConv, features: Tensor, attention: Tensor, fpns: list[Tensor]) -> None:
        self.head = head
        self.features = features
        self.attention = attention  # [B, Q, heads, h, w]
        self.fpns = fpns
        # The criterion calls this outside the model's autocast region (--amp): the head runs under the
        # autocast state of the forward that made it, as the full computation would.
        self.device_type = features.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type)

    def __call__(self, batch: Tensor, query: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast):
            rows = self.head.forward_rows(self.features, self.attention[batch, query], self.fpns, batch)
        return rows[:, 0]


class DETRsegm(nn.Module):
    """DETR plus the mask head. forward adds "pred_masks" [B, Q, H/4, W/4] (mask logits).

    With ``masks_on_demand`` (set by ``detr train``), forward in training mode adds "mask_logits_of" (a
    ``QueryMasks``) instead, so that the criterion computes the matched queries' masks only.
    """

    def __init__(self, detr: DETR, *, freeze_detr: bool = False, masks_on_demand: bool = False) -> None:
        super().__init__()
        self.detr = detr
        self.config = detr.config
        self.masks_on_demand = masks_on_demand
        if freeze_detr:  # the paper's second stage: only the mask head trains
            for p in self.detr.parameters():
                p.requires_grad_(False)
        hidden = detr.config.transformer.hidden_dim
        nheads = detr.config.transformer.nheads
        channels = detr.backbone.body.stage_channels  # [256, 512, 1024, 2048] for ResNet-50
        self.bbox_attention = MHAttentionMap(hidden, hidden, nheads, dropout=0.0)
        self.mask_head = MaskHeadSmallConv(hidden + nheads, channels[2::-1], hidden)

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    def forward(self, images: Images, targets: Targets | None = None) -> dict[str, Any]:
        f = self.detr.forward_features(images, targets)
        out = self.detr.heads(f)
        attention = self.bbox_attention(f.decoded[-1], f.memory, f.masks[-1])  # [B, Q, n, h, w]
        fpns = [f.stages[2], f.stages[1], f.stages[0]]
        if self.training and self.masks_on_demand:
            out["mask_logits_of"] = QueryMasks(self.mask_head, f.projected, attention, fpns)
            return out
        masks = self.mask_head(f.projected, attention, fpns)
        b, q = attention.shape[:2]
        out["pred_masks"] = masks.view(b, q, masks.shape[-2], masks.shape[-1])  # [B, Q, H/4, W/4]
        return out
