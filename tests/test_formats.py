"""YOLO and Pascal VOC datasets: read as COCO annotations, converted both ways, scored the same, and
bad input named by file and line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.cocoeval import COCOeval

from conftest import COCO_MINI
from detr.cli import main
from detr.data.coco import coco_api, load_coco
from detr.data.formats import convert, detect_format, load_split
from detr.data.shapes import generate_shapes

VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"
VAL_IMAGES = COCO_MINI / "val2017"


def fixed_predictions(gt: dict, seed: int = 0) -> list[dict]:
    """One fixed set of detections on coco-mini val: jittered ground-truth boxes (some with the wrong class)
    and false positives, with scores; by file name and category name, so any layout's ids can be used."""
    rng = random.Random(seed)
    files = {i["id"]: i["file_name"] for i in gt["images"]}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    predictions = []
    for a in sorted(gt["annotations"], key=lambda a: a["id"]):
        x, y, w, h = a["bbox"]
        jitter = [rng.gauss(0, 0.08) for _ in range(4)]
        box = [x + jitter[0] * w, y + jitter[1] * h, w * (1 + jitter[2]), h * (1 + jitter[3])]
        name = names[a["category_id"]] if rng.random() > 0.15 else rng.choice(sorted(names.values()))
        predictions.append({"file": files[a["image_id"]], "name": name, "bbox": box, "score": rng.random()})
        if rng.random() < 0.5:  # a false positive nearby
            predictions.append({"file": files[a["image_id"]], "name": names[a["category_id"]],
                                "bbox": [x + w * 0.6, y + h * 0.6, w, h], "score": rng.random() * 0.8})
    return predictions


def coco_ap(gt: dict, predictions: list[dict]) -> list[float]:
    """AP, AP50, AP75 (all areas) of the predictions against a COCO-format dict."""
    ids = {Path(i["file_name"]).name: i["id"] for i in gt["images"]}
    cats = {c["name"]: c["id"] for c in gt["categories"]}
    results = [{"image_id": ids[p["file"]], "category_id": cats[p["name"]], "bbox": p["bbox"], "score": p["score"]}
               for p in predictions]
    coco_gt = coco_api(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:3]]


