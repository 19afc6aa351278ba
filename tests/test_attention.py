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
    # Default reference points: the top boxes' centres, one per feature cell, inside the image.
    assert 1 <= len(maps.points) <= 3
    assert all(0 <= x <= width and 0 <= y <= height for x, y in maps.points)
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


def test_figures_are_drawn(maps):
    decoder = draw_decoder_attention(maps, panel_size=200)
    encoder = draw_encoder_attention(maps, panel_size=200)
    for figure in (decoder, encoder):
        assert figure.mode == "RGB" and figure.width >= 200 and figure.height >= 100
        assert len(np.unique(np.asarray(figure).reshape(-1, 3), axis=0)) > 100
    colours = heatmap(np.array([[0.0, 0.5, 1.0]]))
    assert colours.shape == (1, 3, 3) and colours.dtype == np.uint8
    assert colours[0, 0].sum() < colours[0, 2].sum()  # dark for low, bright for high


def test_attention_command_writes_pngs(checkpoint, tmp_path):
    code, stdout, stderr = run_cli(["attention", str(IMAGE), "--checkpoint", checkpoint, "--out", str(tmp_path),
                                    "--top_k", "2", "--points", "100,100", "500,300", "--size", "128",
                                    "--max_size", "200"])
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert len(summary["detections"]) == 2 and summary["points"] == [[100.0, 100.0], [500.0, 300.0]]
    for name in ("000000018575_decoder_attention.png", "000000018575_encoder_attention.png"):
        with Image.open(tmp_path / name) as figure:
            assert figure.width > 200 and len(np.unique(np.asarray(figure.convert("RGB")).reshape(-1, 3), axis=0)) > 50
