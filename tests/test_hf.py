"""Hugging Face transformers DETR directories load into our model and compute the same outputs."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers  # a test dependency: pip install transformers
from safetensors.torch import load_file, save_file

from conftest import COCO_MINI
from detr.checkpoint import CheckpointError, convert_checkpoint, load_checkpoint, read_checkpoint
from detr.data.images import load_image
from detr.data.transforms import Normalize, resize, to_tensor
from detr.structures import ImageBatch

CLASS_NAMES = {0: "cat", 1: "dog", 2: "traffic light"}


def coco_images() -> list[torch.Tensor]:
    """Two real coco-mini val images, normalized like DETR's inputs: [3, 256, 384] and [3, 224, 298], so
    that batched together the second one is padded along both axes."""
    images = []
    for name, short_side in (("000000000139.jpg", 256), ("000000018575.jpg", 224)):
        image, _ = resize(load_image(COCO_MINI / "val2017" / name), None, short_side, max_size=400)
        images.append(Normalize()(to_tensor(image), None)[0])
    return images


def hf_inputs(batch: ImageBatch) -> dict[str, torch.Tensor]:
    return {"pixel_values": batch.pixels, "pixel_mask": (~batch.padding_mask).long()}  # HF: 1 = real pixel


def randomize(model: torch.nn.Module) -> None:
    """Frozen-BN statistics that are not the identity, and no zero biases or unit norms left."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.2)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)


def hf_config(**overrides):
    backbone = overrides.pop("backbone_config", None) or transformers.ResNetConfig(out_features=["stage4"])
    kwargs = dict(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=128,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=7, id2label=CLASS_NAMES,
    )
    return transformers.DetrConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def hf_detector(tmp_path_factory):
    """A small random DetrForObjectDetection (ResNet-50, sine positions), saved with save_pretrained."""
    model = transformers.DetrForObjectDetection(hf_config()).eval()
    randomize(model)
    path = tmp_path_factory.mktemp("hf") / "detr-r50"
    model.save_pretrained(path)
    return model, path


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_detection_matches_transformers_on_coco_images(hf_detector):
    hf, path = hf_detector
    ours = load_checkpoint(path)
    c = ours.config
    assert (c.num_classes, c.num_queries, c.position_embedding, c.masks) == (3, 7, "sine", False)
    assert (c.backbone.name, c.backbone.dilation, c.backbone.norm) == ("resnet50", False, "frozen_bn")
    t = c.transformer
    assert (t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward) == (128, 8, 2, 2, 64)
    assert not t.pre_norm  # transformers' DETR is post-norm

    images = coco_images()
    assert images[0].shape == (3, 256, 384) and images[1].shape == (3, 224, 298)
    for batch in (ImageBatch.from_images(images[:1]), ImageBatch.from_images(images)):
        with torch.no_grad():
            expected = hf(**hf_inputs(batch))
            got = ours(batch)
        d_logits = max_diff(got["pred_logits"], expected.logits)
        d_boxes = max_diff(got["pred_boxes"], expected.pred_boxes)
        print(f"batch of {len(batch)}: max |logits diff| {d_logits:.2e}, max |boxes diff| {d_boxes:.2e}")
        assert d_logits < 1e-4 and d_boxes < 1e-4
        assert expected.logits.std() > 0.1  # a model that says something, not a constant


def test_class_names_and_conversion(hf_detector, tmp_path):
    hf, path = hf_detector
    ckpt = read_checkpoint(path)
    assert ckpt.source == "huggingface" and ckpt.kind == "detr"
    assert ckpt.metadata["class_names"] == {"0": "cat", "1": "dog", "2": "traffic light"}
    # the q/k/v projections are packed in nn.MultiheadAttention's order
    sd = ckpt.state_dict
    packed = sd["transformer.decoder.layers.1.multihead_attn.in_proj_weight"]
    hf_sd = hf.state_dict()
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(packed[128 * i : 128 * (i + 1)], hf_sd[f"model.decoder.layers.1.encoder_attn.{name}.weight"])
    # an HF directory converts to our format losslessly
    ours = convert_checkpoint(path, tmp_path / "ours.safetensors")
    back = read_checkpoint(ours)
    assert back.config == ckpt.config and back.state_dict.keys() == sd.keys()
    assert all(torch.equal(back.state_dict[k], sd[k]) for k in sd)


