"""COCO evaluation with pycocotools: detections -> COCO results json -> COCOeval's 12 numbers.

The flow is the reference's: post-processed detections (absolute xyxy boxes at the original image
size, one per query) become COCO result entries (xywh boxes, compressed-RLE masks), are gathered
from every process, and are scored by ``COCOeval`` on exactly the images that were evaluated.

Running COCOeval once on all results gives the same numbers as the reference's per-batch evaluation
followed by merging, because COCOeval scores every image independently and accumulates over the
sorted image ids either way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from tqdm import tqdm

from detr.boxes import xyxy_to_xywh
from detr.distributed import gather_objects, is_main_process, world_size
from detr.postprocess import postprocess_detections, postprocess_masks, uses_focal

__all__ = [
    "STAT_NAMES",
    "CocoEvaluator",
    "detections_to_coco",
    "evaluate",
    "masks_to_rle",
]

# The order of COCOeval.stats (bbox and segm).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")

LabelMap = Sequence[int] | Mapping[int, int] | Tensor


def _category_table(label_to_category: LabelMap) -> Tensor:
    """Label -> category id lookup table (int64, CPU); -1 marks labels without a category."""
    if isinstance(label_to_category, Tensor):
        return label_to_category.detach().to("cpu", torch.int64)
    if isinstance(label_to_category, Mapping):
        size = max(label_to_category, default=-1) + 1
        table = torch.full((size,), -1, dtype=torch.int64)
        for label, category in label_to_category.items():
            table[int(label)] = int(category)
        return table
    return torch.as_tensor(list(label_to_category), dtype=torch.int64)


def _labels_to_categories(labels: Tensor, label_to_category: LabelMap | None) -> Tensor:
    """[N] class labels -> [N] COCO category ids (the labels themselves when there is no mapping)."""
    labels = labels.long()
    if label_to_category is None:
        return labels
    table = _category_table(label_to_category)
    if labels.numel() == 0:
        return labels
    in_range = (labels >= 0) & (labels < table.shape[0])  # [N]
    categories = torch.full_like(labels, -1)
    categories[in_range] = table[labels[in_range]]
    if (categories < 0).any():
        missing = sorted(set(labels[categories < 0].tolist()))
        raise ValueError(f"labels {missing} have no category in label_to_category")
    return categories


def masks_to_rle(masks: Tensor) -> list[dict[str, Any]]:
    """Binary masks [N, 1, H, W] or [N, H, W] (bool, or values thresholded at 0.5) -> N compressed RLEs.

    ``counts`` is decoded to str so that the entries can go through ``json.dump``.
    """
    if masks.dim() == 4:
        masks = masks[:, 0]  # [N, H, W]
    if masks.shape[0] == 0:
        return []
    array = masks.detach().cpu().numpy().transpose(1, 2, 0)  # [H, W, N] view
    # pycocotools wants a Fortran-ordered uint8 [H, W, N] array; numpy thresholds and reorders in one
    # pass (several times faster than a torch threshold followed by a strided copy).
    rles = mask_utils.encode((array > 0.5).astype(np.uint8, order="F"))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return rles


def detections_to_coco(
    image_id: int | Tensor,
    result: Mapping[str, Tensor],
    *,
    label_to_category: LabelMap | None = None,
    score_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """One image's post-processed detections -> COCO results json entries.

    Args:
        image_id: the COCO image id (int or a one-element tensor).
        result: ``scores`` [N], ``labels`` [N], ``boxes`` [N, 4] (xyxy pixels at the original size) and
            optionally ``masks`` [N, 1, H, W] (uint8/bool at the original size).
        label_to_category: label -> COCO category id (list, dict or tensor); None when the labels
            already are category ids (the reference's COCO convention).
        score_threshold: if given, keep only detections with score > threshold.

    Returns:
        one dict per detection, in query order: ``image_id``, ``category_id``, ``bbox`` (xywh floats),
        ``score`` and, with masks, ``segmentation`` (compressed RLE with str counts).
    """
    scores, labels, boxes_xyxy = (result[key].detach().cpu() for key in ("scores", "labels", "boxes"))
    masks = result.get("masks")
    if score_threshold is not None:
        keep = scores > score_threshold  # [N]
        scores, labels, boxes_xyxy = scores[keep], labels[keep], boxes_xyxy[keep]
        if masks is not None:
            masks = masks[keep.to(masks.device)]
    if boxes_xyxy.dtype in (torch.float16, torch.bfloat16):
        boxes_xyxy = boxes_xyxy.float()  # widths from half-precision corners would lose pixels
    categories = _labels_to_categories(labels, label_to_category)
    boxes_xywh = xyxy_to_xywh(boxes_xyxy)  # [N, 4]
    image_id = int(image_id)
    entries = [
        {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
        for category, box, score in zip(categories.tolist(), boxes_xywh.tolist(), scores.tolist(), strict=True)
    ]
    if masks is not None:
        for entry, rle in zip(entries, masks_to_rle(masks), strict=True):
            entry["segmentation"] = rle
    return entries


def _entries_for(entries: Iterable[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Fresh copies of the entries with the fields of one iou type.

    Segm entries carry no bbox so that loadRes takes the box and the area from the mask, as for the
    reference's segm results; loadRes also writes into the dicts it gets, hence the copies.
    """
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in entry.items() if k != drop} for entry in entries]


