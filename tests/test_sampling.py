"""Sampling points of a deformable-attention DETR (`detr attention` for --attention deformable)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import COCO_MINI
from detr import build_detr, save_checkpoint
from detr.checkpoint import load_checkpoint
from detr.config import BackboneConfig, DetrConfig, LossConfig, TransformerConfig
from detr.inference.attention import attention_maps
from detr.inference.predictor import Detector
from detr.inference.sampling import draw_sampling_points, sampling_points
from test_predictor import run_cli

IMAGE = COCO_MINI / "val2017" / "000000000139.jpg"
CONFIG = DetrConfig(
    num_classes=5, num_queries=8, num_feature_levels=3, loss=LossConfig(class_loss="focal"),
    backbone=BackboneConfig(name="small", norm="group_norm", frozen_stages=0, widths=(16, 32, 64), depths=(0, 0, 1)),
    transformer=TransformerConfig(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32,
                                  dropout=0.0, attention="deformable", n_points=2),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_detr(CONFIG).eval()
    cross = model.transformer.decoder.layers[-1].multihead_attn
    with torch.no_grad():  # offsets that do not depend on the query: points at known places around the reference
        cross.sampling_offsets.weight.zero_()
        cross.sampling_offsets.bias.copy_(torch.arange(cross.sampling_offsets.bias.numel()) % 5 - 2.0)
        cross.attention_weights.weight.zero_()
        cross.attention_weights.bias.copy_(torch.linspace(-1, 1, cross.attention_weights.bias.numel()))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "deformable.safetensors")


def test_sampling_points_are_the_last_layers_locations_around_each_query_reference(checkpoint):
    model = load_checkpoint(checkpoint)
    detector = Detector(model, threshold=0.0, size=128, max_size=192)
    maps = sampling_points(detector, IMAGE, top_k=3)
    assert len(maps.detections) == 3 and maps.locations.shape == (3, 3, 2 * 2, 2)
    width, height = Image.open(IMAGE).size
    cross = model.transformer.decoder.layers[-1].multihead_attn
    heads, levels, points = 2, 3, 2
    offsets = cross.sampling_offsets.bias.detach().view(heads, levels, points, 2)
    logits = cross.attention_weights.bias.detach().view(heads, levels * points)
    expected_w = logits.softmax(-1).view(heads, levels, points)  # softmax over levels x points, per head
    q = model.deformable_queries
    position = q.query_embed.weight[:, :32]
    reference = q.reference_points(position).sigmoid().detach()  # [Q, 2]; no refinement: every layer's
    for i, query in enumerate(maps.query_indices):
        for level, (h, w) in enumerate(maps.level_sizes):
            # one unpadded image: valid ratios 1; offsets in pixels of the level, divided by its size
            loc = reference[query] + offsets[:, level] / torch.tensor([w, h], dtype=torch.float32)  # [H, P, 2]
            px = (loc * torch.tensor([width, height], dtype=torch.float32)).reshape(-1, 2)
            torch.testing.assert_close(maps.locations[i, level], px, rtol=0, atol=1e-3)
            torch.testing.assert_close(maps.weights[i, level], expected_w[:, level].reshape(-1), rtol=0, atol=1e-6)
    assert maps.weights.sum(dim=(1, 2)).sub(heads).abs().max() < 1e-5  # each head's weights sum to 1
    figure = draw_sampling_points(maps, panel_size=200)
    assert figure.size[0] > 200 and figure.getextrema() != ((255, 255),) * 3
    with pytest.raises(TypeError, match="sampling points"):
        attention_maps(detector, IMAGE)


def test_detr_attention_draws_sampling_points_for_a_deformable_model(checkpoint, tmp_path):
    code, out, err = run_cli(["attention", str(IMAGE), "--checkpoint", str(checkpoint), "--out", str(tmp_path),
                              "--top_k", "2"])
    assert code == 0, err
    result = json.loads(out)
    (written,) = result["written"]
    assert written.endswith("000000000139_sampling_points.png") and Image.open(written).size[0] > 0
    assert len(result["detections"]) == 2 and len(result["feature_levels"]) == 3
