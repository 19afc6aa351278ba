"""DETR: backbone -> 1x1 projection -> transformer -> class and box heads."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DetrConfig
from ..structures import ImageBatch, as_image_batch
from .backbone import Backbone
from .denoising import DenoisingOutputs, DenoisingQueries, QueryLayout, group_attention_mask, noised_queries
from .mlp import MLP
from .position import build_position_encoding
from .proposals import PRIOR, EncoderProposals, Proposals
from .queries import AnchorQueries
from .transformer import Transformer

Images = ImageBatch | Tensor | Sequence[Tensor]
Targets = Sequence[Mapping[str, Tensor]]


@dataclass
class TrainingQueries:
    """What the training-only queries decoded: the extra Group DETR groups and the denoising queries.

    decoded / boxes: [L, B, T, C] / [L, B, T, 4] for the denoising queries followed by the extra groups
    (``layout.training_only``).
    """

    decoded: Tensor
    boxes: Tensor | None
    denoising: DenoisingQueries | None
    layout: QueryLayout


@dataclass
class DetrFeatures:
    """What DETR computes before its heads; the mask head reuses it instead of re-running DETR."""

    stages: list[Tensor]  # backbone outputs: the last stage, or stages 1-4 for the mask head
    masks: list[Tensor]  # padding mask at each stage's resolution, [B, h, w]
    projected: Tensor  # input_proj of the last stage, [B, C, h, w]
    decoded: Tensor  # every decoder layer's normalized output for the Q queries, [L, B, Q, C]
    memory: Tensor  # encoder output, [B, C, h, w]
    boxes: Tensor | None = None  # anchor-box queries: every layer's refined boxes, [L, B, Q, 4]
    proposals: Proposals | None = None  # two-stage: the encoder's proposals
    training_queries: TrainingQueries | None = None


class DETR(nn.Module):
    """The detector. forward(images) -> {"pred_logits" [B, Q, K+1], "pred_boxes" [B, Q, 4],
    "aux_outputs": [{"pred_logits", "pred_boxes"} per decoder layer but the last]}.

    ``images`` is an ImageBatch, a list of normalized CHW tensors (padded here) or a [B, 3, H, W]
    tensor. Boxes are normalized (cx, cy, w, h) relative to each image's unpadded size.

    The convergence options of ``config.queries`` add, in training, typed entries the criterion scores:
    ``enc_outputs`` (two-stage proposals, also at inference), ``group_outputs`` (Group DETR: a list of
    output dicts like the main one) and ``dn_outputs`` (denoising; ``forward(images, targets)``).
    """

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.config = config
        hidden, q = config.transformer.hidden_dim, config.queries
        self.backbone = Backbone(config.backbone, return_all_stages=config.masks)
        self.position = build_position_encoding(config.position_embedding, hidden)
        self.transformer = Transformer(config.transformer)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, hidden, kernel_size=1)
        all_queries = config.num_queries * q.groups  # inference uses the first num_queries
        self.query_embed: nn.Embedding | None = None
        self.anchor_queries: AnchorQueries | None = None
        if q.anchors:
            self.anchor_queries = AnchorQueries(
                num_queries=all_queries, hidden_dim=hidden, num_layers=config.transformer.dec_layers,
                learned_anchors=not q.two_stage, learned_content=q.two_stage and not q.encoder_content,
                anchor_size=q.anchor_size, look_forward_twice=q.look_forward_twice,
            )
        else:
            self.query_embed = nn.Embedding(all_queries, hidden)
        # K + 1 logits (softmax, the last is "no object"), or K sigmoid logits with focal loss
        self.class_embed = nn.Linear(hidden, config.num_classes + (0 if config.loss.focal else 1))
        if config.loss.focal:  # every query starts as background with probability 0.99 (RetinaNet's prior)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - PRIOR) / PRIOR))
        self.bbox_embed = None if q.anchors else MLP(hidden, hidden, 4, 3)  # anchors: per-layer heads
        self.proposals: EncoderProposals | None = None
        if q.two_stage:
            self.proposals = EncoderProposals(hidden_dim=hidden, num_classes=config.num_classes,
                                              cell_size=q.anchor_size, focal=config.loss.proposal_loss == "focal")
        self.label_embedding = nn.Embedding(config.num_classes + 1, hidden) if q.denoising_groups else None
        self.aux_loss = config.loss.aux_loss

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def forward_features(self, images: Images, targets: Targets | None = None) -> DetrFeatures:
        batch = as_image_batch(images)
        stages, masks = self.backbone(batch.pixels, batch.padding_mask)  # last: [B, 2048, H/32, W/32]
        pos = self.position(masks[-1]).to(stages[-1].dtype)  # [B, C, H/32, W/32]
        projected = self.input_proj(stages[-1])
        memory, pos_seq = self.transformer.encode(projected, masks[-1], pos)  # [B, HW, C]
        queries = self._queries(memory, masks[-1], targets)
        decoded, boxes = self.transformer.decoder(
            queries.content, memory, masks[-1].flatten(1), pos_seq, queries.position,
            self_attn_mask=queries.attn_mask, refiner=self.anchor_queries, reference=queries.reference,
        )
        b, c, h, w = projected.shape
        memory_map = memory.transpose(1, 2).reshape(b, c, h, w)
        features = DetrFeatures(stages, masks, projected, decoded, memory_map, boxes, queries.proposals)
        layout = queries.layout
        if layout.has_training_queries:  # the main group goes on; the others are scored apart
            rest = layout.training_only(decoded, dim=2)
            rest_boxes = None if boxes is None else layout.training_only(boxes, dim=2)
            features.decoded = decoded[:, :, layout.main]
            features.boxes = None if boxes is None else boxes[:, :, layout.main]
            features.training_queries = TrainingQueries(rest, rest_boxes, queries.denoising, layout)
        return features

    def _queries(self, memory: Tensor, padding_mask: Tensor, targets: Targets | None) -> DecoderQueries:
        """The decoder's queries: content [B, T, C], positional queries or reference boxes, and in
        training the extra groups and denoising queries with the self-attention mask isolating them."""
        q = self.config.queries
        b, num = memory.shape[0], self.num_queries
        groups = q.groups if self.training else 1
        if self.anchor_queries is None:
            assert self.query_embed is not None
            query_pos = self.query_embed.weight[: num * groups][None].expand(b, -1, -1)  # [B, G*Q, C]
            content: Tensor = torch.zeros_like(query_pos)  # the decoder starts from zeros
            position: Tensor | None = query_pos
            if self.config.transformer.query_pos == "input":  # ... or from the queries, added once
                content, position = query_pos, None
            layout = QueryLayout(num, groups)
            return DecoderQueries(content, position, None, self._group_mask(layout, memory), layout)
        content, reference = self.anchor_queries.initial(b, num * groups, memory)
        proposals = None
        if self.proposals is not None:
            proposals = self.proposals(memory, padding_mask)
            reference, selected = self.proposals.select(proposals, num)
            reference = reference.repeat(1, groups, 1)  # [B, G*Q, 4]
            if q.encoder_content:  # one group only (the config refuses more)
                content = selected.to(content.dtype)  # [B, Q, C]
        assert reference is not None
        denoising = None
        if self.training and self.label_embedding is not None and targets is not None:
            denoising = noised_queries(
                targets, groups=q.denoising_groups, num_classes=self.config.num_classes, label_noise=q.label_noise,
                box_noise=q.box_noise, label_embedding=self.label_embedding,
            )
        layout = QueryLayout(num, groups)
        if denoising is not None:
            content = torch.cat([denoising.content.to(content.dtype), content], dim=1)
            reference = torch.cat([denoising.reference, reference], dim=1)
            layout = QueryLayout(num, groups, denoising.groups, denoising.per_group)
        return DecoderQueries(content, None, reference, self._group_mask(layout, memory), layout, proposals,
                              denoising)

    @staticmethod
    def _group_mask(layout: QueryLayout, like: Tensor) -> Tensor | None:
        sizes = layout.sizes
        return group_attention_mask(sizes, layout.dn_groups, like.device) if len(sizes) > 1 else None

    def _layer_outputs(self, logits: Tensor, boxes: Tensor) -> dict[str, Any]:
        """[L, B, Q, K+1] logits and [L, B, Q, 4] boxes -> the last layer's, with the others as aux_outputs."""
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out

    def _boxes(self, decoded: Tensor, refined: Tensor | None) -> Tensor:
        if refined is not None:  # anchor-box queries refine their boxes layer by layer
            return refined
        assert self.bbox_embed is not None
        return self.bbox_embed(decoded).sigmoid()  # [L, B, Q, 4]

    def heads(self, features: DetrFeatures) -> dict[str, Any]:
        """Features -> the output dict (final layer + auxiliary layers, plus the training entries)."""
        out = self._layer_outputs(self.class_embed(features.decoded), self._boxes(features.decoded, features.boxes))
        if features.proposals is not None:
            out["enc_outputs"] = features.proposals
        extra = features.training_queries
        if extra is not None:
            logits = self.class_embed(extra.decoded)  # [L, B, T, K+1]
            boxes = self._boxes(extra.decoded, extra.boxes)
            layout = extra.layout
            if extra.denoising is not None:
                dn = layout.denoising_in_training_only
                out["dn_outputs"] = DenoisingOutputs(logits[:, :, dn], boxes[:, :, dn], extra.denoising)
            out["group_outputs"] = [self._layer_outputs(logits[:, :, g], boxes[:, :, g])
                                    for g in layout.groups_in_training_only]
        return out

    def forward(self, images: Images, targets: Targets | None = None) -> dict[str, Any]:
        """``targets`` (training, with denoising): the batch's targets, to build the denoising queries."""
        return self.heads(self.forward_features(images, targets))


@dataclass
class DecoderQueries:
    content: Tensor  # [B, T, C]
    position: Tensor | None  # [B, T, C] positional queries of learned queries (None: anchors, or at the input)
    reference: Tensor | None  # [B, T, 4] reference boxes of anchor-box queries
    attn_mask: Tensor | None  # [T, T] True = may attend; None when every query may see every other
    layout: QueryLayout
    proposals: Proposals | None = None
    denoising: DenoisingQueries | None = None
