"""The data side of training and evaluation: datasets and loaders built from ``DataOptions``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..coco_panoptic import coco_panoptic_paths, panoptic_root
from ..data.batch import collate_detection
from ..data.coco import CocoDetection, build_coco, coco_paths, load_coco
from ..data.formats import category_count, detect_format, load_split
from ..data.panoptic import CocoPanoptic
from ..data.transforms import Transform, make_coco_transforms, val_transform
from ..distributed import DistInfo
from ..preprocessing import InputConfig
from .options import DataOptions


def split_paths(data: DataOptions, split: str) -> tuple[str, str]:
    """(image folder, COCO json) of ``split``: the custom pair if given, else the standard layout."""
    images = data.train_images if split == "train" else data.val_images
    ann = data.train_json if split == "train" else data.val_json
    if images and ann:
        return images, ann
    if data.coco_path is None:
        raise ValueError(f"no {split} data: give --coco_path DIR or --{split}_images and --{split}_json")
    image_dir, ann_file = coco_paths(data.coco_path, split)
    return str(image_dir), str(ann_file)


def _build_panoptic(data: DataOptions, split: str, transforms: Transform, masks: bool, seed: int) -> CocoPanoptic:
    root = panoptic_root(data.coco_panoptic_path, data.coco_path)
    image_dir, ann_json, seg_folder = coco_panoptic_paths(data.coco_path or root, split, root)
    custom_images = data.train_images if split == "train" else data.val_images
    if custom_images:
        image_dir = Path(custom_images)
    missing = [str(p) for p in (image_dir, ann_json, seg_folder) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"COCO panoptic {split} split incomplete, missing: {', '.join(missing)}")
    return CocoPanoptic(image_dir, ann_json, seg_folder, transforms=transforms, return_masks=masks,
                        skip_bad_images=data.skip_bad_images, seed=seed)


def training_num_classes(data: DataOptions) -> int:
    """max category id + 1 of the training annotations (the reference's meaning of num_classes)."""
    if data.dataset_file == "coco_panoptic":
        root = panoptic_root(data.coco_panoptic_path, data.coco_path)
        return category_count(coco_panoptic_paths(root, "train")[1])
    if data.coco_path and not data.train_images:
        fmt = data.dataset_format or detect_format(data.coco_path)
        if fmt != "coco":
            loaded = load_split(data.coco_path, "train", fmt, split_name=data.train_split,
                                skip_bad_images=data.skip_bad_images)
            return max(int(c["id"]) for c in loaded.dataset["categories"]) + 1
    return category_count(split_paths(data, "train")[1])


def transforms_for(data: DataOptions, *, train_augment: bool, input: InputConfig | None = None) -> Transform:
    """The reference's training augmentation, or the evaluation resize: ``input`` (a checkpoint's, at
    evaluation), else the one the data options train at."""
    spec = data.input_config()
    if train_augment and data.augment:
        return make_coco_transforms("train", scales=data.train_scales, max_size=spec.max_size)
    return val_transform(input or spec)


def build_dataset(
    data: DataOptions, split: str, *, train_augment: bool, masks: bool, seed: int = 42,
    input: InputConfig | None = None,
) -> CocoDetection | CocoPanoptic:
    """The ``split`` dataset of ``data.dataset_file``, with training or evaluation transforms (``input``: the
    evaluation resize to use instead of the data options')."""
    transforms = transforms_for(data, train_augment=train_augment, input=input)
    if data.dataset_file == "coco_panoptic":
        return _build_panoptic(data, split, transforms, masks, seed)
    custom = data.train_images if split == "train" else data.val_images
    common: dict[str, Any] = {"transforms": transforms, "return_masks": masks,
                              "skip_bad_images": data.skip_bad_images, "seed": seed}
    if data.coco_path and not custom:
        fmt = data.dataset_format or detect_format(data.coco_path)
        if fmt == "coco":
            return build_coco(data.coco_path, split, **common)
        # YOLO / VOC: read into COCO-format annotations once, then the same dataset as COCO's
        loaded = load_split(data.coco_path, split, fmt, skip_bad_images=data.skip_bad_images,
                            split_name=data.train_split if split == "train" else data.val_split)
        return CocoDetection(loaded.image_dir, loaded.source, coco=loaded.coco, **common)
    images, ann = split_paths(data, split)
    return CocoDetection(images, ann, **common)


def build_loader(dataset: Dataset, data: DataOptions, info: DistInfo, *, train: bool, seed: int = 42,
                 device: torch.device | str = "cpu") -> DataLoader:
    """The loader of a split for a model on ``device``. For a GPU the batches land in page-locked memory (the
    loader's pinning thread calls ``DetectionBatch.pin_memory``), so ``batch.to(device, non_blocking=True)``
    overlaps the copy with compute."""
    # The same sampler for one process and many: rank r of W takes every W-th index of one seeded
    # permutation, so W processes with batch b see exactly the batches of one process with W*b.
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=train, seed=seed,
                                 drop_last=False)
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        collate_fn=collate_detection,
        num_workers=data.num_workers,
        persistent_workers=False,
        pin_memory=torch.device(device).type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


def instances_json(data: DataOptions) -> Path | None:
    """The val instances json, for bbox/segm AP of a panoptic model, if there is one."""
    if data.val_json:
        return Path(data.val_json)
    if data.coco_path:
        path = coco_paths(data.coco_path, "val")[1]
        return path if path.is_file() else None
    return None


def panoptic_instances(data: DataOptions) -> Any:
    """``instances_json`` read as a pycocotools COCO, or None."""
    path = instances_json(data)
    return load_coco(path) if path is not None and path.is_file() else None
