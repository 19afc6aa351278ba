from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COCO_MINI
from detr.boxes import cxcywh_to_xyxy, masks_to_boxes_xyxy
from detr.data import CocoDetection, build_coco, make_coco_transforms
from detr.data.transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSizeCrop,
    ToTensor,
    crop,
    hflip,
    resize,
    resized_hw,
)


def _index_of(dataset: CocoDetection, file_name: str) -> int:
    return next(i for i in range(len(dataset)) if dataset.image_path(i).name == file_name)


@pytest.fixture(scope="module")
def val_raw() -> CocoDetection:
    """coco-mini val with masks and no transforms (PIL image, absolute xyxy boxes)."""
    return build_coco(COCO_MINI, "val", return_masks=True)


def _mask_edge_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Mask boxes in the box convention (x1 = one past the last column), [N, 4]."""
    boxes = masks_to_boxes_xyxy(masks)
    boxes[:, 2:] += 1
    return boxes


# ---------------------------------------------------------------------------------------------
# Parity with the reference
# ---------------------------------------------------------------------------------------------


def test_val_transform_matches_reference(reference, val_raw):
    expected = reference["val_transform"]
    dataset = build_coco(COCO_MINI, "val", transforms=make_coco_transforms("val"), return_masks=True)
    image, target = dataset[_index_of(dataset, expected["image_file"])]

    assert tuple(image.shape) == tuple(expected["image_shape"])
    sums = image.double().sum(dim=(1, 2))
    torch.testing.assert_close(sums, expected["image_channel_sums"].double(), rtol=1e-3, atol=0)
    torch.testing.assert_close(image[:, 100:164, 200:264], expected["image_crop_100_200_64"], rtol=0, atol=1e-3)

    ref = expected["target"]
    torch.testing.assert_close(target["boxes"], ref["boxes"], rtol=0, atol=1e-3)
    assert torch.equal(target["labels"], ref["labels"])
    assert torch.equal(target["iscrowd"], ref["iscrowd"])
    assert torch.equal(target["image_id"], ref["image_id"])
    torch.testing.assert_close(target["area"], ref["area"], rtol=1e-3, atol=0)
    assert torch.equal(target["orig_size"], ref["orig_size"])
    assert torch.equal(target["size"], ref["size"])
    masks, summary = target["masks"], ref["masks_summary"]
    assert masks.dtype == torch.bool
    assert tuple(masks.shape) == tuple(summary["shape"])
    assert torch.equal(masks.sum(dim=2).to(summary["row_sums"].dtype), summary["row_sums"])
    assert torch.equal(masks.sum(dim=1).to(summary["col_sums"].dtype), summary["col_sums"])


def test_small_resize_matches_reference_batch_inputs(reference):
    """The fixture's model inputs: short side 256 (max 400), normalized, with full targets."""
    transform = Compose([RandomResize([256], max_size=400), ToTensor(), Normalize()])
    dataset = build_coco(COCO_MINI, "val", transforms=transform, return_masks=True)
    for file_name, ref_image, ref_target in zip(
        reference["image_files"], reference["images"], reference["targets"], strict=True
    ):
        image, target = dataset[_index_of(dataset, file_name)]
        torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-5)
        assert list(target) == list(ref_target)  # same keys, same order
        for key, value in ref_target.items():
            if value.dtype.is_floating_point:
                torch.testing.assert_close(target[key], value, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(target[key], value.to(target[key].dtype)), key


# ---------------------------------------------------------------------------------------------
# Resize rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wh", "size", "max_size", "expected_hw"),
    [
        ((640, 426), 800, 1333, (800, 1201)),  # int(800 * 640 / 426) = int(1201.9)
        ((426, 640), 800, 1333, (1201, 800)),  # portrait
        ((640, 480), 256, 400, (256, 341)),  # int(341.3), under the cap
        ((800, 1000), 800, 1333, (1000, 800)),  # short side already 800: unchanged
        ((100, 50), 20, None, (20, 40)),  # no cap
        # 1000/200 * 800 > 1333 -> short side round(1333 * 200 / 1000) = 267, long int(267 * 5) = 1335:
        # the cap is approximate in the reference too
        ((1000, 200), 800, 1333, (267, 1335)),
        ((640, 100), 256, 400, (62, 396)),  # round(400 * 100 / 640) = round(62.5) = 62 (banker's), int(396.8)
    ],
)
def test_resize_rule(wh, size, max_size, expected_hw):
    assert resized_hw(wh, size, max_size) == expected_hw


