"""DETR: backbone -> 1x1 projection -> transformer -> class and box heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DetrConfig
from ..data.batch import ImageBatch, as_image_batch
from .backbone import Backbone
from .position import build_position_encoding
from .transformer import Transformer

Images = ImageBatch | Tensor | Sequence[Tensor]


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (the box head has 3 layers)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass
class DetrFeatures:
    """What DETR computes before its heads; the mask head reuses it instead of re-running DETR."""

    stages: list[Tensor]  # backbone outputs: the last stage, or stages 1-4 for the mask head
    masks: list[Tensor]  # padding mask at each stage's resolution, [B, h, w]
    projected: Tensor  # input_proj of the last stage, [B, C, h, w]
    decoded: Tensor  # every decoder layer's normalized output, [L, B, Q, C]
    memory: Tensor  # encoder output, [B, C, h, w]


class DETR(nn.Module):
    """The detector. forward(images) -> {"pred_logits" [B, Q, K+1], "pred_boxes" [B, Q, 4],
    "aux_outputs": [{"pred_logits", "pred_boxes"} per decoder layer but the last]}.

    ``images`` is an ImageBatch, a list of normalized CHW tensors (padded here) or a [B, 3, H, W]
    tensor. Boxes are normalized (cx, cy, w, h) relative to each image's unpadded size.
    """

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.transformer.hidden_dim
        self.backbone = Backbone(config.backbone, return_all_stages=config.masks)
        self.position = build_position_encoding(config.position_embedding, hidden)
        self.transformer = Transformer(config.transformer)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, hidden, kernel_size=1)
        self.query_embed = nn.Embedding(config.num_queries, hidden)
        self.class_embed = nn.Linear(hidden, config.num_classes + 1)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        self.aux_loss = config.loss.aux_loss

    @property
    def num_queries(self) -> int:
        return self.query_embed.num_embeddings

    def forward_features(self, images: Images) -> DetrFeatures:
        batch = as_image_batch(images)
        stages, masks = self.backbone(batch.pixels, batch.padding_mask)  # last: [B, 2048, H/32, W/32]
        pos = self.position(masks[-1]).to(stages[-1].dtype)  # [B, C, H/32, W/32]
        projected = self.input_proj(stages[-1])
        decoded, memory = self.transformer(projected, masks[-1], self.query_embed.weight, pos)
        return DetrFeatures(stages, masks, projected, decoded, memory)

    def heads(self, decoded: Tensor) -> dict[str, Any]:
        """decoded [L, B, Q, C] -> the output dict (final layer + auxiliary layers)."""
        logits = self.class_embed(decoded)  # [L, B, Q, K+1]
        boxes = self.bbox_embed(decoded).sigmoid()  # [L, B, Q, 4]
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out

    def forward(self, images: Images) -> dict[str, Any]:
        return self.heads(self.forward_features(images).decoded)


def build_detr(config: DetrConfig, *, freeze_detr: bool = False) -> nn.Module:
    """The model for ``config``: DETR, or DETR with the mask head when ``config.masks``."""
    if config.masks:
        from .segmentation import DETRsegm

        return DETRsegm(DETR(config), freeze_detr=freeze_detr)
    if freeze_detr:
        raise ValueError("freeze_detr only makes sense with masks=True (it trains the mask head alone)")
    return DETR(config)
