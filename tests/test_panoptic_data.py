"""COCO panoptic data: the instances -> panoptic converter on coco-mini, CocoPanoptic, the layout, bad inputs."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from conftest import COCO_MINI
from detr.cli.data import add_parsers as add_data_parsers
from detr.data import CocoDetection, ImageLoadError, make_coco_transforms
from detr.data.panoptic import (
    CocoPanoptic,
    build_coco_panoptic,
    coco_panoptic_paths,
    panoptic_from_instances,
    read_segment_ids,
)

VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"
VAL_IMAGES = COCO_MINI / "val2017"
NUM_OTHER_IMAGES = 9  # besides the 5 val images with crowd annotations
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
TARGET_DTYPES = {
    "masks": torch.bool,
    "labels": torch.int64,
    "boxes": torch.float32,
    "iscrowd": torch.int64,
    "area": torch.float32,
    "image_id": torch.int64,
    "orig_size": torch.int64,
    "size": torch.int64,
}


def subset_instances(path: Path) -> Path:
    """coco-mini val restricted to the images with crowd annotations plus the first few others."""
    data = json.loads(VAL_JSON.read_text())
    crowd = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    others = sorted(i["id"] for i in data["images"] if i["id"] not in crowd)[:NUM_OTHER_IMAGES]
    keep = crowd | set(others)
    data["images"] = [i for i in data["images"] if i["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("panoptic")
    instances = subset_instances(root / "instances.json")
    summary = panoptic_from_instances(instances, root / "panoptic.json", root / "png")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(instances))
    return {"root": root, "instances": instances, "json": root / "panoptic.json", "png": root / "png",
            "summary": summary, "coco": coco, "panoptic": json.loads((root / "panoptic.json").read_text())}


def expected_owner(coco: COCO, image_id: int) -> tuple[np.ndarray, list[int]]:
    """The converter's painting rule derived independently, per pixel: the covering non-crowd annotation
    with the fewest pixels (ties: the higher annotation id), else the covering crowd annotation of the
    highest category id. Returns an index map [H, W] into the returned annotation ids (-1: nothing)."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])  # [A, H, W]
    areas = masks.reshape(len(anns), -1).sum(1)
    # Priority: non-crowd beats crowd; then fewer pixels; then higher id (crowd: higher category).
    keys = [(0, a["category_id"], 0) if a["iscrowd"] else (1, -int(areas[i]), a["id"]) for i, a in enumerate(anns)]
    rank = np.empty(len(anns), dtype=np.int64)
    rank[sorted(range(len(anns)), key=lambda i: keys[i])] = np.arange(len(anns))
    scored = np.where(masks, rank[:, None, None], -1)  # [A, H, W]
    best = scored.max(0)
    owner = np.where(best >= 0, np.argsort(rank)[np.maximum(best, 0)], -1)
    return owner, [a["id"] for a in anns]


