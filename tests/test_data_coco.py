from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from conftest import COCO_MINI
from detr.data import (
    CocoDetection,
    ImageLoadError,
    build_coco,
    collate_detection,
    load_image,
    make_coco_transforms,
)
from detr.data.transforms import Compose, Normalize, ToTensor

TARGET_KEYS = ["boxes", "labels", "masks", "image_id", "area", "iscrowd", "orig_size", "size"]
TARGET_DTYPES = {
    "boxes": torch.float32,
    "labels": torch.int64,
    "masks": torch.bool,
    "image_id": torch.int64,
    "area": torch.float32,
    "iscrowd": torch.int64,
    "orig_size": torch.int64,
    "size": torch.int64,
}
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 42, "name": "answer"}]
BAD_FILES = ["missing.jpg", "corrupt.jpg", "truncated.jpg", "exif_bad.png"]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _rectangle_rle(x0: int, y0: int, x1: int, y1: int, height: int, width: int) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask_utils.encode(np.asfortranarray(mask))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny COCO-format dataset exercising every corner case; returns its folder (images/, tiny.json)."""
    root = tmp_path_factory.mktemp("tiny_coco")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)

    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(images / "rgb.jpg", quality=95)
    Image.new("CMYK", (20, 10), (255, 0, 0, 0)).save(images / "cmyk.jpg", quality=95)  # pure cyan
    Image.new("L", (20, 10), 100).save(images / "gray.png")
    Image.new("RGBA", (20, 10), (10, 20, 30, 0)).save(images / "rgba.png")
    Image.fromarray(np.full((10, 20), 100 * 257, dtype=np.uint16)).save(images / "gray16.png")
    # stored 40 wide x 20 high, left half red, right half blue; orientation 6 = display rotated 90 deg CW
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20, 0] = 255
    stored[:, 20:, 2] = 255
    for name in ("exif_rot.png", "exif_raw.png", "exif_bad.png"):
        Image.fromarray(stored).save(images / name, exif=_exif(6))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(range(256)))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    sizes = {  # file -> (width, height) as the json states them
        "rgb.jpg": (40, 30),
        "cmyk.jpg": (20, 10),
        "gray.png": (20, 10),
        "rgba.png": (20, 10),
        "gray16.png": (20, 10),
        "exif_rot.png": (20, 40),  # annotated upright: matches only after the EXIF rotation
        "exif_raw.png": (40, 20),  # annotated as stored
        "exif_bad.png": (30, 30),  # matches neither
        "missing.jpg": (40, 30),
        "corrupt.jpg": (40, 30),
        "truncated.jpg": (64, 64),
    }
    json_images = [
        {"id": 100 + i, "file_name": name, "width": w, "height": h} for i, (name, (w, h)) in enumerate(sizes.items())
    ]
    rle = _rectangle_rle(20, 2, 26, 6, 30, 40)
    rle["counts"] = rle["counts"].decode()  # compressed RLE as it appears in json
    crowd_mask = np.zeros((30, 40), dtype=np.uint8)
    crowd_mask[0:20, 0:20] = 1
    crowd_counts = _uncompressed_counts(crowd_mask)
    annotations = [
        _annotation([5, 5, 10, 8], 3, 80.0, [[5, 5, 15, 5, 15, 13, 5, 13]]),  # kept as is
        _annotation([0, 0, 20, 20], 7, 400.0, {"counts": crowd_counts, "size": [30, 40]}, iscrowd=1),  # dropped
        _annotation([30, 20, 20, 20], 42, 100.0, [[30, 20, 40, 20, 40, 30, 30, 30]]),  # clipped to 40 x 30
        _annotation([50, 5, 10, 10], 3, 100.0, [[50, 5, 60, 5, 60, 15, 50, 15]]),  # right of the image
        _annotation([10, 10, 0, 5], 7, 0.0, [[10, 10, 10, 15, 10, 12]]),  # zero width: dropped
        _annotation([20, 2, 6, 4], 7, 24.0, rle, iscrowd=None),  # compressed RLE, no iscrowd key
    ]
    for i, annotation in enumerate(annotations):
        annotation.update(id=i + 1, image_id=100)
    annotations.append(dict(_annotation([1, 1, 5, 5], 42, 25.0, [[1, 1, 6, 1, 6, 6, 1, 6]]), id=99, image_id=101))
    dataset = {"images": json_images, "annotations": annotations, "categories": CATEGORIES}
    (root / "tiny.json").write_text(json.dumps(dataset))
    return root


def _annotation(bbox: list, category_id: int, area: float, segmentation, iscrowd: int | None = 0) -> dict:
    annotation = {"bbox": bbox, "category_id": category_id, "area": area, "segmentation": segmentation}
    if iscrowd is not None:
        annotation["iscrowd"] = iscrowd
    return annotation


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def _tiny_dataset(tiny: Path, **kwargs) -> CocoDetection:
    return CocoDetection(tiny / "images", tiny / "tiny.json", **kwargs)


def _item(dataset: CocoDetection, file_name: str):
    index = next(i for i in range(len(dataset)) if dataset.image_path(i).name == file_name)
    return dataset[index]


# ---------------------------------------------------------------------------------------------
# coco-mini
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_mini_loads(split):
    dataset = build_coco(COCO_MINI, split, return_masks=True)
    raw = json.loads((COCO_MINI / "annotations" / f"instances_{split}2017.json").read_text())
    assert len(dataset) == len(raw["images"])
    assert dataset.num_classes == max(c["id"] for c in raw["categories"]) + 1 == 91
    assert dataset.category_names[1] == "person"
    category_ids = {c["id"] for c in raw["categories"]}
    crowd_seen = 0
    for index in range(0, len(dataset), 8):
        image, target = dataset[index]
        info = dataset.coco.imgs[dataset.ids[index]]
        assert image.mode == "RGB" and image.size == (info["width"], info["height"])
        assert list(target) == TARGET_KEYS
        assert {k: v.dtype for k, v in target.items()} == TARGET_DTYPES
        # independently: non-crowd annotations whose clipped box is not empty
        anns = [a for a in raw["annotations"] if a["image_id"] == info["id"]]
        crowd_seen += sum(a["iscrowd"] for a in anns)
        w, h = image.size
        expected = [
            a
            for a in anns
            if not a["iscrowd"]
            and min(a["bbox"][0] + a["bbox"][2], w) > max(a["bbox"][0], 0)
            and min(a["bbox"][1] + a["bbox"][3], h) > max(a["bbox"][1], 0)
        ]
        n = len(expected)
        assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, h, w)
        assert target["labels"].tolist() == [a["category_id"] for a in expected]
        assert set(target["labels"].tolist()) <= category_ids
        torch.testing.assert_close(target["area"], torch.tensor([a["area"] for a in expected]))
        assert not target["iscrowd"].any()
        boxes = target["boxes"]
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        assert target["orig_size"].tolist() == target["size"].tolist() == [h, w]
        assert target["image_id"].tolist() == [info["id"]]
    assert split == "val" or crowd_seen > 0  # the train subset has crowd annotations to drop


# ---------------------------------------------------------------------------------------------
# Targets of the tiny dataset
# ---------------------------------------------------------------------------------------------


def test_target_crowd_clipping_and_degenerate(tiny):
    dataset = _tiny_dataset(tiny, return_masks=True)
    image, target = _item(dataset, "rgb.jpg")
    assert list(target) == TARGET_KEYS
    assert {k: v.dtype for k, v in target.items()} == TARGET_DTYPES
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[5.0, 5.0, 15.0, 13.0], [30.0, 20.0, 40.0, 30.0], [20.0, 2.0, 26.0, 6.0]])
    )
    assert target["labels"].tolist() == [3, 42, 7]
    assert target["area"].tolist() == [80.0, 100.0, 24.0]  # the json's area field, not the clipped box
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert target["image_id"].tolist() == [100]
    assert target["orig_size"].tolist() == [30, 40]
    masks = target["masks"]
    assert masks.shape == (3, 30, 40)
    expected_rle = torch.zeros(30, 40, dtype=torch.bool)
    expected_rle[2:6, 20:26] = True
    assert torch.equal(masks[2], expected_rle)
    # the polygon mask lies within its box (pycocotools rasterizes the polygon's interior)
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    assert xs.min() >= 5 and xs.max() < 15 and ys.min() >= 5 and ys.max() < 13
    assert masks[0].sum() >= 0.7 * 80


def test_num_classes_and_names_with_sparse_ids(tiny):
    dataset = _tiny_dataset(tiny)
    assert dataset.num_classes == 43
    assert dataset.category_names == {3: "cat", 7: "dog", 42: "answer"}


def test_image_without_annotations_has_empty_target(tiny):
    image, target = _item(_tiny_dataset(tiny, return_masks=True), "gray.png")
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 10, 20)
    assert target["area"].dtype == torch.float32 and target["iscrowd"].dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# Image modes and EXIF
# ---------------------------------------------------------------------------------------------


def test_colour_modes_become_rgb(tiny):
    dataset = _tiny_dataset(tiny)
    pixels = {}
    for name in ("cmyk.jpg", "gray.png", "rgba.png", "gray16.png"):
        image, target = _item(dataset, name)
        assert image.mode == "RGB" and image.size == (20, 10), name
        pixels[name] = np.asarray(image)[5, 10].astype(int)
    assert np.abs(pixels["cmyk.jpg"] - [0, 255, 255]).max() <= 8  # cyan
    assert pixels["gray.png"].tolist() == [100, 100, 100]
    assert pixels["rgba.png"].tolist() == [10, 20, 30]  # alpha dropped, as Image.convert("RGB") does
    assert pixels["gray16.png"].tolist() == [100, 100, 100]  # 16-bit scaled, not clipped at 255
    white = load_image(tiny / "images" / "rgba.png", background=(255, 255, 255))
    assert np.asarray(white)[5, 10].tolist() == [255, 255, 255]  # fully transparent over white


def test_exif_orientation(tiny):
    dataset = _tiny_dataset(tiny)
    stored = np.asarray(Image.open(tiny / "images" / "exif_rot.png").convert("RGB"))  # [20, 40, 3]
    upright = np.rot90(stored, k=-1)  # orientation 6: rotate 90 degrees clockwise to display

    rotated, target = _item(dataset, "exif_rot.png")
    assert rotated.size == (20, 40) and target["orig_size"].tolist() == [40, 20]
    assert np.array_equal(np.asarray(rotated), upright)
    assert np.asarray(rotated)[0, 0].tolist() == [255, 0, 0]  # red (stored left) is now on top

    raw, target = _item(dataset, "exif_raw.png")
    assert raw.size == (40, 20) and np.array_equal(np.asarray(raw), stored)

    assert np.array_equal(np.asarray(load_image(tiny / "images" / "exif_raw.png")), upright)
    assert np.array_equal(np.asarray(load_image(tiny / "images" / "exif_raw.png", exif=False)), stored)


# ---------------------------------------------------------------------------------------------
# Bad images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", BAD_FILES)
def test_bad_image_raises_naming_the_file(tiny, file_name):
    dataset = _tiny_dataset(tiny)
    with pytest.raises(ImageLoadError, match=file_name.replace(".", r"\.")) as info:
        _item(dataset, file_name)
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    if file_name == "exif_bad.png":  # both sizes and the annotation's are in the message
        assert all(s in str(info.value) for s in ("40x20", "20x40", "30x30"))
    if file_name in ("missing.jpg", "corrupt.jpg", "truncated.jpg"):
        with pytest.raises(ImageLoadError, match=file_name.replace(".", r"\.")):
            load_image(tiny / "images" / file_name)


def test_skip_bad_images_counts_and_collate_drops(tiny):
    transform = Compose([ToTensor(), Normalize()])
    dataset = _tiny_dataset(tiny, transforms=transform, skip_bad_images=True)
    items = [dataset[i] for i in range(len(dataset))]
    assert sum(item is None for item in items) == len(BAD_FILES)
    assert dataset.skipped == len(BAD_FILES)

    batch = collate_detection(items)
    assert batch.skipped == len(BAD_FILES)
    images, targets = batch  # unpacks like a (ImageBatch, targets) pair
    good = len(dataset) - len(BAD_FILES)
    assert len(images) == len(targets) == good
    assert images.pixels.shape == (good, 3, 40, 40)  # padded to the largest height (exif_rot) and width
    assert images.image_sizes == [tuple(t["size"].tolist()) for t in targets]

    empty = collate_detection([None, None])
    assert empty.images is None and empty.targets == [] and empty.skipped == 2

    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_detection)
    batches = list(loader)
    assert sum(b.skipped for b in batches) == len(BAD_FILES)
    assert sum(len(b.targets) for b in batches) == good


def test_build_coco_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="val2017"):
        build_coco(tmp_path, "val")
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        build_coco(tmp_path, "val")
    with pytest.raises(ValueError, match="split"):
        build_coco(tmp_path, "test")


# ---------------------------------------------------------------------------------------------
# Reproducible augmentation
# ---------------------------------------------------------------------------------------------


def test_seeded_augmentation_independent_of_workers():
    transform = make_coco_transforms("train", scales=[64, 80, 96], max_size=160)
    dataset = build_coco(COCO_MINI, "val", transforms=transform, seed=123)
    subset = torch.utils.data.Subset(dataset, range(6))

    def run(workers: int) -> list:
        loader = DataLoader(subset, batch_size=2, num_workers=workers, collate_fn=collate_detection)
        return [(b.images.pixels, [t["boxes"] for t in b.targets]) for b in loader]

    serial, parallel = run(0), run(2)
    for (pix_a, boxes_a), (pix_b, boxes_b) in zip(serial, parallel, strict=True):
        assert torch.equal(pix_a, pix_b)
        assert all(torch.equal(a, b) for a, b in zip(boxes_a, boxes_b, strict=True))

    first = [dataset[i][0] for i in range(6)]
    dataset.set_epoch(1)
    second = [dataset[i][0] for i in range(6)]
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_loaders_pin_batches_for_a_gpu(tiny, monkeypatch):
    """On a GPU the loaders pin every batch: DataLoader's pinning thread (``pin_memory`` of its utilities) hands
    our batch type to ``DetectionBatch.pin_memory``, which must pin the pixels, the padding mask and every target
    tensor and keep the rest. This machine has no CUDA to page-lock memory, so ``Tensor.pin_memory`` records
    and copies."""
    from torch.utils.data._utils.pin_memory import pin_memory as loader_pin

    from detr.distributed import DistInfo
    from detr.engine.data import build_loader
    from detr.engine.options import DataOptions

    dataset = _tiny_dataset(tiny, transforms=Compose([ToTensor(), Normalize()]), skip_bad_images=True)
    batch = collate_detection([dataset[i] for i in range(len(dataset))])
    pinned: list[torch.Tensor] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self.clone())
    out = loader_pin(batch)
    tensors = [batch.images.pixels, batch.images.padding_mask] + [
        v for t in batch.targets for v in t.values() if isinstance(v, torch.Tensor)]
    assert len(pinned) == len(tensors) > 2 and all(any(p is t for p in pinned) for t in tensors)
    assert out.skipped == batch.skipped == len(BAD_FILES) and len(out.targets) == len(batch.targets)
    assert torch.equal(out.images.pixels, batch.images.pixels) and out.images.pixels is not batch.images.pixels
    for a, b in zip(out.targets, batch.targets, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(b[k], torch.Tensor))
    data, info = DataOptions(), DistInfo()
    assert build_loader(dataset, data, info, train=True, device="cuda").pin_memory
    assert not build_loader(dataset, data, info, train=False).pin_memory  # the CPU default
