"""A checkpoint knows how it sees: the input transform it was trained with travels with it, and eval,
predict and the Python API use it unless told otherwise.

The central fixture trains a small model at 64 pixels with `detr train` (16 shapes images, one object each,
validated on the images it trains on so that it finds them within seconds); shown an 800-pixel image, it finds
nothing right, which is what every consumer did before checkpoints carried their input size.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from detr import demo as demo_module
from detr.boxes import box_iou, xywh_to_xyxy
from detr.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from detr.checkpoint.ours import save_state_dict
from detr.cli import main
from detr.config import preset
from detr.data.coco import load_coco
from detr.data.shapes import generate_shapes
from detr.demo import DEMO_INPUT, demo_precision, run_demo
from detr.inference.predictor import Detector
from detr.model import build_detr
from detr.preprocessing import IMAGENET_MEAN, InputConfig, resolve_input

TRAINED = InputConfig(size=64, max_size=128, train_scales=(64,))
RUN_FLAGS = ["--num_workers", "0", "--batch_size", "8", "--no_progress"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A `detr train` run at 64 px whose model finds the objects of its validation images: (run dir, data root)."""
    root = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=16, num_val=0, image_size=64, seed=3,
                           min_objects=1, max_objects=1, min_object_size=0.3, max_object_size=0.5)
    out = tmp_path_factory.mktemp("run")
    images, annotations = str(root / "train2017"), str(root / "annotations" / "instances_train2017.json")
    code = main(["train", "--preset", "shapes-fast", "--train_images", images, "--train_json", annotations,
                 "--val_images", images, "--val_json", annotations, "--train_scales", "64", "--max_size", "128",
                 "--no_augment", "--epochs", "30", "--eval_every", "0", "--lr", "4e-4", "--lr_backbone", "4e-4",
                 "--lr_drop", "1000", "--seed", "0", "--output_dir", str(out), *RUN_FLAGS])
    assert code == 0
    return out, images, annotations


def _last_epoch(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("type") == "epoch"][-1]


def test_every_checkpoint_of_a_run_stores_its_input(small_run):
    out, _, _ = small_run
    for name in ("model.safetensors", "checkpoint.pth", "checkpoint_best.pth"):
        assert read_checkpoint(out / name).input == TRAINED, name


def test_eval_defaults_to_the_trained_size(small_run, tmp_path, capsys, caplog):
    out, images, annotations = small_run
    trained = _last_epoch(out)
    assert trained["bbox_AP50"] == 1.0  # the model finds every object at the size it was trained at
    common = ["eval", "--checkpoint", str(out / "model.safetensors"), "--val_images", images, "--val_json",
              annotations, *RUN_FLAGS]
    with caplog.at_level(logging.INFO):
        assert main([*common, "--output_dir", str(tmp_path / "default")]) == 0
    assert "input: short side 64, long side <= 128, from the checkpoint" in caplog.text
    metrics = json.loads((tmp_path / "default" / "metrics.json").read_text())["bbox"]
    # The training run's own last evaluation, metric for metric (the same weights and images; eval folds norms).
    for name, value in metrics.items():
        assert abs(value - trained[f"bbox_{name}"]) <= 1e-3, (name, value, trained[f"bbox_{name}"])
    caplog.clear()
    with caplog.at_level(logging.INFO):  # far from the trained size (the reference's 800 px alike, 4x the time)
        assert main([*common, "--val_scale", "400", "--max_size", "667", "--output_dir", str(tmp_path / "400")]) == 0
    assert "input size 400 is more than 2x away from the 64" in caplog.text
    far = json.loads((tmp_path / "400" / "metrics.json").read_text())["bbox"]
    assert far["AP50"] < metrics["AP50"] - 0.5


def test_predict_defaults_to_the_trained_size(small_run, tmp_path, capsys):
    """`detr predict` with no size flags finds each image's one object (right class, IoU > 0.5) as its best
    detection; the same images at 800 px do not."""
    out, images, annotations = small_run
    coco = load_coco(annotations)
    paths = [f"{images}/{coco.imgs[i]['file_name']}" for i in sorted(coco.imgs)[:4]]
    assert main(["predict", *paths, "--checkpoint", str(out / "model.safetensors"), "--threshold", "0",
                 "--out", str(tmp_path / "pred"), "--no_draw", "--no_progress"]) == 0
    capsys.readouterr()
    found = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    detector_800 = Detector.from_checkpoint(out / "model.safetensors", threshold=0.0, size=800, max_size=1333)
    misses_at_800 = 0
    for image_id in sorted(coco.imgs)[:4]:
        (truth,) = coco.imgToAnns[image_id]
        truth_xyxy = xywh_to_xyxy(torch.tensor([truth["bbox"]], dtype=torch.float32))
        name = coco.imgs[image_id]["file_name"]
        best = max((d for d in found if d["file_name"] == name), key=lambda d: d["score"])
        assert best["category_id"] == truth["category_id"]
        assert box_iou(xywh_to_xyxy(torch.tensor([best["bbox"]])), truth_xyxy)[0].item() > 0.5
        top = detector_800(f"{images}/{name}")[0]
        iou = box_iou(torch.tensor([top.box]), truth_xyxy)[0].item()
        misses_at_800 += top.label != truth["category_id"] or iou <= 0.5
    assert misses_at_800 >= 3  # what the 800-px default gave: wrong answers, not an error


