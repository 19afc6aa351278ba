"""Panoptic quality (PQ) with the COCO panoptic definition, and the panoptic evaluation of a model.

Per image, with segments read from the PNG id maps (0 = void in the ground truth) and the jsons:

- a prediction and a ground-truth segment of the same category match when IoU > 0.5, where the union
  leaves out the prediction's void pixels: IoU = |P & G| / (|P| + |G| - |P & G| - |P & void|).
  |P| is counted in the PNG, |G| is the ground truth's json ``area`` (as in panopticapi); crowd
  segments never match. IoU > 0.5 makes matches unique.
- unmatched non-crowd ground truth segments are false negatives (FN);
- an unmatched prediction is ignored when more than half of it lies on void plus the crowd region of
  its own category (if several crowd segments of a category are listed, the last one counts), and is
  a false positive (FP) otherwise.

Per category: PQ = sum(IoU of matches) / (TP + FP/2 + FN/2) = SQ * RQ with SQ = sum(IoU) / TP (0
without TP) and RQ = TP / (TP + FP/2 + FN/2). "All", "Things" and "Stuff" average over the ground
truth's categories (``isthing`` 1 / 0) that have TP + FP + FN > 0; ``n`` counts them. These are
panopticapi's numbers (``pq_compute``), except that an average over no category is 0 (n = 0) where
panopticapi divides by zero. Values are fractions (panopticapi prints them x100).

A predicted segment id 0 is a segment like any other when the prediction json lists it; pixels with
an unlisted id 0 are unlabeled. Every prediction id in the PNG must be listed and vice versa.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from detr.coco_panoptic import read_panoptic_json, read_segment_ids, segment_ids_to_png
from detr.distributed import gather_objects, is_main_process, world_size
from detr.engine.evaluate import CocoEvaluator, model_outputs, target_image_id, target_sizes
from detr.postprocess import postprocess_detections, postprocess_masks, postprocess_panoptic

log = logging.getLogger(__name__)

__all__ = ["PQAccumulator", "PanopticEvaluator", "evaluate_panoptic", "pq_compute"]

VOID = 0
OFFSET = 1 << 24  # segment ids are 24-bit (RGB): gt * OFFSET + pred is a unique pair key


@dataclass
class CategoryCounts:
    iou: float = 0.0  # sum of the IoU of the matches
    tp: int = 0
    fp: int = 0
    fn: int = 0


class PQAccumulator:
    """PQ statistics per category, accumulated image by image (see the module docstring).

    categories: the ground truth's categories (dicts with ``id`` and ``isthing``; a missing
        ``isthing`` counts as a thing).
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        self.categories = {int(c["id"]): dict(c) for c in categories}
        self.counts = {category: CategoryCounts() for category in self.categories}
        self.num_images = 0

    def _checked_areas(self, pred: Mapping[int, Mapping[str, Any]], pred_ids: np.ndarray, image: str) -> dict[int, int]:
        """Each predicted segment's pixel count, after checking that the json and the PNG agree."""
        unknown = sorted({int(s["category_id"]) for s in pred.values()} - set(self.categories))
        if unknown:
            raise ValueError(f"{image}: predicted category ids {unknown} are not ground-truth categories")
        ids, counts = np.unique(pred_ids, return_counts=True)
        pred_area = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        unlisted = sorted(set(pred_area) - set(pred) - {VOID})
        if unlisted:
            raise ValueError(f"{image}: predicted segment ids {unlisted} are in the PNG but not in the json")
        absent = sorted(set(pred) - set(pred_area))
        if absent:
            raise ValueError(f"{image}: predicted segment ids {absent} are in the json but not in the PNG")
        return pred_area

    def add_image(
        self,
        gt_ids: np.ndarray,
        gt_segments: Sequence[Mapping[str, Any]],
        pred_ids: np.ndarray,
        pred_segments: Sequence[Mapping[str, Any]],
        *,
        image: str = "image",
    ) -> None:
        """Add one image: id maps [H, W] and the ``segments_info`` lists of the two jsons.

        ``image`` names the image in error messages.
        """
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"{image}: prediction is {pred_ids.shape} (h, w), ground truth is {gt_ids.shape}")
        gt = {int(s["id"]): s for s in gt_segments}
        pred = {int(s["id"]): s for s in pred_segments}
        pred_area = self._checked_areas(pred, pred_ids, image)

        pair_keys, pair_counts = np.unique(
            gt_ids.astype(np.int64) * OFFSET + pred_ids.astype(np.int64), return_counts=True
        )
        overlap = {  # (gt id, pred id) -> pixels, in increasing key order
            (int(k) // OFFSET, int(k) % OFFSET): int(n) for k, n in zip(pair_keys, pair_counts, strict=True)
        }

        def on_void(pred_id: int) -> int:
            return overlap.get((VOID, pred_id), 0)

        matched_gt: set[int] = set()
        matched_pred: set[int] = set()
        for (gt_id, pred_id), shared in overlap.items():
            g, p = gt.get(gt_id), pred.get(pred_id)
            if g is None or p is None or int(g.get("iscrowd", 0)) == 1:
                continue
            if int(g["category_id"]) != int(p["category_id"]):
                continue
            gt_area = g["area"] if "area" in g else int((gt_ids == gt_id).sum())
            iou = shared / (pred_area[pred_id] + gt_area - shared - on_void(pred_id))
            if iou > 0.5:
                stats = self.counts[int(g["category_id"])]
                stats.tp += 1
                stats.iou += iou
                matched_gt.add(gt_id)
                matched_pred.add(pred_id)

        crowd_of: dict[int, int] = {}  # category -> its crowd segment's id
        for gt_id, g in gt.items():
            if gt_id in matched_gt:
                continue
            if int(g.get("iscrowd", 0)) == 1:
                crowd_of[int(g["category_id"])] = gt_id
            else:
                self.counts[int(g["category_id"])].fn += 1

        for pred_id, p in pred.items():
            if pred_id in matched_pred:
                continue
            category = int(p["category_id"])
            ignored = on_void(pred_id)
            if category in crowd_of:
                ignored += overlap.get((crowd_of[category], pred_id), 0)
            if ignored / pred_area[pred_id] > 0.5:
                continue
            self.counts[category].fp += 1
        self.num_images += 1

    def _average(self, isthing: bool | None) -> tuple[dict[str, float], dict[int, dict[str, Any]]]:
        total = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        n = 0
        per_class: dict[int, dict[str, Any]] = {}
        for category, info in self.categories.items():
            if isthing is not None and (int(info.get("isthing", 1)) == 1) != isthing:
                continue
            c = self.counts[category]
            values = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            if c.tp + c.fp + c.fn > 0:
                n += 1
                denominator = c.tp + 0.5 * c.fp + 0.5 * c.fn
                values = {"pq": c.iou / denominator, "sq": c.iou / c.tp if c.tp else 0.0, "rq": c.tp / denominator}
                for key in total:
                    total[key] += values[key]
            per_class[category] = {**values, "tp": c.tp, "fp": c.fp, "fn": c.fn}
        average = {key: value / n if n else 0.0 for key, value in total.items()}
        return {**average, "n": n}, per_class

    def summarize(self) -> dict[str, Any]:
        """{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category id: {"pq", "sq", "rq",
        "tp", "fp", "fn"}}, "num_images"}; per_class covers every ground-truth category (0s where absent)."""
        results: dict[str, Any] = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            results[name], per_class = self._average(isthing)
            if isthing is None:
                all_classes = per_class
        results["per_class"] = all_classes
        results["num_images"] = self.num_images
        return results


def pq_compute(
    gt_json: str | Path,
    gt_folder: str | Path,
    pred_json: str | Path,
    pred_folder: str | Path,
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """COCO panoptic quality of a prediction json + PNG folder against a ground truth json + PNG folder.

    Every ground-truth image (or each of ``image_ids``, a subset of them) needs a prediction entry.
    Returns :meth:`PQAccumulator.summarize`'s dict.
    """
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    gt_folder, pred_folder = Path(gt_folder), Path(pred_folder)
    for folder in (gt_folder, pred_folder):
        if not folder.is_dir():
            raise FileNotFoundError(f"panoptic PNG folder not found: {folder}")
    gt = read_panoptic_json(gt_json, "ground-truth panoptic json", ("annotations", "categories"))
    pred = read_panoptic_json(pred_json, "predicted panoptic json", ("annotations",))
    predictions = {int(a["image_id"]): a for a in pred["annotations"]}
    gt_annotations = gt["annotations"]
    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        gt_annotations = [a for a in gt_annotations if int(a["image_id"]) in wanted]
        missing_gt = wanted - {int(a["image_id"]) for a in gt_annotations}
        if missing_gt:
            raise ValueError(f"{gt_json}: no ground truth for image ids {sorted(missing_gt)[:10]}")

    accumulator = PQAccumulator(gt["categories"])
    for gt_ann in gt_annotations:
        image_id = int(gt_ann["image_id"])
        pred_ann = predictions.get(image_id)
        if pred_ann is None:
            raise ValueError(f"{pred_json}: no prediction for image id {image_id}")
        gt_ids = read_segment_ids(gt_folder / gt_ann["file_name"])
        pred_ids = read_segment_ids(pred_folder / pred_ann["file_name"])
        accumulator.add_image(gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"],
                              image=f"image {image_id} ({pred_folder / pred_ann['file_name']})")
    return accumulator.summarize()


def format_pq_table(results: Mapping[str, Any]) -> str:
    """The All / Things / Stuff lines as panopticapi prints them (x100)."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} {r['n']:5d}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Model evaluation
# ----------------------------------------------------------------------------------------------


class PanopticEvaluator:
    """Writes post-processed panoptic results as COCO panoptic predictions and scores them.

    Predictions go to ``output_dir/panoptic_pred/{image_id:012d}.png`` (ids 1..N; 0 = unlabeled) and
    ``output_dir/panoptic_pred.json``. Segments whose category is not a ground-truth category are
    dropped (their pixels become unlabeled; ``dropped_segments`` counts them), where panopticapi
    would stop with an error. An image seen twice keeps its first result.
    """

    def __init__(self, gt_json: str | Path, gt_folder: str | Path, output_dir: str | Path) -> None:
        self.gt_json, self.gt_folder = Path(gt_json), Path(gt_folder)
        gt = read_panoptic_json(self.gt_json, "ground-truth panoptic json", ("annotations", "categories"))
        self.categories = {int(c["id"]): c for c in gt["categories"]}
        self.gt_image_ids = {int(a["image_id"]) for a in gt["annotations"]}
        self.output_dir = Path(output_dir)
        self.pred_folder = self.output_dir / "panoptic_pred"
        self.pred_json = self.output_dir / "panoptic_pred.json"
        self.pred_folder.mkdir(parents=True, exist_ok=True)
        self._annotations: dict[int, dict[str, Any]] = {}
        self.dropped_segments = 0

    def is_thing(self, category: int) -> bool:
        """The ground truth's ``isthing``; unknown categories (dropped later) count as things."""
        info = self.categories.get(int(category))
        return True if info is None else int(info.get("isthing", 1)) == 1

    @property
    def image_ids(self) -> list[int]:
        return sorted(self._annotations)

    def update(self, image_id: int, result: Mapping[str, Any]) -> None:
        """Add one image's :func:`detr.postprocess.postprocess_panoptic` result."""
        image_id = int(image_id)
        if image_id not in self.gt_image_ids:
            raise ValueError(f"image id {image_id} is not in the ground truth {self.gt_json}")
        if image_id in self._annotations:
            return
        segments = result["segments_info"]
        new_ids = torch.zeros(len(segments) + 1, dtype=torch.int64)  # postprocess id -> written id (0 = dropped)
        kept = []
        for index, segment in enumerate(segments):
            if int(segment["category_id"]) not in self.categories:
                self.dropped_segments += 1
                continue
            new_ids[index] = len(kept) + 1
            kept.append({"id": len(kept) + 1, "category_id": int(segment["category_id"]),
                         "isthing": int(bool(segment["isthing"])), "area": int(segment["area"])})
        id_map = new_ids[result["segment_ids"].long()]  # [H, W]
        file_name = f"{image_id:012d}.png"
        (self.pred_folder / file_name).write_bytes(segment_ids_to_png(id_map))
        self._annotations[image_id] = {"image_id": image_id, "file_name": file_name, "segments_info": kept}

    def synchronize(self) -> None:
        """Gather every process's json entries (the PNGs are already in the shared output folder)."""
        if world_size() == 1:
            return
        gathered = gather_objects((list(self._annotations.items()), self.dropped_segments))
        merged: dict[int, dict[str, Any]] = {}
        for entries, _ in gathered:
            for image_id, entry in entries:
                merged.setdefault(image_id, entry)
        self._annotations = merged
        self.dropped_segments = sum(dropped for _, dropped in gathered)

    def summarize(self) -> dict[str, Any]:
        """Write the prediction json and return :func:`pq_compute` on the images seen."""
        self.pred_json.write_text(json.dumps({"annotations": [self._annotations[i] for i in self.image_ids]}))
        if not self._annotations:
            return PQAccumulator(list(self.categories.values())).summarize()
        return pq_compute(self.gt_json, self.gt_folder, self.pred_json, self.pred_folder, image_ids=self.image_ids)


def evaluate_panoptic(
    model: nn.Module,
    data_loader: Iterable,
    *,
    gt_json: str | Path,
    gt_folder: str | Path,
    output_dir: str | Path,
    coco_gt: Any | None = None,
    device: str | torch.device = "cpu",
    threshold: float = 0.85,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """PQ (and, with ``coco_gt``, bbox and segm AP) of a panoptic model in one pass over the data.

    Args:
        model: ImageBatch -> ``pred_logits`` [B, Q, K+1], ``pred_boxes`` [B, Q, 4], ``pred_masks``
            [B, Q, h, w]; labels are category ids.
        data_loader: yields ``(ImageBatch, targets)``; targets need ``image_id``, ``size`` (network input
            h, w) and ``orig_size`` (h, w on disk, the size of the ground-truth PNG).
        gt_json, gt_folder: the COCO panoptic ground truth.
        output_dir: where the predicted PNGs and json are written.
        coco_gt: a pycocotools COCO with instance annotations for bbox/segm AP (the reference scores
            AP against the instances json); images it does not contain are left out of AP.
        threshold: class-probability threshold of :func:`detr.postprocess.postprocess_panoptic`.

    Returns:
        {"panoptic": pq_compute's dict, ("bbox": {AP...}, "segm": {AP...},) "num_images",
        "dropped_segments", "predictions": {"json", "folder"}, "seconds"}; under torch.distributed
        every process returns the numbers for all images.
    """
    device = torch.device(device)
    start = time.perf_counter()
    panoptic = PanopticEvaluator(gt_json, gt_folder, output_dir)
    coco_eval = None if coco_gt is None else CocoEvaluator(coco_gt, ("bbox", "segm"))
    coco_ids = set() if coco_gt is None else set(coco_gt.getImgIds())
    is_main = is_main_process()
    for outputs, targets in model_outputs(model, data_loader, device=device, amp_dtype=amp_dtype, progress=progress):
        if "pred_masks" not in outputs:
            raise ValueError("panoptic evaluation needs a model that outputs pred_masks (a --masks model)")
        input_sizes, orig_sizes = target_sizes(targets, "size"), target_sizes(targets, "orig_size")  # [B, 2]
        image_ids = [target_image_id(t) for t in targets]
        if coco_eval is not None:
            results = postprocess_detections(outputs, orig_sizes)
            postprocess_masks(results, outputs["pred_masks"], input_sizes, orig_sizes)
            coco_eval.update({i: r for i, r in zip(image_ids, results, strict=True) if i in coco_ids})
        merged = postprocess_panoptic(outputs, input_sizes, orig_sizes, is_thing=panoptic.is_thing,
                                      threshold=threshold)
        for image_id, result in zip(image_ids, merged, strict=True):
            panoptic.update(image_id, result)
    panoptic.synchronize()
    metrics: dict[str, Any] = {}
    if coco_eval is not None:
        coco_eval.synchronize()
        metrics.update(coco_eval.summarize(verbose=is_main))
    metrics["panoptic"] = panoptic.summarize() if is_main else {}
    if world_size() > 1:  # only the main process scores; share its numbers
        shared = [metrics["panoptic"]]
        dist.broadcast_object_list(shared, src=0)
        metrics["panoptic"] = shared[0]
    if is_main:
        print(format_pq_table(metrics["panoptic"]))
    metrics["num_images"] = len(panoptic.image_ids)
    metrics["dropped_segments"] = panoptic.dropped_segments
    metrics["predictions"] = {"json": str(panoptic.pred_json), "folder": str(panoptic.pred_folder)}
    metrics["seconds"] = time.perf_counter() - start
    if panoptic.dropped_segments:
        log.warning("%d predicted segments had categories outside the ground truth and were left unlabeled",
                    panoptic.dropped_segments)
    return metrics
