"""Sigmoid focal classification (``--focal_loss``, Deformable DETR / DINO): the matching cost, the class loss of
every decoder output, the top-Q (query, class) post-processing, and a model trained with it through every command.
Expected values are computed here independently, with plain loops over tiny cases."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from detr.checkpoint import load_checkpoint
from detr.cli import main
from detr.config import DetrConfig, LossConfig, MatcherConfig, preset
from detr.loss import SetCriterion
from detr.loss.matcher import HungarianMatcher
from detr.model.denoising import DenoisingOutputs, DenoisingQueries
from detr.postprocess import postprocess_detections

# --- hand calculations ---------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hand_focal_sum(logits: np.ndarray, onehot: np.ndarray, alpha: float, gamma: float) -> float:
    """Sum over every element of the sigmoid focal loss, one element at a time."""
    total = 0.0
    for x, t in zip(logits.reshape(-1).tolist(), onehot.reshape(-1).tolist(), strict=True):
        p = _sigmoid(x)
        if t == 1:
            total += alpha * (1 - p) ** gamma * -math.log(p)
        else:
            total += (1 - alpha) * p**gamma * -math.log(1 - p)
    return total


def hand_onehot(shape: tuple[int, ...], positives: list[tuple[tuple[int, ...], int]]) -> np.ndarray:
    onehot = np.zeros(shape)
    for position, label in positives:
        onehot[(*position, label)] = 1
    return onehot


def hand_giou(a: list[float], b: list[float]) -> float:
    """GIoU of two cxcywh boxes."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def hand_focal_cost(logit: float, alpha: float, gamma: float) -> float:
    """Deformable DETR's class cost, with its 1e-8."""
    p = _sigmoid(logit)
    positive = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    negative = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    return positive - negative


# --- matcher ---------------------------------------------------------------------------------------


def test_focal_matching_cost_and_assignment_match_a_hand_calculation():
    gen = torch.Generator().manual_seed(0)
    b, q, k = 2, 6, 5
    logits = torch.randn(b, q, k, generator=gen) * 2
    boxes = torch.rand(b, q, 4, generator=gen) * 0.5 + 0.25
    targets = [{"labels": torch.tensor([3, 0, 3]), "boxes": torch.rand(3, 4, generator=gen) * 0.5 + 0.25},
               {"labels": torch.tensor([4, 1]), "boxes": torch.rand(2, 4, generator=gen) * 0.5 + 0.25}]
    alpha, gamma, weights = 0.3, 1.5, (3.0, 5.0, 2.0)  # class, bbox, giou
    matcher = HungarianMatcher(cost_class=weights[0], cost_bbox=weights[1], cost_giou=weights[2])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    cost = matcher.cost_matrix(outputs, targets, focal=True, focal_alpha=alpha, focal_gamma=gamma)
    indices = matcher(outputs, targets, focal=True, focal_alpha=alpha, focal_gamma=gamma)
    for i, t in enumerate(targets):
        first = sum(len(u["labels"]) for u in targets[:i])
        hand = np.zeros((q, len(t["labels"])))
        for query in range(q):
            pred = boxes[i, query].tolist()
            for j, (label, box) in enumerate(zip(t["labels"].tolist(), t["boxes"].tolist(), strict=True)):
                l1 = sum(abs(u - v) for u, v in zip(pred, box, strict=True))
                focal = hand_focal_cost(logits[i, query, label].item(), alpha, gamma)
                hand[query, j] = weights[1] * l1 + weights[0] * focal - weights[2] * hand_giou(pred, box)
        got = cost[i, :, first:first + len(t["labels"])].double().numpy()
        np.testing.assert_allclose(got, hand, rtol=1e-5, atol=1e-5)
        rows, cols = linear_sum_assignment(hand)
        assert indices[i][0].tolist() == rows.tolist() and indices[i][1].tolist() == cols.tolist()


def test_the_criterion_matches_with_the_focal_cost():
    """Equal boxes: the class cost alone decides. Query 0 [3, 3] has sigmoid 0.95 for class 0 but softmax 0.5;
    query 1 [0, -5] sigmoid 0.5 but softmax 0.99: focal matching picks query 0, softmax matching query 1."""
    logits = torch.tensor([[[3.0, 3.0], [0.0, -5.0]]])
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((1, 2, 4), 0.5)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    focal = DetrConfig(num_classes=2, num_queries=2, loss=LossConfig(class_loss="focal"))
    assert SetCriterion.from_config(focal)(outputs, targets).indices[0][0].tolist() == [0]
    ce_outputs = {**outputs, "pred_logits": torch.cat([logits, torch.full((1, 2, 1), -5.0)], -1)}  # no-object column
    ce = dataclasses.replace(focal, loss=LossConfig())
    assert SetCriterion.from_config(ce)(ce_outputs, targets).indices[0][0].tolist() == [1]


