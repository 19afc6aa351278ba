"""transformers' Deformable DETR directories (plain, box refinement, two-stage; transformers' ResNet and
timm's layout) load into our model and compute the same logits and boxes."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers  # a test dependency: pip install transformers
from safetensors.torch import load_file, save_file

from detr.checkpoint import CheckpointError, load_checkpoint
from detr.structures import as_image_batch
from test_hf import coco_images, hf_inputs, randomize

VARIANTS = {"plain": {}, "box-refine": {"with_box_refine": True},
            "two-stage": {"with_box_refine": True, "two_stage": True}}


def hf_deformable(**overrides) -> transformers.DeformableDetrForObjectDetection:
    kwargs = dict(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=transformers.ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
        d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=96, decoder_ffn_dim=96, num_queries=12, two_stage_num_proposals=15, num_labels=6,
    )
    model = transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(**{**kwargs, **overrides}))
    randomize(model)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return coco_images()


def _compare(hf_model, ours, images) -> tuple[float, float]:
    worst_logits = worst_boxes = 0.0
    for batch_images in ([images[0]], [images[1]], images):  # alone, and as a padded batch
        batch = as_image_batch(batch_images)
        with torch.no_grad():
            theirs = hf_model(**hf_inputs(batch))
            out = ours(batch)
        worst_logits = max(worst_logits, (theirs.logits - out["pred_logits"]).abs().max().item())
        worst_boxes = max(worst_boxes, (theirs.pred_boxes - out["pred_boxes"]).abs().max().item())
    return worst_logits, worst_boxes


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deformable_detr_directories_reproduce_transformers(variant, tmp_path, images):
    hf_model = hf_deformable(**VARIANTS[variant])
    hf_model.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path).eval()
    c = ours.config
    assert c.transformer.attention == "deformable" and c.num_feature_levels == 4 and c.loss.class_loss == "focal"
    assert c.queries.box_refine == (variant != "plain") and c.queries.two_stage == (variant == "two-stage")
    assert c.num_queries == (15 if variant == "two-stage" else 12)
    logits, boxes = _compare(hf_model, ours, images)
    assert logits < 1e-4 and boxes < 1e-4, (logits, boxes)


def test_timm_layout_of_the_released_models_reads_the_same_weights(tmp_path, images):
    # The Hub's Deformable DETR checkpoints use timm's ResNet, whose names are torchvision's: rewrite a
    # transformers-ResNet folder's backbone into that layout (the weights stay) and load it.
    hf_model = hf_deformable(with_box_refine=True)
    hf_model.save_pretrained(tmp_path / "own")
    ours = load_checkpoint(tmp_path / "own")
    theirs = load_file(tmp_path / "own" / "model.safetensors")
    timm = {k: v for k, v in theirs.items() if not k.startswith("model.backbone.")}
    for key, value in ours.state_dict().items():
        if key.startswith("backbone.body."):
            timm["model.backbone.conv_encoder.model." + key.removeprefix("backbone.body.")] = value
    assert any(re.search(r"conv_encoder\.model\.layer3\.5\.conv2\.weight", k) for k in timm)
    (tmp_path / "timm").mkdir()
    save_file(timm, tmp_path / "timm" / "model.safetensors")
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    config.pop("backbone_config")
    config.update(use_timm_backbone=True, backbone="resnet50")
    (tmp_path / "timm" / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(tmp_path / "timm").eval()
    assert loaded.config.backbone.name == "resnet50"
    logits, boxes = _compare(hf_model, loaded, images)
    assert logits < 1e-4 and boxes < 1e-4, (logits, boxes)


def test_a_backbone_with_other_stages_is_refused_by_name(tmp_path):
    hf_deformable(backbone_config=transformers.ResNetConfig(out_features=["stage4"])).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"config.json: the model projects 1 backbone stage\(s\) into 4"):
        load_checkpoint(tmp_path)