def test_demo_checkpoint_eval_reproduces_the_demos_ap(tmp_path, capsys, caplog, monkeypatch):
    """`detr eval` of the demo's checkpoint on its held-out folder, no size flags: the demo's numbers. The demo
    trains under bf16 autocast on a CPU with bf16 instructions (here made to look like one) and says so."""
    monkeypatch.setattr(demo_module, "native_bf16", lambda device: True)
    with caplog.at_level(logging.INFO, logger="detr.demo"):
        result = run_demo(tmp_path / "demo", minutes=0.05, progress=False, draw=1)
    assert result["precision"] == "bf16"
    assert "training precision: bf16 autocast (this CPU has bf16 instructions)" in caplog.text
    config = json.loads((tmp_path / "demo" / "run" / "log.jsonl").read_text().splitlines()[0])
    assert config["schedule"]["amp"] == "bf16"
    checkpoint = read_checkpoint(result["checkpoint"])
    assert checkpoint.input == DEMO_INPUT
    assert main(["eval", "--checkpoint", result["checkpoint"], "--coco_path", str(tmp_path / "demo" / "shapes"),
                 "--output_dir", str(tmp_path / "eval"), *RUN_FLAGS]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 128
    for name in ("AP", "AP50", "AP75"):
        assert abs(metrics["bbox"][name] - result[name]) <= 1e-3, (name, metrics["bbox"][name], result[name])


def test_demo_precision_follows_the_cpu_unless_asked(monkeypatch):
    for native, auto in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(demo_module, "native_bf16", lambda device, native=native: native)
        assert demo_precision() == auto
        assert demo_precision("fp32") == "fp32" and demo_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        demo_precision("fp16")


# --- the stored record and its resolution ------------------------------------------------------------------


def test_input_round_trips_through_our_formats_and_defaults_elsewhere(tmp_path, reference):
    torch.manual_seed(0)
    model = build_detr(preset("shapes-small"))
    spec = InputConfig(size=96, max_size=160, train_scales=(80, 96), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = save_checkpoint(model, tmp_path / "m.safetensors", input=spec)
    ckpt = read_checkpoint(path)
    assert ckpt.input == spec and "input" not in ckpt.metadata
    assert read_checkpoint(save_checkpoint(model, tmp_path / "plain.safetensors")).input is None
    # a loaded model carries its input, and saving it again keeps it
    detector = Detector.from_checkpoint(path)
    assert detector.input == spec and (detector.size, detector.max_size) == (96, 160)
    resaved = save_checkpoint(load_checkpoint(path), tmp_path / "again.safetensors")
    assert read_checkpoint(resaved).input == spec
    # the resize and normalization are the stored ones: grey 128 is (128 / 255 - 0.5) / 0.25 under mean 0.5, std 0.25
    pixels, _ = detector._transform(_grey(64), None)
    assert pixels.shape == (3, 96, 96)
    assert torch.allclose(pixels, torch.full_like(pixels, (128 / 255 - 0.5) / 0.25), atol=1e-6)
    # the reference's format does not say: 800 / 1333 and ImageNet statistics
    ref = tmp_path / "ref.pth"
    torch.save({"model": reference["detection"]["state_dict"]}, ref)
    assert read_checkpoint(ref).input is None
    default = Detector.from_checkpoint(ref)
    assert (default.size, default.max_size, default.input.mean) == (800, 1333, IMAGENET_MEAN)
    assert "does not say" in default.input_origin


def _grey(side: int) -> Image.Image:
    return Image.new("RGB", (side, side), (128, 128, 128))


def test_a_broken_input_record_names_the_file(tmp_path):
    model = build_detr(preset("shapes-small"))
    path = save_state_dict(model.state_dict(), tmp_path / "bad.safetensors", kind="detr",
                           config=model.config.to_dict(), metadata={"input": {"size": 64, "max_size": 32}})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: invalid 'input'.*max_size >= size"):
        read_checkpoint(path)


def test_explicit_sizes_win_and_far_ones_warn(caplog):
    stored = InputConfig(size=128, max_size=256, train_scales=(128,))
    assert resolve_input(stored) == (stored, "the checkpoint")
    with caplog.at_level(logging.WARNING):
        spec, origin = resolve_input(stored, size=160)
    assert (spec.size, spec.max_size, spec.train_scales) == (160, 320, (128,))  # the cap keeps the trained ratio
    assert origin == "explicit size (over the checkpoint)" and not caplog.records
    spec, _ = resolve_input(stored, size=96)
    assert (spec.size, spec.max_size) == (96, 256)  # a smaller size keeps the stored cap
    spec, origin = resolve_input(stored, size=300, max_size=400)
    assert (spec.size, spec.max_size) == (300, 400) and origin == "explicit size and max_size (over the checkpoint)"
    assert "input size 300 is more than 2x away from the 128" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_input(stored, size=63)
    assert "input size 63 is more than 2x away from the 128" in caplog.text
    spec, origin = resolve_input(None, size=400)
    assert (spec.size, spec.max_size) == (400, 1333) and "reference's default" in origin
    assert InputConfig.for_training(train_scales=None, val_scale=None, max_size=None) == InputConfig()
    assert InputConfig.for_training(train_scales=[96, 128], val_scale=None, max_size=200) == InputConfig(
        size=128, max_size=200, train_scales=(96, 128))
    assert InputConfig().example_hw() == (800, 1088) and DEMO_INPUT.example_hw() == (128, 192)
