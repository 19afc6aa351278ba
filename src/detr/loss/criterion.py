"""DETR's set criterion: match, then score the matched pairs and the leftovers.

For each decoder layer that is supervised (the last one, plus every earlier one with auxiliary
losses), predictions are matched to targets with the Hungarian matcher, then

- ``loss_ce``: cross-entropy over K+1 classes for all Q queries; unmatched queries must predict the
  no-object class K, whose weight is ``eos_coef`` (the others 1), and the mean is the weighted mean.
  With ``loss.class_loss == "focal"`` (Deformable DETR, DINO) the K logits are sigmoid scores instead:
  sigmoid focal loss against one-hot targets (a matched query's class, all zeros for the others), summed
  over queries and classes and divided by the number of target boxes; the matching cost is the focal one;
- ``loss_bbox`` / ``loss_giou``: L1 on normalized cxcywh and 1 - GIoU on xyxy, summed over matched
  pairs and divided by the number of target boxes in the batch;
- ``loss_mask`` / ``loss_dice`` (panoptic model, last layer only): sigmoid focal loss and dice loss of
  the matched mask logits, upsampled to the padded target size, divided by the number of boxes.

Auxiliary layer i gets the suffix ``_{i}``. ``class_error`` and ``cardinality_error`` are metrics,
reported but not optimized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr.boxes import cxcywh_to_xyxy, generalized_box_iou
from detr.config import DetrConfig, LossConfig
from detr.distributed import all_reduce_mean, world_size
from detr.loss.matcher import HungarianMatcher, MatchIndices

if TYPE_CHECKING:
    from detr.model.denoising import DenoisingOutputs

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


@dataclass
class LossResult:
    """What the criterion returns.

    terms: every loss term (scalar tensors), e.g. ``loss_ce``, ``loss_bbox_0``;
    weights: the weight of each term in ``total`` (same keys as ``terms``);
    metrics: detached scalars that are not optimized (``class_error``, ``cardinality_error[_i]``);
    total: sum over terms of weight * term, the tensor to call ``backward`` on;
    indices: the last layer's matching, per image (prediction indices, target indices).
    """

    terms: dict[str, Tensor]
    weights: dict[str, float]
    metrics: dict[str, Tensor]
    total: Tensor
    indices: MatchIndices

    def weighted_terms(self) -> dict[str, Tensor]:
        """weight * term for every term (what ``total`` sums)."""
        return {name: term * self.weights[name] for name, term in self.terms.items()}


def focal_terms(logits: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> Tensor:
    """Elementwise sigmoid focal loss (default alpha 0.25, gamma 2) of logits vs {0, 1} targets of the same shape."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = prob * targets + (1 - prob) * (1 - targets)  # probability given to the true label
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return weight * bce * (1 - p_true) ** gamma


