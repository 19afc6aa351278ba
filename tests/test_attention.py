"""Attention maps (Detector.attention, `detr attention`) from the fixture's model on a real image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COCO_MINI
from detr.checkpoint import load_checkpoint
from detr.inference.attention import (
    AttentionMaps,
    capture_attention,
    draw_decoder_attention,
    draw_encoder_attention,
    heatmap,
)
from detr.inference.predictor import Detector
from detr.inference.visualize import colour_for, draw_detections
from detr.model.transformer import MultiheadAttention
from test_predictor import reference_checkpoint, run_cli

IMAGE = COCO_MINI / "val2017" / "000000018575.jpg"  # 640 x 480
SIZE = {"size": 160, "max_size": 240}  # -> 160 x 213 input, a 5 x 7 feature map


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> str:
    return reference_checkpoint(reference["detection"], tmp_path_factory.mktemp("ckpt") / "detr-fixture.pth")


@pytest.fixture(scope="module")
def detector(checkpoint) -> Detector:
    return Detector(load_checkpoint(checkpoint), threshold=0.0, **SIZE)


@pytest.fixture(scope="module")
def maps(detector) -> AttentionMaps:
    return detector.attention(IMAGE, top_k=3)


def conv_out(n: int, stages: int = 5) -> int:
    """ResNet's output size along one axis: each stride-2 stage (3x3/7x7 conv or pool, 'same' padding) ceils."""
    for _ in range(stages):
        n = (n + 1) // 2
    return n


def attention_modules(model) -> list[MultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, MultiheadAttention)]


