"""The prediction heads under mixed precision (detr.model.mlp.predict)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detr.config import preset
from detr.model import build_detr
from detr.model.mlp import MLP, predict
from detr.model.queries import sine_box_embedding


def _tiny(name: str):
    return preset(name, num_queries=6).with_transformer(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1,
                                                        dec_layers=2)


@pytest.mark.parametrize("name", ["shapes-small", "shapes-fast"])  # the box head; anchors + two-stage proposals
def test_heads_predict_in_fp32_under_bf16_autocast(name):
    torch.manual_seed(0)
    model = build_detr(_tiny(name)).eval()
    images = torch.rand(2, 3, 64, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.forward_features(images)
        out = model.heads(features)
    decoded = features.decoded[-1].float()  # [B, Q, C], the last layer's normalized output
    logits = F.linear(decoded, model.class_embed.weight, model.class_embed.bias)
    torch.testing.assert_close(out["pred_logits"], logits, rtol=1e-6, atol=1e-6)
    if features.boxes is None:
        torch.testing.assert_close(out["pred_boxes"], model.bbox_embed(decoded).sigmoid(), rtol=1e-6, atol=1e-6)
    else:  # refined from the layer's fp32 delta
        assert out["pred_boxes"].dtype == torch.float32
        assert out["enc_outputs"].pred_logits.dtype == torch.float32
    in_bf16 = F.linear(decoded.bfloat16(), model.class_embed.weight.bfloat16(), model.class_embed.bias.bfloat16())
    assert not torch.equal(in_bf16.float(), out["pred_logits"])  # what autocast alone would have given


def test_anchor_positions_are_fp32_under_bf16_autocast():
    """The positional queries of the anchor boxes: the fp32 MLP of their sine embedding, not autocast's bf16."""
    torch.manual_seed(0)
    queries = build_detr(_tiny("shapes-fast")).anchor_queries
    boxes = torch.rand(2, 6, 4) * 0.8 + 0.1  # [B, Q, 4]
    expected = queries.position(boxes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        position = queries.position(boxes)
        rounded = queries.position_head(sine_box_embedding(boxes, queries.hidden_dim // 2))
    assert position.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    torch.testing.assert_close(position, expected, rtol=0, atol=0)
    assert not torch.equal(rounded.float(), expected)  # what autocast alone would have given


def test_predict_is_the_plain_call_without_autocast():
    torch.manual_seed(0)
    head = MLP(16, 16, 4, 3)
    x = torch.randn(5, 16)
    assert torch.equal(predict(head, x), head(x))
    half = MLP(16, 16, 4, 3).bfloat16()  # a model cast to bf16 as a whole stays bf16
    assert predict(half, x.bfloat16()).dtype == torch.bfloat16
