"""Panoptic training through ``detr train --dataset_file coco_panoptic``: the paper's two stages on
converted coco-mini images (boxes of every segment, then the mask head on the frozen detector).

The numbers a run reports are checked twice: they equal the saved model's scores recomputed in Python,
and a second, identical run whose val ground truth is the first run's own predictions scores exactly 1
(a run of a few steps scores 0 against the real ground truth, which a broken evaluation would too).
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from conftest import COCO_MINI
from detr.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from detr.cli import main
from detr.data import collate_detection, make_coco_transforms
from detr.data.panoptic import CocoPanoptic, panoptic_from_instances
from detr.engine.evaluate import evaluate
from detr.engine.panoptic_eval import evaluate_panoptic, pq_compute
from detr.model.segmentation import DETRsegm
from detr.postprocess import postprocess_detections

SMALL = ["--preset", "shapes-small", "--num_queries", "6", "--train_scales", "96", "--max_size", "128",
         "--batch_size", "2", "--num_workers", "0", "--no_progress", "--lr_backbone", "1e-4"]
PERFECT = ("AP", "AP50", "AP75", "AR100")  # 1 when every prediction is a ground-truth object and vice versa


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The runs below are compared bit for bit: with several threads, CPU reductions (convolution and norm
    backward passes) may add in another order from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def data_flags(root: Path) -> list[str]:
    return ["--dataset_file", "coco_panoptic", "--coco_panoptic_path", str(root),
            "--train_images", str(COCO_MINI / "val2017"), "--val_images", str(COCO_MINI / "val2017")]


def train(capsys, *args: str) -> dict:
    """`detr train` -> its last record (the printed json line)."""
    capsys.readouterr()
    assert main(["train", *SMALL, *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def val_split(root: Path) -> tuple[Path, Path]:
    return root / "annotations" / "panoptic_val2017.json", root / "annotations" / "panoptic_val2017"


def val_loader(root: Path, masks: bool) -> tuple[CocoPanoptic, DataLoader]:
    """The val split as `detr train` scores it with SMALL's sizes (short side 96, at most 128), in batches of 2."""
    transforms = make_coco_transforms("val", scales=[96], max_size=128)
    dataset = CocoPanoptic(COCO_MINI / "val2017", *val_split(root), transforms=transforms, return_masks=masks)
    return dataset, DataLoader(dataset, batch_size=2, collate_fn=collate_detection)