# --- criterion -------------------------------------------------------------------------------------


def _targets():
    return [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])},
            {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def _boxes_matching(q: int, placed: dict[tuple[int, int], list[float]]) -> torch.Tensor:
    """[2, q, 4] boxes far from every target but those at (image, query) -> exact target boxes."""
    boxes = torch.tensor([0.05, 0.95, 0.02, 0.02]).repeat(2, q, 1)
    for (image, query), box in placed.items():
        boxes[image, query] = torch.tensor(box)
    return boxes


ALPHA, GAMMA = 0.3, 1.5
# image 0: target 0 at query 3, target 1 at query 1; image 1: target 0 at query 4 (5 queries, 3 boxes)
MATCHED = {(0, 3): ((0, 3), 2), (0, 1): ((0, 1), 0), (1, 4): ((1, 4), 3)}
MAIN_PLACED = {(0, 3): [0.3, 0.3, 0.2, 0.2], (0, 1): [0.7, 0.6, 0.3, 0.2], (1, 4): [0.5, 0.5, 0.4, 0.4]}


def _focal_config(**loss) -> DetrConfig:
    return DetrConfig(num_classes=4, num_queries=5,
                      loss=LossConfig(class_loss="focal", focal_alpha=ALPHA, focal_gamma=GAMMA, **loss))


def test_focal_class_loss_of_the_final_and_auxiliary_layers_matches_a_hand_calculation():
    targets = _targets()
    boxes = _boxes_matching(5, MAIN_PLACED)
    gen = torch.Generator().manual_seed(1)
    final, aux = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen) * 3
    outputs = {"pred_logits": final, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": aux, "pred_boxes": boxes}]}
    result = SetCriterion.from_config(_focal_config())(outputs, targets)
    assert [(s.tolist(), t.tolist()) for s, t in result.indices] == [([1, 3], [1, 0]), ([4], [0])]
    onehot = hand_onehot((2, 5, 4), list(MATCHED.values()))
    num_boxes = 3
    for term, logits in (("loss_ce", final), ("loss_ce_0", aux)):
        expected = hand_focal_sum(logits.numpy(), onehot, ALPHA, GAMMA) / num_boxes
        assert result.terms[term].item() == pytest.approx(expected, rel=1e-5), term
    assert result.weights["loss_ce"] == 1.0
    # class error: argmax of the matched queries' logits against their labels
    matched_argmax = [final[image, query].argmax().item() == label for (image, query), label in MATCHED.values()]
    assert result.metrics["class_error"].item() == pytest.approx(100 - 100 * sum(matched_argmax) / 3)
    # cardinality: queries whose best sigmoid score is > 0.5 (logit > 0), against the target counts 2 and 1
    counts = [sum(1 for query in range(5) if max(final[image, query].tolist()) > 0) for image in range(2)]
    assert result.metrics["cardinality_error"].item() == pytest.approx((abs(counts[0] - 2) + abs(counts[1] - 1)) / 2)


def test_focal_class_loss_of_group_and_denoising_outputs_matches_a_hand_calculation():
    targets = _targets()
    gen = torch.Generator().manual_seed(2)
    # An extra Group DETR group: other queries matched (image 0: 0 and 2, image 1: 1)
    group_boxes = _boxes_matching(5, {(0, 0): [0.3, 0.3, 0.2, 0.2], (0, 2): [0.7, 0.6, 0.3, 0.2],
                                      (1, 1): [0.5, 0.5, 0.4, 0.4]})
    group_logits = torch.randn(2, 5, 4, generator=gen)
    # Denoising: 2 groups of 2 slots per image (the batch's largest count); image 1's second slot of each
    # group is padding, with logits that would add a large loss if they were scored.
    layers, slots, groups = 2, 4, 2
    labels = torch.tensor([[2, 0, 2, 0], [3, 4, 3, 4]])  # padding label = num_classes
    valid = torch.tensor([[True, True, True, True], [True, False, True, False]])
    true_boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]] * 2,
                               [[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.5, 0.5]] * 2])
    dn_logits = torch.randn(layers, 2, slots, 4, generator=gen)
    dn_logits[:, ~valid] = 6.0
    dn_boxes = (true_boxes + 0.01)[None].repeat(layers, 1, 1, 1)
    queries = DenoisingQueries(content=torch.zeros(2, slots, 8), reference=true_boxes, labels=labels, boxes=true_boxes,
                               valid=valid, groups=groups)
    main_boxes = _boxes_matching(5, MAIN_PLACED)
    outputs = {"pred_logits": torch.randn(2, 5, 4, generator=gen), "pred_boxes": main_boxes,
               "group_outputs": [{"pred_logits": group_logits, "pred_boxes": group_boxes}],
               "dn_outputs": DenoisingOutputs(dn_logits, dn_boxes, queries)}
    result = SetCriterion.from_config(_focal_config())(outputs, targets)
    num_boxes = 3
    group_onehot = hand_onehot((2, 5, 4), [((0, 0), 2), ((0, 2), 0), ((1, 1), 3)])
    assert result.terms["loss_ce_g1"].item() == pytest.approx(
        hand_focal_sum(group_logits.numpy(), group_onehot, ALPHA, GAMMA) / num_boxes, rel=1e-5)
    for layer, term in ((1, "loss_ce_dn"), (0, "loss_ce_dn_0")):
        expected = 0.0
        for image in range(2):
            for slot in range(slots):
                if valid[image, slot]:
                    row = dn_logits[layer, image, slot].numpy()
                    expected += hand_focal_sum(row, hand_onehot((4,), [((), int(labels[image, slot]))]), ALPHA, GAMMA)
        expected /= num_boxes * groups
        assert result.terms[term].item() == pytest.approx(expected, rel=1e-5), term


