from __future__ import annotations

import argparse
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch

import detr
from detr.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    OtherModelError,
    UnsafeCheckpointError,
    convert_checkpoint,
    load_checkpoint,
    ours_to_reference,
    read_checkpoint,
    reference_to_ours,
    safe_torch_load,
    save_checkpoint,
    state_dict_for,
)
from detr.config import preset
from detr.model.minimal import DemoConfig, DETRdemo


def tiny_config(**overrides):
    return preset("shapes-small", **overrides)


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_reference_key_mapping_round_trip(reference):
    for name in ("detection", "detection_prenorm_learned_dc5", "panoptic"):
        sd = reference[name]["state_dict"]
        ours = reference_to_ours(sd)
        assert all(not k.removeprefix("detr.").startswith("backbone.0.") for k in ours)
        assert_state_dicts_equal(ours_to_reference(ours), sd)


def test_our_format_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = detr.build_detr(tiny_config()).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"class_names": ["a", "b", "c", "d"]})
    loaded = load_checkpoint(path)
    assert not loaded.training and loaded.config == model.config
    assert_state_dicts_equal(loaded.state_dict(), model.state_dict())
    assert read_checkpoint(path).metadata["class_names"] == ["a", "b", "c", "d"]
    x = [torch.randn(3, 64, 80), torch.randn(3, 72, 64)]
    with torch.no_grad():
        assert torch.equal(model(x)["pred_boxes"], loaded(x)["pred_boxes"])


def test_convert_both_directions_is_lossless(reference, tmp_path):
    entry = reference["detection_prenorm_learned_dc5"]
    ref_path = tmp_path / "ref.pth"
    # float16 weights on purpose: conversion must keep dtypes, not only values
    torch.save({"model": entry["state_dict"], "args": argparse.Namespace(**entry["config"])}, ref_path)
    ours = convert_checkpoint(ref_path, tmp_path / "ours.safetensors")
    back = convert_checkpoint(ours, tmp_path / "back.pth")
    blob = safe_torch_load(back)
    assert_state_dicts_equal(blob["model"], entry["state_dict"])
    assert blob["args"].dilation is True and blob["args"].pre_norm is True
    assert read_checkpoint(ours).config == read_checkpoint(ref_path).config


def test_reference_file_with_args_and_bare_state_dict(reference, tmp_path):
    entry = reference["detection"]
    bare = tmp_path / "detr-r50-bare.pth"
    torch.save(entry["state_dict"], bare)
    model = load_checkpoint(bare)  # architecture from the shapes
    assert model.config.num_classes == 91 and model.config.transformer.enc_layers == 2
    assert model.config.transformer.hidden_dim == 128 and model.config.num_queries == 20
    dc5 = tmp_path / "detr-r50-dc5-bare.pth"
    torch.save(reference["detection_prenorm_learned_dc5"]["state_dict"], dc5)
    m2 = load_checkpoint(dc5)
    assert m2.config.backbone.dilation and m2.config.transformer.pre_norm
    assert m2.config.position_embedding == "learned"
    # the caller's architecture wins for bare files
    m3 = load_checkpoint(bare, config=model.config.with_transformer(nheads=4))
    assert m3.config.transformer.nheads == 4


def test_class_count_mismatch_names_both_shapes_unless_reinit(reference, tmp_path):
    entry = reference["detection"]
    path = tmp_path / "ref.pth"
    torch.save({"model": entry["state_dict"], "args": argparse.Namespace(**entry["config"])}, path)
    with pytest.raises(CheckpointError, match=r"\(92, 128\).*\(6, 128\)"):
        load_checkpoint(path, num_classes=5)
    model = load_checkpoint(path, num_classes=5, reinit_heads=True)
    assert model.class_embed.weight.shape == (6, 128)
    # everything but the class head came from the file
    assert torch.equal(model.bbox_embed.layers[2].weight, entry["state_dict"]["bbox_embed.layers.2.weight"].float())


def test_demo_state_dict_is_recognized(tmp_path):
    torch.manual_seed(0)
    cfg = DemoConfig(num_classes=5, hidden_dim=64, nheads=4, num_encoder_layers=1, num_decoder_layers=2,
                     num_queries=7)
    model = DETRdemo(cfg).eval()
    path = tmp_path / "detr_demo.pth"
    torch.save(model.state_dict(), path)  # the notebook's bare state dict, BatchNorm counters included
    loaded = load_checkpoint(path, nheads=4)
    assert isinstance(loaded, DETRdemo) and loaded.config == cfg
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out = loaded(x)
        assert torch.equal(out["pred_logits"], model(x)["pred_logits"])
    assert out["pred_logits"].shape == (1, 7, 6) and out["pred_boxes"].shape == (1, 7, 4)
    conv = convert_checkpoint(path, tmp_path / "demo.safetensors")
    assert_state_dicts_equal(load_checkpoint(conv).state_dict(), model.state_dict())


