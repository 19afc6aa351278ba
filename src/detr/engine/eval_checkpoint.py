"""Scoring a checkpoint file on a val split: COCO AP (``evaluate_checkpoint``), or PQ plus AP for a
panoptic checkpoint (``evaluate_panoptic_checkpoint``). What ``detr eval`` runs; torchrun-aware."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint, read_checkpoint
from ..coco_panoptic import coco_panoptic_paths, panoptic_root
from ..data.coco import load_coco
from ..data.panoptic import CocoPanoptic
from ..distributed import init_distributed
from ..model.fuse import compile_for_inference, optimize_for_inference
from ..model.segmentation import DETRsegm
from ..preprocessing import InputConfig, resolve_input
from ..runtime import amp_dtype
from .data import build_dataset, build_loader, instances_json, transforms_for
from .evaluate import evaluate
from .options import DataOptions
from .panoptic_eval import evaluate_panoptic

log = logging.getLogger(__name__)


def _write_metrics(result: dict[str, Any], output_dir: str | Path | None, is_main: bool) -> None:
    if output_dir is not None and is_main:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))


def _load(checkpoint: str | Path, data: DataOptions) -> tuple[Any, InputConfig]:
    """The model, and the evaluation input: the checkpoint's, unless ``--val_scale`` / ``--max_size`` say."""
    ckpt = read_checkpoint(checkpoint)
    spec, _ = resolve_input(ckpt.input, size=data.val_scale, max_size=data.max_size,
                            what=f"the checkpoint {checkpoint}")
    return load_checkpoint(checkpoint, checkpoint=ckpt), spec


def evaluate_checkpoint(
    checkpoint: str | Path, data: DataOptions, *, device: str = "cpu", precision: str | None = None,
    compile: bool = False, progress: bool = True, output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """COCO AP (bbox, and segm for a panoptic checkpoint) of ``checkpoint`` on ``data``'s val split, with
    the inference rewrites of ``optimize_for_inference``; writes ``output_dir``/metrics.json. Images are resized
    as the checkpoint was validated (its ``InputConfig``) unless ``data.val_scale`` / ``data.max_size`` are set."""
    info = init_distributed(device)
    loaded, spec = _load(checkpoint, data)
    model = optimize_for_inference(loaded).to(device)
    masks = isinstance(model, DETRsegm)
    if compile:
        model = compile_for_inference(model)
    dataset = build_dataset(data, "val", train_augment=False, masks=masks, input=spec)
    loader = build_loader(dataset, data, info, train=False, device=device)
    result = evaluate(model, loader, coco_gt=dataset.coco, device=device,
                      iou_types=("bbox", "segm") if masks else ("bbox",), amp_dtype=amp_dtype(precision, device),
                      progress=progress)
    _write_metrics(result, output_dir, info.is_main)
    return result


def evaluate_panoptic_checkpoint(
    checkpoint: str | Path, data: DataOptions, *, panoptic_json: str | Path | None = None,
    panoptic_folder: str | Path | None = None, threshold: float = 0.85, device: str = "cpu",
    precision: str | None = None, progress: bool = True, output_dir: str | Path = "outputs/eval",
) -> dict[str, Any]:
    """PQ (COCO panoptic) of a panoptic checkpoint, plus bbox/segm AP when an instances json exists.

    Ground truth: ``panoptic_json`` + ``panoptic_folder``, or the standard layout under
    ``data.coco_panoptic_path`` (default ``data.coco_path``). Images: ``data.val_images`` or
    ``data.coco_path``/val2017. Predictions and metrics.json go to ``output_dir``.
    """
    info = init_distributed(device)
    loaded, spec = _load(checkpoint, data)
    model = optimize_for_inference(loaded).to(device)
    if not isinstance(model, DETRsegm):
        raise ValueError(f"--panoptic needs a panoptic checkpoint (with a mask head); {checkpoint} is a detector")
    if panoptic_json or panoptic_folder:
        if not (panoptic_json and panoptic_folder):
            raise ValueError("give both --panoptic_json and --panoptic_folder")
        gt_json, gt_folder = Path(panoptic_json), Path(panoptic_folder)
    else:
        root = panoptic_root(data.coco_panoptic_path, data.coco_path, "--panoptic")
        _, gt_json, gt_folder = coco_panoptic_paths(root, "val")
    if data.val_images:
        image_dir = Path(data.val_images)
    elif data.coco_path:
        image_dir = Path(data.coco_path) / "val2017"
    else:
        raise ValueError("--panoptic needs the images: --val_images DIR or --coco_path DIR")
    dataset = CocoPanoptic(image_dir, gt_json, gt_folder, return_masks=False, skip_bad_images=data.skip_bad_images,
                           transforms=transforms_for(data, train_augment=False, input=spec))
    loader = build_loader(dataset, data, info, train=False, device=device)
    instances = instances_json(data)
    if instances is None:
        log.info("no instances json (--val_json or --coco_path/annotations/instances_val2017.json): PQ only")
    result = evaluate_panoptic(model, loader, gt_json=gt_json, gt_folder=gt_folder, output_dir=output_dir,
                               coco_gt=load_coco(instances) if instances is not None else None, device=device,
                               threshold=threshold, amp_dtype=amp_dtype(precision, device), progress=progress)
    _write_metrics(result, output_dir, info.is_main)
    return result