def _load_results(coco_gt: COCO, entries: list[dict[str, Any]]) -> COCO:
    """``coco_gt.loadRes(entries)``, also for an empty list (where loadRes fails on ``anns[0]``)."""
    if entries:
        return coco_gt.loadRes(entries)
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


class CocoEvaluator:
    """Accumulates COCO result entries per image and scores them with COCOeval.

    Args:
        coco_gt: the ground truth (``pycocotools.coco.COCO``).
        iou_types: ("bbox",) or ("bbox", "segm") (segm needs ``masks`` in every result).
        label_to_category: see :func:`detections_to_coco`.
        score_threshold: see :func:`detections_to_coco`.

    An image seen twice keeps its first result (distributed samplers pad by repeating images; the
    reference keeps the first occurrence too).
    """

    def __init__(
        self,
        coco_gt: COCO,
        iou_types: Sequence[str] = ("bbox",),
        *,
        label_to_category: LabelMap | None = None,
        score_threshold: float | None = None,
    ) -> None:
        iou_types = tuple(iou_types)
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
        self.coco_gt = coco_gt
        self.iou_types = iou_types
        self.score_threshold = score_threshold
        self._category_table = None if label_to_category is None else _category_table(label_to_category)
        self._gt_image_ids = set(coco_gt.getImgIds())
        self._per_image: dict[int, list[dict[str, Any]]] = {}
        self.coco_evals: dict[str, COCOeval] = {}  # filled by summarize(), for per-category analysis

    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images evaluated so far."""
        return sorted(self._per_image)

    def update(self, results_by_image: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Add post-processed results, keyed by COCO image id (see :func:`detections_to_coco`)."""
        for image_id, result in results_by_image.items():
            image_id = int(image_id)
            if image_id not in self._gt_image_ids:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            if image_id in self._per_image:
                continue
            if "segm" in self.iou_types:
                if "masks" not in result:
                    raise ValueError(f"segm evaluation needs 'masks' in the result of image {image_id}")
            else:
                result = {k: v for k, v in result.items() if k != "masks"}  # no RLE work for bbox only
            self._per_image[image_id] = detections_to_coco(
                image_id, result, label_to_category=self._category_table, score_threshold=self.score_threshold
            )

    def synchronize(self) -> None:
        """Gather every process's results onto every process (no-op without torch.distributed)."""
        if world_size() == 1:
            return
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in gather_objects(list(self._per_image.items())):  # rank order; the first result of an image wins
            for image_id, entries in part:
                merged.setdefault(image_id, entries)
        self._per_image = merged

    def results_json(self, iou_type: str | None = None) -> list[dict[str, Any]]:
        """The accumulated COCO results (a list ready for ``json.dump``), in image order.

        With ``iou_type`` "bbox" or "segm", only that type's fields (the file COCOeval would load for it).
        """
        if iou_type is not None and iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be None or one of {IOU_TYPES}, got {iou_type!r}")
        entries = (entry for image_id in self.image_ids for entry in self._per_image[image_id])
        if iou_type is None:
            return [dict(entry) for entry in entries]
        return _entries_for(entries, iou_type)

    def summarize(self, verbose: bool = True) -> dict[str, dict[str, float]]:
        """Run COCOeval per iou type on the evaluated images and return its 12 numbers by name.

        Prints pycocotools' summary when ``verbose``. Numbers are pycocotools' (-1 where an area
        range has no ground truth); with no image evaluated at all every number is 0.
        """
        metrics: dict[str, dict[str, float]] = {}
        image_ids = self.image_ids
        output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with output:
            for iou_type in self.iou_types:
                print(f"IoU metric: {iou_type}")
                if not image_ids:
                    print("no images were evaluated")
                    metrics[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
                    continue
                coco_dt = _load_results(self.coco_gt, self.results_json(iou_type))
                coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
                coco_eval.params.imgIds = image_ids
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
                self.coco_evals[iou_type] = coco_eval
                metrics[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}
        return metrics


def target_image_id(target: Mapping[str, Any]) -> int:
    image_id = target["image_id"]
    return int(image_id.reshape(-1)[0]) if isinstance(image_id, Tensor) else int(image_id)


def target_sizes(targets: Sequence[Mapping[str, Any]], key: str) -> Tensor:
    """[B, 2] (h, w) from each target's ``key``."""
    return torch.stack([torch.as_tensor(t[key]).reshape(2).cpu() for t in targets])  # [B, 2]


def model_outputs(
    model: nn.Module, data_loader: Iterable, *, device: torch.device, amp_dtype: torch.dtype | None, progress: bool
) -> Iterator[tuple[dict[str, Tensor], list[dict[str, Any]]]]:
    """(outputs in float32, targets) per batch, the model in eval mode under inference_mode; the
    model's train/eval state is restored afterwards. Batches whose images were all dropped are skipped."""
    is_main = is_main_process()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, targets in tqdm(data_loader, desc="evaluate", disable=not (progress and is_main)):
                if images is None:  # every image of the batch was dropped by the dataset
                    continue
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = model(images.to(device, non_blocking=True))
                kept = ("pred_logits", "pred_boxes", "pred_masks")  # aux outputs are not evaluated
                yield {k: v.float() for k, v in outputs.items() if k in kept}, targets
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    data_loader: Iterable,
    *,
    coco_gt: COCO,
    device: str | torch.device = "cpu",
    iou_types: Sequence[str] | None = None,
    label_to_category: LabelMap | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    focal: bool | None = None,
) -> dict[str, Any]:
    """COCO evaluation of ``model`` over ``data_loader``.

    Args:
        model: ImageBatch -> ``pred_logits`` [B, Q, K+1], ``pred_boxes`` [B, Q, 4] (normalized cxcywh)
            and optionally ``pred_masks`` [B, Q, h, w].
        data_loader: yields ``(ImageBatch, targets)`` (or a DetectionBatch); each target has
            ``image_id``, ``orig_size`` (h, w on disk) and ``size`` (h, w of the network input).
        coco_gt: the ground truth.
        iou_types: default ("bbox",), plus "segm" when the model outputs ``pred_masks``.
        label_to_category: label -> COCO category id; None when labels are category ids.
        amp_dtype: run the model under autocast with this dtype (post-processing stays float32).
        progress: show a tqdm bar (on the main process).
        focal: the logits are K sigmoid scores (see :func:`detr.postprocess.postprocess_detections`);
            default: what the model's config says (:func:`detr.postprocess.uses_focal`).

    Returns:
        {"bbox": {AP, AP50, ..., ARl}, ("segm": {...},) "num_images": N, "seconds": wall time,
        "timing": {"data_and_model", "postprocess_and_convert", "cocoeval"} seconds}.
        Under torch.distributed every process returns the numbers for all processes' images.
    """
    device = torch.device(device)
    is_main = is_main_process()
    focal = uses_focal(model) if focal is None else focal
    evaluator = None
    start = time.perf_counter()
    convert_seconds = 0.0  # post-processing + conversion to COCO results (the rest: data and model)
    for outputs, targets in model_outputs(model, data_loader, device=device, amp_dtype=amp_dtype, progress=progress):
        convert_start = time.perf_counter()
        if evaluator is None:
            types = iou_types or (("bbox", "segm") if "pred_masks" in outputs else ("bbox",))
            evaluator = CocoEvaluator(coco_gt, types, label_to_category=label_to_category)
        orig_sizes = target_sizes(targets, "orig_size")  # [B, 2]
        results = postprocess_detections(outputs, orig_sizes, focal=focal)
        if "segm" in evaluator.iou_types:
            if "pred_masks" not in outputs:
                raise ValueError("segm evaluation needs a model that outputs pred_masks")
            postprocess_masks(results, outputs["pred_masks"], target_sizes(targets, "size"), orig_sizes)
        evaluator.update({target_image_id(t): r for t, r in zip(targets, results, strict=True)})
        convert_seconds += time.perf_counter() - convert_start
    loop_seconds = time.perf_counter() - start
    if evaluator is None:  # an empty loader
        evaluator = CocoEvaluator(coco_gt, iou_types or ("bbox",), label_to_category=label_to_category)
    evaluator.synchronize()
    metrics: dict[str, Any] = dict(evaluator.summarize(verbose=is_main))
    metrics["num_images"] = len(evaluator.image_ids)
    metrics["seconds"] = time.perf_counter() - start
    # Where the time went: loading + the model, post-processing + conversion, pycocotools' scoring.
    metrics["timing"] = {"data_and_model": loop_seconds - convert_seconds, "postprocess_and_convert": convert_seconds,
                         "cocoeval": metrics["seconds"] - loop_seconds}
    return metrics
