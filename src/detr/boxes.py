"""Box formats and overlaps. Names say the format:

- ``cxcywh``: center x, center y, width, height (normalized to [0, 1] inside the model and loss);
- ``xyxy``: corners x0, y0, x1, y1 (absolute pixels at the edges of the system);
- ``xywh``: COCO json (x0, y0, width, height in pixels).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    x0, y0, w, h = boxes.unbind(-1)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of [N, 4] and [M, 4] boxes. Returns (iou [N, M], union [N, M])."""
    area1, area2 = box_area(boxes1_xyxy), box_area(boxes2_xyxy)
    top_left = torch.max(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])  # [N, M, 2]
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al., 2019) of [N, 4] and [M, 4] boxes -> [N, M].

    Boxes must be well formed (x1 >= x0, y1 >= y0); degenerate boxes give NaN, which is why the
    datasets drop them before they reach the loss.
    """
    iou, union = box_iou(boxes1_xyxy, boxes2_xyxy)
    top_left = torch.min(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])
    bottom_right = torch.max(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)  # [N, M, 2], the smallest enclosing box
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def masks_to_boxes_xyxy(masks: Tensor) -> Tensor:
    """Tight xyxy boxes around boolean masks [N, H, W] -> [N, 4] (zeros for empty masks).

    Pixel-edge convention as in the reference: a mask covering columns a..b gives x0=a, x1=b.
    """
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device)
    h, w = masks.shape[-2:]
    ys = torch.arange(h, dtype=torch.float, device=masks.device)
    xs = torch.arange(w, dtype=torch.float, device=masks.device)
    masks = masks.bool()
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [N, H], [N, W]
    big = torch.tensor(float(max(h, w)) + 1, device=masks.device)
    x_max = torch.where(cols, xs, torch.zeros_like(xs)).amax(dim=1)
    x_min = torch.where(cols, xs, big).amin(dim=1)
    y_max = torch.where(rows, ys, torch.zeros_like(ys)).amax(dim=1)
    y_min = torch.where(rows, ys, big).amin(dim=1)
    boxes = torch.stack([x_min, y_min, x_max, y_max], dim=1)
    empty = ~rows.any(dim=1)
    boxes[empty] = 0
    return boxes
