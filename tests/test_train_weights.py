"""Training starts where the reference starts: ImageNet backbone weights (a name, or a torchvision/timm
file), refused without them under frozen BatchNorm; the best checkpoint by validation AP; TensorBoard."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from conftest import COCO_MINI
from detr.checkpoint import (
    TORCHVISION_HOST,
    CheckpointError,
    DownloadError,
    WeightsEntry,
    load_checkpoint,
    read_backbone_weights,
    read_checkpoint,
    save_checkpoint,
)
from detr.checkpoint import downloads as weights
from detr.cli import main
from detr.config import preset
from detr.data import collate_detection, make_coco_transforms
from detr.data.coco import CocoDetection
from detr.data.shapes import generate_shapes
from detr.engine import train as train_module
from detr.engine.evaluate import evaluate
from detr.engine.initial_weights import load_backbone_weights
from detr.engine.options import TrainOptions
from detr.engine.train import train
from detr.model import build_detr
from detr.model.backbone import ResNet

TINY = ["--hidden_dim", "32", "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1", "--num_queries",
        "5", "--num_workers", "0", "--no_progress"]


def frozen_bn_config(**kw):
    """The reference's backbone setup (frozen BatchNorm, stem + layer1 frozen) on a ResNet-18, tiny transformer."""
    config = preset("r50", num_classes=4, num_queries=5, **kw).with_backbone(name="resnet18")
    return config.with_transformer(hidden_dim=32, dim_feedforward=64, enc_layers=1, dec_layers=1, nheads=8)


def imagenet_state_dict(depth: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout ImageNet file's content: trunk, BatchNorm statistics and counters, fc head."""
    torch.manual_seed(seed)
    trunk = ResNet(depth)
    sd = {}
    for key, value in trunk.state_dict().items():
        if key.endswith(("running_var", "weight")) and value.dim() == 1:
            value = torch.rand_like(value) + 0.5  # non-trivial norms, positive variances
        elif key.endswith(("running_mean", "bias")):
            value = torch.randn_like(value) * 0.1
        sd[key] = value.clone()
        if key.endswith("running_var"):
            sd[key.replace("running_var", "num_batches_tracked")] = torch.tensor(100)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, trunk.stage_channels[-1]), torch.zeros(1000)
    return sd


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=64, seed=3)


def options(shapes: Path, out: Path, **kw) -> TrainOptions:
    base = dict(coco_path=str(shapes), output_dir=str(out), epochs=1, batch_size=4, num_workers=0, progress=False,
                train_scales=[64], val_scale=64, max_size=96, eval_every=0, seed=0)
    return TrainOptions.from_flat(**{**base, **kw})