def test_resize_scales_target():
    image = Image.new("RGB", (40, 20))
    masks = torch.zeros(1, 20, 40, dtype=torch.bool)
    masks[0, 5:10, 8:16] = True
    target = {
        "boxes": torch.tensor([[8.0, 5.0, 16.0, 10.0]]),
        "area": torch.tensor([40.0]),
        "masks": masks,
        "size": torch.tensor([20, 40]),
    }
    resized, out = resize(image, target, 30)  # short side 20 -> 30: factor 1.5
    assert resized.size == (60, 30)
    torch.testing.assert_close(out["boxes"], torch.tensor([[12.0, 7.5, 24.0, 15.0]]))
    torch.testing.assert_close(out["area"], torch.tensor([90.0]))
    assert out["size"].tolist() == [30, 60]
    assert out["masks"].shape == (1, 30, 60)
    torch.testing.assert_close(_mask_edge_boxes(out["masks"]), out["boxes"], rtol=0, atol=1.0)


# ---------------------------------------------------------------------------------------------
# Flip and crop
# ---------------------------------------------------------------------------------------------


def test_flip_twice_is_identity(val_raw):
    image, target = val_raw[0]
    once_image, once = hflip(image, target)
    assert not torch.equal(once["boxes"], target["boxes"])
    twice_image, twice = hflip(once_image, once)
    assert np.array_equal(np.asarray(twice_image), np.asarray(image))
    torch.testing.assert_close(twice["boxes"], target["boxes"], rtol=0, atol=1e-4)
    assert torch.equal(twice["masks"], target["masks"])
    # x -> w - x, checked on one box by hand
    w = image.size[0]
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    torch.testing.assert_close(once["boxes"][0], torch.tensor([w - x1, y0, w - x0, y1]))


def test_crop_keeps_boxes_inside_and_drops_vanished():
    image = Image.new("RGB", (100, 80))
    masks = torch.zeros(3, 80, 100, dtype=torch.bool)
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 20.0, 90.0, 70.0], [70.0, 60.0, 95.0, 78.0]])
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
        mask[y0:y1, x0:x1] = True
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 3]),
        "area": torch.tensor([400.0, 2500.0, 450.0]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "masks": masks,
        "size": torch.tensor([80, 100]),
    }
    # region (top, left, h, w) = rows 5..55, cols 20..80: object 1 ends at x=30 (kept, clipped),
    # object 2 is clipped on the right and bottom, object 3 starts at y=60 (vanishes)
    cropped, out = crop(image, target, (5, 20, 50, 60))
    assert cropped.size == (60, 50)
    assert out["labels"].tolist() == [1, 2]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 5.0, 10.0, 25.0], [20.0, 15.0, 60.0, 50.0]]))
    torch.testing.assert_close(out["area"], torch.tensor([200.0, 1400.0]))  # recomputed from the boxes
    assert out["size"].tolist() == [50, 60]
    assert out["masks"].shape == (2, 50, 60)
    assert out["iscrowd"].shape == (2,)
    torch.testing.assert_close(_mask_edge_boxes(out["masks"]), out["boxes"])


