"""The convergence options through every command: train (with --ema), eval, predict, attention, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detr.checkpoint import load_checkpoint, read_checkpoint
from detr.cli import main
from detr.data.coco import CocoDetection
from detr.data.shapes import generate_shapes
from detr.data.transforms import make_coco_transforms
from detr.inference.predictor import Detector

OPTIONS = ["--preset", "shapes-fast", "--hidden_dim", "32", "--nheads", "4", "--dim_feedforward", "64",
           "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "5", "--backbone_widths", "8,16,32",
           "--anchor_queries", "--two_stage", "--no_encoder_content", "--denoising", "2", "--query_groups", "2"]
SIZES = ["--train_scales", "64", "--val_scale", "64", "--max_size", "128", "--num_workers", "0", "--no_progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    shapes = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=3, image_size=64, seed=2)
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--coco_path", str(shapes), *OPTIONS, *SIZES, "--epochs", "2", "--batch_size", "4",
                 "--lr", "1e-3", "--lr_backbone", "1e-3", "--ema", "0.9", "--output_dir", str(out)])
    assert code == 0
    return shapes, out


def test_train_saves_raw_and_ema_weights_with_the_options(trained):
    _, out = trained
    raw, ema = load_checkpoint(out / "model.safetensors"), load_checkpoint(out / "model_ema.safetensors")
    q = raw.config.queries
    assert (q.anchors, q.two_stage, q.denoising_groups, q.groups) == (True, True, 2, 2)
    assert ema.config == raw.config
    differs = [k for k, v in raw.state_dict().items() if not torch.equal(v, ema.state_dict()[k])]
    assert differs  # the average is not the last step's weights
    # the training checkpoint carries the EMA for --resume, and the log says what was evaluated
    assert "ema" in read_checkpoint(out / "checkpoint.pth").extra


def test_resume_continues_the_ema(trained, tmp_path):
    shapes, out = trained
    code = main(["train", "--coco_path", str(shapes), *OPTIONS, *SIZES, "--epochs", "3", "--batch_size", "4",
                 "--ema", "0.9", "--resume", str(out / "checkpoint.pth"), "--output_dir", str(tmp_path)])
    assert code == 0
    before = read_checkpoint(out / "checkpoint.pth").extra["ema"]["updates"]
    assert read_checkpoint(tmp_path / "checkpoint.pth").extra["ema"]["updates"] == before + 2  # 8 images / 4


def test_eval_scores_the_options_model_as_the_python_api_does(trained, tmp_path, capsys):
    shapes, out = trained
    code = main(["eval", "--checkpoint", str(out / "model_ema.safetensors"), "--coco_path", str(shapes), *SIZES,
                 "--batch_size", "3", "--output_dir", str(tmp_path)])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    from detr.data.batch import collate_detection
    from detr.engine.evaluate import evaluate

    dataset = CocoDetection(shapes / "val2017", shapes / "annotations" / "instances_val2017.json",
                            transforms=make_coco_transforms("val", scales=[64], max_size=128))
    batch = [collate_detection([dataset[i] for i in range(3)])]
    expected = evaluate(load_checkpoint(out / "model_ema.safetensors"), batch, coco_gt=dataset.coco, progress=False)
    assert metrics["num_images"] == 3
    assert metrics["bbox"]["AP"] == pytest.approx(expected["bbox"]["AP"], abs=1e-6)


def test_predict_attention_and_export_run_on_the_options_model(trained, tmp_path, capsys):
    shapes, out = trained
    ckpt = str(out / "model_ema.safetensors")
    image = sorted((shapes / "val2017").glob("*.png"))[0]
    assert main(["predict", "--checkpoint", ckpt, str(image), "--size", "64", "--max_size", "128",
                 "--threshold", "0.0", "--out", str(tmp_path / "pred"), "--no_progress"]) == 0
    written = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    found = Detector.from_checkpoint(ckpt, threshold=0.0, size=64, max_size=128)(image)
    assert [round(d["score"], 5) for d in written] == [round(d.score, 5) for d in found]
    assert len(found) == 5  # one per query: inference uses one group, no denoising queries
    capsys.readouterr()
    assert main(["attention", "--checkpoint", ckpt, str(image), "--size", "64", "--max_size", "128",
                 "--top_k", "2", "--out", str(tmp_path / "att")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["feature_size"] == [8, 8] and len(report["written"]) >= 1  # stride 8 on 64 px
    pytest.importorskip("onnxruntime")
    assert main(["export", "--checkpoint", ckpt, "--height", "64", "--width", "96", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").is_file()