def backbone_equals(model_state: dict[str, torch.Tensor], imagenet: dict[str, torch.Tensor], prefix: str) -> bool:
    trunk = {k: v for k, v in imagenet.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    return all(torch.equal(model_state[prefix + k], v) for k, v in trunk.items())


# --- refusal and its ways out -------------------------------------------------------------------

def test_frozen_bn_without_backbone_weights_is_refused(shapes, tmp_path, capsys):
    with pytest.raises(ValueError, match="refusing to train") as err:
        train(frozen_bn_config(), options(shapes, tmp_path / "a", backbone_weights="none"))
    message = str(err.value)
    assert "--backbone_weights imagenet" in message and "--backbone_norm group_norm --frozen_stages 0" in message
    assert "shapes-small" in message
    assert not (tmp_path / "a" / "checkpoint.pth").exists()
    code = main(["train", "--coco_path", str(shapes), "--backbone", "resnet18", *TINY, "--backbone_weights", "none",
                 "--epochs", "1", "--output_dir", str(tmp_path / "b")])
    assert code == 1 and "--backbone_norm group_norm --frozen_stages 0" in capsys.readouterr().err
    # the second way out: a trained normalization starts from random weights without complaint
    record = train(frozen_bn_config().with_backbone(norm="group_norm", frozen_stages=0),
                   options(shapes, tmp_path / "c", backbone_weights="none"))
    assert record["epoch"] == 0


def test_default_fetches_the_imagenet_weights_by_name(shapes, tmp_path, server, cache, monkeypatch, caplog):
    sd = imagenet_state_dict("resnet18")
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    data = buffer.getvalue()
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # stands in for resnet18-f37072fd.pth
    monkeypatch.setitem(weights.NAMES, "resnet18",
                        WeightsEntry("resnet18", f"{TORCHVISION_HOST}/models/{name}", "backbone", "resnet18"))
    server.files[f"/models/{name}"] = data
    monkeypatch.setenv("DETR_WEIGHTS_MIRROR", server.base)
    with caplog.at_level(logging.INFO, logger="detr.engine.train"):
        train(frozen_bn_config(), options(shapes, tmp_path / "run"))  # no backbone_weights: imagenet, as the reference
    assert server.requests == [f"/models/{name}"] and (cache / name).is_file()
    assert f"weights: backbone <- {cache / name} (torchvision/timm ResNet layout)" in caplog.text
    assert "weights: transformer and heads <- random initialization" in caplog.text
    trained = read_checkpoint(tmp_path / "run" / "checkpoint.pth").state_dict
    stem = {k: v for k, v in sd.items() if k.startswith(("conv1", "bn1", "layer1."))}
    assert backbone_equals(trained, stem, "backbone.body.")  # frozen stages keep the ImageNet weights


def test_default_download_failure_names_both_ways_out(shapes, tmp_path, server, cache, monkeypatch):
    monkeypatch.setenv("DETR_WEIGHTS_MIRROR", server.base)  # serves nothing: HTTP 404
    with pytest.raises(DownloadError) as err:
        train(frozen_bn_config(), options(shapes, tmp_path / "run"))
    message = str(err.value)
    assert f"{server.base}/models/resnet18-f37072fd.pth" in message and "HTTP 404" in message
    assert "fetch https://download.pytorch.org/models/resnet18-f37072fd.pth on a connected machine" in message
    assert "--backbone_norm group_norm --frozen_stages 0" in message and "place the file by hand" in message


# --- ImageNet files in the layouts people have --------------------------------------------------

def test_backbone_files_in_torchvision_timm_and_wrapped_layouts(tmp_path):
    sd = imagenet_state_dict("resnet18")
    torch.save(sd, tmp_path / "torchvision.pth")
    save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")},
              tmp_path / "model.safetensors")  # timm's hub file: the same names, with its fc head
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "timm-train.pth.tar")
    detr_model = build_detr(frozen_bn_config())
    detr_model.backbone.body.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    save_checkpoint(detr_model, tmp_path / "detr.safetensors")
    for source in ("torchvision.pth", "model.safetensors", "timm-train.pth.tar", "detr.safetensors", "."):
        model = build_detr(frozen_bn_config())
        where = load_backbone_weights(model, str(tmp_path / source), frozen_bn_config())
        assert backbone_equals(model.state_dict(), sd, "backbone.body."), source
        assert ("backbone of a DETR" in where) == (source == "detr.safetensors")


def test_backbone_files_that_do_not_fit_are_named(tmp_path):
    torch.save(imagenet_state_dict("resnet34"), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match=r"r34.pth holds resnet34 weights, but the model's backbone is resnet18"):
        load_backbone_weights(build_detr(frozen_bn_config()), str(tmp_path / "r34.pth"), frozen_bn_config())
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not ResNet weights in torchvision/timm layout"):
        read_backbone_weights(tmp_path / "other.pth")
    group_norm = frozen_bn_config().with_backbone(norm="group_norm", frozen_stages=0)
    with pytest.raises(ValueError, match="BatchNorm statistics, which a group_norm backbone has no place for"):
        load_backbone_weights(build_detr(group_norm), str(tmp_path / "r34.pth"), group_norm)


def test_pretrained_detr_takes_precedence_and_the_log_says_so(shapes, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_module, "_evaluate", lambda *a, **k: {"bbox_AP": 0.0})
    torch.save(imagenet_state_dict("resnet18", seed=1), tmp_path / "imagenet.pth")
    torch.manual_seed(5)
    source = build_detr(frozen_bn_config().replace(num_classes=7))
    save_checkpoint(source, tmp_path / "detr.safetensors")
    with caplog.at_level(logging.INFO, logger="detr.engine.train"):
        train(frozen_bn_config(), options(shapes, tmp_path / "ft", lr=0.0, lr_backbone=0.0,
                                          pretrained=str(tmp_path / "detr.safetensors"),
                                          backbone_weights=str(tmp_path / "imagenet.pth")))
    assert "--backbone_weights" in caplog.text and "is not used: --pretrained" in caplog.text
    assert f"weights: everything else <- {tmp_path / 'detr.safetensors'} (--pretrained)" in caplog.text
    assert "weights: class_embed.bias, class_embed.weight <- random initialization" in caplog.text
    tuned = read_checkpoint(tmp_path / "ft" / "checkpoint.pth").state_dict
    assert torch.equal(tuned["backbone.body.conv1.weight"], source.state_dict()["backbone.body.conv1.weight"])


# --- the best checkpoint and TensorBoard --------------------------------------------------------

def _run_with_aps(shapes, out, monkeypatch, aps, **kw):
    values = iter(aps)
    monkeypatch.setattr(train_module, "_evaluate", lambda *a, **k: {"bbox_AP": next(values)})
    config = frozen_bn_config().with_backbone(norm="group_norm", frozen_stages=0)
    return train(config, options(shapes, out, eval_every=1, **kw))


