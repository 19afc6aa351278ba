"""2-D positional encodings of a feature map: sine (fixed) and learned."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """The paper's fixed encoding, computed from the padding mask so padded pixels don't shift it.

    Each of y and x gets ``num_pos_feats`` channels: the normalized cumulative position (scaled to
    2*pi) divided by temperature**(2i/num_pos_feats), with sin/cos interleaved; y channels come first.
    ``offset`` is subtracted from the cumulative position before normalizing (Deformable DETR: 0.5, the
    pixel's centre; DETR: 0).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, padding_mask: Tensor) -> Tensor:
        """padding_mask [B, H, W] (True = padding) -> positions [B, 2*num_pos_feats, H, W]."""
        valid = (~padding_mask).float()
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            if self.offset:
                y, x = y - self.offset, x - self.offset
                y = y / (y[:, -1:, :] + self.offset + eps) * self.scale  # the last cumsum, before the offset
                x = x / (x[:, :, -1:] + self.offset + eps) * self.scale
            else:
                y = y / (y[:, -1:, :] + eps) * self.scale
                x = x / (x[:, :, -1:] + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=padding_mask.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x[..., None] / dim_t  # [B, H, W, F]
        pos_y = y[..., None] / dim_t
        # Even channels take sin, odd ones cos, interleaved: [sin0, cos1, sin2, cos3, ...].
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: 50 row and 50 column embeddings (feature maps up to 50x50)."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, padding_mask: Tensor) -> Tensor:
        """padding_mask [B, H, W] -> positions [B, 2*num_pos_feats, H, W] (x part first, then y)."""
        b, h, w = padding_mask.shape
        limit = self.row_embed.num_embeddings
        if h > limit or w > limit:
            raise ValueError(
                f"learned position embedding covers feature maps up to {limit}x{limit}, got {h}x{w}; "
                f"use smaller images or position_embedding='sine'"
            )
        x_emb = self.col_embed.weight[:w]  # [W, F]
        y_emb = self.row_embed.weight[:h]  # [H, F]
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)  # [H, W, 2F]
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)  # [B, 2F, H, W]


def build_position_encoding(kind: str, hidden_dim: int, *, offset: float = 0.0) -> nn.Module:
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, offset=offset)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {kind!r}")