def test_demo_model_has_the_notebooks_parameter_names():
    names = set(DETRdemo().state_dict())
    for key in ("backbone.conv1.weight", "backbone.bn1.num_batches_tracked", "backbone.layer4.2.conv3.weight",
                "conv.weight", "transformer.encoder.layers.5.self_attn.in_proj_weight",
                "transformer.decoder.norm.weight", "linear_class.weight", "linear_bbox.bias", "query_pos",
                "row_embed", "col_embed"):
        assert key in names, key
    assert not any(k.startswith("backbone.fc") for k in names)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/detr-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "payload": _Exploit()}, f)
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Exploit()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refusing to load .*evil"):
            load_checkpoint(p)
    assert not os.path.exists("/tmp/detr-pwned")


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint(junk)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a DETR model"):
        load_checkpoint(other)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (bytes(range(189, 256)) + os.urandom(4000), "not a format PyTorch writes"),  # was "Unsupported operand 189"
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100), "a JPEG image"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n", "a Git LFS pointer"),
        (b"", "is empty"),
    ],
    ids=["random", "html", "jpeg", "lfs", "empty"],
)
def test_file_that_is_not_a_checkpoint(tmp_path, content, what):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(NotACheckpointError, match=what) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and "pickled" not in str(err.value)


def test_truncated_or_corrupt_checkpoint(tmp_path):
    blob = {"model": reference_to_ours({"backbone.0.body.conv1.weight": torch.ones(64, 3, 7, 7)})}
    whole, legacy = tmp_path / "whole.pth", tmp_path / "legacy.pth"
    torch.save(blob, whole)
    torch.save(blob, legacy, _use_new_zipfile_serialization=False)
    data = whole.read_bytes()
    half = tmp_path / f"detr-half-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # a download cut in half
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"truncated or corrupt.*without its end") as err:
        read_checkpoint(half)
    assert "not the" in str(err.value) and "download it again" in str(err.value)  # the name's hash is checked
    cut_legacy = tmp_path / "cut_legacy.pth"
    cut_legacy.write_bytes(legacy.read_bytes()[:-500])
    with pytest.raises(CorruptCheckpointError, match="cut_legacy.pth is truncated or corrupt"):
        read_checkpoint(cut_legacy)


class SomeTrainerState:
    pass


def test_unsafe_global_is_named(tmp_path):
    path = tmp_path / "trainer.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "trainer": SomeTrainerState()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"needs the Python object test_checkpoint.SomeTrainerState") as err:
        read_checkpoint(path)
    assert err.value.global_name == "test_checkpoint.SomeTrainerState"
    numpy_pickle = tmp_path / "arrays.pth"
    torch.save({"w": np.zeros(3)}, numpy_pickle)
    with pytest.raises(UnsafeCheckpointError, match="NumPy arrays, not a DETR"):
        read_checkpoint(numpy_pickle)


def test_checkpoint_of_another_model_type(tmp_path):
    from detr.model.backbone import ResNet

    classifier = {**ResNet("resnet18").state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(classifier, tmp_path / "resnet18.pth")
    with pytest.raises(OtherModelError, match=r"resnet18.pth: this is an ImageNet ResNet.*--backbone_weights"):
        read_checkpoint(tmp_path / "resnet18.pth")
    deformable = {"model": {"backbone.0.body.conv1.weight": torch.zeros(1),
                            "transformer.level_embed": torch.zeros(4, 256),
                            "transformer.encoder.layers.0.self_attn.sampling_offsets.weight": torch.zeros(1)}}
    torch.save(deformable, tmp_path / "deformable.pth")
    with pytest.raises(OtherModelError, match="Deformable-DETR-family"):
        load_checkpoint(tmp_path / "deformable.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(OtherModelError, match="holds a Tensor"):
        read_checkpoint(tmp_path / "tensor.pth")


def test_safetensors_content_under_a_pth_name_is_read(tmp_path):
    model = detr.build_detr(tiny_config()).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    renamed = tmp_path / "m.pth"
    renamed.write_bytes(path.read_bytes())
    sd = safe_torch_load(renamed)
    assert_state_dicts_equal(sd, {k: v.contiguous() for k, v in model.state_dict().items()})


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    model = detr.build_detr(tiny_config()).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left behind


def test_saved_files_get_the_mode_of_a_plain_open(tmp_path):
    # the temporary file renamed into place must not keep an owner-only mode (tempfile.mkstemp's 0600)
    umask = os.umask(0o022)
    try:
        path = save_checkpoint(detr.build_detr(tiny_config()).eval(), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("text", ["{bad", "[1]"])
def test_checkpoint_directory_with_a_broken_config_json(tmp_path, text):
    save_checkpoint(detr.build_detr(tiny_config()).eval(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json"):
        read_checkpoint(tmp_path)


def test_state_dict_for_fits_a_detector_to_a_panoptic_model_and_back():
    detector, panoptic = detr.build_detr(tiny_config()), detr.build_detr(tiny_config(masks=True))
    seeded = state_dict_for(panoptic, detector.state_dict())
    assert set(seeded) == {k for k in panoptic.state_dict() if k.startswith("detr.")}  # the mask head stays fresh
    assert state_dict_for(panoptic, panoptic.state_dict()).keys() == panoptic.state_dict().keys()
    assert state_dict_for(detector, panoptic.state_dict()).keys() == detector.state_dict().keys()
    assert state_dict_for(detector, detector.state_dict()).keys() == detector.state_dict().keys()
