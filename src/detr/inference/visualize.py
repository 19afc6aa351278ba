"""Drawing detections on images with Pillow: distinct colours, labels that stay inside the image."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated colours (golden-ratio hue steps)."""
    colours = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def draw_detections(
    image: Image.Image,
    boxes_xyxy: Sequence[Sequence[float]],
    labels: Sequence[int],
    scores: Sequence[float],
    names: dict[int, str] | None = None,
) -> Image.Image:
    """A copy of ``image`` with each box outlined and captioned "name score"."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    width = max(2, round(min(out.size) / 200))
    colours = palette(max(labels, default=0) + 1)
    for box, label, score in zip(boxes_xyxy, labels, scores, strict=True):
        x0, y0, x1, y1 = (float(v) for v in box)
        colour = colours[int(label)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{(names or {}).get(int(label), str(int(label)))} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        # Caption above the box when there is room, else inside it; always clamped to the image.
        tx = min(max(0.0, x0), out.width - tw)
        ty = y0 - th if y0 - th >= 0 else min(max(0.0, y0), out.height - th)
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255),
                  font=font)
    return out
