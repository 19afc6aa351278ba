"""Feature levels as the encoder sees them: one typed bundle of flattened tokens and their geometry.

Batch-first: tokens, positions and the padding mask are [B, S, ...] with S = sum of h_l * w_l, the levels
concatenated one after the other, each flattened row-major — one level is exactly today's single map
``src.flatten(2).transpose(1, 2)`` of ``Transformer.encode`` ([B, HW, C]), not a separate path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def valid_ratios(padding_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """padding_mask [B, h, w] (True = padding, images padded at the bottom/right) -> [B, 2] (w, h): the
    fraction of each axis that holds the image, counted along the first row and the first column as
    Deformable DETR does."""
    _, h, w = padding_mask.shape
    valid_h = (~padding_mask[:, :, 0]).sum(1)
    valid_w = (~padding_mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.to(dtype) / w, valid_h.to(dtype) / h], -1)


@dataclass(frozen=True)
class FeatureLevels:
    """The encoder's input: L feature maps flattened into one token sequence.

    tokens [B, S, C]; positions [B, S, C] (sine positions plus the level's embedding, when given);
    padding_mask [B, S] (True = padding); valid_ratios [B, L, 2] (w, h) fraction of each level that is image;
    sizes: each level's (h, w) as Python ints (what the model splits and samples by, reading no tensor), and
    as Deformable DETR's tensors on demand: spatial_shapes [L, 2] int64, level_start_index [L] (first token of
    each level).
    """

    tokens: Tensor
    positions: Tensor
    padding_mask: Tensor
    valid_ratios: Tensor
    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def flatten(cls, maps: Sequence[Tensor], padding_masks: Sequence[Tensor], positions: Sequence[Tensor],
                level_embed: Tensor | None = None) -> FeatureLevels:
        """maps [B, C, h_l, w_l], padding_masks [B, h_l, w_l] (True = padding), positions [B, C, h_l, w_l]
        per level; level_embed [L, C] (added to every position of its level) or None."""
        if not (len(maps) == len(padding_masks) == len(positions)) or not maps:
            raise ValueError(f"{len(maps)} maps, {len(padding_masks)} masks, {len(positions)} positions")
        sizes = tuple((int(m.shape[-2]), int(m.shape[-1])) for m in maps)
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # [B, S, C]
        pos = [p.flatten(2).transpose(1, 2) for p in positions]  # [B, h*w, C] per level
        if level_embed is not None:
            pos = [p + level_embed[level] for level, p in enumerate(pos)]
        return cls(
            tokens=tokens,
            positions=torch.cat(pos, 1),
            padding_mask=torch.cat([m.flatten(1) for m in padding_masks], 1),  # [B, S]
            valid_ratios=torch.stack([valid_ratios(m, tokens.dtype) for m in padding_masks], 1),  # [B, L, 2]
            sizes=sizes,
        )

    @property
    def spatial_shapes(self) -> Tensor:
        """[L, 2] int64 (h, w) on the tokens' device."""
        return torch.tensor(self.sizes, dtype=torch.long, device=self.tokens.device)

    @property
    def level_start_index(self) -> Tensor:
        """[L] the first token of each level."""
        areas = self.spatial_shapes.prod(-1)
        return torch.cumsum(areas, 0) - areas

    def masks(self) -> list[Tensor]:
        """The levels' padding masks [B, h_l, w_l]."""
        b = self.padding_mask.shape[0]
        parts = self.padding_mask.split([h * w for h, w in self.sizes], 1)
        return [p.view(b, h, w) for p, (h, w) in zip(parts, self.sizes, strict=True)]

    @property
    def n_levels(self) -> int:
        return len(self.sizes)

    def split(self, sequence: Tensor) -> list[Tensor]:
        """[B, S, C] (e.g. the encoder's memory) -> the levels' maps [B, C, h_l, w_l]."""
        b, _, c = sequence.shape
        parts = sequence.split([h * w for h, w in self.sizes], 1)
        return [p.transpose(1, 2).reshape(b, c, h, w) for p, (h, w) in zip(parts, self.sizes, strict=True)]

    def encoder_reference_points(self) -> Tensor:
        """[B, S, L, 2] (x, y): each token's centre, normalized by its level's valid (unpadded) size, then
        scaled by every level's valid ratio — the point it looks around in each level (Deformable DETR's
        encoder). Padding tokens get points beyond 1, as there."""
        ratios = self.valid_ratios  # [B, L, 2] (w, h)
        points = []
        for level, (h, w) in enumerate(self.sizes):
            ys = torch.arange(h, dtype=ratios.dtype, device=ratios.device) + 0.5
            xs = torch.arange(w, dtype=ratios.dtype, device=ratios.device) + 0.5
            y = ys[None, :, None] / (ratios[:, level, 1, None, None] * h)  # [B, h, 1]
            x = xs[None, None, :] / (ratios[:, level, 0, None, None] * w)  # [B, 1, w]
            points.append(torch.stack(torch.broadcast_tensors(x, y), -1).flatten(1, 2))  # [B, h*w, 2]
        return torch.cat(points, 1)[:, :, None] * ratios[:, None]  # [B, S, L, 2]


def level_projections(stage_channels: Sequence[int], num_levels: int, hidden_dim: int) -> nn.ModuleList:
    """Deformable DETR's input projections: a 1x1 conv + GroupNorm(32) per backbone stage, then for each
    level beyond the stages a stride-2 3x3 conv + GroupNorm (the first reads the last stage, the others
    the previous level). Xavier-initialized convolutions, zero biases."""
    projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                   for c in stage_channels]
    cin = stage_channels[-1]
    for _ in range(num_levels - len(stage_channels)):
        projections.append(nn.Sequential(nn.Conv2d(cin, hidden_dim, kernel_size=3, stride=2, padding=1),
                                         nn.GroupNorm(32, hidden_dim)))
        cin = hidden_dim
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projections)
