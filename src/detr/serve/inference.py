"""The model calls of the service, each returning plain JSON-ready dicts.

Requests are batched only with requests whose images have the same size: a padded batch changes an
image's results (the padding reaches the backbone's features), so same-size groups are what make a
batched answer equal the one-image answer. Each group runs once at the lowest threshold it holds; each
request then keeps its own threshold and ``max_detections`` (the detections come by decreasing score).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..coco_panoptic import segment_ids_to_png
from ..inference.predictor import Detection, Detector
from ..model.detr import DETR


@dataclass(frozen=True)
class DetectParams:
    threshold: float
    max_detections: int


@dataclass(frozen=True)
class PanopticParams:
    threshold: float  # the panoptic merge's class-probability threshold


@dataclass(frozen=True)
class AttentionParams:
    threshold: float
    max_detections: int
    points: tuple[tuple[float, float], ...] | None  # (x, y) image pixels; None: the detections' centres
    queries: tuple[int, ...] | None  # only these query indices (among the kept detections)
    heads: bool  # also each head's decoder map


def _round(values: Tensor, digits: int = 5) -> list:
    """A tensor as nested lists of floats rounded for JSON (maps sum to 1 over ~1e3 cells)."""
    return torch.round(values.float(), decimals=digits).tolist()


def detection_json(d: Detection) -> dict[str, Any]:
    x0, y0, x1, y1 = d.box
    return {"box_xyxy": [x0, y0, x1, y1], "box_xywh": list(d.box_xywh), "label": d.label, "name": d.name,
            "score": d.score}


def image_json(image: Image.Image) -> dict[str, int]:
    return {"width": image.width, "height": image.height}


def run_detect(detector: Detector, images: Sequence[Image.Image], params: Sequence[DetectParams]) -> list[dict]:
    """Same-size images, one forward (``detector.batch_size`` >= len(images))."""
    start = time.perf_counter()
    found = detector.detect(list(images), threshold=min(p.threshold for p in params))
    ms = (time.perf_counter() - start) * 1000
    return [
        {"detections": [detection_json(d) for d in dets if d.score > p.threshold][: p.max_detections],
         "image": image_json(image), "batch_size": len(images), "model_ms": round(ms, 2)}
        for image, dets, p in zip(images, found, params, strict=True)
    ]


def run_panoptic(detector: Detector, images: Sequence[Image.Image], params: PanopticParams) -> list[dict]:
    """Same-size images with one panoptic threshold: one forward of the model with its mask head."""
    start = time.perf_counter()
    results = detector.predict(list(images), threshold=0.0, panoptic_threshold=params.threshold)
    ms = (time.perf_counter() - start) * 1000
    out = []
    for image, (_, segmentation) in zip(images, results, strict=True):
        assert segmentation is not None
        png = segment_ids_to_png(segmentation.segment_ids)
        segments = [{k: (bool(v) if k == "isthing" else v) for k, v in s.items()} for s in segmentation.segments]
        out.append({"segments": segments, "segment_ids_png": base64.b64encode(png).decode("ascii"),
                    "png_encoding": "COCO panoptic: id = R + 256 G + 256^2 B", "image": image_json(image),
                    "batch_size": len(images), "model_ms": round(ms, 2)})
    return out


def _head_maps(module: torch.nn.Module, args: tuple) -> Tensor:
    """Per-head attention weights [B, heads, Lq, Lk] of a MultiheadAttention call (its own projections)."""
    query, key = args[0], args[1]
    padding_mask = args[3] if len(args) > 3 else None
    e = module.embed_dim
    w, b = module.in_proj_weight, module.in_proj_bias
    q = module._heads(F.linear(query, w[:e], b[:e]))  # [B, h, Lq, d]
    k = module._heads(F.linear(key, w[e : 2 * e], b[e : 2 * e]))  # [B, h, Lk, d]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, h, Lq, Lk]
    if padding_mask is not None:
        scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def run_attention(detector: Detector, image: Image.Image, params: AttentionParams) -> dict:
    """Decoder attention of the kept detections (head-averaged, optionally per head), the encoder
    self-attention at ``points`` and, for anchor-box models, each kept query's reference box."""
    model = detector.detection_model
    if not isinstance(model, DETR):
        raise TypeError(f"attention maps need a DETR model, got {type(model).__name__}")
    start = time.perf_counter()
    seen: dict[str, Tensor] = {}
    hooks = []
    if params.heads:
        cross = model.transformer.decoder.layers[-1].multihead_attn
        hooks.append(cross.register_forward_hook(lambda m, args, out: seen.__setitem__("heads", _head_maps(m, args))))
    if model.anchor_queries is not None:  # the reference boxes the decoder starts from
        def keep_reference(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen["reference"] = kwargs["reference"].detach()

        hooks.append(model.transformer.decoder.register_forward_pre_hook(keep_reference, with_kwargs=True))
    try:
        maps = detector.attention(image, top_k=params.max_detections, threshold=params.threshold,
                                  points=None if params.points is None else list(params.points))
    finally:
        for hook in hooks:
            hook.remove()
    rows = list(range(len(maps.detections)))
    if params.queries is not None:
        rows = [i for i, q in enumerate(maps.query_indices) if q in set(params.queries)]
    h, w = maps.feature_size
    index = torch.tensor(rows, dtype=torch.long)
    queries = [maps.query_indices[i] for i in rows]
    result: dict[str, Any] = {
        "detections": [{**detection_json(maps.detections[i]), "query": maps.query_indices[i]} for i in rows],
        "image": image_json(image), "input_size": {"height": maps.input_size[0], "width": maps.input_size[1]},
        "stride": maps.stride, "feature_size": {"height": h, "width": w},
        "decoder": _round(maps.decoder[index]),  # [k, h, w]
        "points": [list(p) for p in maps.points],
        "encoder": None if maps.encoder is None else _round(maps.encoder),  # [p, h, w]
        "reference_boxes": None, "decoder_heads": None,
    }
    if "heads" in seen:
        per_head = seen["heads"][0][:, queries].reshape(-1, len(queries), h, w).transpose(0, 1)  # [k, heads, h, w]
        result["decoder_heads"] = _round(per_head)
    if "reference" in seen:
        ref = seen["reference"][0, queries].float().cpu()  # [k, 4] cxcywh, normalized
        scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
        xyxy = torch.cat([ref[:, :2] - ref[:, 2:] / 2, ref[:, :2] + ref[:, 2:] / 2], dim=1) * scale
        result["reference_boxes"] = xyxy.tolist()
    result["model_ms"] = round((time.perf_counter() - start) * 1000, 2)
    return result
