"""DETR: backbone -> 1x1 projection -> transformer -> class and box heads."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DetrConfig
from ..structures import ImageBatch, as_image_batch, downsample_mask
from .backbone import Backbone
from .deformable_queries import DeformableQueries
from .denoising import DenoisingOutputs, DenoisingQueries, QueryLayout, group_attention_mask, noised_queries
from .levels import FeatureLevels, level_projections
from .mlp import MLP, predict
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

    stages: list[Tensor]  # backbone outputs: the last stage, or stages 1-4 for the mask head, or the levels' stages
    masks: list[Tensor]  # padding mask at each stage's resolution, [B, h, w]
    projected: Tensor  # input_proj of the last stage, [B, C, h, w] (several levels: the finest level's)
    decoded: Tensor  # every decoder layer's normalized output for the Q queries, [L, B, Q, C]
    memory: Tensor  # encoder output, [B, C, h, w] (several levels: the finest level's)
    boxes: Tensor | None = None  # anchor-box queries: every layer's refined boxes, [L, B, Q, 4]
    proposals: Proposals | None = None  # two-stage: the encoder's proposals
    training_queries: TrainingQueries | None = None
    levels: FeatureLevels | None = None  # deformable attention: the flattened levels the encoder read


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
        self.deformable = config.transformer.deformable
        levels = config.num_feature_levels
        stages = 4 if config.masks else max(1, min(levels - 1, 3 if self.deformable else 1))
        if config.backbone.name == "small":
            stages = min(stages, len(config.backbone.widths))
        self.backbone = Backbone(config.backbone, num_outputs=stages)
        # Deformable DETR's sine encoding measures from pixel centres (offset 0.5)
        offset = 0.5 if self.deformable else 0.0
        self.position = build_position_encoding(config.position_embedding, hidden, offset=offset)
        self.transformer = Transformer(config.transformer, levels)
        self.input_proj: nn.Module
        self.level_embed: nn.Parameter | None = None
        if self.deformable:  # 1x1 conv + GroupNorm per stage, stride-2 3x3 convs for the levels beyond
            self.input_proj = level_projections(self.backbone.output_channels, levels, hidden)
            self.level_embed = nn.Parameter(torch.randn(levels, hidden))
        else:
            self.input_proj = nn.Conv2d(self.backbone.num_channels, hidden, kernel_size=1)
        all_queries = config.num_queries * q.groups  # inference uses the first num_queries
        self.query_embed: nn.Embedding | None = None
        self.anchor_queries: AnchorQueries | None = None
        self.deformable_queries: DeformableQueries | None = None
        focal = config.loss.focal
        if q.anchors:
            self.anchor_queries = AnchorQueries(
                num_queries=all_queries, hidden_dim=hidden, num_layers=config.transformer.dec_layers,
                learned_anchors=not q.two_stage, learned_content=q.two_stage and not q.encoder_content,
                anchor_size=q.anchor_size, look_forward_twice=q.look_forward_twice,
            )
        elif self.deformable:
            self.deformable_queries = DeformableQueries(
                num_queries=all_queries, hidden_dim=hidden, num_layers=config.transformer.dec_layers,
                num_classes=config.num_classes, box_refine=q.box_refine, two_stage=q.two_stage, class_prior=PRIOR,
            )
        else:
            self.query_embed = nn.Embedding(all_queries, hidden)
        # K + 1 logits (softmax, the last is "no object"), or K sigmoid logits with focal loss; one head per
        # decoder layer with Deformable DETR's box refinement
        num_logits = config.num_classes + (0 if focal else 1)
        heads = config.transformer.dec_layers if q.box_refine else 1
        class_heads = [nn.Linear(hidden, num_logits) for _ in range(heads)]
        if focal:  # every query starts as background with probability 0.99 (RetinaNet's prior)
            for head in class_heads:
                nn.init.constant_(head.bias, -math.log((1 - PRIOR) / PRIOR))
        self.class_embed: nn.Module = class_heads[0] if heads == 1 else nn.ModuleList(class_heads)
        # anchors and Deformable DETR's queries: per-layer box heads relative to the reference
        self.bbox_embed = None if q.anchors or self.deformable_queries is not None else MLP(hidden, hidden, 4, 3)
        self.proposals: EncoderProposals | None = None
        if q.two_stage and q.anchors:
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
        levels = None
        if self.deformable:
            levels = self._levels(stages, batch.padding_mask)
            memory = self.transformer.encode_levels(levels)  # [B, S, C]
            projected = levels.split(levels.tokens)[0]
            padding, pos_seq, level_masks = levels.padding_mask, None, levels.masks()
        else:
            pos = self.position(masks[-1]).to(stages[-1].dtype)  # [B, C, H/32, W/32]
            projected = self.input_proj(stages[-1])
            memory, pos_seq = self.transformer.encode(projected, masks[-1], pos)  # [B, HW, C]
            padding, level_masks = masks[-1].flatten(1), [masks[-1]]
        queries = self._queries(memory, level_masks, targets, levels)
        decoded, boxes = self.transformer.decoder(
            queries.content, memory, padding, pos_seq, queries.position,
            self_attn_mask=queries.attn_mask, refiner=self.anchor_queries or self.deformable_queries,
            reference=queries.reference, levels=levels,
        )
        b, c, h, w = projected.shape
        memory_map = memory[:, : h * w].transpose(1, 2).reshape(b, c, h, w)  # the first (finest) level
        features = DetrFeatures(stages, masks, projected, decoded, memory_map, boxes, queries.proposals, levels=levels)
        layout = queries.layout
        if layout.has_training_queries:  # the main group goes on; the others are scored apart
            rest = layout.training_only(decoded, dim=2)
            rest_boxes = None if boxes is None else layout.training_only(boxes, dim=2)
            features.decoded = decoded[:, :, layout.main]
            features.boxes = None if boxes is None else boxes[:, :, layout.main]
            features.training_queries = TrainingQueries(rest, rest_boxes, queries.denoising, layout)
        return features

    def _levels(self, stages: list[Tensor], padding_mask: Tensor) -> FeatureLevels:
        """Backbone stages -> the projected feature levels (extra levels convolved from the last stage),
        with their padding masks and sine positions plus the level embedding."""
        assert isinstance(self.input_proj, nn.ModuleList) and self.level_embed is not None
        maps = [proj(x) for proj, x in zip(self.input_proj, stages, strict=False)]
        for proj in list(self.input_proj)[len(stages):]:  # stride-2 convs: from the last stage, then chained
            maps.append(proj(stages[-1] if len(maps) == len(stages) else maps[-1]))
        level_masks = [downsample_mask(padding_mask, m.shape[-2:]) for m in maps]
        positions = [self.position(m).to(x.dtype) for m, x in zip(level_masks, maps, strict=True)]
        return FeatureLevels.flatten(maps, level_masks, positions, self.level_embed)

    def _queries(self, memory: Tensor, padding_masks: list[Tensor], targets: Targets | None,
                 levels: FeatureLevels | None) -> DecoderQueries:
        """The decoder's queries: content [B, T, C], positional queries or reference boxes, and in
        training the extra groups and denoising queries with the self-attention mask isolating them."""
        q = self.config.queries
        b, num = memory.shape[0], self.num_queries
        groups = q.groups if self.training else 1
        if self.deformable_queries is not None:
            return self._deformable_queries(self.deformable_queries, memory, levels, groups)
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
            proposals = self.proposals(memory, padding_masks)
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

    def _deformable_queries(self, queries: DeformableQueries, memory: Tensor, levels: FeatureLevels | None,
                            groups: int) -> DecoderQueries:
        assert levels is not None
        b, num = memory.shape[0], self.num_queries
        layout = QueryLayout(num, groups)
        mask = self._group_mask(layout, memory)
        if queries.two_stage:
            selected = queries.propose(memory, levels, num)
            content, position = selected.content.repeat(1, groups, 1), selected.position.repeat(1, groups, 1)
            return DecoderQueries(content, position, selected.reference.repeat(1, groups, 1), mask, layout,
                                  selected.proposals)
        content, position, reference = queries.initial(b, num * groups)
        return DecoderQueries(content.to(memory.dtype), position.to(memory.dtype), reference, mask, layout)

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

    def _classify(self, decoded: Tensor) -> Tensor:
        """[L, B, T, C] -> [L, B, T, K(+1)]: one shared class head, or one per decoder layer."""
        if isinstance(self.class_embed, nn.ModuleList):
            return torch.stack([predict(head, x) for head, x in zip(self.class_embed, decoded, strict=True)])
        return predict(self.class_embed, decoded)

    def _boxes(self, decoded: Tensor, refined: Tensor | None) -> Tensor:
        if refined is not None:  # anchor-box queries refine their boxes layer by layer
            return refined
        assert self.bbox_embed is not None
        return predict(self.bbox_embed, decoded).sigmoid()  # [L, B, Q, 4]

    def heads(self, features: DetrFeatures) -> dict[str, Any]:
        """Features -> the output dict (final layer + auxiliary layers, plus the training entries)."""
        out = self._layer_outputs(self._classify(features.decoded), self._boxes(features.decoded, features.boxes))
        if features.proposals is not None:
            out["enc_outputs"] = features.proposals
        extra = features.training_queries
        if extra is not None:
            logits = self._classify(extra.decoded)  # [L, B, T, K+1]
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
    reference: Tensor | None  # [B, T, 4] reference boxes of anchor-box queries ([B, T, 2] points: Deformable DETR)
    attn_mask: Tensor | None  # [T, T] True = may attend; None when every query may see every other
    layout: QueryLayout
    proposals: Proposals | None = None
    denoising: DenoisingQueries | None = None
