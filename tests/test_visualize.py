"""Drawing (detr.inference.visualize): the pixels of the drawn boxes, captions and segments."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detr.inference.visualize import colour_for, draw_detections, draw_segments, palette, text_colour

WIDTH = 2  # draw_detections' outline width on images under 300 px
BAND = 30  # a caption's height is well under this (10 px font + padding)


def noise(width: int = 200, height: int = 160, seed: int = 0) -> Image.Image:
    """Random pixels: any pixel the drawing touches by mistake changes."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def outline(shape: tuple[int, int], box: tuple[int, int, int, int], width: int = WIDTH) -> np.ndarray:
    """[H, W] True on the ``width`` pixels inside each edge of the inclusive box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    mask[y0 + width : y1 + 1 - width, x0 + width : x1 + 1 - width] = False
    return mask


def interior(shape: tuple[int, int], box: tuple[int, int, int, int], width: int = WIDTH) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[y0 + width : y1 + 1 - width, x0 + width : x1 + 1 - width] = True
    return mask


def caption_band(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Where the caption of a box with room above it may go: a band above its top-left corner."""
    x0, y0, _, _ = box
    mask = np.zeros(shape, dtype=bool)
    mask[max(0, y0 - BAND) : y0 + 1, x0 : x0 + 100] = True
    return mask


def test_boxes_are_outlined_in_their_class_colour_and_nothing_else_changes():
    image = noise()
    before = np.asarray(image).copy()
    boxes = [(30, 50, 90, 120), (120, 60, 180, 140)]
    labels, scores = [3, 7], [0.9, 0.5]
    out = draw_detections(image, boxes, labels, scores, {3: "cat", 7: "train"})
    assert np.array_equal(np.asarray(image), before)  # the input is left alone
    drawn = np.asarray(out)
    assert drawn.shape == before.shape
    shape = before.shape[:2]
    changed = np.zeros(shape, dtype=bool)
    for box, label in zip(boxes, labels, strict=True):
        colour = colour_for(label)
        edge = outline(shape, box)
        assert (drawn[edge] == colour).all(), box  # every outline pixel, in the class colour
        assert np.array_equal(drawn[interior(shape, box)], before[interior(shape, box)])  # the inside is the image
        band = caption_band(shape, box)
        # The caption: a filled label of the box colour above the box, with text in black or white.
        caption = band & ~edge
        filled = (drawn[caption] == colour).all(axis=-1)
        assert filled.sum() > 100
        # the text: anti-aliased strokes, pixels of neither the fill nor the image, leaning to the text colour
        strokes = drawn[caption][~filled & (drawn[caption] != before[caption]).any(axis=-1)].astype(int)
        ink = np.abs(strokes - text_colour(colour)).sum(-1) < np.abs(strokes - colour).sum(-1)
        assert ink.sum() > 10
        changed |= edge | band
    assert np.array_equal(drawn[~changed], before[~changed])  # nothing else is touched


def test_confident_boxes_are_drawn_on_top():
    low, high = (20, 20, 100, 100), (60, 60, 140, 140)
    crossing = (61, 100)  # (y, x): the low box's right edge meets the high box's top edge
    for scores, top in (([0.3, 0.8], 2), ([0.8, 0.3], 1)):
        drawn = np.asarray(draw_detections(noise(), [low, high], [1, 2], scores))
        assert tuple(drawn[crossing]) == colour_for(top), scores
    # Away from the crossings each outline keeps its own colour, also inside the other box.
    drawn = np.asarray(draw_detections(noise(), [low, high], [1, 2], [0.3, 0.8]))
    assert tuple(drawn[90, 100]) == colour_for(1) and tuple(drawn[130, 60]) == colour_for(2)


def test_caption_goes_inside_a_box_at_the_top_and_stays_in_the_image():
    image = noise()
    before = np.asarray(image)
    box = (150, 0, 199, 80)  # no room above, no room for a wide caption to the right
    drawn = np.asarray(draw_detections(image, [box], [5], [0.75], {5: "a long class name"}))
    colour = colour_for(5)
    below_caption = outline(before.shape[:2], box)
    below_caption[:BAND] = False
    assert below_caption.sum() > 100 and (drawn[below_caption] == colour).all()
    # The caption fills from the box's top edge down inside it, its right end clamped to the image.
    assert (drawn[2:8, 190:198] == colour).all(axis=-1).any()
    assert not np.array_equal(drawn[2:14, 152:198], before[2:14, 152:198])
    assert np.array_equal(drawn[BAND + 2 :, :148], before[BAND + 2 :, :148])  # left of and below the label


def test_segments_are_blended_with_their_colour():
    image = noise(60, 40)
    base = np.asarray(image).astype(np.float64)
    ids = np.zeros((40, 60), dtype=np.int64)
    ids[5:20, 10:30] = 3
    ids[22:38, 35:58] = 8
    ids[0:3, 0:3] = 9  # in the map, not in the segment list: left as it is
    segments = [{"id": 3, "category_id": 1}, {"id": 8, "category_id": 2}]
    out = np.asarray(draw_segments(image, ids, segments, alpha=0.6, min_label_area=1.1))  # no labels
    for seg_id in (3, 8):
        where = ids == seg_id
        expected = np.rint(0.4 * base[where] + 0.6 * np.array(colour_for(seg_id), dtype=np.float64))
        assert np.abs(out[where].astype(np.float64) - expected).max() <= 1, seg_id  # float32 rounding
    untouched = ~np.isin(ids, [3, 8])
    assert np.array_equal(out[untouched], np.asarray(image)[untouched])
    # With labels: the category name sits at each large segment's centroid; far from it the blend is unchanged.
    labelled = np.asarray(draw_segments(image, ids, segments, {1: "sky", 2: "road"}, alpha=0.6))
    assert not np.array_equal(labelled[8:17, 15:25], out[8:17, 15:25])
    left = np.zeros_like(untouched)
    left[:, :8] = True  # far from both centroids
    assert np.array_equal(labelled[left], out[left])
    with pytest.raises(ValueError, match="does not match"):
        draw_segments(image, ids[:10], segments)


def test_palette_colours_are_distinct():
    colours = palette(64)
    assert colours == [colour_for(i) for i in range(64)] and len(set(colours)) == 64
    assert text_colour((250, 250, 250)) == (0, 0, 0) and text_colour((10, 10, 10)) == (255, 255, 255)
