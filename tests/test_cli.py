"""The command line on real inputs: convert, eval (COCO AP on coco-mini), plot, and the demo's drawing."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from conftest import COCO_MINI
from detr.checkpoint import read_checkpoint, save_checkpoint
from detr.cli import main
from detr.config import preset
from detr.data.shapes import generate_shapes
from detr.demo import draw_predictions
from detr.model import build_detr


def test_convert_and_eval_a_reference_checkpoint(reference, tmp_path, capsys):
    entry = reference["detection"]
    ref = tmp_path / "detr-ref.pth"
    torch.save({"model": {k: v.float() for k, v in entry["state_dict"].items()},
                "args": argparse.Namespace(**entry["config"])}, ref)
    assert main(["convert", str(ref), str(tmp_path / "ours.safetensors")]) == 0
    assert read_checkpoint(tmp_path / "ours.safetensors").config.num_classes == 91
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(ref), "--coco_path", str(COCO_MINI), "--val_scale", "96",
                 "--max_size", "160", "--batch_size", "4", "--num_workers", "0", "--no_progress",
                 "--output_dir", str(tmp_path / "eval")])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 79
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--coco_path", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert code == 1
    assert "nowhere" in capsys.readouterr().err


def test_demo_draws_predictions(tmp_path):
    data = generate_shapes(tmp_path / "shapes", num_train=2, num_val=3, image_size=64, seed=1)
    torch.manual_seed(0)
    model = build_detr(preset("shapes-small")).eval()
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    drawn = draw_predictions(ckpt, data / "val2017", tmp_path / "pred", count=2, threshold=0.0)
    assert len(drawn) == 2
    with Image.open(drawn[0]) as image:
        assert image.size == (192, 192)
        assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 10
