"""Hub-style factories: the paper's architectures, local weights in any format, never a download."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from detr.checkpoint import CheckpointError, load_checkpoint
from detr.hub import detr_resnet50, detr_resnet50_dc5, detr_resnet50_panoptic, detr_resnet101, detr_resnet101_dc5
from detr.model.segmentation import DETRsegm


def trainable_millions(model: torch.nn.Module) -> float:
    # the count the reference prints ("number of params"): frozen stem/layer1 and frozen-BN buffers excluded
    return round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 1)


@pytest.mark.parametrize(
    ("factory", "backbone", "dilation", "millions"),
    [
        (detr_resnet50, "resnet50", False, 41.3),  # the paper's Table 1: DETR 41M, DETR-R101 60M
        (detr_resnet50_dc5, "resnet50", True, 41.3),
        (detr_resnet101, "resnet101", False, 60.2),
        (detr_resnet101_dc5, "resnet101", True, 60.2),
    ],
)
def test_detection_factories_build_the_papers_models(factory, backbone, dilation, millions):
    model = factory()
    c = model.config
    assert (c.backbone.name, c.backbone.dilation, c.masks, c.num_classes, c.num_queries) == (
        backbone, dilation, False, 91, 100
    )
    t = c.transformer
    assert (t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward, t.pre_norm) == (
        256, 8, 6, 6, 2048, False
    )
    assert trainable_millions(model) == millions
    assert not model.training


def test_panoptic_factory_and_overrides():
    model = detr_resnet50_panoptic()
    assert isinstance(model, DETRsegm) and model.config.masks and model.config.num_classes == 250
    assert model.detr.class_embed.out_features == 251
    small = detr_resnet50(num_classes=20, num_queries=50)
    assert small.class_embed.out_features == 21 and small.query_embed.weight.shape == (50, 256)


def _reference_file(reference, name, tmp_path):
    entry = reference[name]
    path = tmp_path / f"{name}.pth"
    torch.save({"model": entry["state_dict"], "args": argparse.Namespace(**entry["config"])}, path)
    return path


@pytest.mark.parametrize(
    ("name", "factory"),
    [("detection", detr_resnet50), ("detection_prenorm_learned_dc5", detr_resnet50_dc5),
     ("panoptic", detr_resnet50_panoptic)],
)
def test_factory_with_reference_weights_equals_load_checkpoint(reference, tmp_path, name, factory):
    path = _reference_file(reference, name, tmp_path)
    num_classes = reference[name]["num_classes"]
    got = factory(weights=path, num_classes=num_classes)
    expected = load_checkpoint(path)
    assert got.config == expected.config and not got.training
    a, b = got.state_dict(), expected.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if name == "detection":  # same weights and config; one forward pass against the reference's numbers
        with torch.no_grad():
            out = got(reference["images"])
        fixture = reference[name]["outputs"]
        assert (out["pred_logits"] - fixture["pred_logits"]).abs().max() < 1e-4
        assert (out["pred_boxes"] - fixture["pred_boxes"]).abs().max() < 1e-4


def test_other_class_count_reinitializes_only_the_class_head(reference, tmp_path, caplog):
    path = _reference_file(reference, "detection", tmp_path)
    sd = reference["detection"]["state_dict"]
    with caplog.at_level(logging.WARNING, logger="detr.hub"):
        model = detr_resnet50(weights=path, num_classes=5)
    assert "re-initialized class_embed.bias, class_embed.weight" in caplog.text and "91 classes" in caplog.text
    assert model.class_embed.weight.shape == (6, 128)
    assert torch.equal(model.bbox_embed.layers[0].weight, sd["bbox_embed.layers.0.weight"].float())
    assert torch.equal(model.query_embed.weight, sd["query_embed.weight"].float())


def test_file_of_another_architecture_is_refused(reference, tmp_path):
    with pytest.raises(CheckpointError, match="backbone is 'resnet50' but this factory builds 'resnet101'"):
        detr_resnet101(weights=_reference_file(reference, "detection", tmp_path))
    with pytest.raises(CheckpointError, match=r"dilation \(DC5\) is True"):
        detr_resnet50(weights=_reference_file(reference, "detection_prenorm_learned_dc5", tmp_path))
    with pytest.raises(CheckpointError, match="masks is True"):
        detr_resnet50(weights=_reference_file(reference, "panoptic", tmp_path), num_classes=250)


def test_hub_names_and_missing_files_are_clear(tmp_path):
    # URLs and released names are fetched (tests/test_weights.py, from a local server); hub repositories are not
    with pytest.raises(FileNotFoundError, match="hub repositories are not fetched"):
        detr_resnet50(weights="facebook/detr-resnet-50")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        detr_resnet50(weights=tmp_path / "missing.pth")
