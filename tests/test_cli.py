"""The command line on real inputs: convert, eval (COCO AP on coco-mini), plot, and the demo's drawing."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from conftest import COCO_MINI
from detr.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from detr.cli import main
from detr.config import preset
from detr.data import collate_detection, make_coco_transforms
from detr.data.coco import CocoDetection
from detr.data.shapes import generate_shapes
from detr.demo import DEMO_INPUT, IMAGE_SIZE, draw_predictions
from detr.engine.evaluate import evaluate
from detr.inference.predictor import Detector
from detr.inference.visualize import draw_detections
from detr.model import build_detr
from detr.model.fuse import optimize_for_inference
from detr.postprocess import postprocess_detections

VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"
EVAL_SIZE = ["--val_scale", "96", "--max_size", "160", "--batch_size", "4", "--num_workers", "0", "--no_progress"]


def _val_dataset(annotations=VAL_JSON) -> CocoDetection:
    """coco-mini val as `detr eval` is told to read it (EVAL_SIZE), built here without the CLI."""
    return CocoDetection(COCO_MINI / "val2017", annotations, transforms=make_coco_transforms("val", scales=[96],
                                                                                            max_size=160))


def _reference_file(reference, path) -> str:
    entry = reference["detection"]
    torch.save({"model": {k: v.float() for k, v in entry["state_dict"].items()},
                "args": argparse.Namespace(**entry["config"])}, path)
    return str(path)


def test_convert_and_eval_a_reference_checkpoint(reference, tmp_path, capsys):
    ref = _reference_file(reference, tmp_path / "detr-ref.pth")
    assert main(["convert", ref, str(tmp_path / "ours.safetensors")]) == 0
    assert read_checkpoint(tmp_path / "ours.safetensors").config.num_classes == 91
    capsys.readouterr()
    code = main(["eval", "--checkpoint", ref, "--coco_path", str(COCO_MINI), *EVAL_SIZE,
                 "--output_dir", str(tmp_path / "eval")])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics
    assert metrics["num_images"] == 79
    # The same numbers as evaluate() in Python on the model `detr eval` runs (norms folded) and the data its
    # flags name: every one of the 12 COCO metrics, exactly.
    dataset = _val_dataset()
    model = optimize_for_inference(load_checkpoint(ref))
    expected = evaluate(model, DataLoader(dataset, batch_size=4, collate_fn=collate_detection), coco_gt=dataset.coco,
                        progress=False)
    assert len(metrics["bbox"]) == 12 and metrics["bbox"] == expected["bbox"]


def test_eval_scores_one_against_the_models_own_detections(reference, tmp_path):
    """Ground truth = every detection the model makes in Python (the checkpoint as loaded, norms not
    folded) on 8 val images: `detr eval` must find each of them again, at every IoU threshold (AP = AR = 1).
    Boxes off by a scale, labels off by one, images mixed up or a flag ignored would all score below 1."""
    ref = _reference_file(reference, tmp_path / "detr-ref.pth")
    dataset = _val_dataset()
    model = load_checkpoint(ref).eval()
    subset = Subset(dataset, range(8))
    images, annotations = [], []
    with torch.inference_mode():
        for batch, targets in DataLoader(subset, batch_size=4, collate_fn=collate_detection):
            sizes = torch.stack([t["orig_size"] for t in targets])
            for target, found in zip(targets, postprocess_detections(model(batch), sizes), strict=True):
                image_id = int(target["image_id"])
                images.append(dataset.coco.imgs[image_id])
                for box, label in zip(found["boxes"].tolist(), found["labels"].tolist(), strict=True):
                    if label not in dataset.category_names:  # "N/A" slots of the 91 classes: no COCO category
                        continue
                    x0, y0, x1, y1 = box
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                        "iscrowd": 0})
    assert len(annotations) > 8 * 10  # most of the 20 queries of each image land on a real category
    own = tmp_path / "own_detections.json"
    own.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": dataset.coco.dataset["categories"]}))
    code = main(["eval", "--checkpoint", ref, "--val_images", str(COCO_MINI / "val2017"), "--val_json", str(own),
                 *EVAL_SIZE, "--output_dir", str(tmp_path / "eval")])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 8
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics["bbox"][name] == 1.0, (name, metrics["bbox"])


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--coco_path", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert code == 1
    assert "nowhere" in capsys.readouterr().err


def test_demo_draws_predictions(tmp_path):
    data = generate_shapes(tmp_path / "shapes", num_train=2, num_val=3, image_size=64, seed=1)
    torch.manual_seed(0)
    model = build_detr(preset("shapes-small")).eval()
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors", input=DEMO_INPUT)  # as run_demo saves it
    drawn = draw_predictions(ckpt, data / "val2017", tmp_path / "pred", count=2, threshold=0.0)
    sources = sorted((data / "val2017").glob("*.png"))[:2]
    assert [p.name for p in drawn] == [p.name for p in sources]
    # Each drawing is that image's detections (the checkpoint's, at the demo's size, which the checkpoint
    # stores) drawn by draw_detections (whose pixels tests/test_visualize.py checks), then enlarged 3x.
    detector = Detector.from_checkpoint(ckpt, threshold=0.0, size=IMAGE_SIZE, max_size=2 * IMAGE_SIZE)
    for path, source in zip(drawn, sources, strict=True):
        image = detector.load(source)
        found = detector(image)
        assert len(found) == 10  # threshold 0: every query
        expected = draw_detections(image, [d.box for d in found], [d.label for d in found],
                                   [d.score for d in found], detector.class_names).resize((192, 192))
        with Image.open(path) as saved:
            assert saved.size == (192, 192)
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(expected))
            assert not np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image.resize((192, 192))))
