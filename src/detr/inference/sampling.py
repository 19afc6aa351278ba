"""Where a deformable-attention DETR looks: the sampling points of each detection's query.

The deformable counterpart of the attention map (``detr.inference.attention``): the last decoder
layer's cross-attention samples, per head and feature level, ``n_points`` locations around the query's
reference; each has a weight (softmaxed over levels x points). They are read from the model's own
forward with a forward hook on that layer's ``MultiScaleDeformableAttention`` (which recomputes its
``sampling`` from the hooked inputs), and drawn per level: a dot per point, its area the weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from ..model.deformable import MultiScaleDeformableAttention
from ..model.detr import DETR
from .attention import _grid, _scaled, _title
from .results import Detection, ImageInput
from .visualize import colour_for, draw_detections

_LEVEL_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


class _Detector(Protocol):
    device: torch.device
    detection_model: nn.Module

    def load(self, image: ImageInput) -> Image.Image: ...

    def preprocess(self, image: Image.Image) -> Tensor: ...

    def postprocess(self, outputs: dict, orig_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]: ...

    def select(self, result: dict[str, Tensor], threshold: float | None, top_k: int | None = None) -> Tensor: ...

    def to_detections(self, result: dict[str, Tensor], indices: Tensor) -> list[Detection]: ...


@dataclass(frozen=True)
class SamplingPoints:
    """The last decoder layer's sampling points of each top detection's query, in original-image pixels.

    locations [k, L, H*P, 2] (x, y); weights [k, L, H*P] (each detection's weights sum to 1 over all
    levels); level_sizes: the (h, w) of each feature level."""

    image: Image.Image
    detections: list[Detection]
    query_indices: list[int]
    locations: Tensor
    weights: Tensor
    level_sizes: tuple[tuple[int, int], ...]


def sampling_points(detector: _Detector, image: ImageInput, *, top_k: int = 4,
                    threshold: float | None = None) -> SamplingPoints:
    """Run ``detector``'s deformable model once on ``image`` and keep its top detections' sampling points."""
    model = detector.detection_model
    if not isinstance(model, DETR) or not model.deformable:
        raise TypeError("sampling points need a DETR with deformable attention (--attention deformable)")
    cross = model.transformer.decoder.layers[-1].multihead_attn
    assert isinstance(cross, MultiScaleDeformableAttention)
    seen: dict[str, Tensor] = {}

    def keep(module: MultiScaleDeformableAttention, args: tuple, output: Tensor) -> None:
        query, reference, _, shapes = args[:4]
        seen["locations"], seen["weights"] = module.sampling(query, reference, shapes)

    pil = detector.load(image)
    pixels = detector.preprocess(pil).to(detector.device)
    handle = cross.register_forward_hook(keep)
    try:
        with torch.inference_mode():
            features = model.forward_features([pixels])
            outputs = model.heads(features)
    finally:
        handle.remove()
    result = detector.postprocess(outputs, [(pil.height, pil.width)])[0]
    chosen = detector.select(result, threshold, top_k)
    detections = detector.to_detections(result, chosen)
    queries = result["query_indices"][chosen] if "query_indices" in result else chosen
    locations = seen["locations"][0, queries].float().cpu()  # [k, H, L, P, 2] normalized (x, y)
    weights = seen["weights"][0, queries].float().cpu()  # [k, H, L, P]
    k, heads, levels, points = weights.shape
    # an unpadded image: normalized coordinates are fractions of the image, as the boxes are
    scale = torch.tensor([pil.width, pil.height], dtype=torch.float32)
    locations = (locations * scale).permute(0, 2, 1, 3, 4).reshape(k, levels, heads * points, 2)
    weights = weights.permute(0, 2, 1, 3).reshape(k, levels, heads * points)
    assert features.levels is not None
    return SamplingPoints(pil, detections, [int(q) for q in queries], locations, weights, features.levels.sizes)


def draw_sampling_points(maps: SamplingPoints, *, panel_size: int = 360, columns: int = 3) -> Image.Image:
    """A figure: the image with the top detections, then per detection its sampling points over the image,
    coloured by feature level (finest first), each dot's area proportional to its weight."""
    dets = maps.detections
    base, scale = _scaled(maps.image, panel_size)
    overview = draw_detections(base, [[v * scale for v in d.box] for d in dets], [d.label for d in dets],
                               [d.score for d in dets], {d.label: d.name for d in dets})
    panels = [_title(overview, f"top {len(dets)} detections; levels " +
                     ", ".join(f"{h}x{w}" for h, w in maps.level_sizes))]
    largest = max(3.0, panel_size / 40)
    for i, det in enumerate(dets):
        panel = base.convert("L").convert("RGB")
        draw = ImageDraw.Draw(panel)
        draw.rectangle([v * scale for v in det.box], outline=colour_for(det.label), width=max(2, panel_size // 150))
        top = float(maps.weights[i].max())
        for level in range(maps.weights.shape[1]):
            colour = _LEVEL_COLOURS[level % len(_LEVEL_COLOURS)]
            for (x, y), w in zip(maps.locations[i, level].tolist(), maps.weights[i, level].tolist(), strict=True):
                r = largest * (w / top) ** 0.5 if top > 0 else 0.0
                if r >= 0.5:
                    draw.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r], fill=colour)
        panels.append(_title(panel, f"{det.name} {det.score:.2f} (query {maps.query_indices[i]})",
                             colour_for(det.label)))
    return _grid(panels, columns)


def save_sampling_figure(maps: SamplingPoints, out_dir: str | os.PathLike[str], stem: str) -> Path:
    """Write ``{stem}_sampling_points.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_sampling_points.png"
    draw_sampling_points(maps).save(path)
    return path
