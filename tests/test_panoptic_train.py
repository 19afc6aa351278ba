"""Panoptic training through ``detr train --dataset_file coco_panoptic``: the paper's two stages on
converted coco-mini images (boxes of every segment, then the mask head on the frozen detector)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import COCO_MINI
from detr.checkpoint import read_checkpoint
from detr.cli import main
from detr.data.panoptic import CocoPanoptic, panoptic_from_instances

SMALL = ["--preset", "shapes-small", "--num_queries", "6", "--train_scales", "96", "--max_size", "128",
         "--batch_size", "2", "--num_workers", "0", "--no_progress", "--lr_backbone", "1e-4"]


@pytest.fixture(scope="module")
def panoptic_root(tmp_path_factory) -> tuple[Path, Path]:
    """Three coco-mini val images as a panoptic layout whose train and val splits are those images."""
    root = tmp_path_factory.mktemp("pan")
    source = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    keep = {im["id"] for im in source["images"][:3]}
    subset = {**source, "images": [im for im in source["images"] if im["id"] in keep],
              "annotations": [a for a in source["annotations"] if a["image_id"] in keep]}
    (root / "annotations").mkdir()
    instances = root / "annotations" / "instances_subset.json"
    instances.write_text(json.dumps(subset))
    for split in ("train", "val"):
        panoptic_from_instances(instances, root / "annotations" / f"panoptic_{split}2017.json",
                                root / "annotations" / f"panoptic_{split}2017", image_dir=COCO_MINI / "val2017")
    return root, instances


def test_panoptic_boxes_as_coco_ground_truth(panoptic_root):
    root, _ = panoptic_root
    dataset = CocoPanoptic(COCO_MINI / "val2017", root / "annotations" / "panoptic_val2017.json",
                           root / "annotations" / "panoptic_val2017")
    coco = dataset.coco
    segments = [s for i in dataset.ids for s in dataset.annotations[i]["segments_info"]]
    assert sorted(coco.getImgIds()) == dataset.ids and len(coco.anns) == len(segments) > 0
    by_box = sorted(tuple(a["bbox"]) + (a["category_id"], a["iscrowd"]) for a in coco.anns.values())
    expected = sorted(tuple(float(v) for v in s["bbox"]) + (s["category_id"], s.get("iscrowd", 0)) for s in segments)
    assert by_box == expected


def test_two_stage_panoptic_training(panoptic_root, tmp_path, capsys):
    root, instances = panoptic_root
    data = ["--dataset_file", "coco_panoptic", "--coco_panoptic_path", str(root),
            "--train_images", str(COCO_MINI / "val2017"), "--val_images", str(COCO_MINI / "val2017")]
    # Stage 1: a detector on the boxes of the panoptic segments; AP against those boxes.
    assert main(["train", *SMALL, *data, "--epochs", "1", "--output_dir", str(tmp_path / "boxes")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= record["bbox_AP"] <= 1.0 and "panoptic_PQ" not in record
    detector = read_checkpoint(tmp_path / "boxes" / "checkpoint.pth").state_dict
    assert detector["class_embed.weight"].shape[0] == 91 + 1  # max category id of the panoptic json + 1, + no-object

    # Stage 2: the mask head on the frozen detector; PQ plus bbox/segm AP against the instances json.
    stage2 = ["--masks", "--frozen_weights", str(tmp_path / "boxes" / "checkpoint.pth"), "--val_json", str(instances)]
    assert main(["train", *SMALL, *data, *stage2, "--epochs", "1", "--output_dir", str(tmp_path / "masks")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("panoptic_PQ", "panoptic_PQ_th", "panoptic_SQ_th", "panoptic_RQ_th", "bbox_AP", "segm_AP"):
        assert 0.0 <= record[key] <= 1.0, key
    assert record["train_loss_mask"] > 0 and record["train_loss_dice"] > 0
    assert (tmp_path / "masks" / "eval_panoptic" / "panoptic_pred.json").is_file()

    trained = read_checkpoint(tmp_path / "masks" / "checkpoint.pth").state_dict
    frozen = {k.removeprefix("detr."): v for k, v in trained.items() if k.startswith("detr.")}
    assert frozen.keys() == detector.keys()
    assert all(torch.equal(frozen[k], detector[k]) for k in detector), "the detector must stay frozen"
    assert any(k.startswith("mask_head.") for k in trained)


def test_panoptic_dataset_file_needs_its_files(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    args = ["train", *SMALL, "--dataset_file", "coco_panoptic", "--coco_path", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--epochs", "1"]
    assert main(args) != 0
    assert "annotations/panoptic_train2017.json" in capsys.readouterr().err


def test_one_stage_panoptic_training_trains_everything(panoptic_root, tmp_path, capsys):
    root, _ = panoptic_root
    data = ["--dataset_file", "coco_panoptic", "--coco_panoptic_path", str(root),
            "--train_images", str(COCO_MINI / "val2017"), "--val_images", str(COCO_MINI / "val2017")]
    out = tmp_path / "one"
    assert main(["train", *SMALL, *data, "--masks", "--epochs", "1", "--output_dir", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= record["panoptic_PQ"] <= 1.0 and "segm_AP" not in record  # no instances json given
    weights = read_checkpoint(out / "checkpoint.pth").state_dict
    assert any(k.startswith("detr.transformer.") for k in weights) and any(k.startswith("mask_head.") for k in weights)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss_mask" in r and "loss_ce" in r for r in log if r["type"] == "step")


def test_mask_head_width_is_checked_when_configured():
    import dataclasses

    from detr.config import preset

    assert preset("shapes-small", masks=True).transformer.hidden_dim == 128
    with pytest.raises(ValueError, match="hidden_dim divisible by 128, got 96"):
        dataclasses.replace(preset("shapes-small").with_transformer(hidden_dim=96), masks=True)


def test_masks_on_demand_follow_the_forward_autocast():
    """--amp: the criterion (outside autocast) computes on-demand masks under the forward's autocast."""
    from detr.config import preset
    from detr.loss import SetCriterion
    from detr.model import build_detr

    config = preset("shapes-small", masks=True, num_queries=4).with_transformer(enc_layers=1, dec_layers=1)
    torch.manual_seed(0)
    model = build_detr(config)
    model.masks_on_demand = True
    model.train()
    images = [torch.randn(3, 64, 64), torch.randn(3, 64, 48)]
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 10:40, 12:30] = True
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.33, 0.39, 0.28, 0.47]]), "masks": mask},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]),
                "masks": torch.ones(1, 64, 48, dtype=torch.bool)}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
    masks = outputs["mask_logits_of"](torch.tensor([0, 1]), torch.tensor([2, 0]))
    assert masks.dtype == torch.bfloat16 and masks.shape == (2, 16, 16)
    result = SetCriterion.from_config(config)(outputs, targets)
    result.total.backward()
    assert torch.isfinite(result.terms["loss_dice"]) and model.mask_head.lay1.weight.grad is not None
