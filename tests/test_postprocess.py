"""Post-processing: parity with the reference fixture, plus unit tests of the options and edge cases.

The "literal" helpers below restate the reference semantics step by step (per-image loops, Pillow on
the RGB-encoded id map, torch nearest on float masks); the vectorized code must agree with them.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detr.coco_panoptic import rgb_to_segment_ids, segment_ids_to_png, segment_ids_to_rgb
from detr.postprocess import (
    _pillow_nearest_resize,
    postprocess_detections,
    postprocess_masks,
    postprocess_panoptic,
)

CONFIGS = ["detection", "detection_prenorm_learned_dc5", "panoptic"]
NUM_CLASSES = 250  # logits have K+1 = 251 columns; column 250 is no-object


def _sizes(reference: dict, key: str) -> torch.Tensor:
    return torch.stack([t[key] for t in reference["targets"]])  # [B, 2] (h, w)


# ----------------------------------------------------------------------------------------------
# Parity with the reference fixture
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_detections_match_reference(reference: dict, config: str) -> None:
    entry = reference[config]
    results = postprocess_detections(entry["outputs"], _sizes(reference, "orig_size"))
    assert len(results) == len(entry["postprocess_bbox"])
    for ours, ref in zip(results, entry["postprocess_bbox"], strict=True):
        assert set(ours) == {"scores", "labels", "boxes"}
        assert ours["boxes"].shape == ref["boxes"].shape
        assert (ours["boxes"] - ref["boxes"]).abs().max().item() <= 1e-3
        assert (ours["scores"] - ref["scores"]).abs().max().item() <= 1e-5
        assert torch.equal(ours["labels"], ref["labels"])


def test_detections_accept_list_sizes(reference: dict) -> None:
    outputs = reference["detection"]["outputs"]
    sizes = _sizes(reference, "orig_size")
    from_tensor = postprocess_detections(outputs, sizes)
    from_list = postprocess_detections(outputs, [tuple(s) for s in sizes.tolist()])
    for a, b in zip(from_tensor, from_list, strict=True):
        assert torch.equal(a["boxes"], b["boxes"])


def test_instance_masks_match_reference(reference: dict) -> None:
    entry = reference["panoptic"]
    results = postprocess_detections(entry["outputs"], _sizes(reference, "orig_size"))
    results = postprocess_masks(
        results, entry["outputs"]["pred_masks"], _sizes(reference, "size"), _sizes(reference, "orig_size")
    )
    for ours, ref in zip(results, entry["postprocess_segm"], strict=True):
        masks = ours["masks"]
        assert masks.dtype == torch.uint8 and masks.dim() == 4 and masks.shape[1] == 1
        masks = masks[:, 0].long()  # [Q, H, W]
        assert tuple(masks.shape) == tuple(ref["shape"])
        assert torch.equal(masks.sum(-1), ref["row_sums"])
        assert torch.equal(masks.sum(-2), ref["col_sums"])


def test_panoptic_matches_reference(reference: dict) -> None:
    entry = reference["panoptic"]
    config = entry["postprocess_panoptic"]
    assert config["is_thing"] == "class id <= 90"
    results = postprocess_panoptic(
        entry["outputs"],
        _sizes(reference, "size"),
        _sizes(reference, "orig_size"),
        is_thing=lambda category: category <= 90,
        threshold=config["threshold"],
    )
    for ours, ref in zip(results, config["results"], strict=True):
        assert ours["segment_ids"].dtype == torch.int32
        assert torch.equal(ours["segment_ids"], ref["segment_ids"])
        assert ours["segments_info"] == ref["segments_info"]


# ----------------------------------------------------------------------------------------------
# Literal restatements of the reference semantics
# ----------------------------------------------------------------------------------------------


def _literal_masks(pred_masks, input_sizes, orig_sizes, threshold=0.5):
    max_h = max(h for h, _ in input_sizes)
    max_w = max(w for _, w in input_sizes)
    up = F.interpolate(pred_masks, size=(max_h, max_w), mode="bilinear", align_corners=False)
    binary = up.sigmoid() > threshold
    out = []
    for mask, (h, w), (oh, ow) in zip(binary, input_sizes, orig_sizes, strict=True):
        crop = mask[:, :h, :w].unsqueeze(1).float()
        out.append(F.interpolate(crop, size=(oh, ow), mode="nearest").byte())
    return out


def _literal_panoptic(logits, masks, size, orig, is_thing, threshold):
    """One image, step by step as the reference describes it."""
    h, w = size
    oh, ow = orig
    scores, labels = logits.softmax(-1).max(-1)
    keep = (labels != logits.shape[-1] - 1) & (scores > threshold)
    classes = labels[keep].tolist()
    mask_logits = F.interpolate(masks[keep][:, None], size=(h, w), mode="bilinear", align_corners=False)
    mask_logits = mask_logits[:, 0].flatten(1)
    groups: dict[int, list[int]] = {}
    for k, c in enumerate(classes):
        if not is_thing(c):
            groups.setdefault(c, []).append(k)

    def ids_and_areas(mask_logits, n, dedup):
        if n == 0:
            id_map = torch.zeros((h, w), dtype=torch.long)
        else:
            id_map = mask_logits.transpose(0, 1).softmax(-1).argmax(-1).view(h, w)
        if dedup:
            for members in groups.values():
                if len(members) > 1:
                    for k in members:
                        id_map[id_map == k] = members[0]
        ids = id_map.numpy()
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        resized = np.asarray(Image.fromarray(rgb).resize((ow, oh), Image.NEAREST)).astype(np.int64)
        ids = resized[..., 0] + 256 * resized[..., 1] + 65536 * resized[..., 2]
        return ids, [int((ids == i).sum()) for i in range(n)]

    ids, areas = ids_and_areas(mask_logits, len(classes), dedup=True)
    while classes and any(a <= 4 for a in areas):
        survivors = [i for i, a in enumerate(areas) if a > 4]
        classes = [classes[i] for i in survivors]
        mask_logits = mask_logits[survivors]
        ids, areas = ids_and_areas(mask_logits, len(classes), dedup=False)
    info = [
        {"id": i, "isthing": bool(is_thing(c)), "category_id": c, "area": a}
        for i, (c, a) in enumerate(zip(classes, areas, strict=True))
    ]
    return ids, info


# ----------------------------------------------------------------------------------------------
# Detections: options
# ----------------------------------------------------------------------------------------------


def _detection_outputs(best_probs: list[float]) -> dict[str, torch.Tensor]:
    """One image whose query i has its best real class i % 3 at (roughly) probability best_probs[i]."""
    num_queries, num_columns = len(best_probs), 4  # K = 3 real classes + no-object
    logits = torch.full((1, num_queries, num_columns), -20.0)
    for i, p in enumerate(best_probs):
        logits[0, i, i % 3] = float(np.log(p))
        logits[0, i, -1] = float(np.log(1 - p))
    boxes = torch.rand(1, num_queries, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.1
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_detection_threshold_and_top_k() -> None:
    outputs = _detection_outputs([0.3, 0.9, 0.6, 0.95, 0.1])
    full = postprocess_detections(outputs, [(100, 200)])[0]
    assert full["scores"].shape == (5,) and "query_indices" not in full

    thresholded = postprocess_detections(outputs, [(100, 200)], threshold=0.5)[0]
    assert thresholded["query_indices"].tolist() == [1, 2, 3]  # query order kept
    for key in ("scores", "labels", "boxes"):
        assert torch.equal(thresholded[key], full[key][thresholded["query_indices"]])
    assert thresholded["labels"].tolist() == [1, 2, 0]

    top = postprocess_detections(outputs, [(100, 200)], top_k=2)[0]
    assert top["query_indices"].tolist() == [3, 1]  # by decreasing score
    assert torch.equal(top["boxes"], full["boxes"][[3, 1]])

    both = postprocess_detections(outputs, [(100, 200)], threshold=0.5, top_k=10)[0]
    assert both["query_indices"].tolist() == [3, 1, 2]
    none = postprocess_detections(outputs, [(100, 200)], threshold=0.99, top_k=2)[0]
    assert none["scores"].shape == (0,) and none["boxes"].shape == (0, 4)


def test_detection_boxes_scaled_to_original_size() -> None:
    outputs = {
        "pred_logits": torch.zeros(2, 1, 3),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4]], [[0.25, 0.75, 0.5, 0.5]]]),
    }
    results = postprocess_detections(outputs, torch.tensor([[100, 200], [40, 80]]))
    assert torch.allclose(results[0]["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0]]))
    assert torch.allclose(results[1]["boxes"], torch.tensor([[0.0, 20.0, 40.0, 40.0]]))
    assert torch.allclose(results[0]["scores"], torch.tensor([1 / 3]))


# ----------------------------------------------------------------------------------------------
# Instance masks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_sizes, orig_sizes",
    [
        ([(13, 17), (20, 9)], [(26, 34), (31, 14)]),  # exact 2x, and odd upsampling
        ([(20, 18), (11, 18)], [(7, 18), (11, 5)]),  # downsampling and identity axes
    ],
)
def test_instance_masks_match_literal(input_sizes, orig_sizes) -> None:
    pred_masks = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    results = [{} for _ in input_sizes]
    results = postprocess_masks(results, pred_masks, input_sizes, torch.tensor(orig_sizes))
    for ours, expected in zip(results, _literal_masks(pred_masks, input_sizes, orig_sizes), strict=True):
        assert torch.equal(ours["masks"], expected)


def test_instance_masks_follow_query_indices() -> None:
    outputs = _detection_outputs([0.3, 0.9, 0.6, 0.95, 0.1])
    outputs["pred_masks"] = torch.randn(1, 5, 6, 6, generator=torch.Generator().manual_seed(2))
    full = postprocess_detections(outputs, [(30, 20)])
    full = postprocess_masks(full, outputs["pred_masks"], [(12, 9)], [(30, 20)])
    top = postprocess_detections(outputs, [(30, 20)], top_k=2)
    top = postprocess_masks(top, outputs["pred_masks"], [(12, 9)], [(30, 20)])
    assert torch.equal(top[0]["masks"], full[0]["masks"][[3, 1]])


# ----------------------------------------------------------------------------------------------
# Panoptic
# ----------------------------------------------------------------------------------------------


def test_rgb_id_encoding_round_trip() -> None:
    ids = torch.tensor([[0, 1, 255, 256], [257, 65535, 65536, 2**24 - 1]])
    rgb = segment_ids_to_rgb(ids)
    assert rgb.dtype == torch.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[1, 0].tolist() == [1, 1, 0]  # 257 = 1 + 256 * 1
    assert rgb[1, 2].tolist() == [0, 0, 1]
    assert torch.equal(rgb_to_segment_ids(rgb), ids.to(torch.int32))
    decoded = np.asarray(Image.open(io.BytesIO(segment_ids_to_png(ids))))
    assert torch.equal(rgb_to_segment_ids(torch.from_numpy(decoded.copy())), ids.to(torch.int32))


@pytest.mark.parametrize("in_hw, out_hw", [((2, 3), (3, 2)), ((7, 11), (23, 5)), ((50, 41), (17, 100))])
def test_nearest_id_resize_matches_pillow(in_hw, out_hw) -> None:
    ids = torch.randint(0, 2**24, in_hw, generator=torch.Generator().manual_seed(3))
    expected = Image.fromarray(segment_ids_to_rgb(ids).numpy()).resize(out_hw[::-1], Image.NEAREST)
    expected = rgb_to_segment_ids(torch.from_numpy(np.asarray(expected).copy()))
    assert torch.equal(_pillow_nearest_resize(ids, *out_hw).to(torch.int32), expected)


def _panoptic_outputs(classes: list[int], mask_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """One image; query i predicts classes[i] confidently (NUM_CLASSES = no-object)."""
    logits = torch.zeros(1, len(classes), NUM_CLASSES + 1)
    logits[0, torch.arange(len(classes)), torch.tensor(classes)] = 12.0
    boxes = torch.full((1, len(classes), 4), 0.5)
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": mask_logits[None]}


def is_thing(category: int) -> bool:
    return category <= 90


def test_panoptic_all_no_object() -> None:
    outputs = _panoptic_outputs([NUM_CLASSES] * 3, torch.randn(3, 4, 5))
    (result,) = postprocess_panoptic(outputs, [(8, 10)], [(16, 15)], is_thing=is_thing)
    assert result["segments_info"] == []  # the reference's dummy class 1 has no area to pair with
    assert result["segment_ids"].shape == (16, 15) and result["segment_ids"].dtype == torch.int32
    assert not result["segment_ids"].any()


def _columns(values_per_column: list[float], height: int = 4) -> torch.Tensor:
    return torch.tensor(values_per_column).expand(height, -1).clone()  # [h, w]


@pytest.mark.parametrize("thing_logit_on_right, expected_areas", [(0.0, [16, 8]), (3.0, [8, 16])])
def test_panoptic_stuff_queries_merge(thing_logit_on_right: float, expected_areas: list[int]) -> None:
    # Queries 0 and 1: stuff class 200 (left and right columns); query 2: thing class 1 (middle).
    masks = torch.stack(
        [
            _columns([5, 5, 0, 0, 2, 2]),
            _columns([-5, -5, -5, -5, 5, 5]),
            _columns([0, 0, 5, 5, thing_logit_on_right, thing_logit_on_right]),
        ]
    )
    outputs = _panoptic_outputs([200, 200, 1], masks)
    (result,) = postprocess_panoptic(outputs, [(4, 6)], is_thing=is_thing)
    # The merged-away query 1 has area 0 and is dropped; its pixels are then reassigned WITHOUT the
    # merge (reference quirk): they stay with stuff query 0 only if it beats the thing there.
    right = 0 if thing_logit_on_right < 2 else 1
    expected = _columns([0, 0, 1, 1, right, right]).to(torch.int32)
    assert torch.equal(result["segment_ids"], expected)
    assert result["segments_info"] == [
        {"id": 0, "isthing": False, "category_id": 200, "area": expected_areas[0]},
        {"id": 1, "isthing": True, "category_id": 1, "area": expected_areas[1]},
    ]


def test_panoptic_small_segments_removed() -> None:
    h, w = 5, 6
    masks = torch.zeros(3, h, w)
    masks[0] += 1.0  # stuff background
    masks[1, 0, :4] = 5.0  # 4 pixels: removed
    masks[2, 4, :5] = 5.0  # 5 pixels: kept
    outputs = _panoptic_outputs([150, 3, 4], masks)
    (result,) = postprocess_panoptic(outputs, torch.tensor([[h, w]]), is_thing=is_thing)
    expected = torch.zeros(h, w, dtype=torch.int32)
    expected[4, :5] = 1
    assert torch.equal(result["segment_ids"], expected)
    assert result["segments_info"] == [
        {"id": 0, "isthing": False, "category_id": 150, "area": 25},
        {"id": 1, "isthing": True, "category_id": 4, "area": 5},
    ]


def test_panoptic_everything_too_small() -> None:
    # A 2x2 original image holds 4 pixels, so every segment is <= 4 pixels and all are dropped.
    masks = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(5))
    outputs = _panoptic_outputs([150, 3, 4], masks)
    (result,) = postprocess_panoptic(outputs, [(4, 4)], [(2, 2)], is_thing=is_thing)
    assert result["segments_info"] == []
    assert torch.equal(result["segment_ids"], torch.zeros(2, 2, dtype=torch.int32))


def test_panoptic_threshold_and_mapping_is_thing() -> None:
    masks = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(4))
    outputs = _panoptic_outputs([7, 100], masks)
    outputs["pred_logits"][0, 1, 100] = 1.0  # query 1 becomes unconfident (its best class prob < 0.85)
    thing_map = {c: c <= 90 for c in range(NUM_CLASSES)}
    (result,) = postprocess_panoptic(outputs, [(4, 4)], [(9, 9)], is_thing=thing_map)
    assert result["segments_info"] == [{"id": 0, "isthing": True, "category_id": 7, "area": 81}]
    assert not result["segment_ids"].any()


@pytest.mark.parametrize("seed", range(12))
def test_panoptic_matches_literal_on_random_inputs(seed: int) -> None:
    # Few classes and tiny original sizes: stuff merges, small-segment drops and empty results all occur.
    gen = torch.Generator().manual_seed(seed)
    num_queries, num_columns = 8, 6
    logits = torch.randn(2, num_queries, num_columns, generator=gen) * 2
    masks = torch.randn(2, num_queries, 5, 6, generator=gen) * 3
    input_sizes = [(9, 11), (5, 4)]
    random_h, random_w = torch.randint(2, 30, (2,), generator=gen).tolist()
    orig_sizes = [(random_h, random_w), (13, 7)]

    def thing(c: int) -> bool:
        return c < 2

    outputs = {"pred_logits": logits, "pred_masks": masks, "pred_boxes": torch.rand(2, num_queries, 4)}
    results = postprocess_panoptic(outputs, input_sizes, orig_sizes, is_thing=thing, threshold=0.3)
    for i, result in enumerate(results):
        ids, info = _literal_panoptic(logits[i], masks[i], input_sizes[i], orig_sizes[i], thing, 0.3)
        assert torch.equal(result["segment_ids"], torch.from_numpy(ids).to(torch.int32))
        assert result["segments_info"] == info
