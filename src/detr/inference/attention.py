"""Attention maps of a trained DETR: what each detection looks at, and what the encoder relates.

The weights come from the model's own forward: the attention modules of interest are switched to
their opt-in ``keep_weights`` path and read with forward hooks (:func:`capture_attention`), then
switched back. Maps are the head-averaged softmax weights over the [h, w] feature map (each sums to
1); the drawings normalize them by their maximum, Pillow only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from ..model.detr import DETR
from ..model.transformer import MultiheadAttention
from .results import Detection, ImageInput
from .visualize import colour_for, draw_caption, draw_detections, font


class _Detector(Protocol):
    """What attention maps need of a ``Detector`` (which depends on this module, not the other way)."""

    device: torch.device
    detection_model: nn.Module

    def load(self, image: ImageInput) -> Image.Image: ...

    def preprocess(self, image: Image.Image) -> Tensor: ...

    def postprocess(
        self, outputs: Mapping[str, Tensor], orig_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]: ...

    def select(self, result: Mapping[str, Tensor], threshold: float | None, top_k: int | None = None) -> Tensor: ...

    def to_detections(self, result: Mapping[str, Tensor], indices: Tensor) -> list[Detection]: ...

__all__ = [
    "AttentionMaps",
    "attention_maps",
    "capture_attention",
    "draw_decoder_attention",
    "draw_encoder_attention",
    "heatmap",
    "save_attention_figures",
]


@contextmanager
def capture_attention(modules: Mapping[str, MultiheadAttention]) -> Iterator[dict[str, Tensor]]:
    """Within the block, each named module returns its head-averaged weights [B, Lq, Lk] and a
    forward hook stores them (detached) under its name in the yielded dict. On exit the hooks are
    removed and each module's ``keep_weights`` is restored."""
    captured: dict[str, Tensor] = {}
    previous = {name: module.keep_weights for name, module in modules.items()}
    handles = []

    def hook_for(name: str):
        def hook(module: MultiheadAttention, args: tuple, output: tuple[Tensor, Tensor | None]) -> None:
            if output[1] is not None:
                captured[name] = output[1].detach()

        return hook

    try:
        for name, module in modules.items():
            module.keep_weights = True
            handles.append(module.register_forward_hook(hook_for(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            module.keep_weights = previous[name]


@dataclass(frozen=True)
class AttentionMaps:
    """Attention of one image. Maps live on the [h, w] feature grid; cell (i, j) covers input pixels
    [i*stride, (i+1)*stride) x [j*stride, (j+1)*stride) of the resized image (``input_size``)."""

    image: Image.Image  # the original image (RGB)
    detections: list[Detection]  # the top detections, by decreasing score
    query_indices: list[int]  # their decoder queries
    decoder: Tensor  # [k, h, w] last decoder layer's cross-attention of each detection's query
    points: list[tuple[float, float]]  # encoder reference points, (x, y) in original-image pixels
    encoder: Tensor | None  # [p, h, w] last encoder layer's self-attention from each point's cell
    input_size: tuple[int, int]  # (h, w) of the resized image the model saw
    stride: int  # backbone stride: 32, or 16 with a dilated (DC5) last stage

    @property
    def feature_size(self) -> tuple[int, int]:
        return int(self.decoder.shape[-2]), int(self.decoder.shape[-1])

    def to_image_size(self, attention: Tensor) -> np.ndarray:
        """One [h, w] map -> float32 [H, W] at the original image size, min-max scaled to [0, 1] for display."""
        h, w = attention.shape
        values = attention.float().cpu().numpy()
        values = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
        grid = Image.fromarray(values.astype(np.float32))  # mode "F"
        # Feature cells cover stride x stride input pixels; the last row/column may overhang the image.
        covered = grid.resize((w * self.stride, h * self.stride), Image.Resampling.BILINEAR)
        in_h, in_w = self.input_size
        cropped = covered.crop((0, 0, in_w, in_h)).resize(self.image.size, Image.Resampling.BILINEAR)
        return np.clip(np.asarray(cropped, dtype=np.float32), 0.0, 1.0)


def _feature_cell(point: tuple[float, float], image_size: tuple[int, int], input_size: tuple[int, int],
                  stride: int, feature_size: tuple[int, int]) -> int:
    """Flat index of the feature cell under an (x, y) original-image point."""
    (orig_h, orig_w), (in_h, in_w), (h, w) = image_size, input_size, feature_size
    col = int(point[0] * in_w / orig_w // stride)
    row = int(point[1] * in_h / orig_h // stride)
    return min(max(row, 0), h - 1) * w + min(max(col, 0), w - 1)


def attention_maps(
    detector: _Detector,
    image: ImageInput,
    *,
    top_k: int = 4,
    points: Sequence[tuple[float, float]] | None = None,
    threshold: float | None = None,
) -> AttentionMaps:
    """Run ``detector``'s model once on ``image`` with the last decoder layer's cross-attention and the
    last encoder layer's self-attention captured (see :meth:`Detector.attention`)."""
    model = detector.detection_model
    if not isinstance(model, DETR):
        raise TypeError(f"attention maps need a DETR model, got {type(model).__name__}")
    if model.deformable:
        raise TypeError("a deformable-attention model has no attention maps over the feature map: draw its "
                        "sampling points (detr.inference.sampling.sampling_points; `detr attention` does)")
    decoder_layers, encoder_layers = model.transformer.decoder.layers, model.transformer.encoder.layers
    modules = {"decoder": decoder_layers[-1].multihead_attn}
    if len(encoder_layers) > 0:
        modules["encoder"] = encoder_layers[-1].self_attn
    pil = detector.load(image)
    pixels = detector.preprocess(pil).to(detector.device)
    with torch.inference_mode(), capture_attention(modules) as weights:
        # The model's own forward, split where it exposes the feature map size: forward = heads(features).
        features = model.forward_features([pixels])
        outputs = model.heads(features)
    h, w = features.projected.shape[-2:]
    image_size = (pil.height, pil.width)
    result = detector.postprocess(outputs, [image_size])[0]
    keep = detector.select(result, threshold, top_k)
    detections = detector.to_detections(result, keep)
    if "query_indices" in result:  # focal: detections are (query, class) pairs, and a query may give several
        keep = result["query_indices"][keep]
    decoder = weights["decoder"][0, keep].reshape(-1, h, w).float().cpu()  # [k, h, w]

    input_size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
    stride = model.config.backbone.output_stride

    def cell(point: tuple[float, float]) -> int:
        return _feature_cell(point, image_size, input_size, stride, (h, w))

    if points is None:  # the detections' box centres, one per feature cell
        points, seen = [], set()
        for d in detections:
            centre = ((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2)
            if cell(centre) not in seen:
                seen.add(cell(centre))
                points.append(centre)
    points = [(float(x), float(y)) for x, y in points]
    encoder = None
    if "encoder" in weights:
        cells = [cell(p) for p in points]
        encoder = weights["encoder"][0, cells].reshape(-1, h, w).float().cpu()  # [p, h, w]
    return AttentionMaps(pil, detections, keep.tolist(), decoder, points, encoder, input_size, stride)


# --- drawing ---------------------------------------------------------------------------------

# Viridis at five stops: dark blue (low) -> yellow (high); readable in greyscale too.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


def heatmap(values: np.ndarray) -> np.ndarray:
    """float [H, W] in [0, 1] -> uint8 RGB [H, W, 3] (viridis-like colour map)."""
    stops = np.linspace(0.0, 1.0, len(_VIRIDIS))
    flat = np.clip(values, 0.0, 1.0).reshape(-1)
    rgb = np.stack([np.interp(flat, stops, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8).reshape(*values.shape, 3)


def _overlay(image: Image.Image, values: np.ndarray, alpha: float = 0.65) -> Image.Image:
    """The image, greyed, under the heat map of ``values`` [H, W]."""
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32)
    mixed = (1 - alpha) * grey + alpha * heatmap(values).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))


def _scaled(image: Image.Image, longest: int) -> tuple[Image.Image, float]:
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), scale


def _grid(panels: Sequence[Image.Image], columns: int, gap: int = 6) -> Image.Image:
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    cell_w, cell_h = max(p.width for p in panels), max(p.height for p in panels)
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap), "white")
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        sheet.paste(panel, (gap + c * (cell_w + gap), gap + r * (cell_h + gap)))
    return sheet


def _title(panel: Image.Image, text: str, colour: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    draw = ImageDraw.Draw(panel)
    draw_caption(draw, (0, 0), text, colour, panel.size, font(max(11, panel.height // 24)), above=False)
    return panel


def draw_decoder_attention(maps: AttentionMaps, *, panel_size: int = 360, columns: int = 3) -> Image.Image:
    """A figure: the image with the top detections, then per detection its cross-attention map over
    the (greyed) image with its box."""
    dets = maps.detections
    base, scale = _scaled(maps.image, panel_size)
    width = max(2, panel_size // 150)
    overview = draw_detections(base, [[v * scale for v in d.box] for d in dets], [d.label for d in dets],
                               [d.score for d in dets], {d.label: d.name for d in dets})
    panels = [_title(overview, f"top {len(dets)} detections")]
    for i, det in enumerate(dets):
        values = maps.to_image_size(maps.decoder[i])
        panel, _ = _scaled(_overlay(maps.image, values), panel_size)
        draw = ImageDraw.Draw(panel)
        draw.rectangle([v * scale for v in det.box], outline=colour_for(det.label), width=width)
        panels.append(_title(panel, f"{det.name} {det.score:.2f} (query {maps.query_indices[i]})",
                             colour_for(det.label)))
    return _grid(panels, columns)


def draw_encoder_attention(maps: AttentionMaps, *, panel_size: int = 360, columns: int = 3) -> Image.Image:
    """A figure: the image with the numbered reference points, then per point the last encoder layer's
    self-attention from that point over the (greyed) image."""
    if maps.encoder is None:
        raise ValueError("this model has no encoder layers: no encoder self-attention to draw")
    base, scale = _scaled(maps.image, panel_size)
    radius = max(4, panel_size // 60)

    def mark(panel: Image.Image, i: int, point: tuple[float, float]) -> None:
        x, y = point[0] * scale, point[1] * scale
        draw = ImageDraw.Draw(panel)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour_for(i), outline="white", width=2)

    overview = base.copy()
    for i, point in enumerate(maps.points):
        mark(overview, i, point)
    panels = [_title(overview, f"{len(maps.points)} reference points")]
    for i, point in enumerate(maps.points):
        panel, _ = _scaled(_overlay(maps.image, maps.to_image_size(maps.encoder[i])), panel_size)
        mark(panel, i, point)
        panels.append(_title(panel, f"point {i + 1} ({point[0]:.0f}, {point[1]:.0f})", colour_for(i)))
    return _grid(panels, columns)


def save_attention_figures(maps: AttentionMaps, out_dir: str | os.PathLike[str], stem: str) -> list[Path]:
    """Write ``{stem}_decoder_attention.png`` and (with an encoder) ``{stem}_encoder_attention.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}_decoder_attention.png"]
    draw_decoder_attention(maps).save(written[0])
    if maps.encoder is not None and len(maps.points) > 0:
        written.append(out / f"{stem}_encoder_attention.png")
        draw_encoder_attention(maps).save(written[-1])
    return written
