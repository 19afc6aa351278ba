"""DETR's training objective: Hungarian matching and the set criterion."""

from detr.loss.criterion import LossResult, SetCriterion, dice_loss, sigmoid_focal_loss
from detr.loss.matcher import HungarianMatcher, MatchIndices

__all__ = [
    "HungarianMatcher",
    "LossResult",
    "MatchIndices",
    "SetCriterion",
    "dice_loss",
    "sigmoid_focal_loss",
]
