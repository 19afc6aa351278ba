from __future__ import annotations

import torch

from detr.boxes import (
    box_area,
    box_iou,
    cxcywh_to_xyxy,
    generalized_box_iou,
    masks_to_boxes_xyxy,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


def random_boxes_xyxy(n: int, seed: int = 0, scale: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=g) * scale
    size = torch.rand(n, 2, generator=g) * scale + 0.1  # strictly positive sizes
    return torch.cat([corner, corner + size], dim=1).double()


def test_conversions_known_values() -> None:
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert torch.equal(xyxy_to_cxcywh(xyxy), torch.tensor([[20.0, 40.0, 20.0, 40.0]]))
    assert torch.equal(xyxy_to_xywh(xyxy), torch.tensor([[10.0, 20.0, 20.0, 40.0]]))
    assert torch.equal(cxcywh_to_xyxy(torch.tensor([[20.0, 40.0, 20.0, 40.0]])), xyxy)
    assert torch.equal(xywh_to_xyxy(torch.tensor([[10.0, 20.0, 20.0, 40.0]])), xyxy)


def test_round_trips() -> None:
    xyxy = random_boxes_xyxy(50)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy)
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(xyxy)), xyxy)
    cxcywh = xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(cxcywh)), cxcywh)
    xywh = xyxy_to_xywh(xyxy)
    torch.testing.assert_close(xyxy_to_xywh(xywh_to_xyxy(xywh)), xywh)
    # Leading batch dimensions are kept.
    assert cxcywh_to_xyxy(torch.rand(2, 3, 4)).shape == (2, 3, 4)


def test_area_and_iou_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert box_area(a).item() == 4.0
    iou, union = box_iou(a, b)
    # Intersection 1x1, union 4 + 4 - 1 = 7, smallest enclosing box 3x3 = 9.
    assert union.item() == 7.0
    torch.testing.assert_close(iou, torch.tensor([[1 / 7]]))
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([[1 / 7 - (9 - 7) / 9]]))


def test_giou_properties() -> None:
    boxes = random_boxes_xyxy(30, seed=1)
    others = random_boxes_xyxy(20, seed=2)
    giou = generalized_box_iou(boxes, others)
    assert giou.shape == (30, 20)
    assert (giou >= -1).all() and (giou <= 1).all()
    torch.testing.assert_close(giou, generalized_box_iou(others, boxes).T)  # symmetric
    iou, _ = box_iou(boxes, others)
    assert (giou <= iou + 1e-12).all()  # the enclosing-box penalty is never negative
    ones = torch.ones(30, dtype=torch.double)
    torch.testing.assert_close(torch.diag(generalized_box_iou(boxes, boxes)), ones)  # GIoU(a, a) = 1
    torch.testing.assert_close(torch.diag(box_iou(boxes, boxes)[0]), ones)


def test_giou_disjoint_far_boxes_is_negative() -> None:
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    near = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    far = torch.tensor([[1000.0, 1000.0, 1001.0, 1001.0]])
    iou, _ = box_iou(a, far)
    assert iou.item() == 0.0
    giou_near, giou_far = generalized_box_iou(a, near).item(), generalized_box_iou(a, far).item()
    # Disjoint: GIoU = -(enclosing - union) / enclosing; near: enclosing 3, union 2.
    assert abs(giou_near - (-1 / 3)) < 1e-6
    assert giou_far < giou_near < 0
    assert giou_far > -1 and giou_far < -0.99  # tends to -1 as the boxes move apart


def test_masks_to_boxes_xyxy() -> None:
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True  # rows 2..4, columns 3..6
    masks[1, 9, 11] = True  # a single pixel in the corner
    # masks[2] stays empty
    boxes = masks_to_boxes_xyxy(masks)
    expected = torch.tensor([[3.0, 2.0, 6.0, 4.0], [11.0, 9.0, 11.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(boxes, expected)
    assert masks_to_boxes_xyxy(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)
    # uint8 masks are accepted as well.
    assert torch.equal(masks_to_boxes_xyxy(masks.to(torch.uint8)), expected)