def test_maps_have_the_feature_shape_and_are_distributions(maps):
    with Image.open(IMAGE) as image:
        width, height = image.size
    assert (width, height) == (640, 480)
    assert maps.input_size == (160, 213)  # short side 160, long side int(640 * 160 / 480) <= 240
    h, w = conv_out(160), conv_out(213)
    assert maps.feature_size == (h, w)
    assert maps.decoder.shape == (3, h, w) and len(maps.detections) == 3
    assert maps.encoder is not None and maps.encoder.shape == (len(maps.points), h, w)
    # Head-averaged softmax weights: each map sums to 1 over the keys (the feature cells).
    assert torch.allclose(maps.decoder.sum((1, 2)), torch.ones(3), atol=1e-5)
    assert torch.allclose(maps.encoder.sum((1, 2)), torch.ones(len(maps.points)), atol=1e-5)
    assert (maps.decoder >= 0).all() and (maps.encoder >= 0).all()
    # Default reference points: the top boxes' centres in score order, the first one of each feature cell
    # (cells of 32 x 32 input pixels; the input is the image scaled by 160 / 480 and 213 / 640).
    centres = [((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2) for d in maps.detections]
    cells = [(int(y * 160 / height // 32), int(x * 213 / width // 32)) for x, y in centres]
    assert maps.points == [c for i, c in enumerate(centres) if cells[i] not in cells[:i]]
    scores = [d.score for d in maps.detections]
    assert scores == sorted(scores, reverse=True)
    shown = maps.to_image_size(maps.decoder[0])
    assert shown.shape == (height, width) and shown.min() >= 0 and shown.max() <= 1 and shown.max() > 0.9


def test_hooks_leave_the_model_as_it_was_and_do_not_change_results(detector, maps):
    model = detector.detection_model
    assert all(not m.keep_weights for m in attention_modules(model))
    assert all(len(m._forward_hooks) == 0 for m in attention_modules(model))
    plain = detector(IMAGE)  # the ordinary path (fused attention, no hooks)
    for with_hooks, without in zip(maps.detections, plain[:3], strict=True):
        assert with_hooks.label == without.label
        assert with_hooks.score == pytest.approx(without.score, rel=1e-5, abs=1e-6)
        assert with_hooks.box == pytest.approx(without.box, rel=1e-5, abs=1e-3)


def test_captured_weights_are_the_modules_attention(detector, maps):
    """Recompute the last decoder layer's cross-attention from the module's own inputs and weights."""
    model = detector.detection_model
    layer = model.transformer.decoder.layers[-1].multihead_attn
    seen = {}
    handle = layer.register_forward_hook(lambda module, args, output: seen.update(query=args[0], key=args[1]))
    try:
        with torch.inference_mode():
            model([detector.preprocess(detector.load(IMAGE))])
    finally:
        handle.remove()
    e, heads = layer.embed_dim, layer.num_heads
    with torch.inference_mode():
        q = seen["query"] @ layer.in_proj_weight[:e].T + layer.in_proj_bias[:e]  # [1, Q, E]
        k = seen["key"] @ layer.in_proj_weight[e : 2 * e].T + layer.in_proj_bias[e : 2 * e]  # [1, HW, E]
        q = q.view(1, -1, heads, e // heads).transpose(1, 2)  # [1, heads, Q, d]
        k = k.view(1, -1, heads, e // heads).transpose(1, 2)  # [1, heads, HW, d]
        weights = ((q @ k.transpose(-2, -1)) / (e // heads) ** 0.5).softmax(-1).mean(1)[0]  # [Q, HW]
    expected = weights[maps.query_indices].view(maps.decoder.shape)
    assert torch.allclose(maps.decoder, expected, atol=1e-6)


def test_capture_restores_keep_weights_on_error(detector):
    layer = detector.detection_model.transformer.encoder.layers[0].self_attn
    with pytest.raises(RuntimeError, match="boom"), capture_attention({"enc": layer}):
        assert layer.keep_weights
        raise RuntimeError("boom")
    assert not layer.keep_weights and len(layer._forward_hooks) == 0
    layer.keep_weights = True  # a module already opted in stays opted in
    try:
        with capture_attention({"enc": layer}):
            pass
        assert layer.keep_weights
    finally:
        layer.keep_weights = False


def test_explicit_points_pick_their_feature_cells(detector, maps):
    with Image.open(IMAGE) as image:
        width, height = image.size
    corners = [(0.0, 0.0), (width - 1.0, height - 1.0)]
    explicit = detector.attention(IMAGE, top_k=1, points=corners)
    assert explicit.points == corners and explicit.encoder.shape[0] == 2
    # The whole self-attention matrix of the last encoder layer, captured here directly.
    model = detector.detection_model
    with torch.inference_mode(), capture_attention({"enc": model.transformer.encoder.layers[-1].self_attn}) as seen:
        model([detector.preprocess(detector.load(IMAGE))])
    h, w = maps.feature_size
    full = seen["enc"][0]  # [HW, HW]
    # Top-left pixel -> cell (0, 0); bottom-right pixel -> the last cell (160 x 213 input, stride 32).
    assert torch.allclose(explicit.encoder[0].flatten(), full[0], atol=1e-6)
    assert torch.allclose(explicit.encoder[1].flatten(), full[(h - 1) * w + (w - 1)], atol=1e-6)
    assert not torch.allclose(full[0], full[(h - 1) * w + (w - 1)])  # distinct cells, distinct rows


def panel(figure: Image.Image, index: int, size: tuple[int, int], columns: int = 3, gap: int = 6) -> np.ndarray:
    """Panel ``index`` (row-major, ``size`` = (w, h)) of a figure laid out by the attention module's grid."""
    row, column = divmod(index, columns)
    x, y = gap + column * (size[0] + gap), gap + row * (size[1] + gap)
    return np.asarray(figure)[y : y + size[1], x : x + size[0]]


def test_figures_are_drawn(maps):
    panel_size = 200
    scale = panel_size / max(maps.image.size)  # 640 x 480 -> 200 x 150
    size = (round(maps.image.width * scale), round(maps.image.height * scale))
    grey = np.asarray(maps.image.convert("L").convert("RGB"), dtype=np.float32)

    def overlay(attention: torch.Tensor) -> np.ndarray:
        """The expected heat-map panel: 0.35 grey image + 0.65 viridis of the map, scaled to the panel."""
        mixed = 0.35 * grey + 0.65 * heatmap(maps.to_image_size(attention)).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR)).astype(int)

    decoder = draw_decoder_attention(maps, panel_size=panel_size)
    encoder = draw_encoder_attention(maps, panel_size=panel_size)
    assert decoder.size == (3 * size[0] + 4 * 6, 2 * size[1] + 3 * 6)  # overview + 3 detections, 3 columns
    below_title = np.zeros(size[::-1], dtype=bool)
    below_title[30:] = True  # the panels' titles sit in their top rows
    for i, det in enumerate(maps.detections):
        shown = panel(decoder, i + 1, size)
        x0, y0, x1, y1 = (round(v * scale) for v in det.box)
        box = np.zeros_like(below_title)
        box[max(y0 - 2, 0) : y1 + 3, max(x0 - 2, 0) : x1 + 3] = True  # the outline, give or take rounding
        # Away from the box and the title: this detection's own attention map over the greyed image ...
        away = below_title & ~box
        assert np.abs(shown[away].astype(int) - overlay(maps.decoder[i])[away]).max() <= 1
        other = overlay(maps.decoder[(i + 1) % len(maps.detections)])
        assert np.abs(shown[away].astype(int) - other[away]).max() > 10  # ... and not another's
        # ... and the box outlined in its class colour (its bottom edge, clear of the title).
        if y1 - 1 < size[1] and y1 - 1 > 30:
            bottom = shown[y1 - 1, x0 + 3 : x1 - 3]
            assert (bottom == colour_for(det.label)).all(), i
    # The overview: the scaled image with the detections drawn by draw_detections.
    boxes = [[v * scale for v in d.box] for d in maps.detections]
    base = maps.image.resize(size, Image.Resampling.BILINEAR)
    overview = draw_detections(base, boxes, [d.label for d in maps.detections], [d.score for d in maps.detections],
                               {d.label: d.name for d in maps.detections})
    assert np.array_equal(panel(decoder, 0, size)[below_title], np.asarray(overview)[below_title])
    # Encoder: per reference point its self-attention map with the point marked in its colour.
    for i, (x, y) in enumerate(maps.points):
        shown = panel(encoder, i + 1, size)
        assert tuple(shown[round(y * scale), round(x * scale)]) == colour_for(i)
        mark = np.zeros_like(below_title)
        cy, cx = round(y * scale), round(x * scale)
        mark[max(cy - 8, 0) : cy + 9, max(cx - 8, 0) : cx + 9] = True
        away = below_title & ~mark
        assert np.abs(shown[away].astype(int) - overlay(maps.encoder[i])[away]).max() <= 1
        assert tuple(panel(encoder, 0, size)[cy, cx]) == colour_for(i)
    colours = heatmap(np.array([[0.0, 0.5, 1.0]]))
    assert colours.shape == (1, 3, 3) and colours.dtype == np.uint8
    assert colours[0, 0].tolist() == [68, 1, 84] and colours[0, 2].tolist() == [253, 231, 37]  # viridis' ends
    assert colours[0, 1].tolist() == [33, 145, 140]  # its middle stop


def test_attention_command_writes_pngs(checkpoint, tmp_path):
    code, stdout, stderr = run_cli(["attention", str(IMAGE), "--checkpoint", checkpoint, "--out", str(tmp_path),
                                    "--top_k", "2", "--points", "100,100", "500,300", "--size", "128",
                                    "--max_size", "200"])
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert len(summary["detections"]) == 2 and summary["points"] == [[100.0, 100.0], [500.0, 300.0]]
    # The figures the Python API draws for the same image, sizes, detections and points.
    maps = Detector(load_checkpoint(checkpoint), threshold=0.0, size=128, max_size=200).attention(
        IMAGE, top_k=2, points=[(100.0, 100.0), (500.0, 300.0)])
    assert [d.to_dict() for d in maps.detections] == summary["detections"]
    expected = {"000000018575_decoder_attention.png": draw_decoder_attention(maps),
                "000000018575_encoder_attention.png": draw_encoder_attention(maps)}
    assert sorted(summary["written"]) == sorted(str(tmp_path / name) for name in expected)
    for name, figure in expected.items():
        with Image.open(tmp_path / name) as written:
            assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(figure))
