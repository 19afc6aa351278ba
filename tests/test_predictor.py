"""The inference API (Detector) and `detr predict` on real coco-mini images, against the reference fixture."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from conftest import COCO_MINI
from detr.checkpoint import load_checkpoint, save_checkpoint
from detr.cli.inference import add_parsers as add_inference_parsers
from detr.config import preset
from detr.inference.files import expand_inputs, output_stems
from detr.inference.names import (
    COCO_CATEGORY_NAMES,
    COCO_PANOPTIC_STUFF_NAMES,
    NA,
    class_names_from_json,
    coco_class_names,
)
from detr.inference.predictor import Detection, Detector, nms
from detr.inference.visualize import draw_detections
from detr.model import build_detr

VAL = COCO_MINI / "val2017"
VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"
# The fixture's images: short side 256, long side at most 400, batched together (padded).
FIXTURE_SIZE = {"size": 256, "max_size": 400}


def reference_checkpoint(entry: dict, path) -> str:
    """The fixture's weights and args as a file in the reference's released layout."""
    weights = {k: v.float() for k, v in entry["state_dict"].items()}
    torch.save({"model": weights, "args": argparse.Namespace(**entry["config"])}, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> str:
    return reference_checkpoint(reference["detection"], tmp_path_factory.mktemp("ckpt") / "detr-fixture.pth")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def panoptic_checkpoint(reference, tmp_path_factory) -> str:
    return reference_checkpoint(reference["panoptic"], tmp_path_factory.mktemp("ckpt") / "detr-panoptic.pth")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_detr(preset("shapes-small")).eval()  # ResNet-18, 4 classes


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run a subcommand added by add_inference_parsers; returns (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="detr")
    add_inference_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Absolute for |values| <= 1, relative above (as in test_parity)."""
    return ((actual - expected).abs() / expected.abs().clamp(min=1.0)).max().item()


# --- the reference's numbers --------------------------------------------------------------------


def test_detector_reproduces_reference_bbox_postprocessing(reference, checkpoint):
    """Image files -> validation transform -> the model (both images in one padded batch, as the fixture
    was made) -> detections: every query's score, label and xyxy box at the original size."""
    detector = Detector.from_checkpoint(checkpoint, threshold=0.0, batch_size=2, **FIXTURE_SIZE)
    files = [VAL / name for name in reference["image_files"]]
    results = detector(files)
    assert len(results) == 2
    for detections, expected, target in zip(results, reference["detection"]["postprocess_bbox"],
                                             reference["targets"], strict=True):
        order = expected["scores"].argsort(descending=True)  # ours come by decreasing score
        assert len(detections) == len(order) == 20  # threshold 0 keeps every query
        scores = torch.tensor([d.score for d in detections])
        boxes = torch.tensor([d.box for d in detections])
        assert torch.equal(torch.tensor([d.label for d in detections]), expected["labels"][order])
        assert relative_error(scores, expected["scores"][order]) <= 1e-4
        assert relative_error(boxes, expected["boxes"][order]) <= 1e-4
        assert all(d.name == COCO_CATEGORY_NAMES.get(d.label, NA) for d in detections)
        h, w = target["orig_size"].tolist()
        assert boxes[:, 0::2].abs().max() < 2 * w and boxes[:, 1::2].abs().max() < 2 * h


def test_single_input_pil_or_path_and_threshold(reference, model):
    detector = Detector(model, threshold=0.0, size=128, max_size=200)
    path = VAL / reference["image_files"][0]
    from_path = detector(path)
    from_pil = detector(Image.open(path))
    assert isinstance(from_path, list) and all(isinstance(d, Detection) for d in from_path)
    assert from_path == from_pil
    scores = [d.score for d in from_path]
    assert scores == sorted(scores, reverse=True)
    cut = (scores[4] + scores[5]) / 2
    assert detector(path, threshold=cut) == from_path[:5]
    assert detector([path], threshold=cut) == [from_path[:5]]
    as_dict = from_path[0].to_dict()
    assert set(as_dict) == {"box", "score", "label", "name"} and as_dict["box"] == list(from_path[0].box)
    x, y, bw, bh = from_path[0].box_xywh
    assert (x + bw, y + bh) == pytest.approx(from_path[0].box[2:])


