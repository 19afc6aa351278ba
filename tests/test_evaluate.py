"""COCO evaluation: conversion to COCO results, CocoEvaluator against pycocotools run directly, evaluate()."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader

from conftest import COCO_MINI
from detr.boxes import xywh_to_xyxy
from detr.data.batch import DetectionBatch
from detr.engine.evaluate import STAT_NAMES, CocoEvaluator, detections_to_coco, evaluate
from detr.structures import ImageBatch

# pycocotools' own decode (annToMask) trips a numpy 2 deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"


def _load_gt() -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(VAL_JSON))


@pytest.fixture(scope="module")
def coco_gt() -> COCO:
    return _load_gt()


def _objects(coco: COCO, image_id: int) -> list[dict]:
    return [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]


def _gt_result(coco: COCO, image_id: int, *, masks: bool = False) -> dict[str, Tensor]:
    """The ground truth as the post-processor would report it: xyxy float32 boxes, score 1, label = category."""
    anns = _objects(coco, image_id)
    boxes_xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    result = {
        "scores": torch.ones(len(anns)),
        "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
        "boxes": xywh_to_xyxy(boxes_xywh),
    }
    if masks:
        info = coco.imgs[image_id]
        stack = [torch.from_numpy(coco.annToMask(a)) for a in anns]
        empty = torch.zeros((0, 1, info["height"], info["width"]), dtype=torch.uint8)
        result["masks"] = torch.stack(stack)[:, None] if stack else empty  # [N, 1, H, W]
    return result


def _summarize(evaluator: CocoEvaluator) -> dict[str, dict[str, float]]:
    return evaluator.summarize(verbose=False)


def _perturbed(coco: COCO, image_ids: list[int], seed: int) -> tuple[dict[int, dict[str, Tensor]], list[dict]]:
    """Jittered, rescored, relabelled and thinned ground truth plus some false positives.

    Returns the post-processor-style results (float64 xyxy tensors) and, built independently from the
    json's xywh boxes, the COCO results list the same detections make.
    """
    gen = torch.Generator().manual_seed(seed)
    category_ids = sorted(coco.getCatIds())
    results, direct = {}, []
    for image_id in image_ids:
        anns = _objects(coco, image_id)
        info = coco.imgs[image_id]
        n, n_false = len(anns), 3
        jitter = torch.randn(n, 4, generator=gen, dtype=torch.float64).tolist()
        keep = (torch.rand(n, generator=gen) > 0.15).tolist()
        relabel = (torch.rand(n, generator=gen) < 0.15).tolist()
        new_label = torch.randint(len(category_ids), (n,), generator=gen).tolist()
        false_xywh = (torch.rand(n_false, 4, generator=gen, dtype=torch.float64) * 0.5).tolist()
        false_label = torch.randint(len(category_ids), (n_false,), generator=gen).tolist()
        scores = torch.rand(n + n_false, generator=gen)  # float32, as the post-processor's

        rows = []  # (x, y, w, h, category, score index)
        for i, ann in enumerate(anns):
            if not keep[i]:
                continue
            x, y, w, h = ann["bbox"]
            dx, dy, sw, sh = jitter[i]
            category = category_ids[new_label[i]] if relabel[i] else ann["category_id"]
            jittered = (x + 0.1 * w * dx, y + 0.1 * h * dy, w * math.exp(0.1 * sw), h * math.exp(0.1 * sh))
            rows.append((*jittered, category, i))
        for j in range(n_false):
            fx, fy, fw, fh = false_xywh[j]
            width, height = info["width"], info["height"]
            rows.append((fx * width, fy * height, fw * width + 1, fh * height + 1, category_ids[false_label[j]], n + j))

        score_list = scores.tolist()
        direct += [
            {"image_id": image_id, "category_id": c, "bbox": [x, y, w, h], "score": score_list[k]}
            for x, y, w, h, c, k in rows
        ]
        results[image_id] = {
            "scores": scores[[k for *_, k in rows]],
            "labels": torch.tensor([c for *_, c, _ in rows], dtype=torch.int64),
            "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h, *_ in rows], dtype=torch.float64).view(-1, 4),
        }
    return results, direct


def _cocoeval_directly(coco: COCO, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(zip(STAT_NAMES, coco_eval.stats.tolist(), strict=True))


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


def test_detections_to_coco_fields_masks_and_threshold():
    masks = torch.zeros(3, 1, 5, 7, dtype=torch.uint8)
    masks[0, 0, 1:3, 2:6] = 1
    masks[1, 0, 0, 0] = 1
    masks[2, 0, 4, :] = 1
    result = {
        "scores": torch.tensor([0.25, 0.5, 0.75]),
        "labels": torch.tensor([3, 1, 2]),
        "boxes": torch.tensor([[1.0, 2.0, 4.5, 6.0], [0.0, 0.0, 1.0, 1.0], [2.0, 3.0, 2.5, 3.25]]),
        "masks": masks,
    }
    entries = detections_to_coco(torch.tensor([42]), result)
    assert [e["image_id"] for e in entries] == [42, 42, 42]
    assert [e["category_id"] for e in entries] == [3, 1, 2]
    assert [e["score"] for e in entries] == [0.25, 0.5, 0.75]
    assert entries[0]["bbox"] == [1.0, 2.0, 3.5, 4.0]
    assert entries[2]["bbox"] == [2.0, 3.0, 0.5, 0.25]
    json.dumps(entries)  # str RLE counts, plain Python numbers
    for entry, mask in zip(entries, masks, strict=True):
        assert isinstance(entry["segmentation"]["counts"], str)
        assert entry["segmentation"]["size"] == [5, 7]
        decoded = mask_utils.decode({**entry["segmentation"], "counts": entry["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded, mask[0].numpy())

    kept = detections_to_coco(7, result, score_threshold=0.4)
    assert [e["score"] for e in kept] == [0.5, 0.75]
    assert [e["category_id"] for e in kept] == [1, 2]
    assert [e["segmentation"] for e in kept] == [e["segmentation"] for e in entries[1:]]
    assert detections_to_coco(7, result, score_threshold=0.8) == []


def test_detections_to_coco_label_to_category():
    result = {"scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 2]), "boxes": torch.zeros(2, 4)}
    assert [e["category_id"] for e in detections_to_coco(1, result, label_to_category=[5, 6, 9])] == [5, 9]
    assert [e["category_id"] for e in detections_to_coco(1, result, label_to_category={0: 11, 2: 13})] == [11, 13]
    with pytest.raises(ValueError, match="no category"):
        detections_to_coco(1, result, label_to_category={0: 11})
    with pytest.raises(ValueError, match="no category"):
        detections_to_coco(1, result, label_to_category=[5, 6])


# ----------------------------------------------------------------------------------------------
# CocoEvaluator
# ----------------------------------------------------------------------------------------------


def test_ground_truth_scores_ap_one(coco_gt):
    image_ids = sorted(coco_gt.getImgIds())
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({i: _gt_result(coco_gt, i) for i in image_ids})
    metrics = _summarize(evaluator)["bbox"]
    assert evaluator.image_ids == image_ids
    assert set(metrics) == set(STAT_NAMES)
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name
    assert len(evaluator.results_json()) == sum(len(_objects(coco_gt, i)) for i in image_ids)


def test_ground_truth_masks_score_ap_one(coco_gt):
    image_ids = sorted(coco_gt.getImgIds())[:30]  # masks at full size: a subset keeps the test fast
    evaluator = CocoEvaluator(coco_gt, ("bbox", "segm"))
    evaluator.update({i: _gt_result(coco_gt, i, masks=True) for i in image_ids})
    metrics = _summarize(evaluator)
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert metrics[iou_type][name] == pytest.approx(1.0, abs=1e-12), (iou_type, name)
    # The results json carries both fields and survives json; per-type views carry one each.
    entries = evaluator.results_json()
    assert len(entries) == sum(len(_objects(coco_gt, i)) for i in image_ids)
    json.dumps(entries)
    assert all("bbox" in e and "segmentation" in e for e in entries)
    assert all("segmentation" not in e for e in evaluator.results_json("bbox"))
    assert all("bbox" not in e for e in evaluator.results_json("segm"))


def test_perturbed_matches_cocoeval_run_directly(coco_gt):
    image_ids = sorted(coco_gt.getImgIds())
    results, direct = _perturbed(coco_gt, image_ids, seed=0)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(dict(list(results.items())[:30]))  # in several calls, as per batch
    evaluator.update(dict(list(results.items())[30:]))
    ours = _summarize(evaluator)["bbox"]
    expected = _cocoeval_directly(coco_gt, direct, image_ids)
    assert 0.05 < expected["AP"] < 0.95  # a non-trivial score
    for name in STAT_NAMES:
        assert ours[name] == pytest.approx(expected[name], abs=1e-9), name
    assert len(evaluator.results_json()) == len(direct)


def test_perturbed_masks_match_cocoeval_run_directly(coco_gt):
    # Relabelled masks are false positives whose area (from the mask, as for the reference's segm
    # results, not from a box) decides their area range: APs/APm/APl check that.
    image_ids = sorted(coco_gt.getImgIds())[:30]
    category_ids = sorted(coco_gt.getCatIds())
    gen = torch.Generator().manual_seed(4)
    evaluator = CocoEvaluator(coco_gt, ("segm",))
    direct = []
    for image_id in image_ids:
        result = _gt_result(coco_gt, image_id, masks=True)
        n = result["labels"].shape[0]
        keep = torch.rand(n, generator=gen) > 0.15
        relabel = torch.rand(n, generator=gen) < 0.3
        other = torch.tensor(category_ids)[torch.randint(len(category_ids), (n,), generator=gen)]
        result["labels"] = torch.where(relabel, other, result["labels"])
        result["scores"] = torch.rand(n, generator=gen)
        result = {k: v[keep] for k, v in result.items()}
        evaluator.update({image_id: result})
        anns = [a for a, kept in zip(_objects(coco_gt, image_id), keep.tolist(), strict=True) if kept]
        for ann, category, score in zip(anns, result["labels"].tolist(), result["scores"].tolist(), strict=True):
            rle = coco_gt.annToRLE(ann)
            direct.append({"image_id": image_id, "category_id": category, "segmentation": rle, "score": score})
    ours = _summarize(evaluator)["segm"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(direct), iouType="segm")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    expected = dict(zip(STAT_NAMES, coco_eval.stats.tolist(), strict=True))
    assert 0.05 < expected["AP"] < 0.95
    for name in STAT_NAMES:
        assert ours[name] == pytest.approx(expected[name], abs=1e-9), name


def test_only_evaluated_images_count(coco_gt):
    image_ids = sorted(coco_gt.getImgIds())[:10]
    results, direct = _perturbed(coco_gt, image_ids, seed=1)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(results)
    assert _summarize(evaluator)["bbox"] == pytest.approx(_cocoeval_directly(coco_gt, direct, image_ids), abs=1e-9)
    # Perfect detections on a subset are perfect: the other images' ground truth is not counted.
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({i: _gt_result(coco_gt, i) for i in image_ids})
    assert _summarize(evaluator)["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12)


def test_first_result_of_an_image_wins(coco_gt):
    image_id = sorted(coco_gt.getImgIds())[0]
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({image_id: _gt_result(coco_gt, image_id)})
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator.update({image_id: empty})
    assert len(evaluator.results_json()) == len(_objects(coco_gt, image_id))
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.update({-5: empty})


def test_label_to_category(coco_gt):
    category_ids = sorted(coco_gt.getCatIds())
    label_of = {c: i for i, c in enumerate(category_ids)}
    image_ids = sorted(coco_gt.getImgIds())
    native = CocoEvaluator(coco_gt)
    as_list = CocoEvaluator(coco_gt, label_to_category=category_ids)
    as_dict = CocoEvaluator(coco_gt, label_to_category=dict(enumerate(category_ids)))
    for image_id in image_ids:
        result = _gt_result(coco_gt, image_id)
        native.update({image_id: result})
        remapped = {**result, "labels": torch.tensor([label_of[c] for c in result["labels"].tolist()])}
        as_list.update({image_id: remapped})
        as_dict.update({image_id: remapped})
    assert as_list.results_json() == native.results_json()
    assert as_dict.results_json() == native.results_json()
    assert _summarize(as_dict)["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12)


def test_empty_detections_give_zeros(coco_gt):
    evaluator = CocoEvaluator(coco_gt, ("bbox", "segm"))
    assert _summarize(evaluator) == {t: dict.fromkeys(STAT_NAMES, 0.0) for t in ("bbox", "segm")}  # no images
    for image_id in coco_gt.getImgIds():
        info = coco_gt.imgs[image_id]
        evaluator.update(
            {
                image_id: {
                    "scores": torch.zeros(0),
                    "labels": torch.zeros(0, dtype=torch.int64),
                    "boxes": torch.zeros(0, 4),
                    "masks": torch.zeros(0, 1, info["height"], info["width"], dtype=torch.uint8),
                }
            }
        )
    assert evaluator.results_json() == []
    # Every area range has ground truth in coco-mini val, so pycocotools says 0 everywhere.
    assert _summarize(evaluator) == {t: dict.fromkeys(STAT_NAMES, 0.0) for t in ("bbox", "segm")}


def test_score_threshold_filters(coco_gt):
    image_ids = sorted(coco_gt.getImgIds())
    results, direct = _perturbed(coco_gt, image_ids, seed=2)
    evaluator = CocoEvaluator(coco_gt, score_threshold=0.5)
    evaluator.update(results)
    entries = evaluator.results_json()
    assert len(entries) == sum(d["score"] > 0.5 for d in direct) < len(direct)
    expected = _cocoeval_directly(coco_gt, [d for d in direct if d["score"] > 0.5], image_ids)
    assert _summarize(evaluator)["bbox"] == pytest.approx(expected, abs=1e-9)


DIST_IMAGES = 16  # few: the spawned processes' torch import is the cost


def _distributed_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        coco = _load_gt()
        image_ids = sorted(coco.getImgIds())[:DIST_IMAGES]
        results, _ = _perturbed(coco, image_ids, seed=3)
        mine = {i: results[i] for i in image_ids[rank::world_size]}
        if rank == 0:  # a padding repeat of rank 1's first image, with different detections: rank 0's wins
            mine[image_ids[1]] = results[image_ids[0]] | {"labels": results[image_ids[0]]["labels"] * 0 + 1}
        evaluator = CocoEvaluator(coco)
        evaluator.update(mine)
        evaluator.synchronize()
        metrics = evaluator.summarize(verbose=False)["bbox"]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "ids": evaluator.image_ids}))
    finally:
        dist.destroy_process_group()


def test_synchronize_gathers_all_processes(coco_gt, tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    image_ids = sorted(coco_gt.getImgIds())[:DIST_IMAGES]
    results, _ = _perturbed(coco_gt, image_ids, seed=3)
    single = CocoEvaluator(coco_gt)
    repeat = results[image_ids[0]] | {"labels": results[image_ids[0]]["labels"] * 0 + 1}
    single.update({**{i: results[i] for i in image_ids[0::2]}, image_ids[1]: repeat})
    single.update({i: results[i] for i in image_ids[1::2]})
    expected = _summarize(single)["bbox"]
    for rank in range(2):
        gathered = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert gathered["ids"] == image_ids
        assert gathered["metrics"] == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# evaluate()
# ----------------------------------------------------------------------------------------------


class _GroundTruthModel(nn.Module):
    """Stand-in for DETR: answers each batch, in order, with its targets' ground truth."""

    def __init__(self, coco: COCO, batches: list[list[dict]], num_classes: int, *, masks: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # so that train()/eval() have something to act on
        self.outputs = [self._answer(coco, targets, num_classes, masks) for targets in batches]
        self.calls = 0

    @staticmethod
    def _answer(coco: COCO, targets: list[dict], num_classes: int, masks: bool) -> dict[str, Tensor]:
        objects = [_objects(coco, int(t["image_id"])) for t in targets]
        num_queries = max(len(o) for o in objects) + 2  # spare queries answer "no object"
        logits = torch.zeros(len(targets), num_queries, num_classes + 1)
        logits[:, :, -1] = 10.0
        boxes = torch.full((len(targets), num_queries, 4), 0.25)
        padded_h = max(int(t["size"][0]) for t in targets)
        padded_w = max(int(t["size"][1]) for t in targets)
        mask_logits = torch.full((len(targets), num_queries, padded_h, padded_w), -10.0)
        for b, (target, anns) in enumerate(zip(targets, objects, strict=True)):
            height, width = target["orig_size"].tolist()
            for q, ann in enumerate(anns):
                logits[b, q, -1] = 0.0
                logits[b, q, ann["category_id"]] = 10.0
                x, y, w, h = ann["bbox"]
                boxes[b, q] = torch.tensor([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
                if masks:  # at the input size, which the segm test keeps equal to the original size
                    gt_mask = torch.from_numpy(coco.annToMask(ann)).bool()
                    mask_logits[b, q, :height, :width][gt_mask] = 10.0
        outputs = {"pred_logits": logits, "pred_boxes": boxes}
        if masks:
            outputs["pred_masks"] = mask_logits
        return outputs

    def forward(self, images: ImageBatch) -> dict[str, Tensor]:
        assert not self.training
        outputs = self.outputs[self.calls]
        self.calls += 1
        assert images.pixels.shape[0] == outputs["pred_logits"].shape[0]
        return {k: v * self.scale if k == "pred_boxes" else v for k, v in outputs.items()}


def _batches(coco: COCO, image_ids: list[int], scales: list[float]) -> list[tuple[ImageBatch, list[dict]]]:
    """Batches of two images of different sizes, with network-input sizes = scale * original size."""
    batches = []
    for start in range(0, len(image_ids), 2):
        targets, images = [], []
        for image_id, scale in zip(image_ids[start : start + 2], scales[start : start + 2], strict=True):
            info = coco.imgs[image_id]
            size = (round(info["height"] * scale), round(info["width"] * scale))
            targets.append(
                {
                    "image_id": torch.tensor([image_id]),
                    "orig_size": torch.tensor([info["height"], info["width"]]),
                    "size": torch.tensor(size),
                }
            )
            images.append(torch.zeros(3, *size))
        assert targets[0]["size"].tolist() != targets[1]["size"].tolist()
        batches.append((ImageBatch.from_images(images), targets))
    return batches


def _small_images(coco: COCO, count: int) -> list[int]:
    """``count`` images with few objects, consecutive pairs of different original sizes."""
    chosen: list[int] = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        if not 1 <= len(_objects(coco, image_id)) <= 6:
            continue
        if len(chosen) % 2 == 1 and (info["height"], info["width"]) == (
            coco.imgs[chosen[-1]]["height"],
            coco.imgs[chosen[-1]]["width"],
        ):
            continue
        chosen.append(image_id)
        if len(chosen) == count:
            return chosen
    raise AssertionError("coco-mini val has too few small images")


def _loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def test_evaluate_end_to_end_bbox(coco_gt):
    image_ids = _small_images(coco_gt, 4)
    batches = _batches(coco_gt, image_ids, scales=[0.5, 0.75, 0.6, 0.4])
    num_classes = max(coco_gt.getCatIds()) + 1
    model = _GroundTruthModel(coco_gt, [targets for _, targets in batches], num_classes)
    model.train()
    metrics = evaluate(model, _loader(batches), coco_gt=coco_gt, progress=False)
    assert model.training  # restored
    assert model.calls == 2
    assert set(metrics) == {"bbox", "num_images", "seconds", "timing"}
    assert metrics["num_images"] == 4
    assert metrics["seconds"] > 0 and all(v >= 0 for v in metrics["timing"].values())
    assert sum(metrics["timing"].values()) == pytest.approx(metrics["seconds"], rel=1e-3, abs=1e-3)
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics["bbox"][name] == pytest.approx(1.0, abs=1e-12), name
    # Collated DetectionBatches (one with every image dropped) and autocast work the same.
    model.calls = 0
    collated = [DetectionBatch(images, targets) for images, targets in batches]
    collated.insert(1, DetectionBatch(None, [], skipped=2))
    metrics = evaluate(model, _loader(collated), coco_gt=coco_gt, amp_dtype=torch.bfloat16, progress=False)
    assert metrics["num_images"] == 4 and model.calls == 2
    assert metrics["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12)


def test_evaluate_end_to_end_segm(coco_gt):
    image_ids = _small_images(coco_gt, 4)
    batches = _batches(coco_gt, image_ids, scales=[1.0] * 4)  # masks are exact only at the original size
    num_classes = max(coco_gt.getCatIds()) + 1
    model = _GroundTruthModel(coco_gt, [targets for _, targets in batches], num_classes, masks=True)
    metrics = evaluate(model, _loader(batches), coco_gt=coco_gt, progress=False)
    assert metrics["num_images"] == 4
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert metrics[iou_type][name] == pytest.approx(1.0, abs=1e-12), (iou_type, name)
    # Asking for bbox only skips the masks.
    model.calls = 0
    metrics = evaluate(model, _loader(batches), coco_gt=coco_gt, iou_types=("bbox",), progress=False)
    assert "segm" not in metrics and metrics["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12)