def test_converter_paints_disjoint_segments_by_the_documented_rule(converted):
    data, coco = converted["panoptic"], converted["coco"]
    assert [c["id"] for c in data["categories"]] == [c["id"] for c in coco.dataset["categories"]]
    assert all(c["isthing"] == 1 for c in data["categories"])
    assert [a["image_id"] for a in data["annotations"]] == sorted(coco.getImgIds())
    crowd_anns = {a["id"]: a for a in coco.dataset["annotations"] if a["iscrowd"]}
    assert len(crowd_anns) == 5
    seen_crowd: set[int] = set()
    for entry in data["annotations"]:
        image_id = entry["image_id"]
        ids = read_segment_ids(converted["png"] / entry["file_name"])
        info = coco.imgs[image_id]
        assert entry["file_name"] == info["file_name"].replace(".jpg", ".png")
        assert ids.shape == (info["height"], info["width"])
        listed = [s["id"] for s in entry["segments_info"]]
        assert len(set(listed)) == len(listed) and 0 not in listed
        assert set(np.unique(ids).tolist()) - {0} == set(listed)

        owner, ann_ids = expected_owner(coco, image_id)
        expected = np.full(ids.shape, -1, dtype=np.int64)
        for segment in entry["segments_info"]:
            pixels = ids == segment["id"]
            assert segment["area"] == int(pixels.sum()) > 0
            rows, cols = np.nonzero(pixels)
            assert segment["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            sources = [coco.anns[i] for i in segment["annotation_ids"]]
            assert {a["category_id"] for a in sources} == {segment["category_id"]}
            if segment["iscrowd"]:
                assert all(a["iscrowd"] for a in sources)
                seen_crowd.update(segment["annotation_ids"])
            else:
                assert len(sources) == 1 and not sources[0]["iscrowd"]
            for ann_id in segment["annotation_ids"]:
                expected[(owner == ann_ids.index(ann_id)) & pixels] = segment["id"]
        expected[owner < 0] = 0
        np.testing.assert_array_equal(expected, ids)  # every pixel where the rule says, nothing else
    assert seen_crowd == set(crowd_anns)
    summary = converted["summary"]
    assert summary["images"] == len(coco.getImgIds())
    assert summary["crowd_segments"] == 5  # one crowd annotation per (image, category) here
    assert summary["segments"] + summary["dropped_covered"] + summary["dropped_empty"] == len(coco.anns)
    assert summary["skipped_annotations"] == summary["skipped_images"] == 0


def test_dataset_round_trip_gives_the_instance_masks_where_not_overlapped(converted):
    coco = converted["coco"]
    dataset = CocoPanoptic(VAL_IMAGES, converted["json"], converted["png"])
    assert dataset.ids == sorted(coco.getImgIds())
    assert dataset.num_classes == 91 and all(dataset.is_thing.values())
    for index in (0, 1, 3):  # three of the crowd images
        image, target = dataset[index]
        assert {k: v.dtype for k, v in target.items()} == TARGET_DTYPES
        image_id = int(target["image_id"])
        entry = dataset.annotations[image_id]
        n = len(entry["segments_info"])
        assert target["masks"].shape == (n, image.size[1], image.size[0])
        assert target["masks"].sum(0).max() <= 1  # disjoint
        assert target["orig_size"].tolist() == target["size"].tolist() == [image.size[1], image.size[0]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        instance_masks = {a["id"]: torch.from_numpy(coco.annToMask(a).astype(bool)) for a in anns}
        covered = torch.stack(list(instance_masks.values())).sum(0)  # how many annotations cover a pixel
        for k, segment in enumerate(entry["segments_info"]):
            mask = target["masks"][k]
            assert int(target["labels"][k]) == segment["category_id"]
            assert int(target["iscrowd"][k]) == segment["iscrowd"]
            assert float(target["area"][k]) == segment["area"] == int(mask.sum())
            x, y, w, h = segment["bbox"]
            assert target["boxes"][k].tolist() == [x, y, x + w - 1, y + h - 1]
            if not segment["iscrowd"]:
                (ann_id,) = segment["annotation_ids"]
                alone = covered == 1
                assert torch.equal(mask & alone, instance_masks[ann_id] & alone)
                assert bool((mask <= instance_masks[ann_id]).all())  # never outside its instance


def test_transforms_and_seeds_follow_coco_detection(converted):
    transforms = make_coco_transforms("train", scales=[96, 128], max_size=200)
    panoptic = CocoPanoptic(VAL_IMAGES, converted["json"], converted["png"], transforms=transforms, seed=3)
    detection = CocoDetection(VAL_IMAGES, converted["instances"], transforms=transforms, seed=3)
    assert panoptic.ids == detection.ids
    for index in range(4):
        image, target = panoptic[index]
        n = target["labels"].shape[0]
        h, w = image.shape[1:]
        assert target["size"].tolist() == [h, w] and max(h, w) <= 200
        assert target["masks"].shape == (n, h, w)
        assert target["boxes"].shape == (n, 4) and target["iscrowd"].shape == target["area"].shape == (n,)
        assert bool(((target["boxes"] >= 0) & (target["boxes"] <= 1)).all())  # normalized cxcywh
        # The same seed, epoch and index draw the same augmentation as the detection dataset.
        torch.testing.assert_close(image, detection[index][0], rtol=0, atol=0)
        again, _ = panoptic[index]
        torch.testing.assert_close(image, again, rtol=0, atol=0)
    first = panoptic[0][0]
    changed = False
    for epoch in range(1, 6):
        panoptic.set_epoch(epoch)
        changed |= panoptic[0][0].shape != first.shape or not torch.equal(panoptic[0][0], first)
    assert changed

    val = CocoPanoptic(VAL_IMAGES, converted["json"], converted["png"], return_masks=False,
                       transforms=make_coco_transforms("val", scales=[64], max_size=100))
    image, target = val[2]
    assert "masks" not in target and min(image.shape[1:]) == 64
    assert target["orig_size"].tolist() == list(read_segment_ids(val.segments_path(2)).shape)


def test_standard_layout(converted, tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(VAL_IMAGES)
    (root / "annotations" / "panoptic_val2017.json").write_text(converted["json"].read_text())
    with pytest.raises(FileNotFoundError, match="panoptic_val2017"):
        build_coco_panoptic(root, "val")
    (root / "panoptic_val2017").symlink_to(converted["png"])  # the reference README's place
    assert coco_panoptic_paths(root, "val")[2] == root / "panoptic_val2017"
    assert len(build_coco_panoptic(root, "val")) == converted["summary"]["images"]
    (root / "annotations" / "panoptic_val2017").symlink_to(converted["png"])  # the official zip's place wins
    assert coco_panoptic_paths(root, "val")[2] == root / "annotations" / "panoptic_val2017"
    with pytest.raises(ValueError, match="split"):
        coco_panoptic_paths(root, "test")


def test_bad_inputs_are_counted_or_named(converted, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        panoptic_from_instances(tmp_path / "nowhere.json", tmp_path / "o.json", tmp_path / "o")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        panoptic_from_instances(tmp_path / "broken.json", tmp_path / "o.json", tmp_path / "o")

    images = [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 6}, {"id": 2, "file_name": "b.jpg"}]
    square = [[1, 1, 5, 1, 5, 4, 1, 4]]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": square, "bbox": [1, 1, 4, 3]},
        {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": {"counts": "??", "size": [1]}},
        {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": []},  # empty mask
        {"id": 13, "image_id": 99, "category_id": 3, "iscrowd": 0, "segmentation": square},  # unknown image
        {"id": 9, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": square},  # a tie with 10
    ]
    data = {"images": images[:1], "annotations": anns, "categories": [{"id": 3, "name": "c"}]}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    summary = panoptic_from_instances(path, tmp_path / "p.json", tmp_path / "p")
    counts = ("segments", "skipped_annotations", "dropped_empty", "dropped_covered")
    assert tuple(summary[k] for k in counts) == (1, 2, 1, 1)
    (segment,) = json.loads((tmp_path / "p.json").read_text())["annotations"][0]["segments_info"]
    assert segment["annotation_ids"] == [10] and segment["area"] == 12  # equal areas: the higher id on top

    data["images"] = images  # image 2 has no size: the json alone cannot say how big its PNG is
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"tiny.json.*image 2"):
        panoptic_from_instances(path, tmp_path / "p.json", tmp_path / "p")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 6)).save(folder / "a.jpg")
    summary = panoptic_from_instances(path, tmp_path / "p.json", tmp_path / "p", image_dir=folder)
    assert (summary["images"], summary["skipped_images"]) == (1, 1)  # b.jpg is missing
    data["annotations"].append({"id": 14, "image_id": 1, "category_id": 5, "iscrowd": 0, "segmentation": square})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"tiny.json.*\[5\]"):
        panoptic_from_instances(path, tmp_path / "p.json", tmp_path / "p", image_dir=folder)

    # The dataset names a missing PNG, or skips it and counts it.
    png = tmp_path / "png"
    png.mkdir()
    for name in ("000000000139.png",):
        (png / name).write_bytes((converted["png"] / name).read_bytes())
    dataset = CocoPanoptic(VAL_IMAGES, converted["json"], png)
    with pytest.raises(ImageLoadError, match="000000000802.png"):
        dataset[1]
    dataset = CocoPanoptic(VAL_IMAGES, converted["json"], png, skip_bad_images=True)
    assert dataset[0] is not None and dataset[1] is None and dataset.skipped == 1
    Image.new("L", (4, 4)).save(png / "000000000802.png")
    with pytest.raises(ImageLoadError, match="mode L"):
        CocoPanoptic(VAL_IMAGES, converted["json"], png)[1]


def test_cli_converts_and_prints_a_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="detr")
    add_data_parsers(parser.add_subparsers(dest="command", required=True))
    instances = subset_instances(tmp_path / "instances.json")
    args = parser.parse_args(["data", "panoptic-from-instances", "--instances", str(instances),
                              "--out-json", str(tmp_path / "out.json"), "--out-folder", str(tmp_path / "out")])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 5 + NUM_OTHER_IMAGES == len(list((tmp_path / "out").glob("*.png")))
    assert json.loads((tmp_path / "out.json").read_text())["annotations"][0]["segments_info"]
