from __future__ import annotations

import datetime
import math
import os
import socket

import pytest
import torch

from detr.config import LossConfig, MatcherConfig, preset
from detr.loss import HungarianMatcher, SetCriterion, dice_loss, sigmoid_focal_loss
from detr.loss.criterion import count_boxes

CONFIGS = ["detection", "detection_prenorm_learned_dc5", "panoptic"]


def criterion_for(entry: dict, **loss_overrides: object) -> SetCriterion:
    masks = bool(entry["config"]["masks"])
    return SetCriterion(
        num_classes=int(entry["num_classes"]),
        matcher=HungarianMatcher.from_config(MatcherConfig()),
        loss=LossConfig(**loss_overrides),  # type: ignore[arg-type]
        masks=masks,
    )


def detached_outputs(entry: dict, requires_grad: bool = False) -> dict:
    """A fresh copy of a fixture entry's outputs (optionally leaves that collect gradients)."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(requires_grad)

    out = {k: leaf(v) for k, v in entry["outputs"].items() if k != "aux_outputs"}
    out["aux_outputs"] = [{k: leaf(v) for k, v in aux.items()} for aux in entry["outputs"]["aux_outputs"]]
    return out


def first_image(outputs: dict) -> dict:
    """The outputs of image 0 only, as a batch of one."""
    out = {k: v[:1] for k, v in outputs.items() if k != "aux_outputs"}
    out["aux_outputs"] = [{k: v[:1] for k, v in aux.items()} for aux in outputs["aux_outputs"]]
    return out


def empty_target(like: dict) -> dict:
    h, w = like["masks"].shape[-2:]
    return {
        "labels": torch.zeros(0, dtype=torch.int64),
        "boxes": torch.zeros(0, 4),
        "masks": torch.zeros(0, h, w, dtype=torch.bool),
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_reference(reference: dict, name: str) -> None:
    entry = reference[name]
    result = criterion_for(entry)(entry["outputs"], reference["targets"])
    reported = {**result.terms, **result.metrics}
    expected = entry["losses"]
    assert set(reported) == set(expected), (sorted(reported), sorted(expected))
    for key, value in expected.items():
        ours = reported[key]
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, value.float(), rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    torch.testing.assert_close(result.total, entry["total_loss"].float(), rtol=1e-4, atol=0)
    # Weights: the reference's weight_dict restricted to the terms that exist.
    assert result.weights == {k: float(v) for k, v in entry["weight_dict"].items() if k in result.terms}
    for (src, tgt), (ref_src, ref_tgt) in zip(result.indices, entry["indices"], strict=True):
        assert torch.equal(src, ref_src.long()) and torch.equal(tgt, ref_tgt.long())
    assert all(not m.requires_grad for m in result.metrics.values())


def test_total_is_weighted_sum_and_backprops(reference: dict) -> None:
    entry = reference["panoptic"]
    outputs = detached_outputs(entry, requires_grad=True)
    result = criterion_for(entry)(outputs, reference["targets"])
    manual = sum(result.terms[k] * result.weights[k] for k in result.terms)
    torch.testing.assert_close(result.total, manual)
    torch.testing.assert_close(sum(result.weighted_terms().values()), manual)
    result.total.backward()
    for tensor in [outputs["pred_logits"], outputs["pred_boxes"], outputs["pred_masks"]]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].grad is not None and aux["pred_boxes"].grad is not None


def test_one_image_without_objects(reference: dict) -> None:
    entry = reference["panoptic"]
    outputs = detached_outputs(entry, requires_grad=True)
    first = reference["targets"][0]
    targets = [first, empty_target(reference["targets"][1])]
    criterion = criterion_for(entry)
    result = criterion(outputs, targets)
    assert all(torch.isfinite(t) for t in result.terms.values())
    assert result.indices[1][0].numel() == 0
    result.total.backward()
    # Image 1 has nothing to regress: its boxes get no gradient, its logits are pushed to "no object".
    assert torch.all(outputs["pred_boxes"].grad[1] == 0)
    assert outputs["pred_boxes"].grad[0].abs().sum() > 0
    assert outputs["pred_logits"].grad[1].abs().sum() > 0
    assert torch.all(outputs["pred_masks"].grad[1] == 0)

    # Box terms come from image 0 alone: the same as a batch holding only image 0.
    alone = criterion(first_image(outputs), [first])
    for key in ["loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0", "loss_bbox_1", "loss_giou_1"]:
        torch.testing.assert_close(result.terms[key], alone.terms[key], rtol=1e-6, atol=0)


def test_all_empty_batch(reference: dict) -> None:
    entry = reference["panoptic"]
    outputs = detached_outputs(entry, requires_grad=True)
    targets = [empty_target(t) for t in reference["targets"]]
    result = criterion_for(entry)(outputs, targets)
    assert all(torch.isfinite(t) for t in result.terms.values())
    for key in ["loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_bbox_0", "loss_giou_1"]:
        assert result.terms[key].item() == 0.0
    # Every query is "no object" with the same class weight: a plain mean of -log p(no object).
    logits = entry["outputs"]["pred_logits"]
    expected_ce = -logits.log_softmax(-1)[..., -1].mean()
    torch.testing.assert_close(result.terms["loss_ce"], expected_ce)
    # The reference's convention when nothing is matched: accuracy 0, so class_error 100.
    assert result.metrics["class_error"].item() == 100.0
    predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
    assert result.metrics["cardinality_error"].item() == pytest.approx(predicted.mean().item())
    result.total.backward()
    assert torch.all(outputs["pred_boxes"].grad == 0)
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_weights_follow_config(reference: dict) -> None:
    entry = reference["detection"]
    targets = reference["targets"]
    base = criterion_for(entry)(entry["outputs"], targets)
    custom = criterion_for(entry, ce=2.0, bbox=3.0, giou=0.5, eos_coef=0.1)(entry["outputs"], targets)
    assert custom.weights["loss_ce_1"] == 2.0 and custom.weights["loss_bbox"] == 3.0
    assert custom.weights["loss_giou_0"] == 0.5
    for key in base.terms:
        torch.testing.assert_close(custom.terms[key], base.terms[key])  # weights do not change the terms
    torch.testing.assert_close(custom.total, sum(custom.terms[k] * custom.weights[k] for k in custom.terms))
    assert "loss_mask" not in base.weights and "loss_mask_0" not in base.weights

    no_aux = criterion_for(entry, aux_loss=False)(entry["outputs"], targets)
    assert set(no_aux.terms) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert set(no_aux.metrics) == {"class_error", "cardinality_error"}
    torch.testing.assert_close(no_aux.terms["loss_ce"], base.terms["loss_ce"])


def test_empty_weight_buffer() -> None:
    criterion = SetCriterion.from_config(preset("r50", loss=LossConfig(eos_coef=0.25)))
    assert "empty_weight" in dict(criterion.named_buffers())
    assert "empty_weight" in criterion.state_dict()
    weight = criterion.empty_weight
    assert weight.shape == (92,)
    assert weight[-1].item() == 0.25 and torch.all(weight[:-1] == 1)


def test_eos_coef_changes_only_the_class_loss(reference: dict) -> None:
    entry = reference["detection"]
    a = criterion_for(entry)(entry["outputs"], reference["targets"])
    b = criterion_for(entry, eos_coef=1.0)(entry["outputs"], reference["targets"])
    assert not torch.allclose(a.terms["loss_ce"], b.terms["loss_ce"])
    torch.testing.assert_close(a.terms["loss_bbox"], b.terms["loss_bbox"])
    # With eos_coef 1 the weighted mean is the plain mean over all queries.
    logits = entry["outputs"]["pred_logits"]
    target_classes = torch.full(logits.shape[:2], logits.shape[-1] - 1)
    for i, (src, tgt) in enumerate(b.indices):
        target_classes[i, src] = reference["targets"][i]["labels"][tgt]
    plain = -logits.log_softmax(-1).gather(-1, target_classes[..., None]).mean()
    torch.testing.assert_close(b.terms["loss_ce"], plain)


def test_class_error_zero_when_matched_predictions_are_right() -> None:
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}]
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 0, 2] = logits[0, 1, 0] = 5.0  # two confident, correct predictions
    logits[0, 2, 3] = 5.0  # and one confident "no object"
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]]])
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher(), loss=LossConfig(aux_loss=False))
    result = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert result.metrics["class_error"].item() == 0.0
    assert result.metrics["cardinality_error"].item() == 0.0
    assert result.terms["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)
    assert result.terms["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    # One of the two predictions wrong -> 50 %; an extra detection -> cardinality error 1.
    logits[0, 1, 0], logits[0, 1, 1] = -5.0, 5.0
    logits[0, 2, 3], logits[0, 2, 1] = -5.0, 5.0
    result = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert result.metrics["class_error"].item() == pytest.approx(50.0)
    assert result.metrics["cardinality_error"].item() == 1.0


def test_focal_and_dice_hand_computed() -> None:
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    # p = 0.5 everywhere: bce = ln 2, (1 - p_t)^2 = 1/4, alpha 0.25 for positives and 0.75 for negatives.
    expected_focal = (2 * 0.25 + 2 * 0.75) * math.log(2) * 0.25 / 4
    assert sigmoid_focal_loss(logits, targets, num_boxes=1.0).item() == pytest.approx(expected_focal, rel=1e-6)
    assert sigmoid_focal_loss(logits, targets, num_boxes=2.0).item() == pytest.approx(expected_focal / 2, rel=1e-6)
    # Dice: 1 - (2 * 1 + 1) / (2 + 2 + 1).
    assert dice_loss(logits, targets, num_boxes=1.0).item() == pytest.approx(1 - 3 / 5, rel=1e-6)
    perfect = torch.tensor([[30.0, -30.0, 30.0, -30.0]])
    assert dice_loss(perfect, targets, num_boxes=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert sigmoid_focal_loss(perfect, targets, num_boxes=1.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs(reference: dict, dtype: torch.dtype) -> None:
    entry = reference["panoptic"]
    outputs = detached_outputs(entry)
    half = {k: v.to(dtype) for k, v in outputs.items() if k != "aux_outputs"}
    half["aux_outputs"] = [{k: v.to(dtype) for k, v in aux.items()} for aux in outputs["aux_outputs"]]
    rounded = {k: v.float() for k, v in half.items() if k != "aux_outputs"}
    rounded["aux_outputs"] = [{k: v.float() for k, v in aux.items()} for aux in half["aux_outputs"]]
    criterion = criterion_for(entry)
    result = criterion(half, reference["targets"])
    expected = criterion(rounded, reference["targets"])  # the same values, computed in fp32
    for key, term in result.terms.items():
        assert term.dtype == torch.float32
        torch.testing.assert_close(term, expected.terms[key], rtol=1e-6, atol=1e-6)


def test_under_autocast(reference: dict) -> None:
    entry = reference["panoptic"]
    criterion = criterion_for(entry)
    plain = criterion(entry["outputs"], reference["targets"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = criterion(entry["outputs"], reference["targets"])
    for key, term in cast.terms.items():
        assert term.dtype == torch.float32
        torch.testing.assert_close(term, plain.terms[key], rtol=1e-6, atol=1e-6)


def test_missing_masks_raise(reference: dict) -> None:
    entry = reference["panoptic"]
    targets = [{k: v for k, v in t.items() if k != "masks"} for t in reference["targets"]]
    with pytest.raises(KeyError, match="masks"):
        criterion_for(entry)(entry["outputs"], targets)
    with pytest.raises(KeyError, match="pred_masks"):
        outputs = {k: v for k, v in entry["outputs"].items() if k != "pred_masks"}
        criterion_for(entry)(outputs, reference["targets"])


def test_count_boxes_single_process() -> None:
    targets = [{"labels": torch.zeros(3, dtype=torch.int64)}, {"labels": torch.zeros(0, dtype=torch.int64)}]
    assert count_boxes(targets, torch.device("cpu")) == 3.0
    assert count_boxes(targets[1:], torch.device("cpu")) == 1.0  # clamped to at least 1


def _count_boxes_worker(rank: int, world_size: int, port: int, results: object) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # a forked child: keep clear of the parent's thread pool
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        local = [{"labels": torch.zeros(n, dtype=torch.int64)} for n in ([2, 3] if rank == 0 else [0])]
        results.put((rank, count_boxes(local, torch.device("cpu"))))  # type: ignore[attr-defined]
    finally:
        torch.distributed.destroy_process_group()


def test_count_boxes_is_averaged_over_processes() -> None:
    if not torch.distributed.is_available():
        pytest.fail("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = torch.multiprocessing.get_context("fork").SimpleQueue()
    torch.multiprocessing.start_processes(
        _count_boxes_worker, args=(2, port, results), nprocs=2, join=True, start_method="fork"
    )
    # 5 boxes on rank 0, none on rank 1: each process divides by the average, 2.5.
    assert dict(results.get() for _ in range(2)) == {0: 2.5, 1: 2.5}
