from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO

from detr.boxes import masks_to_boxes_xyxy
from detr.data import SHAPES_CATEGORIES, build_coco, generate_shapes

PARAMS = {"num_train": 12, "num_val": 4, "image_size": 96, "seed": 3}


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), **PARAMS)


def test_generation_is_deterministic(shapes_root, tmp_path):
    again = generate_shapes(tmp_path / "again", **PARAMS)
    first, second = _files(shapes_root), _files(again)
    assert len(first) == PARAMS["num_train"] + PARAMS["num_val"] + 3  # images, two jsons, params
    assert first == second
    other = _files(generate_shapes(tmp_path / "other", **{**PARAMS, "seed": 4}))
    assert other["train2017/000000.png"] != first["train2017/000000.png"]


def test_generation_is_idempotent(shapes_root):
    stamps = {p: p.stat().st_mtime_ns for p in shapes_root.rglob("*") if p.is_file()}
    generate_shapes(shapes_root, **PARAMS)
    assert {p: p.stat().st_mtime_ns for p in shapes_root.rglob("*") if p.is_file()} == stamps


def test_changed_parameters_regenerate(tmp_path):
    root = generate_shapes(tmp_path / "s", **{**PARAMS, "num_train": 2, "num_val": 1})
    generate_shapes(root, **{**PARAMS, "num_train": 3, "num_val": 1})
    train = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert len(train["images"]) == 3 and (root / "train2017" / "000002.png").is_file()
    assert json.loads((root / "shapes_params.json").read_text())["num_train"] == 3


def test_refuses_foreign_coco_folder(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(FileExistsError):
        generate_shapes(tmp_path, **PARAMS)


def test_annotations_load_and_masks_match_boxes(shapes_root):
    for split, count in (("train", PARAMS["num_train"]), ("val", PARAMS["num_val"])):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(shapes_root / "annotations" / f"instances_{split}2017.json"))
        assert len(coco.imgs) == count
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [c["name"] for c in SHAPES_CATEGORIES]
        for image_id in coco.imgs:
            anns = coco.imgToAnns[image_id]
            assert 1 <= len(anns) <= 4
            assert {a["category_id"] for a in anns} <= {1, 2, 3}
            assert all(a["iscrowd"] == 0 and isinstance(a["segmentation"], list) for a in anns)

        dataset = build_coco(shapes_root, split, return_masks=True)
        assert dataset.num_classes == 4
        for index in range(len(dataset)):
            image, target = dataset[index]
            size = PARAMS["image_size"]
            assert image.size == (size, size)
            masks, boxes = target["masks"], target["boxes"]
            assert len(boxes) == len(coco.imgToAnns[dataset.ids[index]])  # nothing clipped away
            mask_boxes = masks_to_boxes_xyxy(masks)
            mask_boxes[:, 2:] += 1  # last pixel index -> right/bottom edge
            # within 2 px: a triangle's tip thinner than a pixel is not rasterized
            assert (mask_boxes - boxes).abs().max() <= 2.0
            # area is the rasterized polygon area
            torch.testing.assert_close(target["area"], masks.flatten(1).sum(1).float())
            # little overlap: every shape keeps most of its box to itself
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    lo = torch.max(boxes[i, :2], boxes[j, :2])
                    hi = torch.min(boxes[i, 2:], boxes[j, 2:])
                    inter = (hi - lo).clamp(min=0).prod()
                    smaller = min((boxes[k, 2:] - boxes[k, :2]).prod() for k in (i, j))
                    assert inter <= 0.16 * smaller