def test_panoptic_matches_reference_from_image_files(reference, panoptic_checkpoint):
    """The kept segments (classes, thing/stuff) match the reference on both images, and the whole id map
    on the first. On the second, the fixture's random mask head gives several queries of one class
    near-identical mask logits, so per-pixel winners flip on the model's own 1e-5 float differences
    (the reference's post-processing of *our* model outputs shows the same areas as ours)."""
    entry = reference["panoptic"]
    expected = entry["postprocess_panoptic"]
    detector = Detector.from_checkpoint(panoptic_checkpoint, batch_size=2, **FIXTURE_SIZE)
    assert detector.is_panoptic and detector.num_classes == 250
    results = detector.panoptic([VAL / name for name in reference["image_files"]], threshold=expected["threshold"])
    for ours, ref, target in zip(results, expected["results"], reference["targets"], strict=True):
        assert ours.segment_ids.shape == ref["segment_ids"].shape == tuple(target["orig_size"].tolist())
        strip = [{k: s[k] for k in ("id", "isthing", "category_id")} for s in ours.segments]
        assert strip == [{k: s[k] for k in ("id", "isthing", "category_id")} for s in ref["segments_info"]]
        assert sum(s["area"] for s in ours.segments) == ours.segment_ids.numel()
        names = coco_class_names(250)
        assert all(s["name"] == names.get(s["category_id"], str(s["category_id"])) for s in ours.segments)
    assert torch.equal(results[0].segment_ids, expected["results"][0]["segment_ids"])
    assert [{k: v for k, v in s.items() if k != "name"} for s in results[0].segments] == \
        expected["results"][0]["segments_info"]


def test_panoptic_needs_a_mask_head(reference, model):
    detector = Detector(model, size=64, max_size=64)
    with pytest.raises(TypeError, match="panoptic"):
        detector.panoptic(VAL / reference["image_files"][0])


# --- NMS -------------------------------------------------------------------------------------