def test_best_checkpoint_by_validation_ap_survives_resume(shapes, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="detr.engine.train"):
        _run_with_aps(shapes, out, monkeypatch, [0.10, 0.30, 0.20], epochs=3)
    assert "epoch 1: best bbox_AP so far, 0.3000" in caplog.text
    best = read_checkpoint(out / "checkpoint_best.pth")
    assert best.extra["best"] == {"metric": "bbox_AP", "value": 0.30, "epoch": 1} and "optimizer" not in best.extra
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [(r["best_epoch"], r["best_bbox_AP"]) for r in epochs] == [(0, 0.10), (1, 0.30), (1, 0.30)]
    # resumed: a lower AP keeps the old best, a higher one replaces it
    before = (out / "checkpoint_best.pth").read_bytes()
    _run_with_aps(shapes, out, monkeypatch, [0.25], epochs=4, resume=str(out / "checkpoint.pth"))
    assert (out / "checkpoint_best.pth").read_bytes() == before
    _run_with_aps(shapes, out, monkeypatch, [0.35], epochs=5, resume=str(out / "checkpoint.pth"))
    assert read_checkpoint(out / "checkpoint_best.pth").extra["best"] == {"metric": "bbox_AP", "value": 0.35,
                                                                         "epoch": 4}


def test_best_written_after_the_last_checkpoint_is_remembered(shapes, tmp_path, monkeypatch):
    # epoch 1's evaluation wrote checkpoint_best.pth after checkpoint.pth (which then knew only epoch 0's best)
    out = tmp_path / "run"
    _run_with_aps(shapes, out, monkeypatch, [0.10, 0.50], epochs=2)
    assert read_checkpoint(out / "checkpoint.pth").extra["best"]["epoch"] == 0
    before = (out / "checkpoint_best.pth").read_bytes()
    _run_with_aps(shapes, out, monkeypatch, [0.40], epochs=3, resume=str(out / "checkpoint.pth"))
    assert (out / "checkpoint_best.pth").read_bytes() == before


def test_tensorboard_holds_the_scalars_of_the_json_log(shapes, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _run_with_aps(shapes, out, monkeypatch, [0.125, 0.25], epochs=2, tensorboard=True)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [r for r in records if r["type"] == "step"]
    logged = events.Scalars("train/loss_giou")
    assert [e.step for e in logged] == [r["step"] for r in steps]
    assert [e.value for e in logged] == pytest.approx([r["loss_giou"] for r in steps], rel=1e-6)
    assert [e.value for e in events.Scalars("epoch/bbox_AP")] == [0.125, 0.25]
    epoch_keys = {k for r in records if r["type"] == "epoch" for k, v in r.items()
                  if isinstance(v, float | int) and k not in ("epoch",)}
    assert {f"epoch/{k}" for k in epoch_keys} <= set(events.Tags()["scalars"])


# --- a real run: coco-mini from a local ImageNet-layout file --------------------------------------

def test_coco_mini_training_from_a_local_imagenet_file(tmp_path, capsys):
    sd = imagenet_state_dict("resnet18", seed=2)
    torch.save(sd, tmp_path / "resnet18-imagenet.pth")
    out = tmp_path / "run"
    code = main(["train", "--coco_path", str(COCO_MINI), "--backbone", "resnet18", "--backbone_weights",
                 str(tmp_path / "resnet18-imagenet.pth"), *TINY, "--train_scales", "96", "--val_scale", "96",
                 "--max_size", "128", "--batch_size", "8", "--epochs", "1", "--output_dir", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["epoch"] == 0 and record["best_epoch"] == 0 and record["best_bbox_AP"] == record["bbox_AP"]
    # The record's 12 box metrics are the saved model's on coco-mini val at the run's sizes, batches of 8.
    dataset = CocoDetection(COCO_MINI / "val2017", COCO_MINI / "annotations" / "instances_val2017.json",
                            transforms=make_coco_transforms("val", scales=[96], max_size=128))
    expected = evaluate(load_checkpoint(out / "model.safetensors"),
                        DataLoader(dataset, batch_size=8, collate_fn=collate_detection), coco_gt=dataset.coco,
                        progress=False)["bbox"]
    assert len(expected) == 12 and {k: record[f"bbox_{k}"] for k in expected} == expected
    assert record["train_loss"] == record["train_loss"]  # finite
    trained = read_checkpoint(out / "model.safetensors").state_dict
    frozen = {k: v for k, v in sd.items() if k.startswith(("conv1", "bn1", "layer1."))}
    assert backbone_equals(trained, frozen, "backbone.body.")  # the frozen stages are the file's
    assert not torch.equal(trained["backbone.body.layer4.0.conv1.weight"], sd["layer4.0.conv1.weight"])  # trained
    assert (out / "checkpoint_best.pth").is_file()
