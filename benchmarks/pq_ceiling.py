"""How much PQ can DETR's mask head express at a given image size? An upper bound from the ground truth.

    python benchmarks/pq_ceiling.py --panoptic_json J --panoptic_folder F [--sizes 256 384 512 800]

The mask head predicts one logit map per query at stride 4 of the resized input. This script gives each
ground-truth segment its best such map: the segment's coverage of every 4x4 cell of the resized image
(area-averaged), as a logit. It then runs the model's own panoptic post-processing on those maps (bilinear
upsampling, each pixel to the query with the largest logit, back to the original size) and scores PQ against
the same ground truth. Whatever PQ a trained model loses below this line is training, not resolution.
Prints one JSON line per size: {"size", "max_size", "pq", "pq_things", "sq_things", "rq_things", "segments"}.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from detr.data.panoptic import read_segment_ids
from detr.data.transforms import resized_hw
from detr.engine.panoptic_eval import PQAccumulator
from detr.files import read_json
from detr.postprocess import postprocess_panoptic

STRIDE = 4  # the mask head's output stride


def ideal_outputs(gt_ids: np.ndarray, segments: list[dict], size: int, max_size: int,
                  num_classes: int) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """One confident query per segment with the best stride-4 mask logits at ``size``; returns the outputs
    (``pred_logits`` [1, N, K+1], ``pred_masks`` [1, N, ceil(h/4), ceil(w/4)]) and the input size (h, w)."""
    H, W = gt_ids.shape
    h, w = resized_hw((W, H), size, max_size)
    onehot = torch.stack([torch.from_numpy(gt_ids == s["id"]) for s in segments]).float()  # [N, H, W]
    resized = F.interpolate(onehot[None], size=(h, w), mode="area")  # [1, N, h, w], coverage in [0, 1]
    coverage = F.avg_pool2d(resized, STRIDE, ceil_mode=True)  # [1, N, ceil(h/4), ceil(w/4)]
    masks = torch.logit(coverage, eps=1e-4)
    logits = torch.full((1, len(segments), num_classes + 1), -20.0)  # each query sure of its segment's class
    logits[0, torch.arange(len(segments)), torch.tensor([int(s["category_id"]) for s in segments])] = 20.0
    return {"pred_logits": logits, "pred_masks": masks}, (h, w)


def ceilings(panoptic_json: str | Path, panoptic_folder: str | Path, sizes: list[tuple[int, int]]) -> list[dict]:
    """PQ of the ideal stride-4 masks at each (size, max_size), one dict per pair (see the module docstring)."""
    gt = read_json(panoptic_json, "panoptic json")
    categories = {int(c["id"]): c for c in gt["categories"]}
    num_classes = max(categories) + 1
    accumulators = [PQAccumulator(gt["categories"]) for _ in sizes]
    n_segments = 0
    for ann in gt["annotations"]:
        gt_ids = read_segment_ids(Path(panoptic_folder) / ann["file_name"])  # read once for every size
        segments = [s for s in ann["segments_info"] if not s.get("iscrowd", 0)]
        n_segments += len(segments)
        for (size, max_size), accumulator in zip(sizes, accumulators, strict=True):
            pred_ids, pred_segments = np.zeros_like(gt_ids), []
            if segments:
                outputs, (h, w) = ideal_outputs(gt_ids, segments, size, max_size, num_classes)
                result = postprocess_panoptic(outputs, [(h, w)], [gt_ids.shape], threshold=0.85,
                                              is_thing=lambda c: int(categories[c].get("isthing", 1)) == 1)[0]
                pred_ids = result["segment_ids"].numpy().astype(np.int64) + 1  # 0 stays unlabeled
                pred_segments = [{**s, "id": s["id"] + 1} for s in result["segments_info"]]
            accumulator.add_image(gt_ids, ann["segments_info"], pred_ids, pred_segments, image=ann["file_name"])
    lines = []
    for (size, max_size), accumulator in zip(sizes, accumulators, strict=True):
        summary = accumulator.summarize()
        things = summary["Things"]
        lines.append({"size": size, "max_size": max_size, "pq": round(summary["All"]["pq"], 4),
                      "pq_things": round(things["pq"], 4), "sq_things": round(things["sq"], 4),
                      "rq_things": round(things["rq"], 4), "segments": n_segments})
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--panoptic_json", required=True)
    p.add_argument("--panoptic_folder", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512, 800], help="short sides")
    p.add_argument("--max_size_ratio", type=float, default=1333 / 800,
                   help="long-side cap as a multiple of the short side (the reference's 1333 for 800)")
    args = p.parse_args(argv)
    sizes = [(size, math.floor(size * args.max_size_ratio)) for size in args.sizes]
    for line in ceilings(args.panoptic_json, args.panoptic_folder, sizes):
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
