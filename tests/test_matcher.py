from __future__ import annotations

import itertools

import pytest
import torch

from detr.boxes import cxcywh_to_xyxy, generalized_box_iou
from detr.config import MatcherConfig
from detr.loss import HungarianMatcher

CONFIGS = ["detection", "detection_prenorm_learned_dc5", "panoptic"]


def random_outputs(batch: int, queries: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=g) * 2,
        "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.6 + 0.2,
    }


def random_targets(sizes: list[int], classes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1000)
    return [
        {
            "labels": torch.randint(0, classes, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25,
        }
        for n in sizes
    ]


def pair_cost(logits: torch.Tensor, box: torch.Tensor, label: int, target_box: torch.Tensor) -> float:
    """The matching cost of one prediction against one target, written out pair by pair."""
    prob = logits.double().softmax(-1)[label]
    l1 = (box.double() - target_box.double()).abs().sum()
    giou = generalized_box_iou(cxcywh_to_xyxy(box.double()[None]), cxcywh_to_xyxy(target_box.double()[None]))
    return float(5 * l1 - 1 * prob - 2 * giou[0, 0])


def test_parity_with_reference(reference: dict) -> None:
    matcher = HungarianMatcher.from_config(MatcherConfig())
    for name in CONFIGS:
        entry = reference[name]
        indices = matcher(entry["outputs"], reference["targets"])
        assert len(indices) == len(entry["indices"])
        for (src, tgt), (ref_src, ref_tgt) in zip(indices, entry["indices"], strict=True):
            assert src.dtype == tgt.dtype == torch.int64
            assert torch.equal(src, ref_src.long()), name
            assert torch.equal(tgt, ref_tgt.long()), name


@pytest.mark.parametrize("seed", range(12))
def test_brute_force_minimum(seed: int) -> None:
    queries = 3 + seed % 3  # 3..5
    sizes = [1 + seed % 3, 3 - seed % 3]  # up to 3 targets, two images of a batch
    outputs = random_outputs(2, queries, classes=4, seed=seed)
    targets = random_targets(sizes, classes=4, seed=seed)
    indices = HungarianMatcher()(outputs, targets)
    for b, (target, (src, tgt)) in enumerate(zip(targets, indices, strict=True)):
        n = len(target["labels"])

        def cost(q: int, j: int, b: int = b, target: dict = target) -> float:
            logits, box = outputs["pred_logits"][b, q], outputs["pred_boxes"][b, q]
            return pair_cost(logits, box, int(target["labels"][j]), target["boxes"][j])

        best = min(
            sum(cost(q, j) for j, q in enumerate(assignment))
            for assignment in itertools.permutations(range(queries), n)
        )
        assert len(src) == len(tgt) == n
        assert sorted(tgt.tolist()) == list(range(n))  # every target matched exactly once
        assert len(set(src.tolist())) == n  # to distinct queries
        assert src.tolist() == sorted(src.tolist())
        found = sum(cost(int(q), int(j)) for q, j in zip(src, tgt, strict=True))
        assert found == pytest.approx(best, abs=1e-5)


def test_batched_equals_per_image() -> None:
    outputs = random_outputs(3, 7, classes=5, seed=3)
    targets = random_targets([4, 2, 5], classes=5, seed=3)
    batched = HungarianMatcher()(outputs, targets)
    for b in range(3):
        single = HungarianMatcher()({k: v[b : b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert torch.equal(single[0], batched[b][0]) and torch.equal(single[1], batched[b][1])


def test_more_targets_than_queries() -> None:
    outputs = random_outputs(1, 2, classes=3, seed=4)
    targets = random_targets([4], classes=3, seed=4)
    src, tgt = HungarianMatcher()(outputs, targets)[0]
    assert src.tolist() == [0, 1] and len(set(tgt.tolist())) == 2


def test_empty_targets() -> None:
    outputs = random_outputs(2, 5, classes=3, seed=5)
    targets = random_targets([0, 0], classes=3, seed=5)
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == 2
    for src, tgt in indices:
        assert src.shape == tgt.shape == (0,)
        assert src.dtype == tgt.dtype == torch.int64


def test_mixed_empty_and_non_empty() -> None:
    outputs = random_outputs(3, 6, classes=3, seed=6)
    targets = random_targets([0, 3, 0], classes=3, seed=6)
    indices = HungarianMatcher()(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[2][0].numel() == 0
    single = HungarianMatcher()({k: v[1:2] for k, v in outputs.items()}, [targets[1]])[0]
    assert torch.equal(indices[1][0], single[0]) and torch.equal(indices[1][1], single[1])
    assert len(indices[1][0]) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(reference: dict, dtype: torch.dtype) -> None:
    entry = reference["detection"]
    outputs = {k: entry["outputs"][k].to(dtype) for k in ("pred_logits", "pred_boxes")}
    targets = [{"labels": t["labels"], "boxes": t["boxes"].to(dtype)} for t in reference["targets"]]
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(outputs, targets)
    assert cost.dtype == torch.float32
    # Same result as matching the (rounded) values in fp32.
    targets32 = [{"labels": t["labels"], "boxes": t["boxes"].float()} for t in targets]
    as_fp32 = matcher({k: v.float() for k, v in outputs.items()}, targets32)
    for (src, tgt), (src32, tgt32) in zip(matcher(outputs, targets), as_fp32, strict=True):
        assert torch.equal(src, src32) and torch.equal(tgt, tgt32)


def test_no_gradient_tracking() -> None:
    outputs = {k: v.clone().requires_grad_() for k, v in random_outputs(1, 4, 3, seed=7).items()}
    cost = HungarianMatcher().cost_matrix(outputs, random_targets([2], 3, seed=7))
    assert not cost.requires_grad


def test_rejects_zero_weights() -> None:
    with pytest.raises(ValueError, match="all cost weights are 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=1)  # one non-zero weight is enough


def test_non_finite_predictions_raise() -> None:
    outputs = random_outputs(2, 4, classes=3, seed=8)
    outputs["pred_boxes"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        HungarianMatcher()(outputs, random_targets([2, 1], classes=3, seed=8))


def test_mismatched_batch_raises() -> None:
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(random_outputs(2, 4, 3, seed=9), random_targets([1], 3, seed=9))


def test_custom_weights_change_the_cost() -> None:
    outputs = random_outputs(1, 5, classes=3, seed=10)
    targets = random_targets([2], classes=3, seed=10)
    only_l1 = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0).cost_matrix(outputs, targets)[0]
    expected = torch.cdist(outputs["pred_boxes"][0], targets[0]["boxes"], p=1)
    torch.testing.assert_close(only_l1, expected)
