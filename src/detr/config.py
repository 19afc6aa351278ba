"""Typed configuration of a DETR model, its matcher and its loss.

Frozen dataclasses, one per concept, plus the presets of the paper and a tiny CPU preset. The CLI
parses flags into these and stops there; ``detr.checkpoint.reference`` translates them
to and from the ``args`` namespace stored in the reference implementation's checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = (*RESNETS, "small")
POSITION_EMBEDDINGS = ("sine", "learned")
BACKBONE_NORMS = ("frozen_bn", "group_norm")
# Where positional encodings enter the transformer (the paper's Table 3): added to queries and keys of
# every attention (DETR), once to the input only, or not at all.
SPATIAL_POSITIONS = ("attention", "input", "none")
QUERY_POSITIONS = ("attention", "input")
# Attention of the encoder and of the decoder's cross-attention: DETR's full attention over every token,
# or multi-scale deformable attention (Deformable DETR): a few learned sampling points per head and level.
ATTENTIONS = ("full", "deformable")
PROPOSAL_LOSSES = ("focal", "ce")
CLASS_LOSSES = ("ce", "focal")
PRESETS = ("r50", "r50-dc5", "r101", "r101-dc5", "panoptic", "shapes-small", "shapes-fast", "deformable-r50",
           "deformable-r50-refine", "deformable-r50-two-stage")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet50"
    dilation: bool = False  # DC5: dilation instead of stride in the last stage
    trainable: bool = True  # False freezes every stage (the reference's lr_backbone <= 0)
    # "frozen_bn" (the reference: ImageNet statistics, fixed) or "group_norm" (32 groups, trained):
    # a backbone trained from scratch has no statistics to freeze and needs a normalization that learns.
    norm: str = "frozen_bn"
    # Leading stages that never train: 1 = stem + layer1 (the reference), 0 = everything trains.
    frozen_stages: int = 1
    # name="small" only: a plain GroupNorm CNN for training from scratch. Stage i halves the resolution
    # with a strided 3x3 convolution to widths[i] channels, then adds depths[i] more 3x3 convolutions;
    # the output stride is 2 ** len(widths) (3, 4, 5 stages: stride 8, 16, 32).
    widths: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if self.name not in BACKBONES:
            raise ValueError(f"backbone.name must be one of {BACKBONES}, got {self.name!r}")
        if self.norm not in BACKBONE_NORMS:
            raise ValueError(f"backbone.norm must be one of {BACKBONE_NORMS}, got {self.norm!r}")
        if not 0 <= self.frozen_stages <= 4:
            raise ValueError(f"backbone.frozen_stages must be in 0..4, got {self.frozen_stages}")
        # JSON round trips turn tuples into lists
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if self.name == "small":
            if self.norm != "group_norm" or self.frozen_stages != 0 or self.dilation:
                raise ValueError(
                    "backbone 'small' trains from scratch with GroupNorm: it needs norm='group_norm', "
                    "frozen_stages=0 and no dilation (flags: --backbone_norm group_norm --frozen_stages 0)"
                )
            if len(self.widths) not in (3, 4, 5) or len(self.depths) != len(self.widths):
                raise ValueError(
                    f"backbone 'small': widths and depths need 3, 4 or 5 entries each (output stride 8, 16, 32), "
                    f"got widths {self.widths} and depths {self.depths}"
                )
            if any(w < 4 for w in self.widths) or any(d < 0 for d in self.depths):
                raise ValueError(f"backbone 'small': widths must be >= 4 and depths >= 0, got {self}")

    @property
    def output_stride(self) -> int:
        if self.name == "small":
            return 2 ** len(self.widths)
        return 16 if self.dilation else 32


@dataclass(frozen=True)
class TransformerConfig:
    hidden_dim: int = 256  # d_model: token, query and position width
    nheads: int = 8  # attention heads (hidden_dim must divide by it)
    enc_layers: int = 6  # encoder layers over the feature map's tokens (0: none)
    dec_layers: int = 6  # decoder layers; each one's output is supervised with aux_loss
    dim_feedforward: int = 2048  # hidden width of every layer's feed-forward network
    dropout: float = 0.1  # in attention and feed-forward; 0 for small from-scratch models
    pre_norm: bool = False  # LayerNorm before each sub-layer (the paper's models: after)
    # The paper's ablations (Sec. 4.2). dim_feedforward = 0 removes the feed-forward networks (Table 4).
    spatial_pos: str = "attention"  # image positions: "attention" (every attention), "input" (once), "none"
    query_pos: str = "attention"  # learned query positions: "attention" (every decoder layer) or "input" (once)
    # "full" (DETR) or "deformable" (Deformable DETR: encoder self-attention and decoder cross-attention
    # sample n_points locations per head and feature level around a reference point; the decoder's
    # self-attention stays full). Deformable DETR's layers have no final decoder norm (post-norm).
    attention: str = "full"
    n_points: int = 4  # deformable attention: sampling points per head and level

    def __post_init__(self) -> None:
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        if self.dec_layers < 1:
            raise ValueError("dec_layers must be >= 1")
        if self.dim_feedforward < 0:
            raise ValueError(f"dim_feedforward must be >= 0 (0: no feed-forward network), got {self.dim_feedforward}")
        if self.spatial_pos not in SPATIAL_POSITIONS:
            raise ValueError(f"spatial_pos must be one of {SPATIAL_POSITIONS}, got {self.spatial_pos!r}")
        if self.query_pos not in QUERY_POSITIONS:
            raise ValueError(f"query_pos must be one of {QUERY_POSITIONS}, got {self.query_pos!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {self.n_points}")
        if self.attention == "deformable" and (self.spatial_pos != "attention" or self.query_pos != "attention"):
            raise ValueError("deformable attention adds positions to its queries in every layer: it needs "
                             "spatial_pos='attention' and query_pos='attention' (drop --spatial_pos/--query_pos)")

    @property
    def deformable(self) -> bool:
        return self.attention == "deformable"


@dataclass(frozen=True)
class QueryConfig:
    """What the decoder's queries are, and the extra query sets that only training sees.

    Vanilla DETR (all defaults): Q learned positional embeddings, content starting from zeros, boxes
    predicted from scratch by every decoder layer.
    """

    # Anchor-box queries (DAB-DETR) with iterative refinement (Deformable DETR): each query owns a
    # reference box; its positional query is an MLP of the box's sine embedding, and each decoder layer
    # predicts a delta in logit space: box_l = sigmoid(delta_l + logit(box_{l-1})), detached between layers.
    anchors: bool = False
    # Two-stage query selection (Deformable DETR two-stage, DINO's mixed selection): a class and a box head
    # on every encoder token; the top-Q proposals by objectness become the reference boxes (content stays
    # learned). Needs anchors.
    two_stage: bool = False
    # Two-stage: the content queries are the selected tokens' projected encoder features, detached (RT-DETR;
    # Deformable DETR's two-stage also derives them from the proposals) instead of learned embeddings.
    encoder_content: bool = False
    # Look forward twice (DINO): layer l's box loss also trains layer l-1's box head, through the undetached
    # box_{l-1} inside box_l = sigmoid(delta_l + logit(box_{l-1})); the next layer's reference stays detached,
    # so the forward pass is unchanged. Needs anchors.
    look_forward_twice: bool = False
    # Initial width and height (normalized) of the learned anchors and of each encoder cell's proposal.
    anchor_size: float = 0.1
    # Denoising training (DN-DETR): noised ground-truth boxes and labels as extra query groups, isolated by
    # an attention mask, trained to reconstruct the truth. Training only; needs anchors.
    denoising_groups: int = 0
    label_noise: float = 0.5  # fraction of denoising labels flipped to a random class
    box_noise: float = 0.4  # centres move up to box_noise * w/2 (h/2); sizes scale by 1 +- box_noise
    # Deformable DETR's iterative box refinement for its learned queries: one box (and class) head per
    # decoder layer, each layer's box the next one's reference point, detached. The positional queries stay
    # the learned embeddings (anchor-box queries, --anchor_queries, recompute them from the box instead).
    # Needs deformable attention; with two_stage it is Deformable DETR's two-stage variant.
    box_refine: bool = False
    # One-to-many supervision (Group DETR): groups - 1 extra sets of Q queries, each matched to the targets
    # on its own and blind to the others in self-attention. Training only: inference uses the first Q.
    groups: int = 1

    def __post_init__(self) -> None:
        if self.two_stage and not (self.anchors or self.box_refine):
            raise ValueError("two_stage needs anchor-box queries (queries.anchors=True, flag --anchor_queries) or, "
                             "with deformable attention, Deformable DETR's box refinement (flag --box_refine): "
                             "the proposals become reference boxes that the decoder refines")
        if self.box_refine and self.anchors:
            raise ValueError("box_refine is Deformable DETR's refinement of learned queries; anchor-box queries "
                             "(--anchor_queries) refine their boxes already: use one of the two")
        if self.encoder_content and self.box_refine:
            raise ValueError("encoder_content is for anchor-box queries: Deformable DETR's two-stage (--box_refine) "
                             "derives content and positions from the selected proposals' boxes")
        if self.encoder_content and not self.two_stage:
            raise ValueError("encoder_content needs two-stage selection: the content comes from the selected "
                             "encoder tokens (queries.two_stage=True, flag --two_stage)")
        if self.encoder_content and self.groups > 1:
            raise ValueError("encoder_content gives every query group the same content and boxes (the same selected "
                             "tokens), so extra groups would be copies of the first: use --query_groups 1, or learned "
                             "content (drop --encoder_content; over a preset, --no_encoder_content)")
        if self.look_forward_twice and not self.anchors:
            raise ValueError("look_forward_twice needs anchor-box queries: it changes how their refined boxes are "
                             "trained (queries.anchors=True, flag --anchor_queries)")
        if self.denoising_groups and not self.anchors:
            raise ValueError("denoising needs anchor-box queries: noised boxes enter as reference boxes "
                             "(queries.anchors=True, flag --anchor_queries)")
        if self.denoising_groups < 0 or self.groups < 1:
            raise ValueError(f"need denoising_groups >= 0 and groups >= 1, got {self.denoising_groups}, {self.groups}")
        if not 0 <= self.label_noise <= 1 or not 0 <= self.box_noise <= 1:
            raise ValueError(f"label_noise and box_noise must be in [0, 1], got {self.label_noise}, {self.box_noise}")
        if not 0 < self.anchor_size < 1:
            raise ValueError(f"anchor_size must be in (0, 1), got {self.anchor_size}")


@dataclass(frozen=True)
class MatcherConfig:
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


@dataclass(frozen=True)
class LossConfig:
    # Weights of the terms in the total: class cross-entropy, box L1, 1 - GIoU, mask focal and dice.
    ce: float = 1.0
    bbox: float = 5.0
    giou: float = 2.0
    mask: float = 1.0
    dice: float = 1.0
    eos_coef: float = 0.1  # weight of the "no object" class in the classification loss
    aux_loss: bool = True
    # Class loss of the two-stage encoder proposals: sigmoid focal loss (Deformable DETR), or DETR's
    # weighted cross-entropy, whose mean over hundreds of token slots leaves the positives little weight.
    proposal_loss: str = "focal"
    # Class loss of the decoder's predictions: DETR's softmax cross-entropy over K classes + "no object", or
    # sigmoid focal loss over K classes without a "no object" class (Deformable DETR, DINO): the class head
    # then has K outputs, the matcher uses the focal cost and post-processing ranks the top Q x K scores.
    class_loss: str = "ce"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        if self.proposal_loss not in PROPOSAL_LOSSES:
            raise ValueError(f"proposal_loss must be one of {PROPOSAL_LOSSES}, got {self.proposal_loss!r}")
        if self.class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss must be one of {CLASS_LOSSES}, got {self.class_loss!r}")

    @property
    def focal(self) -> bool:
        return self.class_loss == "focal"


@dataclass(frozen=True)
class DetrConfig:
    num_classes: int = 91  # K: the class head has K + 1 outputs, the last one is "no object" (focal: K outputs)
    num_queries: int = 100
    position_embedding: str = "sine"
    # Feature maps the transformer sees. 1: the backbone's last stage (DETR). L > 1 (Deformable DETR: 4):
    # the last L-1 backbone stages, then stride-2 3x3 convolutions on the last stage for the levels beyond
    # them, each projected by a 1x1 conv + GroupNorm, with a learned level embedding. Needs deformable attention.
    num_feature_levels: int = 1
    masks: bool = False  # panoptic variant: attention-map mask head on top of the detector
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if self.num_classes < 1 or self.num_queries < 1:
            raise ValueError("num_classes and num_queries must be >= 1")
        if self.masks and self.transformer.hidden_dim % 128:
            # the mask head narrows to hidden_dim / 16 channels under GroupNorm(8)
            raise ValueError(f"masks=True needs hidden_dim divisible by 128, got {self.transformer.hidden_dim}")
        if self.masks and self.backbone.name == "small":
            raise ValueError("masks=True needs a ResNet backbone: the mask head upsamples with its stages 1-3")
        if self.masks and self.loss.focal:
            raise ValueError("masks=True (panoptic) needs the softmax class head: the panoptic merge keeps the queries "
                             "not predicting 'no object', which a focal head (loss.class_loss='focal', flag "
                             "--focal_loss) does not have; drop --focal_loss")
        if self.queries.anchors and self.transformer.query_pos != "attention":
            raise ValueError("query_pos='input' is for learned queries: anchor-box queries recompute their "
                             "positional query from the refined box at every decoder layer")
        deformable = self.transformer.deformable
        if self.num_feature_levels < 1:
            raise ValueError(f"num_feature_levels must be >= 1, got {self.num_feature_levels}")
        if self.num_feature_levels > 1 and not deformable:
            raise ValueError("several feature levels need deformable attention (full attention over the stride-8 "
                             "tokens does not fit in memory at real image sizes): add --attention deformable")
        if deformable and self.masks:
            raise ValueError("the panoptic mask head reads full attention maps: masks=True needs attention='full'")
        if deformable and self.transformer.hidden_dim % 32:
            raise ValueError(f"deformable attention projects every level with GroupNorm(32): hidden_dim must be "
                             f"divisible by 32, got {self.transformer.hidden_dim}")
        if self.queries.box_refine and not deformable:
            raise ValueError("box_refine refines Deformable DETR's reference points: it needs --attention deformable "
                             "(with full attention, use anchor-box queries: --anchor_queries)")
        if self.queries.anchors and self.transformer.hidden_dim % 4:
            raise ValueError(f"anchor-box queries embed 4 box coordinates: hidden_dim must be divisible by 4, "
                             f"got {self.transformer.hidden_dim}")

    # --- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetrConfig:
        parts = {
            "backbone": BackboneConfig,
            "transformer": TransformerConfig,
            "queries": QueryConfig,
            "matcher": MatcherConfig,
            "loss": LossConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DetrConfig fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts and isinstance(value, dict):
                sub = parts[key]
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - sub_known
                if bad:
                    raise ValueError(f"unknown {sub.__name__} fields: {sorted(bad)}")
                value = sub(**value)
            kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> DetrConfig:
        return dataclasses.replace(self, **changes)

    def with_backbone(self, **changes: Any) -> DetrConfig:
        return dataclasses.replace(self, backbone=dataclasses.replace(self.backbone, **changes))

    def with_transformer(self, **changes: Any) -> DetrConfig:
        return dataclasses.replace(self, transformer=dataclasses.replace(self.transformer, **changes))

    def with_queries(self, **changes: Any) -> DetrConfig:
        return dataclasses.replace(self, queries=dataclasses.replace(self.queries, **changes))

    def with_loss(self, **changes: Any) -> DetrConfig:
        return dataclasses.replace(self, loss=dataclasses.replace(self.loss, **changes))

    @property
    def is_vanilla(self) -> bool:
        """True for the reference's architecture (what its checkpoints and parity tests cover): every field
        the reference cannot express keeps its default, so a new option counts as not vanilla by itself."""
        base = DetrConfig()
        for section in ("", "backbone", "transformer", "queries", "matcher", "loss"):
            ours, default = (getattr(self, section), getattr(base, section)) if section else (self, base)
            for f in dataclasses.fields(ours):
                value = getattr(ours, f.name)
                if dataclasses.is_dataclass(value) or (section, f.name) in _VANILLA_FREE_FIELDS:
                    continue
                if value != getattr(default, f.name):
                    return False
        b = self.backbone
        # The reference's ResNet: stem + layer1 frozen (or every stage, with lr_backbone 0).
        reference_backbone = b.name != "small" and (b.frozen_stages == 1 or not b.trainable)
        return reference_backbone and self.transformer.dim_feedforward > 0


# --- the reference's argparse namespace ----------------------------------------------------

# the reference's argument -> (section of DetrConfig, field); "" is DetrConfig itself
REFERENCE_ARGS: dict[str, tuple[str, str]] = {
    "num_queries": ("", "num_queries"), "position_embedding": ("", "position_embedding"), "masks": ("", "masks"),
    "backbone": ("backbone", "name"), "dilation": ("backbone", "dilation"),
    **{name: ("transformer", name) for name in ("hidden_dim", "nheads", "enc_layers", "dec_layers",
                                                "dim_feedforward", "dropout", "pre_norm")},
    "set_cost_class": ("matcher", "cost_class"), "set_cost_bbox": ("matcher", "cost_bbox"),
    "set_cost_giou": ("matcher", "cost_giou"),
    "bbox_loss_coef": ("loss", "bbox"), "giou_loss_coef": ("loss", "giou"), "mask_loss_coef": ("loss", "mask"),
    "dice_loss_coef": ("loss", "dice"), "eos_coef": ("loss", "eos_coef"), "aux_loss": ("loss", "aux_loss"),
}

# Fields a vanilla config may set freely: the reference's arguments, the class count, and fields that only
# act where vanilla is already excluded (the small backbone's shape, the two-stage proposals' loss).
_VANILLA_FREE_FIELDS = {*REFERENCE_ARGS.values(), ("", "num_classes"), ("backbone", "trainable"),
                        ("backbone", "frozen_stages"), ("backbone", "widths"), ("backbone", "depths"),
                        ("loss", "ce"), ("loss", "proposal_loss"),
                        ("loss", "focal_alpha"), ("loss", "focal_gamma"),
                        ("transformer", "n_points")}


# --- presets -------------------------------------------------------------------------------

def preset(name: str, **overrides: Any) -> DetrConfig:
    """Named configurations: r50, r50-dc5, r101, r101-dc5, panoptic (R50); shapes-small (a GroupNorm
    ResNet-18 DETR for CPU experiments) and shapes-fast (the demo's: DETR with the convergence options);
    deformable-r50 (Deformable DETR), -refine (with box refinement), -two-stage (box refinement + two-stage)."""
    shapes_small = DetrConfig(
        num_classes=4,
        num_queries=10,
        # trained from scratch: no ImageNet statistics to freeze, so a trained GroupNorm and every stage trains
        backbone=BackboneConfig(name="resnet18", norm="group_norm", frozen_stages=0),
        transformer=TransformerConfig(hidden_dim=128, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=256,
                                      dropout=0.0),
    )
    # Deformable DETR-R50 (Zhu et al. 2021): 4 levels, deformable attention, 300 queries, FFN 1024, focal
    # classification with class cost and weight 2
    deformable = DetrConfig(
        num_queries=300, num_feature_levels=4,
        transformer=TransformerConfig(dim_feedforward=1024, attention="deformable"),
        matcher=MatcherConfig(cost_class=2.0), loss=LossConfig(ce=2.0, class_loss="focal"),
    )
    presets: dict[str, DetrConfig] = {
        "r50": DetrConfig(),
        "r50-dc5": DetrConfig(backbone=BackboneConfig(dilation=True)),
        "r101": DetrConfig(backbone=BackboneConfig(name="resnet101")),
        "r101-dc5": DetrConfig(backbone=BackboneConfig(name="resnet101", dilation=True)),
        "panoptic": DetrConfig(num_classes=250, masks=True),
        "shapes-small": shapes_small,
        # the demo's: the small stride-8 CNN, a third decoder layer, 20 anchor queries from two-stage selection
        # with the selected tokens' features as their content
        "shapes-fast": shapes_small.with_transformer(dec_layers=3).replace(
            num_queries=20, backbone=BackboneConfig(name="small", norm="group_norm", frozen_stages=0),
            queries=QueryConfig(anchors=True, two_stage=True, encoder_content=True, anchor_size=0.3),
        ),
        "deformable-r50": deformable,
        "deformable-r50-refine": deformable.with_queries(box_refine=True),
        "deformable-r50-two-stage": deformable.with_queries(box_refine=True, two_stage=True),
    }
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
    return dataclasses.replace(presets[name], **overrides)