def rescore(checkpoint: Path, root: Path, out_dir: Path, instances: Path | None = None) -> tuple[dict, dict]:
    """A record's metrics recomputed in Python from the saved model, under the record's names; and (for a
    panoptic model) the prediction files evaluate_panoptic wrote."""
    model = load_checkpoint(checkpoint)
    masks = hasattr(model, "mask_head")
    dataset, loader = val_loader(root, masks)
    if not masks:
        metrics = evaluate(model, loader, coco_gt=dataset.coco, progress=False)["bbox"]
        return {f"bbox_{k}": v for k, v in metrics.items()}, {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(instances)) if instances is not None else None
    result = evaluate_panoptic(model, loader, gt_json=val_split(root)[0], gt_folder=val_split(root)[1],
                               output_dir=out_dir, coco_gt=coco, progress=False)
    record = {f"panoptic_{metric.upper()}{suffix}": result["panoptic"][group][metric]
              for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")) for metric in ("pq", "sq", "rq")}
    for iou_type in ("bbox", "segm"):
        record.update({f"{iou_type}_{k}": v for k, v in result.get(iou_type, {}).items()})
    return record, result["predictions"]


def assert_record_has(record: dict, expected: dict) -> None:
    assert len(expected) >= 9 and {k: record.get(k) for k in expected} == expected


def with_val_ground_truth(root: Path, dest: Path, annotations: list[dict], png_folder: Path) -> Path:
    """A copy of the layout ``root`` (same train split) whose val split has these annotations and PNGs."""
    (dest / "annotations").mkdir(parents=True)
    for name in ("panoptic_train2017.json", "panoptic_train2017"):
        copy = shutil.copytree if (root / "annotations" / name).is_dir() else shutil.copy
        copy(root / "annotations" / name, dest / "annotations" / name)
    gt_json, _ = val_split(root)
    val = json.loads(gt_json.read_text())
    val_json, val_folder = val_split(dest)
    val_json.write_text(json.dumps({**val, "annotations": annotations}))
    shutil.copytree(png_folder, val_folder)
    return dest


def own_detections(root: Path, checkpoint: Path, dest: Path) -> Path:
    """``root`` with the val ground truth replaced by every detection the detector in ``checkpoint`` makes
    on the val images (boxes only: the segments' PNG ids are left out, so their masks are empty)."""
    dataset, loader = val_loader(root, masks=False)
    model = load_checkpoint(checkpoint).eval()
    annotations = []
    with torch.inference_mode():
        for images, targets in loader:
            sizes = torch.stack([t["orig_size"] for t in targets])
            for target, found in zip(targets, postprocess_detections(model(images), sizes), strict=True):
                image_id = int(target["image_id"])
                segments = []
                for (x0, y0, x1, y1), label in zip(found["boxes"].tolist(), found["labels"].tolist(), strict=True):
                    if label in dataset.categories:
                        segments.append({"id": 1_000_000 + len(segments), "category_id": label, "iscrowd": 0,
                                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
                annotations.append({**dataset.annotations[image_id], "segments_info": segments})
    assert sum(len(a["segments_info"]) for a in annotations) >= 3 * 3  # most of the 6 queries name a category
    return with_val_ground_truth(root, dest, annotations, val_split(root)[1])


def own_segments(root: Path, predictions: dict, dest: Path) -> Path:
    """``root`` with the val ground truth replaced by the panoptic predictions evaluate_panoptic wrote."""
    annotations = json.loads(Path(predictions["json"]).read_text())["annotations"]
    assert sum(len(a["segments_info"]) for a in annotations) >= 3  # something to find again
    return with_val_ground_truth(root, dest, annotations, Path(predictions["folder"]))


def same_weights(a: Path, b: Path) -> bool:
    first, second = read_checkpoint(a).state_dict, read_checkpoint(b).state_dict
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def stage_one(panoptic_root, tmp_path_factory) -> tuple[Path, dict]:
    """Stage 1: a detector on the boxes of the panoptic segments, one epoch -> (checkpoint, record)."""
    root, _ = panoptic_root
    out = tmp_path_factory.mktemp("boxes")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["train", *SMALL, *data_flags(root), "--epochs", "1", "--output_dir", str(out)]) == 0
    return out / "checkpoint.pth", json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def confident_detector(stage_one, tmp_path_factory) -> Path:
    """The stage-1 detector, made to call every query the first category with probability ~1: panoptic
    post-processing (class threshold 0.85) keeps its queries, so a mask head on it predicts segments."""
    model = load_checkpoint(stage_one[0])
    with torch.no_grad():
        model.class_embed.bias[1] += 30.0
    return save_checkpoint(model, tmp_path_factory.mktemp("confident") / "detector.safetensors")


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


def test_stage_one_reports_the_saved_detectors_box_ap(panoptic_root, stage_one, tmp_path, capsys):
    root, _ = panoptic_root
    checkpoint, record = stage_one
    assert "panoptic_PQ" not in record
    detector = read_checkpoint(checkpoint).state_dict
    assert detector["class_embed.weight"].shape[0] == 91 + 1  # max category id of the panoptic json + 1, + no-object
    # The record scores the saved detector: the same 12 numbers from evaluate() on the checkpoint ...
    assert_record_has(record, rescore(checkpoint, root, tmp_path)[0])
    # ... and the same run scored against the detector's own detections finds every one of them.
    own = own_detections(root, checkpoint, tmp_path / "own")
    again = train(capsys, *data_flags(own), "--epochs", "1", "--output_dir", str(tmp_path / "again"))
    assert same_weights(tmp_path / "again" / "checkpoint.pth", checkpoint)  # val data do not change training
    assert {k: again[f"bbox_{k}"] for k in PERFECT} == dict.fromkeys(PERFECT, 1.0)
    assert_record_has(again, rescore(checkpoint, own, tmp_path)[0])


def test_stage_two_trains_the_mask_head_on_the_frozen_detector(panoptic_root, confident_detector, tmp_path, capsys):
    root, instances = panoptic_root
    # The mask head on the frozen detector; PQ plus bbox/segm AP against the instances json.
    stage2 = ["--masks", "--frozen_weights", str(confident_detector), "--val_json", str(instances), "--epochs", "1"]
    record = train(capsys, *data_flags(root), *stage2, "--output_dir", str(tmp_path / "masks"))
    assert record["train_loss_mask"] > 0 and record["train_loss_dice"] > 0
    checkpoint = tmp_path / "masks" / "checkpoint.pth"
    # PQ as pq_compute scores the prediction files the run wrote ...
    written = tmp_path / "masks" / "eval_panoptic"
    pq = pq_compute(*val_split(root), written / "panoptic_pred.json", written / "panoptic_pred")
    assert (record["panoptic_PQ"], record["panoptic_SQ_th"], record["panoptic_RQ_st"]) == (
        pq["All"]["pq"], pq["Things"]["sq"], pq["Stuff"]["rq"])
    # ... and every number (PQ/SQ/RQ of all, things, stuff; bbox and segm AP against the instances json)
    # as the saved model scores in Python.
    expected, predictions = rescore(checkpoint, root, tmp_path / "rescored", instances)
    assert len(expected) == 9 + 12 + 12
    assert_record_has(record, expected)

    trained = read_checkpoint(checkpoint).state_dict
    detector = read_checkpoint(confident_detector).state_dict
    frozen = {k.removeprefix("detr."): v for k, v in trained.items() if k.startswith("detr.")}
    assert frozen.keys() == detector.keys()
    assert all(torch.equal(frozen[k], detector[k]) for k in detector), "the detector must stay frozen"
    assert any(k.startswith("mask_head.") for k in trained)

    # The same run against its own panoptic predictions as the val ground truth: PQ = SQ = RQ = 1.
    own = own_segments(root, predictions, tmp_path / "own")
    again = train(capsys, *data_flags(own), *stage2, "--output_dir", str(tmp_path / "again"))
    assert same_weights(tmp_path / "again" / "checkpoint.pth", checkpoint)
    assert [again[f"panoptic_{m}"] for m in ("PQ", "SQ", "RQ", "PQ_th")] == [1.0] * 4
    assert {k: again[k] for k in again if k.startswith(("bbox_", "segm_"))} == {
        k: record[k] for k in record if k.startswith(("bbox_", "segm_"))}  # the same model on the same images


def test_panoptic_dataset_file_needs_its_files(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    args = ["train", *SMALL, "--dataset_file", "coco_panoptic", "--coco_path", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--epochs", "1"]
    assert main(args) != 0
    assert "annotations/panoptic_train2017.json" in capsys.readouterr().err


def test_one_stage_panoptic_training_trains_everything(panoptic_root, confident_detector, tmp_path, capsys):
    root, _ = panoptic_root
    torch.manual_seed(0)  # a panoptic model: the confident detector and a fresh mask head
    start = save_checkpoint(DETRsegm(load_checkpoint(confident_detector)), tmp_path / "start.safetensors")
    one_stage = ["--masks", "--pretrained", str(start), "--epochs", "1"]
    out = tmp_path / "one"
    record = train(capsys, *data_flags(root), *one_stage, "--output_dir", str(out))
    assert "segm_AP" not in record  # no instances json given
    expected, predictions = rescore(out / "checkpoint.pth", root, tmp_path / "rescored")
    assert_record_has(record, expected)
    weights = read_checkpoint(out / "checkpoint.pth").state_dict
    assert any(k.startswith("detr.transformer.") for k in weights) and any(k.startswith("mask_head.") for k in weights)
    initial = read_checkpoint(start).state_dict
    for key in ("detr.transformer.decoder.norm.weight", "detr.backbone.body.layer4.0.conv1.weight",
                "mask_head.lay1.weight"):
        assert not torch.equal(weights[key], initial[key]), key  # detector and mask head both trained
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss_mask" in r and "loss_ce" in r for r in log if r["type"] == "step")
    own = own_segments(root, predictions, tmp_path / "own")
    again = train(capsys, *data_flags(own), *one_stage, "--output_dir", str(tmp_path / "again"))
    assert same_weights(tmp_path / "again" / "checkpoint.pth", out / "checkpoint.pth")
    assert [again[f"panoptic_{m}"] for m in ("PQ", "SQ", "RQ", "PQ_th")] == [1.0] * 4


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