def test_the_focal_class_term_has_the_class_weight():
    targets = _targets()
    boxes = _boxes_matching(5, MAIN_PLACED)
    logits = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(3))
    result = SetCriterion.from_config(_focal_config(ce=2.0))({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert result.weights["loss_ce"] == 2.0
    expected = sum(result.terms[n] * result.weights[n] for n in result.terms)
    torch.testing.assert_close(result.total, expected)


# --- post-processing -------------------------------------------------------------------------------


def test_focal_postprocessing_ranks_query_class_pairs():
    # image 0: query 0 is the best for two classes; image 1 is another size
    logits = torch.tensor([[[2.0, 1.5, -4.0], [-1.0, 0.5, -3.0], [-3.0, -2.0, -2.5]],
                           [[-2.0, -2.0, 0.1], [3.0, -1.0, -1.2], [-0.5, -5.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.1, 0.1], [0.8, 0.8, 0.2, 0.2]],
                          [[0.4, 0.5, 0.2, 0.2], [0.6, 0.6, 0.4, 0.2], [0.3, 0.2, 0.2, 0.2]]])
    sizes = [(100, 200), (50, 80)]  # (h, w)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}

    def hand(image: int, count: int) -> list[tuple[float, int, int, list[float]]]:
        pairs = [(_sigmoid(logits[image, q, c].item()), c, q) for q in range(3) for c in range(3)]
        pairs.sort(key=lambda s: -s[0])
        h, w = sizes[image]
        out = []
        for score, label, query in pairs[:count]:
            cx, cy, bw, bh = boxes[image, query].tolist()
            out.append((score, label, query, [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                                              (cy + bh / 2) * h]))
        return out

    def check(result: dict, expected: list) -> None:
        assert result["scores"].tolist() == pytest.approx([e[0] for e in expected], abs=1e-6)
        assert result["labels"].tolist() == [e[1] for e in expected]
        assert result["query_indices"].tolist() == [e[2] for e in expected]
        torch.testing.assert_close(result["boxes"], torch.tensor([e[3] for e in expected]).reshape(-1, 4))

    results = postprocess_detections(outputs, sizes, focal=True)
    for image in range(2):
        check(results[image], hand(image, 3))  # Q = 3 detections by default
    assert results[0]["query_indices"].tolist()[:2] == [0, 0]  # one query, two classes
    assert results[0]["labels"].tolist()[:2] == [0, 1]
    check(postprocess_detections(outputs, sizes, focal=True, num_detections=5)[1], hand(1, 5))
    threshold = _sigmoid(0.3)  # image 1: keeps 3.0 and 1.0, not 0.1
    kept = postprocess_detections(outputs, torch.tensor(sizes), focal=True, threshold=threshold)
    check(kept[1], hand(1, 2))
    check(postprocess_detections(outputs, sizes, focal=True, top_k=1)[0], hand(0, 1))


# --- config and flags ------------------------------------------------------------------------------


def test_focal_flags_config_round_trip_and_panoptic_refusal():
    import argparse

    from detr.cli import add_model_flags, model_config_from_args

    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    args = parser.parse_args(["--preset", "shapes-small", "--focal_loss", "--focal_alpha", "0.3", "--focal_gamma",
                              "1.5", "--set_cost_class", "2", "--cls_loss_coef", "2"])
    config = model_config_from_args(args, num_classes=4)
    assert config.loss == dataclasses.replace(preset("shapes-small").loss, class_loss="focal", focal_alpha=0.3,
                                              focal_gamma=1.5, ce=2.0)
    assert config.matcher == MatcherConfig(cost_class=2.0)
    assert DetrConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    plain = model_config_from_args(parser.parse_args(["--preset", "shapes-small"]), num_classes=4)
    assert plain.loss.class_loss == "ce" and plain.loss.ce == 1.0 and plain.matcher.cost_class == 1.0
    with pytest.raises(ValueError, match="--focal_loss"):
        DetrConfig(masks=True, loss=LossConfig(class_loss="focal"))


# --- end to end ------------------------------------------------------------------------------------

TRAIN = ["--preset", "shapes-fast", "--hidden_dim", "32", "--nheads", "4", "--dim_feedforward", "64",
         "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "5", "--backbone_widths", "8,16,32",
         "--no_encoder_content", "--denoising", "2", "--query_groups", "2", "--focal_loss", "--focal_alpha", "0.3"]
SIZES = ["--train_scales", "64", "--val_scale", "64", "--max_size", "128", "--num_workers", "0", "--no_progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from detr.data.shapes import generate_shapes

    shapes = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=3, image_size=64, seed=4)
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--coco_path", str(shapes), *TRAIN, *SIZES, "--epochs", "1", "--batch_size", "4",
                 "--lr", "1e-3", "--lr_backbone", "1e-3", "--output_dir", str(out)])
    assert code == 0
    return shapes, out