def test_nms_removes_a_duplicate_and_keeps_distinct_boxes():
    boxes = torch.tensor([
        [10.0, 10.0, 110.0, 110.0],  # 0: a car
        [12.0, 12.0, 112.0, 110.0],  # 1: the same car again, lower score (IoU ~0.94 with 0)
        [200.0, 10.0, 300.0, 110.0],  # 2: another car, disjoint
        [10.0, 10.0, 110.0, 110.0],  # 3: a person exactly where the car is (other class)
        [40.0, 10.0, 140.0, 110.0],  # 4: a car overlapping 0 by IoU 0.54
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([3, 3, 3, 1, 3])
    assert nms(boxes, scores, labels, iou_threshold=0.7).tolist() == [0, 2, 3, 4]
    assert nms(boxes, scores, labels, iou_threshold=0.5).tolist() == [0, 2, 3]
    assert nms(boxes, scores, None, iou_threshold=0.7).tolist() == [0, 2, 4]  # class-agnostic
    shuffled = torch.tensor([4, 2, 0, 3, 1])
    assert shuffled[nms(boxes[shuffled], scores[shuffled], labels[shuffled], 0.7)].tolist() == [0, 2, 3, 4]
    assert nms(boxes[:0], scores[:0], labels[:0], 0.5).tolist() == []


def test_detector_applies_nms_only_when_asked(tiny_model):
    result = {
        "scores": torch.tensor([0.8, 0.9, 0.75, 0.3]),
        "labels": torch.tensor([2, 2, 1, 2]),
        "boxes": torch.tensor([[0.0, 0, 50, 50], [1, 1, 50, 50], [0, 0, 50, 50], [60, 60, 90, 90]]),
    }
    assert Detector(tiny_model).select(result, threshold=0.5).tolist() == [1, 0, 2]
    assert Detector(tiny_model, nms_iou=0.5).select(result, threshold=0.5).tolist() == [1, 2]
    assert Detector(tiny_model, nms_iou=0.5).select(result, threshold=None).tolist() == [1, 2, 3]


# --- class names -----------------------------------------------------------------------------


def test_coco_names_match_the_coco_annotations():
    categories = {c["id"]: c["name"] for c in json.loads(VAL_JSON.read_text())["categories"]}
    assert len(categories) == 80
    assert sorted(COCO_CATEGORY_NAMES) == list(range(1, 91))
    for category_id, name in COCO_CATEGORY_NAMES.items():
        assert name == categories.get(category_id, NA), category_id
    assert class_names_from_json(VAL_JSON) == categories
    assert coco_class_names(91) == {0: NA, **COCO_CATEGORY_NAMES}
    panoptic = coco_class_names(250)
    assert {k: panoptic[k] for k in range(91)} == coco_class_names(91)
    assert min(COCO_PANOPTIC_STUFF_NAMES) == 92 and max(COCO_PANOPTIC_STUFF_NAMES) == 200
    assert len(COCO_PANOPTIC_STUFF_NAMES) == 53  # 80 things + 53 stuff = COCO panoptic's 133 categories
    assert coco_class_names(4) is None


def test_class_names_from_metadata_json_or_ids(tiny_model, tmp_path):
    named = save_checkpoint(tiny_model, tmp_path / "named.safetensors",
                            metadata={"class_names": {"1": "rectangle", "2": "ellipse", "3": "triangle"}})
    detector = Detector.from_checkpoint(named, size=64, max_size=64)
    assert [detector.name(i) for i in range(5)] == ["0", "rectangle", "ellipse", "triangle", "4"]

    as_list = save_checkpoint(tiny_model, tmp_path / "list.safetensors", metadata={"class_names": ["bg", "a", "b"]})
    assert Detector.from_checkpoint(as_list).name(2) == "b"

    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 3, "name": "kite"}]}))
    from_json = Detector.from_checkpoint(named, class_names_from=dataset)
    assert (from_json.name(3), from_json.name(1)) == ("kite", "1")
    assert Detector.from_checkpoint(named, class_names={2: "two"}).name(2) == "two"

    bare = save_checkpoint(tiny_model, tmp_path / "bare.safetensors")
    assert Detector.from_checkpoint(bare).name(1) == "1"  # 4 classes: not COCO, no names

    # The names reach the detections.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    detections = detector(image, threshold=0.0)
    assert len(detections) == tiny_model.num_queries
    assert all(d.name == detector.name(d.label) for d in detections)


# --- detr predict ----------------------------------------------------------------------------


def test_expand_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.jpg", "a/y.PNG", "a/notes.txt", "z.jpg"):
        (tmp_path / name).write_bytes(b"")
    paths, unmatched = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.jpg"), str(tmp_path / "z.jpg"),
                                      str(tmp_path / "missing.jpg")])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a/x.jpg", "a/y.PNG", "z.jpg"]
    assert unmatched == [str(tmp_path / "missing.jpg")]
    assert output_stems([tmp_path / "a/x.jpg", tmp_path / "x.png", tmp_path / "y.png"]) == ["x", "x_2", "y"]