def sigmoid_focal_loss(mask_logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """Focal loss of [M, P] mask logits vs {0, 1} targets.

    Averaged over the P pixels of each mask, then summed over the M masks and divided by ``num_boxes``.
    """
    return focal_terms(mask_logits, targets).mean(dim=1).sum() / num_boxes


def dice_loss(mask_logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """Soft dice loss (+1 smoothing) of [M, P] logits vs {0, 1} targets, summed over M / num_boxes."""
    prob = mask_logits.sigmoid()
    overlap = 2 * (prob * targets).sum(dim=1)  # [M]
    total = prob.sum(dim=1) + targets.sum(dim=1)  # [M]
    return (1 - (overlap + 1) / (total + 1)).sum() / num_boxes


def count_boxes(targets: Sequence[Mapping[str, Tensor]], device: torch.device) -> float:
    """Target boxes in the batch, averaged over processes when distributed, at least 1."""
    local = float(sum(len(t["labels"]) for t in targets))
    if world_size() > 1:
        local = all_reduce_mean(torch.tensor([local], dtype=torch.float32, device=device)).item()
    return max(local, 1.0)


class SetCriterion(nn.Module):
    """DETR's loss. ``forward(outputs, targets) -> LossResult``.

    outputs: ``pred_logits`` [B, Q, K+1] ([B, Q, K] with focal classification), ``pred_boxes`` [B, Q, 4]
    (normalized cxcywh), optional ``aux_outputs`` (a list of such dicts for decoder layers 0..L-2) and, with
    ``masks=True``, ``pred_masks`` [B, Q, h, w] mask logits. targets: B dicts with ``labels`` int64 [N_i], ``boxes``
    [N_i, 4] normalized cxcywh and, with ``masks=True``, ``masks`` bool [N_i, H_i, W_i].
    """

    empty_weight: Tensor

    def __init__(
        self, *, num_classes: int, matcher: HungarianMatcher, loss: LossConfig, masks: bool = False
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.matcher = matcher
        self.loss_config = loss
        self.masks = masks
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = loss.eos_coef
        self.register_buffer("empty_weight", class_weight)  # [K+1]

    @classmethod
    def from_config(cls, config: DetrConfig) -> SetCriterion:
        return cls(
            num_classes=config.num_classes,
            matcher=HungarianMatcher.from_config(config.matcher),
            loss=config.loss,
            masks=config.masks,
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, masks={self.masks}, loss={self.loss_config}"

    # --- the terms -------------------------------------------------------------------------

    def focal_class_loss(self, logits: Tensor, index: tuple[Tensor, ...], labels: Tensor, num_boxes: float) -> Tensor:
        """Sigmoid focal loss of [..., K] logits against one-hot targets: ``labels`` [M] at the M positions
        ``index`` (a tuple of [M] index tensors into the leading dimensions), all-zero targets elsewhere;
        summed over every position and class and divided by ``num_boxes``."""
        cfg = self.loss_config
        onehot = torch.zeros_like(logits)  # [..., K]
        onehot[(*index, labels)] = 1
        return focal_terms(logits, onehot, cfg.focal_alpha, cfg.focal_gamma).sum() / num_boxes

    def loss_labels(
        self, logits: Tensor, targets: Sequence[Mapping[str, Tensor]], match: _Match, num_boxes: float
    ) -> tuple[Tensor, Tensor]:
        """Weighted cross-entropy over all queries (with focal classification: focal loss / ``num_boxes``), and
        the class error (%) of the matched ones."""
        logits = logits.float()  # [B, Q, K+1], or [B, Q, K] with focal
        matched_labels = torch.cat(
            [t["labels"][j] for t, j in zip(targets, match.target_per_image, strict=True)]
        ).to(logits.device)  # [M]
        if self.loss_config.focal:
            loss_ce = self.focal_class_loss(logits, (match.batch, match.query), matched_labels, num_boxes)
            return loss_ce, self._class_error(logits, match, matched_labels)
        no_object = self.num_classes
        target_classes = torch.full(logits.shape[:2], no_object, dtype=torch.int64, device=logits.device)
        target_classes[match.batch, match.query] = matched_labels
        weight = self.empty_weight.float()
        if world_size() > 1:
            # The weighted mean's denominator is averaged over processes (as num_boxes is), so the
            # averaged gradients equal one process's on the global batch; one process: as the reference.
            per_query = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight, reduction="none")
            loss_ce = per_query.sum() / all_reduce_mean(weight[target_classes].sum().detach())
        else:
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight)
        return loss_ce, self._class_error(logits, match, matched_labels)

    @staticmethod
    @torch.no_grad()
    def _class_error(logits: Tensor, match: _Match, matched_labels: Tensor) -> Tensor:
        """100 - accuracy (%) of the matched queries' most probable class (softmax or sigmoid: the argmax)."""
        if matched_labels.numel() == 0:
            # As the reference: accuracy over no matched query counts as 0%, so the error is 100%.
            return 100 - logits.new_zeros(())
        matched_logits = logits[match.batch, match.query]  # [M, K+1] or [M, K]
        return 100 - (matched_logits.argmax(-1) == matched_labels).float().mean() * 100

    @staticmethod
    @torch.no_grad()
    def cardinality_error(logits: Tensor, targets: Sequence[Mapping[str, Tensor]], *, focal: bool = False) -> Tensor:
        """Mean over images of |#predictions - #targets|: a prediction is a query not argmax-ing to no-object,
        or with ``focal`` (sigmoid scores, no such class) one whose best class has probability > 0.5."""
        if focal:
            predicted = (logits.max(-1).values > 0).sum(dim=1).float()  # logit > 0 <=> sigmoid > 0.5; [B]
        else:
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(dim=1).float()  # [B]
        expected = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)  # [B]
        return F.l1_loss(predicted, expected)

    @staticmethod
    def loss_boxes(
        boxes_cxcywh: Tensor, targets: Sequence[Mapping[str, Tensor]], match: _Match, num_boxes: float
    ) -> tuple[Tensor, Tensor]:
        """L1 and 1 - GIoU of the matched boxes, each summed and divided by ``num_boxes``."""
        pred = boxes_cxcywh.float()[match.batch, match.query]  # [M, 4]
        target = torch.cat([t["boxes"][j] for t, j in zip(targets, match.target_per_image, strict=True)])
        target = target.to(pred.device, torch.float32)  # [M, 4]
        loss_bbox = F.l1_loss(pred, target, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target)))  # [M]
        loss_giou = (1 - giou).sum() / num_boxes
        return loss_bbox, loss_giou

    @staticmethod
    def loss_masks(
        mask_logits: Tensor | Callable[[Tensor, Tensor], Tensor], targets: Sequence[Mapping[str, Tensor]],
        match: _Match, num_boxes: float,
    ) -> tuple[Tensor, Tensor]:
        """Focal and dice losses of the matched masks at the batch's padded target size.

        mask_logits: [B, Q, h, w], or a callable (batch, query) -> [M, h, w] that computes the chosen ones.
        """
        for i, t in enumerate(targets):
            if "masks" not in t:
                raise KeyError(f"target {i} has no 'masks'; the mask losses need them (masks=True)")
        height = max(int(t["masks"].shape[-2]) for t in targets)
        width = max(int(t["masks"].shape[-1]) for t in targets)
        if len(match.batch) == 0:
            # Nothing matched: zero losses that still belong to the graph (on demand, one mask is computed:
            # GroupNorm takes no empty batch).
            first = torch.zeros(1, dtype=torch.int64, device=match.batch.device)
            some = mask_logits if isinstance(mask_logits, Tensor) else mask_logits(first, first)
            zero = some.float().sum() * 0
            return zero, zero.clone()
        if isinstance(mask_logits, Tensor):
            pred = mask_logits.float()[match.batch, match.query]  # [M, h, w]
        else:
            pred = mask_logits(match.batch, match.query).float()  # [M, h, w], only these computed
        # Targets are padded with zeros at the bottom/right, like the images they belong to.
        target = torch.cat(
            [
                F.pad(t["masks"][j], (0, width - t["masks"].shape[-1], 0, height - t["masks"].shape[-2]))
                for t, j in zip(targets, match.target_per_image, strict=True)
            ]
        ).to(pred.device, torch.float32)  # [M, H, W]
        pred = F.interpolate(pred[:, None], size=(height, width), mode="bilinear", align_corners=False)
        pred = pred.flatten(1)  # [M, H*W]
        target = target.flatten(1)  # [M, H*W]
        return sigmoid_focal_loss(pred, target, num_boxes), dice_loss(pred, target, num_boxes)

    # --- putting it together ---------------------------------------------------------------

    def loss_proposal_labels(
        self, proposals: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]], match: _Match, num_boxes: float
    ) -> Tensor:
        """Class loss of the encoder's proposals over their valid tokens. Focal (default): sigmoid focal loss
        over the K classes, summed and divided by the number of boxes, so that the few matched tokens are not
        drowned by hundreds of background ones as in a mean. ``ce``: the decoder's weighted cross-entropy.
        Class-agnostic proposals (Deformable DETR's two-stage: K logits, no no-object column) are always focal."""
        logits, valid = proposals["pred_logits"].float(), proposals["valid"]  # [B, N, K+1], [B, N]
        matched_labels = torch.cat(
            [t["labels"][j] for t, j in zip(targets, match.target_per_image, strict=True)]
        ).to(logits.device)  # [M]
        agnostic = getattr(proposals, "class_agnostic", False)
        if agnostic or self.loss_config.proposal_loss == "focal":
            scores = logits if agnostic else logits[..., :-1]  # [B, N, K]: the no-object column is unused
            onehot = torch.zeros_like(scores)
            onehot[match.batch, match.query, matched_labels] = 1
            return (focal_terms(scores, onehot) * valid[..., None]).sum() / num_boxes
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[match.batch, match.query] = matched_labels
        weight = self.empty_weight.float()[target_classes] * valid  # [B, N]
        per_token = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")  # [B, N]
        return (per_token * weight).sum() / weight.sum().clamp(min=1e-6)

    def denoising_terms(self, dn: DenoisingOutputs, num_boxes: float) -> list[tuple[str, str, Tensor]]:
        """Reconstruction losses of the denoising queries, per layer: cross-entropy of the true label (with focal
        classification: the focal loss of its one-hot target over the K classes, summed and divided like the box
        terms, as DINO), and L1 / 1 - GIoU of the true box, divided by the number of boxes times the number of
        denoising groups.
        Returns (term, suffix, value) triples: ("loss_ce", "_dn", ...) for the last layer, "_dn_{i}" for the others."""
        q = dn.queries
        valid = q.valid
        labels, boxes = q.labels[valid], q.boxes[valid].float()  # [M], [M, 4]
        layers = dn.pred_logits.shape[0]
        supervised = range(layers) if self.loss_config.aux_loss else range(layers - 1, layers)
        normalizer = num_boxes * q.groups
        terms = []
        for i in supervised:
            suffix = "_dn" if i == layers - 1 else f"_dn_{i}"
            if not labels.numel():  # no object in this batch: zeros, so every process reports the same terms
                zero = dn.pred_logits[i].sum() * 0  # still on the graph: backward reaches the same parameters
                terms += [("loss_ce", suffix, zero), ("loss_bbox", suffix, zero), ("loss_giou", suffix, zero)]
                continue
            pred = dn.pred_boxes[i][valid].float()  # [M, 4]
            giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(boxes)))
            logits = dn.pred_logits[i][valid].float()  # [M, K+1], or [M, K] with focal
            if self.loss_config.focal:
                rows = torch.arange(len(labels), device=logits.device)
                loss_ce = self.focal_class_loss(logits, (rows,), labels, normalizer)
            else:
                loss_ce = F.cross_entropy(logits, labels)
            terms += [
                ("loss_ce", suffix, loss_ce),
                ("loss_bbox", suffix, F.l1_loss(pred, boxes, reduction="none").sum() / normalizer),
                ("loss_giou", suffix, (1 - giou).sum() / normalizer),
            ]
        return terms

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> LossResult:
        logits = outputs["pred_logits"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"SetCriterion: {logits.shape[0]} predictions but {len(targets)} targets")
        num_boxes = count_boxes(targets, logits.device)  # once for all layers
        cfg = self.loss_config
        acc = _Terms({"loss_ce": cfg.ce, "loss_bbox": cfg.bbox, "loss_giou": cfg.giou, "loss_mask": cfg.mask,
                      "loss_dice": cfg.dice})
        # One-to-one sets: the final layer, the auxiliary layers, and each extra Group DETR group likewise.
        groups = [("", outputs)] + [(f"_g{g}", o) for g, o in enumerate(outputs.get("group_outputs") or [], 1)]
        final_indices: MatchIndices = []
        for prefix, group in groups:
            layers = [(prefix, group)]
            if cfg.aux_loss:
                layers += [(f"{prefix}_{i}", aux) for i, aux in enumerate(group.get("aux_outputs") or [])]
            for suffix, layer in layers:
                indices = self._layer_terms(acc, suffix, layer, targets, num_boxes)
                if suffix == "":
                    final_indices = indices
        proposals = outputs.get("enc_outputs")
        if proposals is not None:  # two-stage: the encoder's proposals, matched over all valid tokens
            agnostic = getattr(proposals, "class_agnostic", False)  # Deformable DETR's: every object is class 0
            found = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets] if agnostic else targets
            indices = self.matcher(proposals, found, focal=agnostic or cfg.proposal_loss == "focal",
                                   valid=proposals["valid"])
            match = _Match.build(indices, proposals["pred_logits"].device)
            acc.add("loss_ce", "_enc", self.loss_proposal_labels(proposals, found, match, num_boxes))
            acc.add_boxes("_enc", *self.loss_boxes(proposals["pred_boxes"], found, match, num_boxes))
        denoising = outputs.get("dn_outputs")
        if denoising is not None:
            for name, suffix, value in self.denoising_terms(denoising, num_boxes):
                acc.add(name, suffix, value)
        total = sum(acc.terms[name] * acc.weights[name] for name in acc.terms)
        assert isinstance(total, Tensor)
        return LossResult(terms=acc.terms, weights=acc.weights, metrics=acc.metrics, total=total,
                          indices=final_indices)

    def _layer_terms(self, acc: _Terms, suffix: str, layer: Mapping[str, Any],
                     targets: Sequence[Mapping[str, Tensor]], num_boxes: float) -> MatchIndices:
        """Match one decoder layer's predictions and add its terms (and metrics) under ``suffix``."""
        cfg = self.loss_config
        indices = self.matcher(layer, targets, focal=cfg.focal, focal_alpha=cfg.focal_alpha,
                               focal_gamma=cfg.focal_gamma)
        match = _Match.build(indices, layer["pred_logits"].device)
        is_final = suffix == ""
        loss_ce, class_error = self.loss_labels(layer["pred_logits"], targets, match, num_boxes)
        acc.add("loss_ce", suffix, loss_ce)
        acc.add_boxes(suffix, *self.loss_boxes(layer["pred_boxes"], targets, match, num_boxes))
        if self.masks and is_final:  # the reference supervises masks on the last layer only
            masks = layer.get("pred_masks", layer.get("mask_logits_of"))
            if masks is None:
                raise KeyError("SetCriterion(masks=True) needs outputs['pred_masks'] (or 'mask_logits_of')")
            loss_mask, loss_dice = self.loss_masks(masks, targets, match, num_boxes)
            acc.add("loss_mask", "", loss_mask)
            acc.add("loss_dice", "", loss_dice)
        if is_final:  # the reference logs the class error of the last layer only
            acc.metrics["class_error"] = class_error.detach()
        if not suffix.startswith("_g"):
            acc.metrics[f"cardinality_error{suffix}"] = self.cardinality_error(layer["pred_logits"], targets,
                                                                                focal=cfg.focal)
        return indices


@dataclass
class _Terms:
    """The loss terms, their weights and the metrics, as ``SetCriterion.forward`` collects them."""

    weight_of: dict[str, float]  # term name without suffix -> its weight
    terms: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def add(self, name: str, suffix: str, value: Tensor) -> None:
        self.terms[name + suffix] = value
        self.weights[name + suffix] = float(self.weight_of[name])

    def add_boxes(self, suffix: str, loss_bbox: Tensor, loss_giou: Tensor) -> None:
        self.add("loss_bbox", suffix, loss_bbox)
        self.add("loss_giou", suffix, loss_giou)


@dataclass
class _Match:
    """A matching flattened for indexing: (batch[m], query[m]) is the prediction paired with target m."""

    batch: Tensor  # [M] int64, on the predictions' device
    query: Tensor  # [M]
    target_per_image: list[Tensor]  # per image, the matched target indices in the order of ``query``

    @classmethod
    def build(cls, indices: MatchIndices, device: torch.device) -> _Match:
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query = torch.cat([src for src, _ in indices])
        return cls(batch.to(device), query.to(device), [tgt for _, tgt in indices])