def test_segmentation_and_every_file_layout(tmp_path):
    """DetrForSegmentation (ResNet-18, learned positions): masks too; the save_pretrained file layout, the v5
    in-memory names, pytorch_model.bin and sharded safetensors all give the same weights."""
    backbone = transformers.ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    hf = transformers.DetrForSegmentation(hf_config(backbone_config=backbone, position_embedding_type="learned")).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "file")
    ours = load_checkpoint(tmp_path / "file")
    assert ours.config.masks and ours.config.backbone.name == "resnet18"
    assert ours.config.position_embedding == "learned"

    batch = ImageBatch.from_images([img[:, :160, :224] for img in coco_images()])
    batch.padding_mask[1, 100:] = True  # a padded second image
    batch.pixels[1, :, 100:] = 0
    with torch.no_grad():
        expected = hf(**hf_inputs(batch))
        got = ours(batch)
    for key, theirs in (("pred_logits", expected.logits), ("pred_boxes", expected.pred_boxes),
                        ("pred_masks", expected.pred_masks)):
        print(f"segmentation {key}: max |diff| {max_diff(got[key], theirs):.2e}")
        assert max_diff(got[key], theirs) < 1e-4, key

    reference = read_checkpoint(tmp_path / "file").state_dict
    layouts = {"memory": tmp_path / "memory", "bin": tmp_path / "bin", "sharded": tmp_path / "sharded"}
    for d in layouts.values():
        d.mkdir()
        shutil.copy(tmp_path / "file" / "config.json", d)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, layouts["memory"] / "model.safetensors")
    torch.save(load_file(tmp_path / "file" / "model.safetensors"), layouts["bin"] / "pytorch_model.bin")
    hf.save_pretrained(layouts["sharded"], max_shard_size="20MB")
    assert (layouts["sharded"] / "model.safetensors.index.json").exists()
    assert any(k.startswith("mask_head.conv1.conv") for k in hf.state_dict())  # v5 names differ from the file's
    for name, d in layouts.items():
        sd = read_checkpoint(d).state_dict
        assert sd.keys() == reference.keys(), name
        assert all(torch.equal(sd[k], reference[k]) for k in sd), name


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            cfg[outer][inner] = value
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "rt_detr"}, "model_type 'rt_detr' is not supported"),
        ({"backbone_config": None, "use_timm_backbone": True}, "timm"),
        ({"backbone_config.model_type": "timm_backbone"}, "timm"),
        ({"backbone_config.downsample_in_bottleneck": True}, "backbone_config.downsample_in_bottleneck"),
        ({"decoder_attention_heads": 4}, r"encoder_attention_heads \(8\) != decoder_attention_heads \(4\)"),
        ({"activation_function": "gelu"}, "activation_function"),
    ],
)
def test_unsupported_configs_name_the_field(hf_detector, tmp_path, changes, message):
    _, path = hf_detector
    bad = _edited(path, tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert "config.json" in str(info.value)


def test_timm_weights_and_bare_state_dicts_are_refused(hf_detector, tmp_path):
    _, path = hf_detector
    sd = load_file(path / "model.safetensors")
    timm = {k.replace("embedder.embedder.convolution", "conv1"): v for k, v in sd.items()}
    bad = _edited(path, tmp_path / "timm")
    save_file(timm, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="timm layout"):
        read_checkpoint(bad)
    # the weights file alone: say to pass the directory
    with pytest.raises(CheckpointError, match="pass the directory"):
        read_checkpoint(path / "model.safetensors")
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors or pytorch_model.bin"):
        read_checkpoint(bad)


def test_flags_transformers_does_not_honor_are_reported(hf_detector, tmp_path, caplog):
    _, path = hf_detector
    d = _edited(path, tmp_path / "dc5", dilation=True, auxiliary_loss=True)
    with caplog.at_level(logging.WARNING, logger="detr.checkpoint"):
        ckpt = read_checkpoint(d)
    assert ckpt.config.backbone.dilation
    assert "ignores this flag" in caplog.text and "auxiliary_loss=True" in caplog.text
    assert not load_checkpoint(d, dilation=False).config.backbone.dilation