def test_predict_folder_with_a_corrupt_image(checkpoint, model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = ["000000000139.jpg", "000000000802.jpg", "000000011813.jpg"]
    for name in names:
        shutil.copy(VAL / name, images / name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["predict", str(images), "--checkpoint", checkpoint, "--out", str(out),
                                    "--threshold", "0", "--size", "128", "--max_size", "200", "--no_progress"])
    assert code != 0
    assert "broken.jpg" in stderr
    assert all(name not in stderr for name in names)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["images"] == 3 and summary["failed"] == [str(images / "broken.jpg")]

    # Each drawing is the image with the Python API's detections of it drawn by draw_detections (whose
    # pixels tests/test_visualize.py checks).
    detector = Detector(model, threshold=0.0, size=128, max_size=200)
    for name in names:
        image = detector.load(VAL / name)
        found = detector(image)
        expected = draw_detections(image, [d.box for d in found], [d.label for d in found], [d.score for d in found],
                                   detector.class_names)
        with Image.open(out / name.replace(".jpg", ".png")) as drawn:
            assert drawn.size == image.size and len(found) == 20
            assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(expected))
    assert not (out / "broken.png").exists()

    rows = json.loads((out / "predictions.json").read_text())
    assert len(rows) == 3 * 20  # threshold 0: every query of every readable image
    assert {row["file_name"] for row in rows} == set(names)
    for row in rows:
        assert set(row) >= {"file_name", "category_id", "bbox", "score"}
        assert len(row["bbox"]) == 4 and row["bbox"][2] >= 0 and row["bbox"][3] >= 0

    # The same numbers as the Python API (one image per batch, like the command).
    expected = Detector(model, threshold=0.0, size=128, max_size=200)(VAL / names[1])
    ours = [row for row in rows if row["file_name"] == names[1]]
    assert [row["score"] for row in ours] == [d.score for d in expected]
    assert [row["bbox"] for row in ours] == [list(d.box_xywh) for d in expected]
    assert [row["category_id"] for row in ours] == [d.label for d in expected]

    # With file names mapped to image ids it is a COCO results file.
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(VAL_JSON))
        ids = {image["file_name"]: image["id"] for image in coco.dataset["images"]}
        loaded = coco.loadRes([{**row, "image_id": ids[row["file_name"]]} for row in rows])
    assert len(loaded.anns) == len(rows)
    assert {ann["image_id"] for ann in loaded.anns.values()} == {ids[name] for name in names}


def test_predict_panoptic_writes_segments(panoptic_checkpoint, tmp_path):
    name = "000000000802.jpg"
    out = tmp_path / "out"
    code, _, stderr = run_cli(["predict", str(VAL / name), "--checkpoint", panoptic_checkpoint, "--out", str(out),
                               "--threshold", "0", "--panoptic_threshold", "0", "--size", "96", "--max_size", "160"])
    assert code == 0, stderr
    stem = name.removesuffix(".jpg")
    info = json.loads((out / f"{stem}_segments.json").read_text())
    assert info["file_name"] == name and len(info["segments_info"]) >= 1
    with Image.open(VAL / name) as original:
        size = original.size
    for suffix in ("", "_panoptic", "_segments"):
        with Image.open(out / f"{stem}{suffix}.png") as image:
            assert image.size == size
    with Image.open(out / f"{stem}_segments.png") as ids_png:
        rgb = np.asarray(ids_png.convert("RGB")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    assert set(np.unique(ids).tolist()) == {s["id"] for s in info["segments_info"]}
    areas = {s["id"]: s["area"] for s in info["segments_info"]}
    assert all(int((ids == i).sum()) == area for i, area in areas.items())


def test_bf16_precision_stays_close_to_fp32(reference, checkpoint):
    """precision="bf16" (autocast) on the fixture's images: every query's normalized box within 1e-2 of
    fp32, every class probability within 2e-3, fp32's best detection scored as bf16's best (to that
    tolerance: the fixture model's scores are close to uniform, so exact ties can break either way under
    bf16's 8-bit mantissa on CPUs with native bf16 arithmetic), outputs back in float32."""
    fp32 = Detector.from_checkpoint(checkpoint, **FIXTURE_SIZE)
    bf16 = Detector.from_checkpoint(checkpoint, precision="bf16", **FIXTURE_SIZE)
    for name in reference["image_files"]:
        image = fp32.load(VAL / name)
        with torch.inference_mode():
            a, _ = fp32._forward(fp32.model, [image])
            b, _ = bf16._forward(bf16.model, [image])
        assert b["pred_boxes"].dtype == torch.float32
        assert (a["pred_boxes"] - b["pred_boxes"]).abs().max() < 1e-2
        prob_a, prob_b = a["pred_logits"].softmax(-1)[..., :-1], b["pred_logits"].softmax(-1)[..., :-1]
        diff = (prob_a - prob_b).abs().max().item()
        assert diff < 2e-3, diff
        assert prob_b.flatten()[prob_a.flatten().argmax()] >= prob_b.max() - 2 * diff
    with pytest.raises(ValueError, match="precision"):
        Detector.from_checkpoint(checkpoint, precision="int8")
