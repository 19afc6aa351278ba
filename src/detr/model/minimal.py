"""The paper's minimal demo model (its Colab notebook): ~50 lines of DETR for inference.

No padding mask, no auxiliary outputs; positions are learned row/column embeddings and the encoder
input is ``pos + 0.1 * features``. Parameter names match the notebook so its released
``detr_demo`` state dict loads unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .backbone import ResNet


@dataclass(frozen=True)
class DemoConfig:
    """The notebook model's sizes, named as torch.nn.Transformer names them."""

    num_classes: int = 91  # COCO's class ids (the head has num_classes + 1 outputs)
    hidden_dim: int = 256
    nheads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_queries: int = 100  # the notebook's learned query positions

    def to_dict(self) -> dict:
        return asdict(self)


class DETRdemo(nn.Module):
    """forward(images [B, 3, H, W]) -> {"pred_logits" [B, Q, K+1], "pred_boxes" [B, Q, 4]}.

    Feature maps must be at most 50x50 (images up to about 1600 px on a side).
    """

    def __init__(self, config: DemoConfig | None = None) -> None:
        super().__init__()
        c = config or DemoConfig()
        self.config = c
        # A plain torchvision-style ResNet-50 with trainable BatchNorm, as in the notebook.
        self.backbone = ResNet("resnet50", norm=nn.BatchNorm2d)
        self.conv = nn.Conv2d(2048, c.hidden_dim, 1)
        with warnings.catch_warnings():  # nn.Transformer warns that sequence-first layout skips nested tensors
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(c.hidden_dim, c.nheads, c.num_encoder_layers, c.num_decoder_layers)
        self.linear_class = nn.Linear(c.hidden_dim, c.num_classes + 1)
        self.linear_bbox = nn.Linear(c.hidden_dim, 4)
        self.query_pos = nn.Parameter(torch.rand(c.num_queries, c.hidden_dim))
        self.row_embed = nn.Parameter(torch.rand(50, c.hidden_dim // 2))
        self.col_embed = nn.Parameter(torch.rand(50, c.hidden_dim // 2))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dim() != 4:
            raise ValueError(f"DETRdemo takes a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
        h = self.conv(self.backbone(images))  # [B, C, H/32, W/32]
        b, _, height, width = h.shape
        if height > self.row_embed.shape[0] or width > self.col_embed.shape[0]:
            raise ValueError(f"feature map {height}x{width} exceeds the demo model's 50x50 positions")
        pos = torch.cat(
            [
                self.col_embed[:width][None].expand(height, -1, -1),  # [H, W, C/2]
                self.row_embed[:height][:, None].expand(-1, width, -1),  # [H, W, C/2]
            ],
            dim=-1,
        ).flatten(0, 1)[:, None]  # [HW, 1, C]
        src = pos + 0.1 * h.flatten(2).permute(2, 0, 1)  # [HW, B, C], sequence first as nn.Transformer wants
        tgt = self.query_pos[:, None].expand(-1, b, -1)  # [Q, B, C]
        decoded = self.transformer(src, tgt).transpose(0, 1)  # [B, Q, C]
        return {"pred_logits": self.linear_class(decoded), "pred_boxes": self.linear_bbox(decoded).sigmoid()}