def test_random_size_crop_bounds(val_raw):
    image, target = val_raw[1]
    transform = RandomSizeCrop(100, 300)
    for seed in range(10):
        cropped, out = transform(image, target, random.Random(seed))
        w, h = cropped.size
        assert 100 <= w <= 300 and 100 <= h <= 300
        assert out["size"].tolist() == [h, w]
        boxes = out["boxes"]
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()  # vanished objects were dropped
        assert out["masks"].shape[1:] == (h, w)
        n = len(boxes)
        assert out["labels"].shape == out["area"].shape == out["iscrowd"].shape == (n,)


# ---------------------------------------------------------------------------------------------
# Determinism and consistency of the train pipeline
# ---------------------------------------------------------------------------------------------


def test_train_transform_deterministic_under_seed(val_raw):
    image, target = val_raw[2]
    transform = make_coco_transforms("train", scales=[96, 128, 160], max_size=256)
    outputs = [transform(image, target, random.Random(seed)) for seed in (0, 0, 1, 2, 3, 4)]
    first, again = outputs[0], outputs[1]
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(first[1][k], again[1][k]) for k in first[1])
    # different seeds give different augmentations (sizes, flips or crops)
    assert any(out[0].shape != first[0].shape or not torch.equal(out[0], first[0]) for out in outputs[2:])
    # Compose with its own seed: a reproducible stream
    a, b = Compose(transform.transforms, seed=7), Compose(transform.transforms, seed=7)
    for _ in range(3):
        assert torch.equal(a(image, target)[0], b(image, target)[0])


def test_boxes_follow_masks_through_flip_and_resize(val_raw):
    """Treat each mask's own box as the target boxes: after the transform they must still agree.

    Upscaling only: nearest-neighbour downscaling may drop thin parts of a mask, moving its box.
    """
    transform = Compose([RandomHorizontalFlip(), RandomResize([480, 560, 640], max_size=1000)])
    for index in range(3):
        image, target = val_raw[index]
        target = dict(target, boxes=_mask_edge_boxes(target["masks"]))
        for seed in range(4):
            _, out = transform(image, target, random.Random(seed))
            nonempty = out["masks"].flatten(1).any(1)
            diff = (_mask_edge_boxes(out["masks"]) - out["boxes"])[nonempty]
            assert diff.abs().max() <= 1.0 + 1e-4


def test_masks_stay_inside_boxes_through_train_transform(val_raw):
    """With crops a clipped box can be looser than its mask, but never tighter.

    One resize, so nearest interpolation can push a mask edge at most one pixel past its box.
    """
    transform = Compose(
        [
            RandomHorizontalFlip(),
            RandomSizeCrop(150, 400),
            RandomResize([96, 128, 160], max_size=256),
            ToTensor(),
            Normalize(),
        ]
    )
    for index in range(3):
        image, target = val_raw[index]
        target = dict(target, boxes=_mask_edge_boxes(target["masks"]))
        for seed in range(4):
            tensor, out = transform(image, target, random.Random(seed))
            h, w = tensor.shape[-2:]
            assert out["size"].tolist() == [h, w]
            boxes = cxcywh_to_xyxy(out["boxes"]) * torch.tensor([w, h, w, h])
            nonempty = out["masks"].flatten(1).any(1)
            mask_boxes = _mask_edge_boxes(out["masks"])[nonempty]
            assert (mask_boxes[:, :2] >= boxes[nonempty, :2] - 1.0 - 1e-4).all()
            assert (mask_boxes[:, 2:] <= boxes[nonempty, 2:] + 1.0 + 1e-4).all()


def test_to_tensor_and_normalize():
    image = Image.new("RGB", (3, 2), (255, 0, 51))
    tensor, _ = ToTensor()(image, None)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    normalized, target = Normalize()(tensor, {"boxes": torch.tensor([[0.0, 0.0, 3.0, 1.0]])})
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    torch.testing.assert_close(normalized[:, 1, 2], expected)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.25, 1.0, 0.5]]))


def test_make_coco_transforms_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        make_coco_transforms("test")
