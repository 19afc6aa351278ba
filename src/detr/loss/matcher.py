"""Hungarian matching between predicted and ground-truth boxes.

DETR predicts a fixed-size set of Q boxes per image; the loss first pairs each ground-truth object with
exactly one prediction (the rest are trained towards "no object"). The pairing minimizes, per image,

    cost = cost_bbox * L1(cxcywh) - cost_class * p(target class) - cost_giou * GIoU(xyxy)

and is solved exactly by ``scipy.optimize.linear_sum_assignment``. With sigmoid focal classification
(``focal=True``: Deformable DETR, DINO; the two-stage proposals) the class term is the focal loss of calling
the prediction the target class minus that of calling it background (:func:`focal_class_cost`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from detr.boxes import cxcywh_to_xyxy, generalized_box_iou
from detr.config import MatcherConfig

MatchIndices = list[tuple[Tensor, Tensor]]
UNMATCHABLE = 1e6  # the cost of a prediction slot that must not be matched


def focal_class_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per (prediction, target) logit of the target's class: focal loss as a positive minus as a negative.

    Deformable DETR's cost, alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)) with p the
    sigmoid; the logs are taken as log-sigmoids, which equal its log(p + 1e-8) up to that epsilon.
    """
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * -F.logsigmoid(logits)
    negative = (1 - alpha) * prob**gamma * -F.logsigmoid(-logits)
    return positive - negative


class HungarianMatcher:
    """One-to-one assignment of predictions to targets, per image.

    Call with ``outputs`` holding ``pred_logits`` [B, Q, K+1] (with ``focal``: [B, Q, K]) and ``pred_boxes``
    [B, Q, 4] (normalized cxcywh) and ``targets``, a list of B dicts with ``labels`` int64 [N_i] and ``boxes`` [N_i, 4]
    (normalized cxcywh). Returns, per image, ``(pred_indices, target_indices)``: two int64 CPU tensors
    of length min(Q, N_i), prediction indices ascending.
    """

    def __init__(self, *, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0, the matching would be arbitrary")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)

    @classmethod
    def from_config(cls, config: MatcherConfig) -> HungarianMatcher:
        return cls(cost_class=config.cost_class, cost_bbox=config.cost_bbox, cost_giou=config.cost_giou)

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou})"
        )

    @torch.no_grad()
    def cost_matrix(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]], *, focal: bool = False,
        valid: Tensor | None = None, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
    ) -> Tensor:
        """Matching cost of every prediction of the batch against every target of the batch.

        Returns [B, Q, sum N_i] float32 on the predictions' device; the block [b, :, targets of image b]
        is image b's cost (other blocks are computed only because one batched pass is cheaper).
        ``focal``: the class logits are trained with sigmoid focal loss (``--focal_loss``, two-stage proposals),
        so the class cost is the focal loss's gain from calling the prediction the target class (Deformable
        DETR), with ``focal_alpha`` and ``focal_gamma``; the logits' class index is the label, as without.
        ``valid`` [B, Q]: predictions that may be matched (False: padding tokens of the proposals).
        """
        logits = outputs["pred_logits"]
        batch_size, num_queries = logits.shape[:2]
        # Matching is a discrete decision: do it in fp32 even when the model runs in half precision.
        boxes_cxcywh = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4]
        target_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)  # [sum N]
        target_cxcywh = torch.cat([t["boxes"] for t in targets]).to(logits.device, torch.float32)  # [sum N,4]

        cost_bbox = torch.cdist(boxes_cxcywh, target_cxcywh, p=1)  # [B*Q, sum N]
        if focal:
            target_logits = logits.flatten(0, 1).float()[:, target_labels]  # [B*Q, sum N]
            cost_class = focal_class_cost(target_logits, focal_alpha, focal_gamma)
        else:
            probs = logits.flatten(0, 1).float().softmax(-1)  # [B*Q, K+1]
            cost_class = -probs[:, target_labels]  # [B*Q, sum N]
        cost_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes_cxcywh), cxcywh_to_xyxy(target_cxcywh))
        # Summed in the reference's order (bbox, class, giou) so that ties break identically.
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(batch_size, num_queries, -1)  # [B, Q, sum N]
        if valid is not None:  # finite, so that an image with fewer valid slots than targets still matches
            cost = cost.masked_fill(~valid[..., None], UNMATCHABLE)
        return cost

    @torch.no_grad()
    def __call__(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]], *, focal: bool = False,
        valid: Tensor | None = None, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
    ) -> MatchIndices:
        batch_size = outputs["pred_logits"].shape[0]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: {batch_size} predictions but {len(targets)} targets")
        sizes = [len(t["labels"]) for t in targets]
        for i, t in enumerate(targets):
            if len(t["boxes"]) != sizes[i]:
                raise ValueError(f"target {i}: {sizes[i]} labels but {len(t['boxes'])} boxes")

        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in range(batch_size)]

        cost = self.cost_matrix(outputs, targets, focal=focal, valid=valid, focal_alpha=focal_alpha,
                                focal_gamma=focal_gamma).cpu()  # the one device -> host copy
        if not torch.isfinite(cost).all():
            raise ValueError(
                "HungarianMatcher: the matching cost has NaN/inf entries; the predictions (pred_logits or "
                "pred_boxes) or the target boxes are not finite, or a box is degenerate"
            )
        indices: MatchIndices = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            if sizes[i] == 0:
                indices.append((empty.clone(), empty.clone()))
                continue
            rows, cols = linear_sum_assignment(block[i].numpy())
            indices.append((torch.from_numpy(rows).to(torch.int64), torch.from_numpy(cols).to(torch.int64)))
        return indices
