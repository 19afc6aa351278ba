"""Post-processing: model outputs -> detections, instance masks and panoptic segmentations.

Model outputs are a mapping with ``pred_logits`` [B, Q, K+1] (the last column is "no object"),
``pred_boxes`` [B, Q, 4] (normalized cxcywh) and, for the panoptic model, ``pred_masks`` [B, Q, h, w]
(mask logits at the padded feature resolution). A model trained with sigmoid focal loss
(``config.loss.focal``, ``--focal_loss``) has K logits per query instead, each an independent sigmoid score:
:func:`postprocess_detections` is then told so (``focal=True``, read by :func:`uses_focal` from the model's
config) and ranks the Q x K (query, class) scores, as Deformable DETR does.

Sizes are (h, w) pairs, given as an int tensor [B, 2] or a sequence of pairs:
- ``input_sizes``: each image's size after the transforms, before batch padding;
- ``orig_sizes``: each image's size on disk, where results are reported.

All three functions reproduce the reference implementation's numbers, including its resampling
conventions (bilinear with align_corners=False for mask logits, torch "nearest" for instance masks,
Pillow NEAREST for panoptic id maps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from detr.boxes import box_iou, cxcywh_to_xyxy
from detr.coco_panoptic import rgb_to_segment_ids, segment_ids_to_rgb
from detr.structures import nearest_source_index

Sizes = Tensor | Sequence[Sequence[int]]
IsThing = Callable[[int], bool] | Mapping[int, bool]

# A panoptic segment whose area (at the original size) is at most this many pixels is dropped.
MIN_SEGMENT_AREA = 4

__all__ = [
    "postprocess_detections",
    "uses_focal",
    "postprocess_masks",
    "postprocess_panoptic",
]


def _size_pairs(sizes: Sizes) -> list[tuple[int, int]]:
    """[B, 2] tensor or sequence of (h, w) -> list of int pairs."""
    if isinstance(sizes, Tensor):
        sizes = sizes.tolist()
    return [(int(h), int(w)) for h, w in sizes]


# ----------------------------------------------------------------------------------------------
# Detections
# ----------------------------------------------------------------------------------------------


def uses_focal(model: Any) -> bool:
    """Whether ``model``'s class logits are K sigmoid scores (trained with focal loss), as its config says
    (``config.loss.focal``); False for a model without one (the demo model, a plain callable). A
    DistributedDataParallel wrapper is looked through."""
    config = getattr(getattr(model, "module", model), "config", None)
    return bool(getattr(getattr(config, "loss", None), "focal", False))


def postprocess_detections(
    outputs: Mapping[str, Tensor],
    orig_sizes: Sizes,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    focal: bool = False,
    num_detections: int | None = None,
) -> list[dict[str, Tensor]]:
    """Class scores/labels and absolute xyxy boxes at the original image size, per image.

    Args:
        outputs: ``pred_logits`` [B, Q, K+1] ([B, Q, K] with ``focal``) and ``pred_boxes`` [B, Q, 4]
            (normalized cxcywh).
        orig_sizes: [B, 2] (h, w) of the original images.
        threshold: if given, keep only the detections with score > threshold (in query order; with
            ``focal``, in order of decreasing score).
        top_k: if given, keep the top_k highest-scoring detections (sorted by decreasing score), applied
            after ``threshold``.
        focal: the logits are sigmoid scores of K classes with no "no object" column (the model's
            ``config.loss.focal``, see :func:`uses_focal`): each (query, class) pair is a candidate,
            score = sigmoid(logit), and the ``num_detections`` best of the Q x K pairs are the detections,
            by decreasing score, so one query may give several detections of different classes.
        num_detections: with ``focal``, the number of (query, class) pairs kept before ``threshold`` and
            ``top_k``; default Q (Deformable DETR takes 100, its query count on COCO is 300).

    Returns:
        per image ``scores`` [N], ``labels`` [N] (int64), ``boxes`` [N, 4] (xyxy pixels), on the
        outputs' device. Without filtering and without ``focal`` N = Q (every query, in order, as the
        reference returns); with ``threshold``, ``top_k`` or ``focal`` there is also ``query_indices``
        [N], the query of each detection (what :func:`postprocess_masks` needs to select the masks).
    """
    logits, boxes_cxcywh = outputs["pred_logits"], outputs["pred_boxes"]
    if isinstance(orig_sizes, Tensor):
        sizes_hw = orig_sizes.to(boxes_cxcywh.device)
    else:
        sizes_hw = torch.as_tensor(_size_pairs(orig_sizes), device=boxes_cxcywh.device)
    img_h, img_w = sizes_hw.unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # [B, 4]
    boxes_xyxy = cxcywh_to_xyxy(boxes_cxcywh) * scale[:, None, :]  # [B, Q, 4]
    if focal:
        return _focal_detections(logits, boxes_xyxy, threshold, top_k, num_detections)

    probs = logits.softmax(-1)  # [B, Q, K+1]
    scores, labels = probs[..., :-1].max(-1)  # [B, Q]: best real class, no-object excluded
    if threshold is None and top_k is None:
        per_image = zip(scores, labels, boxes_xyxy, strict=True)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in per_image]

    results = []
    for s, lab, b in zip(scores, labels, boxes_xyxy, strict=True):
        idx = torch.arange(s.shape[0], device=s.device)
        if threshold is not None:
            idx = idx[s > threshold]
        if top_k is not None:
            idx = idx[s[idx].topk(min(top_k, idx.numel())).indices]
        results.append({"scores": s[idx], "labels": lab[idx], "boxes": b[idx], "query_indices": idx})
    return results


def _focal_detections(
    logits: Tensor, boxes_xyxy: Tensor, threshold: float | None, top_k: int | None, num_detections: int | None
) -> list[dict[str, Tensor]]:
    """Sigmoid scores [B, Q, K] -> per image the best (query, class) pairs, by decreasing score."""
    num_queries, num_classes = logits.shape[-2:]
    count = min(num_queries if num_detections is None else num_detections, num_queries * num_classes)
    scores, flat = logits.sigmoid().flatten(1).topk(count, dim=1)  # [B, count]: index = query * K + class
    results = []
    for s, f, b in zip(scores, flat, boxes_xyxy, strict=True):
        if threshold is not None:
            keep = s > threshold  # still by decreasing score
            s, f = s[keep], f[keep]
        if top_k is not None:
            s, f = s[:top_k], f[:top_k]
        query = f // num_classes  # [N]
        results.append({"scores": s, "labels": f % num_classes, "boxes": b[query], "query_indices": query})
    return results


# ----------------------------------------------------------------------------------------------
# Instance masks
# ----------------------------------------------------------------------------------------------


def postprocess_masks(
    results: list[dict[str, Tensor]],
    pred_masks: Tensor,
    input_sizes: Sizes,
    orig_sizes: Sizes,
    threshold: float = 0.5,
) -> list[dict[str, Tensor]]:
    """Binary instance masks at the original image size, added to ``results[i]["masks"]``.

    As in the reference: the mask logits of the whole batch are upsampled bilinearly to the largest
    input size in the batch (max over images, per dimension), thresholded (sigmoid > threshold), then
    each image's mask is cropped to its input size and resized (nearest) to its original size.

    Args:
        results: per-image dicts from :func:`postprocess_detections` (modified in place; if they carry
            ``query_indices`` only those queries' masks are kept).
        pred_masks: [B, Q, h, w] mask logits (a [B, Q, 1, h, w] layout is accepted too).
        input_sizes: [B, 2] (h, w) of the resized, unpadded images.
        orig_sizes: [B, 2] (h, w) of the original images.
        threshold: probability threshold.

    Returns:
        ``results``, each with ``masks`` uint8 [N, 1, H, W] on the CPU (as the reference).
    """
    if pred_masks.dim() == 5:
        pred_masks = pred_masks.squeeze(2)  # [B, Q, h, w]
    in_sizes, out_sizes = _size_pairs(input_sizes), _size_pairs(orig_sizes)
    if not (len(results) == len(in_sizes) == len(out_sizes) == pred_masks.shape[0]):
        raise ValueError("results, pred_masks, input_sizes and orig_sizes must have the same batch size")
    max_h = max(h for h, _ in in_sizes)
    max_w = max(w for _, w in in_sizes)
    upsampled = F.interpolate(pred_masks, size=(max_h, max_w), mode="bilinear", align_corners=False)
    binary = upsampled.sigmoid() > threshold  # [B, Q, max_h, max_w]
    for result, mask, (h, w), (out_h, out_w) in zip(results, binary, in_sizes, out_sizes, strict=True):
        if "query_indices" in result:
            mask = mask[result["query_indices"]]
        rows = nearest_source_index(h, out_h, mask.device)
        cols = nearest_source_index(w, out_w, mask.device)
        # Crop to the unpadded image, then nearest-resize by gathering rows and columns.
        resized = mask[:, :h, :w].index_select(1, rows).index_select(2, cols)  # [N, H, W]
        result["masks"] = resized.to(torch.uint8).unsqueeze(1).cpu()  # [N, 1, H, W]
    return results


@lru_cache(maxsize=256)
def _pillow_nearest_index(in_size: int, out_size: int, axis: int) -> Tensor:
    """Source index of each output position for Pillow's ``Image.resize(..., Image.NEAREST)``.

    Pillow steps through source coordinates with its own double-precision accumulation, which can
    round differently from a closed formula on exact half-pixel boundaries; so the table is taken
    from Pillow itself by resizing an RGB-encoded index ramp (axis 0: a column, axis 1: a row).
    """
    ramp = segment_ids_to_rgb(torch.arange(in_size)).numpy()  # [in, 3]
    if axis == 0:
        image, size = Image.fromarray(ramp[:, None, :]), (1, out_size)
    else:
        image, size = Image.fromarray(ramp[None, :, :]), (out_size, 1)
    resized = np.asarray(image.resize(size, resample=Image.NEAREST)).reshape(out_size, 3)
    return rgb_to_segment_ids(torch.from_numpy(resized.copy())).long()


def _pillow_nearest_resize(id_map: Tensor, out_h: int, out_w: int) -> Tensor:
    """[h, w] id map -> [out_h, out_w], pixel-identical to Pillow NEAREST on its RGB encoding."""
    h, w = id_map.shape
    rows = _pillow_nearest_index(h, out_h, 0).to(id_map.device)
    cols = _pillow_nearest_index(w, out_w, 1).to(id_map.device)
    return id_map.index_select(0, rows).index_select(1, cols)


# ----------------------------------------------------------------------------------------------
# Panoptic merge
# ----------------------------------------------------------------------------------------------


def _assign_pixels(mask_logits: Tensor, h: int, w: int) -> Tensor:
    """[N, h*w] mask logits -> [h, w] index of the winning query per pixel (all 0 when N == 0)."""
    if mask_logits.shape[0] == 0:
        return torch.zeros((h, w), dtype=torch.long, device=mask_logits.device)
    # Softmax before argmax (as the reference) so that ties created by rounding resolve identically.
    probs = mask_logits.transpose(0, 1).softmax(-1)  # [h*w, N]
    return probs.argmax(-1).view(h, w)


def _segment_areas(id_map: Tensor, num_segments: int) -> list[int]:
    """Pixel count of each id in [0, num_segments)."""
    counts = torch.bincount(id_map.flatten(), minlength=num_segments)
    return counts[:num_segments].tolist()


def _merge_stuff(classes: Tensor, stuff: list[bool]) -> Tensor:
    """[N] kept classes -> [N] id each kept query's pixels go to: the first kept query of its class
    for stuff, itself for things."""
    same_class = classes[:, None] == classes[None, :]  # [N, N]
    first_of_class = same_class.to(torch.uint8).argmax(1)  # argmax returns the first maximum
    is_stuff = torch.tensor(stuff, dtype=torch.bool, device=classes.device)
    return torch.where(is_stuff, first_of_class, torch.arange(len(stuff), device=classes.device))


def _is_thing_fn(is_thing: IsThing) -> Callable[[int], bool]:
    if isinstance(is_thing, Mapping):
        return lambda category: bool(is_thing[category])
    return lambda category: bool(is_thing(category))


def postprocess_panoptic(
    outputs: Mapping[str, Tensor],
    input_sizes: Sizes,
    orig_sizes: Sizes | None = None,
    *,
    is_thing: IsThing,
    threshold: float = 0.85,
) -> list[dict[str, Any]]:
    """Panoptic segmentation per image: a segment id map at the original size and its segments.

    Per image (following the reference):
    1. keep the queries whose most probable class (over all K+1) is not no-object and whose
       probability is > threshold;
    2. resize their mask logits bilinearly to the image's input size and give each pixel to the
       kept query with the largest mask logit;
    3. merge the queries of one stuff class into the first of them (first pass only, see below);
    4. resize the id map to the original size (Pillow NEAREST) and measure each segment's area;
    5. drop segments of at most 4 pixels and redo 2 and 4 with the remaining queries until none is
       that small.

    Args:
        outputs: ``pred_logits`` [B, Q, K+1] and ``pred_masks`` [B, Q, h, w].
        input_sizes: [B, 2] (h, w) of the resized, unpadded images.
        orig_sizes: [B, 2] (h, w) to report at; defaults to ``input_sizes``.
        is_thing: category id -> whether it is a thing (callable or mapping).
        threshold: class-probability threshold for keeping a query.

    Returns:
        per image ``segment_ids`` int32 [H, W] (CPU; values index ``segments_info``) and
        ``segments_info``: list of {"id", "isthing", "category_id", "area"} with ids 0, 1, ...
        With no kept query the map is all 0 and ``segments_info`` is empty.
    """
    thing = _is_thing_fn(is_thing)
    in_sizes = _size_pairs(input_sizes)
    out_sizes = in_sizes if orig_sizes is None else _size_pairs(orig_sizes)
    logits_all, masks_all = outputs["pred_logits"], outputs["pred_masks"]
    if masks_all.dim() == 5:
        masks_all = masks_all.squeeze(2)  # [B, Q, h, w]
    no_object = logits_all.shape[-1] - 1

    results = []
    for logits, masks, (h, w), (out_h, out_w) in zip(logits_all, masks_all, in_sizes, out_sizes, strict=True):
        scores, labels = logits.softmax(-1).max(-1)  # [Q]
        keep = (labels != no_object) & (scores > threshold)
        classes = labels[keep]  # [N]
        kept_masks = masks[keep]  # [N, h', w']
        kept_masks = F.interpolate(kept_masks[:, None], size=(h, w), mode="bilinear", align_corners=False)
        kept_masks = kept_masks.flatten(1)  # [N, h*w]

        class_list = classes.tolist()
        id_map = _assign_pixels(kept_masks, h, w)  # [h, w]
        if class_list:
            id_map = _merge_stuff(classes, [not thing(c) for c in class_list])[id_map]
        id_map = _pillow_nearest_resize(id_map, out_h, out_w)  # [H, W]
        areas = _segment_areas(id_map, len(class_list))

        # Merged-away stuff queries now have area 0 and are dropped here like any small segment.
        # Quirk kept from the reference: the reassignment after a drop does NOT apply the stuff
        # merge (the reference merges in the first pass only), so the pixels of a dropped query,
        # merged-away stuff duplicates included, go to the best remaining query whatever its class.
        while any(area <= MIN_SEGMENT_AREA for area in areas):
            survivors = [i for i, area in enumerate(areas) if area > MIN_SEGMENT_AREA]
            class_list = [class_list[i] for i in survivors]
            kept_masks = kept_masks[survivors]  # [N', h*w]
            id_map = _pillow_nearest_resize(_assign_pixels(kept_masks, h, w), out_h, out_w)
            areas = _segment_areas(id_map, len(class_list))

        # (With nothing kept the reference substitutes a dummy class 1, but with no areas to pair it
        # with it never reaches segments_info: the result is an all-0 map and no segments.)
        segments_info = [
            {"id": i, "isthing": thing(category), "category_id": category, "area": area}
            for i, (category, area) in enumerate(zip(class_list, areas, strict=True))
        ]
        results.append({"segment_ids": id_map.to(torch.int32).cpu(), "segments_info": segments_info})
    return results


def nms(boxes_xyxy: Tensor, scores: Tensor, labels: Tensor | None = None, iou_threshold: float = 0.5) -> Tensor:
    """Greedy non-maximum suppression, class-wise when ``labels`` are given.

    Visits boxes by decreasing score and drops every later box (of the same label) whose IoU with a
    kept one is > ``iou_threshold``. boxes_xyxy [N, 4], scores [N], labels [N]; returns the kept
    indices [M], by decreasing score.
    """
    order = scores.argsort(descending=True, stable=True)
    iou, _ = box_iou(boxes_xyxy[order], boxes_xyxy[order])  # [N, N]
    overlaps = iou > iou_threshold  # NaN (two empty boxes) compares False: both kept
    if labels is not None:
        sorted_labels = labels[order]
        overlaps &= sorted_labels[:, None] == sorted_labels[None, :]
    keep = torch.ones(len(order), dtype=torch.bool, device=order.device)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1 :] &= ~overlaps[i, i + 1 :]
    return order[keep]