def test_coco_mini_through_yolo_and_voc_scores_the_same(tmp_path, capsys):
    original = json.loads(VAL_JSON.read_text())
    predictions = fixed_predictions(original)
    expected = coco_ap(original, predictions)
    assert 0.2 < expected[0] < 0.9  # a score with room to move either way
    without_crowd = {**original, "annotations": [a for a in original["annotations"] if not a["iscrowd"]]}
    expected_without_crowd = coco_ap(without_crowd, predictions)
    assert expected_without_crowd != expected  # the crowd regions matter for these predictions

    # COCO -> YOLO: YOLO has no crowd flag, so crowd annotations are left out (and counted)
    assert main(["data", "convert", str(VAL_JSON), "--images", str(VAL_IMAGES), "--to", "yolo", "--split", "val",
                 "--out", str(tmp_path / "yolo")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 79 and summary["crowd_left_out"] == 5 and summary["boxes"] == 619
    assert detect_format(tmp_path / "yolo") == "yolo"
    yolo = load_split(tmp_path / "yolo", "val")
    assert yolo.format == "yolo" and yolo.counts["images"] == 79 and yolo.counts["boxes"] == 619
    assert yolo.counts["background_images"] == sum(
        1 for i in original["images"] if not any(a["image_id"] == i["id"] and not a["iscrowd"]
                                                 for a in original["annotations"]))
    assert coco_ap(yolo.dataset, predictions) == pytest.approx(expected_without_crowd, abs=1e-9)
    # YOLO -> COCO json (the file other tools read) scores exactly as the YOLO folder itself
    assert main(["data", "convert", "--from", "yolo", str(tmp_path / "yolo"), "--split", "val",
                 "--out", str(tmp_path / "from_yolo.json")]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["images_dir"] == str(tmp_path / "yolo" / "images" / "val")
    from_yolo = load_coco(tmp_path / "from_yolo.json").dataset
    assert coco_ap(from_yolo, predictions) == coco_ap(yolo.dataset, predictions)

    # COCO -> VOC: crowd annotations become difficult objects, which COCO evaluation ignores again
    assert main(["data", "convert", str(VAL_JSON), "--images", str(VAL_IMAGES), "--to", "voc", "--split", "val",
                 "--out", str(tmp_path / "voc")]) == 0
    assert json.loads(capsys.readouterr().out)["difficult"] == 5
    voc = load_split(tmp_path / "voc", "val")
    assert voc.format == "voc" and voc.counts["difficult"] == 5 and voc.counts["boxes"] == 624
    assert coco_ap(voc.dataset, predictions) == pytest.approx(expected, abs=1e-9)
    assert convert(tmp_path / "voc", tmp_path / "from_voc.json", split="val")["boxes"] == 624
    assert coco_ap(load_coco(tmp_path / "from_voc.json").dataset, predictions) == coco_ap(voc.dataset, predictions)
    # same class names in the same order everywhere (class id = position)
    names = [c["name"] for c in sorted(original["categories"], key=lambda c: c["id"])]
    for converted in (yolo.dataset, voc.dataset, from_yolo):
        assert [c["name"] for c in converted["categories"]] == names
        assert [c["id"] for c in converted["categories"]] == list(range(80))


def test_train_and_evaluate_on_a_yolo_folder(tmp_path, capsys):
    shapes = generate_shapes(tmp_path / "shapes", num_train=8, num_val=4, image_size=64, seed=3)
    for split in ("train", "val"):
        convert(shapes / "annotations" / f"instances_{split}2017.json", tmp_path / "yolo", from_format="coco",
                to="yolo", split=split, images=shapes / f"{split}2017")
    out = tmp_path / "run"
    code = main(["train", "--coco_path", str(tmp_path / "yolo"), "--preset", "shapes-small", "--hidden_dim", "32",
                 "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "5",
                 "--train_scales", "64", "--val_scale", "64", "--max_size", "96", "--num_workers", "0",
                 "--no_progress", "--epochs", "1", "--output_dir", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "bbox_AP" in record
    from detr.checkpoint import read_checkpoint

    saved = read_checkpoint(out / "model.safetensors")
    assert saved.config.num_classes == 3  # YOLO classes 0..2: the head has 3 + 1 outputs
    assert saved.metadata["class_names"] == {"0": "rectangle", "1": "ellipse", "2": "triangle"}
    code = main(["eval", "--checkpoint", str(out / "model.safetensors"), "--coco_path", str(tmp_path / "yolo"),
                 "--dataset_format", "yolo", "--val_scale", "64", "--max_size", "96", "--num_workers", "0",
                 "--no_progress", "--output_dir", str(tmp_path / "eval")])
    assert code == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 4


# --- bad input is named ---------------------------------------------------------------------------

def yolo_folder(root: Path, labels: dict[str, str], names: str = "cat\ndog\n", size=(40, 20)) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text(names)
    for stem, text in labels.items():
        Image.new("RGB", size).save(root / "images" / "train" / f"{stem}.png")
        if text is not None:
            (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    return root


def test_yolo_labels_read_clipped_and_counted(tmp_path, caplog):
    root = yolo_folder(tmp_path, {
        "a": "0 0.5 0.5 0.5 0.5\n\n1 0.9 0.5 0.4 1.2\n",  # the second reaches outside the image: clipped
        "b": None,  # no label file: a background image
        "c": "1 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n",  # a polygon (segmentation label)
        "d": "0 1.5 0.5 0.2 0.2\n",  # entirely outside: nothing left, dropped
    })
    with caplog.at_level(logging.INFO, logger="detr.data.formats"):
        loaded = load_split(root, "train")
    counts = loaded.counts
    assert (counts["images"], counts["boxes"], counts["background_images"]) == (4, 3, 2)
    assert counts["clipped"] == 1 and counts["first_clipped"] == f"{root / 'labels/train/a.txt'}:3"
    assert counts["degenerate_dropped"] == 1 and counts["first_degenerate"] == f"{root / 'labels/train/d.txt'}:1"
    assert "2 background images" in caplog.text and "1 boxes clipped to their image" in caplog.text
    boxes = {(a["image_id"], a["category_id"]): a for a in loaded.dataset["annotations"]}
    assert boxes[(1, 0)]["bbox"] == pytest.approx([10, 5, 20, 10])
    assert boxes[(1, 1)]["bbox"] == pytest.approx([28, 0, 12, 20])  # x 28..44 -> 28..40, y -4..24 -> 0..20
    polygon = boxes[(3, 1)]
    assert polygon["bbox"] == pytest.approx([4, 2, 16, 10]) and polygon["area"] == pytest.approx(160)
    assert polygon["segmentation"] == [pytest.approx([4, 2, 20, 2, 20, 12, 4, 12])]


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("0 0.5 0.5 0.5 0.5\n1 0.5 0.5 0.5\n", r"a.txt:2: expected 5 numbers \(class cx cy w h\) or a polygon"),
        ("2 0.5 0.5 0.5 0.5\n", r"a.txt:1: class id 2 is not one of the 2 classes of .*classes.txt \(0..1\)"),
        ("0 0.5 zero 0.5 0.5\n", r"a.txt:1: 'zero' is not a number"),
    ],
    ids=["four-numbers", "class-outside-names", "not-a-number"],
)
def test_bad_yolo_label_lines_name_file_and_line(tmp_path, label, message):
    root = yolo_folder(tmp_path, {"a": label})
    with pytest.raises(ValueError, match=message):
        load_split(root, "train")


def test_bad_yolo_yaml_and_layouts(tmp_path, capsys):
    root = yolo_folder(tmp_path / "y", {"a": "0 0.5 0.5 0.5 0.5\n"})
    (root / "data.yaml").write_text("train: images/train\nnames: [cat, dog\n")
    with pytest.raises(ValueError, match=r"data.yaml:3:1: invalid YAML"):
        load_split(root, "train")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    with pytest.raises(FileNotFoundError, match=r"YOLO image source not found: .*images/val"):
        load_split(root, "val")
    (root / "Annotations").mkdir()
    with pytest.raises(ValueError, match=r"fits more than one dataset layout \(yolo, voc\): pass --dataset_format"):
        detect_format(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset layout recognized"):
        detect_format(tmp_path / "empty")
    assert main(["train", "--coco_path", str(tmp_path / "empty"), "--epochs", "1"]) == 1
    assert "Pascal VOC (Annotations/" in capsys.readouterr().err


def voc_folder(root: Path, xml: str, split: str = "train") -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations" / "img1.xml").write_text(xml)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("img1\n")
    return root


GOOD_OBJECT = "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>30</ymax></bndbox>" \
              "</object>"


def test_voc_annotations_read(tmp_path):
    xml = (f"<annotation>\n<filename>img1.jpg</filename>\n<size><width>20</width><height>20</height></size>\n"
           f"{GOOD_OBJECT}\n<object><name>cat</name><difficult>1</difficult><bndbox><xmin>5</xmin><ymin>5</ymin>"
           "<xmax>8</xmax><ymax>9</ymax></bndbox></object>\n</annotation>\n")
    loaded = load_split(voc_folder(tmp_path, xml), "train")
    a, b = loaded.dataset["annotations"]
    assert a["bbox"] == [0, 0, 10, 20] and a["category_id"] == 11 and a["iscrowd"] == 0  # VOC's 'dog', clipped
    assert b["bbox"] == [4, 4, 4, 5] and b["iscrowd"] == 1 and b["category_id"] == 7  # difficult: ignored
    assert loaded.counts["clipped"] == 1 and loaded.counts["first_clipped"].endswith("img1.xml:4")
    assert loaded.image_dir == tmp_path / "JPEGImages"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (f"<annotation>\n<filename>x.jpg</filename>\n{GOOD_OBJECT}\n</annotation>", r"img1.xml:1: no <size> element"),
        ("<annotation>\n<size><width>20</width><height>20</height></size>\n<object><name>dog</name><bndbox>"
         "<xmin>1</xmin><ymin>one</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></object></annotation>",
         r"img1.xml:3: <ymin> is 'one', not a number"),
        ("<annotation>\n<size><width>20</width>\n</annotation>", r"img1.xml:3:3: not well-formed XML"),
        ("<annotation>\n<size><width>20</width><height>20</height></size>\n<object>\n<bndbox/></object></annotation>",
         r"img1.xml:3: <object> has no <name>"),
    ],
    ids=["no-size", "bad-number", "malformed", "no-name"],
)
def test_bad_voc_annotations_name_file_and_line(tmp_path, xml, message):
    with pytest.raises(ValueError, match=message):
        load_split(voc_folder(tmp_path, xml), "train")


def test_voc_split_names_and_unknown_class(tmp_path):
    xml = f"<annotation><size><width>20</width><height>20</height></size>{GOOD_OBJECT}</annotation>"
    root = voc_folder(tmp_path, xml, split="trainval")
    assert load_split(root, "train").counts["images"] == 1  # train falls back to trainval
    with pytest.raises(FileNotFoundError, match=r"Main/val.txt \(splits here: \['trainval'\]\)"):
        load_split(root, "val", split_name="val")
    (root / "classes.txt").write_text("cat\nbird\n")
    with pytest.raises(ValueError, match=r"img1.xml:1: class 'dog' is not one of the 2 classes of .*classes.txt"):
        load_split(root, "train")


def test_json_syntax_error_names_the_file(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    bad = tmp_path / "annotations" / "instances_train2017.json"
    bad.write_text('{"images": [],\n  "annotations": [,]}\n')
    assert main(["train", "--coco_path", str(tmp_path), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:19: invalid JSON in this annotation file" in err
    with pytest.raises(ValueError, match=rf"{bad}:2:19"):
        load_coco(bad)


def test_yolo_labels_describe_the_image_as_shown(tmp_path):
    # stored pixels: a white square bottom-right; EXIF orientation 3 (rotated 180) shows it top-left,
    # where the label (Ultralytics' convention: the shown image) puts the box
    root = yolo_folder(tmp_path, {"a": "0 0.25 0.25 0.5 0.5\n"}, size=(40, 20))
    stored = Image.new("RGB", (40, 20))
    stored.paste((255, 255, 255), (20, 10, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 3
    stored.save(root / "images" / "train" / "a.jpg", exif=exif.tobytes(), quality=95)
    (root / "images" / "train" / "a.png").unlink()
    from detr.data.coco import CocoDetection

    loaded = load_split(root, "train")
    dataset = CocoDetection(loaded.image_dir, loaded.source, coco=loaded.coco)
    image, target = dataset[0]
    x0, y0, x1, y1 = (int(v) for v in target["boxes"][0].tolist())
    pixels = image.crop((x0 + 2, y0 + 2, x1 - 2, y1 - 2)).convert("L").getextrema()
    assert (x0, y0, x1, y1) == (0, 0, 20, 10) and pixels[0] > 200  # white under the box