def _hand_top(logits: torch.Tensor, count: int) -> list[tuple[float, int, int]]:
    """(score, label, query) of the ``count`` best sigmoid scores of [Q, K] logits."""
    pairs = [(_sigmoid(logits[q, c].item()), c, q) for q in range(logits.shape[0]) for c in range(logits.shape[1])]
    return sorted(pairs, key=lambda s: -s[0])[:count]


def test_a_focal_run_trains_reloads_and_predicts_top_query_class_pairs(trained, tmp_path, capsys):
    from detr.inference.predictor import Detector

    shapes, out = trained
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("train_loss_ce_dn" in r for r in records)
    ckpt = out / "model.safetensors"
    model = load_checkpoint(ckpt).eval()
    assert model.config.loss.focal and model.config.loss.focal_alpha == 0.3
    assert model.class_embed.out_features == model.config.num_classes == 4  # no "no object" column

    image = sorted((shapes / "val2017").glob("*.png"))[0]
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--threshold", "0.0", "--out",
                 str(tmp_path / "pred"), "--no_draw", "--no_progress"]) == 0
    written = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    detector = Detector.from_checkpoint(ckpt, threshold=0.0, optimize=False)
    with torch.no_grad():
        logits = model([detector.preprocess(detector.load(image))])["pred_logits"][0]  # [Q, K] raw
    expected = _hand_top(logits, 5)  # Q = 5 of the 5 x 4 pairs
    assert [d["score"] for d in written] == pytest.approx([e[0] for e in expected], abs=1e-5)
    assert [d["category_id"] for d in written] == [e[1] for e in expected]

    maps = detector.attention(image, top_k=3)
    assert maps.query_indices == [e[2] for e in expected[:3]]
    capsys.readouterr()
    assert main(["attention", "--checkpoint", str(ckpt), str(image), "--top_k", "2", "--out",
                 str(tmp_path / "att")]) == 0


def test_eval_of_a_focal_checkpoint_postprocesses_with_focal(trained, tmp_path, monkeypatch):
    from detr.engine import evaluate as evaluate_module

    shapes, out = trained
    seen = []
    original = evaluate_module.postprocess_detections

    def recording(outputs, orig_sizes, **kwargs):
        results = original(outputs, orig_sizes, **kwargs)
        seen.append((kwargs.get("focal"), outputs["pred_logits"].shape, [len(r["scores"]) for r in results]))
        return results

    monkeypatch.setattr(evaluate_module, "postprocess_detections", recording)
    assert main(["eval", "--checkpoint", str(out / "model.safetensors"), "--coco_path", str(shapes), *SIZES,
                 "--batch_size", "3", "--output_dir", str(tmp_path)]) == 0
    assert seen == [(True, torch.Size([3, 5, 4]), [5, 5, 5])]
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 3


def test_export_of_a_focal_checkpoint_says_how_to_read_its_logits(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    _, out = trained
    assert main(["export", "--checkpoint", str(out / "model.safetensors"), "--height", "64", "--width", "96",
                 str(tmp_path / "m.onnx")]) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert "sigmoid" in props["detr.pred_logits"]
    assert json.loads(props["detr.config"])["loss"]["class_loss"] == "focal"
