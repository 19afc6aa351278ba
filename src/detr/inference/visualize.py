"""Drawing detections and segments on images with Pillow: distinct colours, labels that stay inside the image."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

Colour = tuple[int, int, int]


def colour_for(index: int) -> Colour:
    """The ``index``-th of a sequence of well-separated saturated colours: golden-ratio hue steps, and
    alternating brightness so that neighbouring ids differ even where their hues come close."""
    value = 0.95 if index % 2 == 0 else 0.75
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, value)
    return int(r * 255), int(g * 255), int(b * 255)


def palette(n: int) -> list[Colour]:
    """The first ``n`` colours of :func:`colour_for`."""
    return [colour_for(i) for i in range(n)]


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` pixels (a scalable font with FreeType, the bitmap one without)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def text_colour(background: Colour) -> Colour:
    """Black or white, whichever reads better on ``background``."""
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_caption(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: Colour, size: tuple[int, int],
    text_font: ImageFont.ImageFont | ImageFont.FreeTypeFont, *, above: bool = True,
) -> None:
    """A filled label with ``text`` at ``xy`` (above that point if there is room), kept inside ``size``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=text_font)
    pad = 2
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    width, height = size
    x, y = xy
    tx = min(max(0.0, x), max(0.0, width - tw))
    ty = y - th if above and y - th >= 0 else min(max(0.0, y), max(0.0, height - th))
    draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
    draw.text((tx + pad - left, ty + pad - top), text, fill=text_colour(colour), font=text_font)


def draw_detections(
    image: Image.Image,
    boxes_xyxy: Sequence[Sequence[float]],
    labels: Sequence[int],
    scores: Sequence[float],
    names: Mapping[int, str] | None = None,
    *,
    font_size: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with each box outlined in its class colour and captioned "name score".

    Captions sit above their box when there is room, else inside it, and are always clamped to the
    image. ``font_size`` defaults to about 1/40 of the shorter side (at least 10 px).
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    text_font = font(font_size or max(10, round(min(out.size) / 40)))
    width = max(2, round(min(out.size) / 200))
    items = list(zip(boxes_xyxy, labels, scores, strict=True))
    # Lowest scores first so that the most confident boxes and captions end up on top.
    for box, label, score in sorted(items, key=lambda item: float(item[2])):
        x0, y0, x1, y1 = (float(v) for v in box)
        colour = colour_for(int(label))
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=width)
        text = f"{(names or {}).get(int(label), str(int(label)))} {float(score):.2f}"
        draw_caption(draw, (x0, y0), text, colour, out.size, text_font)
    return out


def draw_segments(
    image: Image.Image,
    segment_ids: Tensor | np.ndarray,
    segments: Sequence[Mapping],
    names: Mapping[int, str] | None = None,
    *,
    alpha: float = 0.6,
    min_label_area: float = 0.005,
) -> Image.Image:
    """``image`` with each panoptic segment filled in its own colour (blended with ``alpha``) and, for
    segments of at least ``min_label_area`` of the image, its category name at the segment's centroid.

    segment_ids: [H, W] ids at the image's size; segments: dicts with "id", "category_id" (and "area").
    """
    ids = np.asarray(segment_ids.cpu() if isinstance(segment_ids, Tensor) else segment_ids).astype(np.int64)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if ids.shape != base.shape[:2]:
        raise ValueError(f"segment map {ids.shape} does not match the image {base.shape[:2]}")
    colours = np.zeros((max((int(s["id"]) for s in segments), default=0) + 1, 3), dtype=np.float32)
    known = np.zeros(len(colours), dtype=bool)
    for s in segments:
        colours[int(s["id"])] = colour_for(int(s["id"]))
        known[int(s["id"])] = True
    inside = (ids >= 0) & (ids < len(colours))
    painted = inside & known[np.clip(ids, 0, len(colours) - 1)]
    blended = base.copy()
    blended[painted] = (1 - alpha) * base[painted] + alpha * colours[ids[painted]]
    out = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    text_font = font(max(10, round(min(out.size) / 45)))
    for s in segments:
        ys, xs = np.nonzero(ids == int(s["id"]))
        if len(xs) == 0 or len(xs) < min_label_area * ids.size:
            continue
        category = int(s["category_id"])
        draw_caption(draw, (float(xs.mean()), float(ys.mean())), (names or {}).get(category, str(category)),
                     colour_for(int(s["id"])), out.size, text_font, above=False)
    return out
