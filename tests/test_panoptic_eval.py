"""Panoptic quality against torchmetrics' independent PanopticQuality on converted coco-mini, the COCO
void/crowd rules on hand-counted cases, the CLI, and the evaluation of panoptic models.

torchmetrics (a test dependency) differs from the COCO definition in three places; the comparison cases
are built so that each difference has no effect, and the COCO-only rules are checked by hand below:
1. it has no crowd: crowd regions are given to it as void, and every prediction leaves crowd pixels
   to one segment of the crowd's category that covers exactly them (ignored under both rules). So no
   other segment touches a crowd region, where "crowd = void" and the COCO rule would differ;
2. it ignores ground-truth segments mostly covered by predicted void, and leaves predicted void out of
   the union: the predictions here cover every pixel (a "background" stuff category fills the rest),
   or are the ground truth itself;
3. it merges all pixels of a stuff category into one segment: the ground truth and the predictions
   here have at most one segment per stuff category and image.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.detection import PanopticQuality

from conftest import COCO_MINI
from detr.checkpoint import load_checkpoint
from detr.cli import build_parser
from detr.cli.data import add_parsers as add_data_parsers
from detr.cli.train import cmd_eval
from detr.coco_panoptic import read_segment_ids, segment_ids_to_png
from detr.data import collate_detection, make_coco_transforms
from detr.data.panoptic import CocoPanoptic, panoptic_from_instances
from detr.engine.panoptic_eval import PQAccumulator, evaluate_panoptic, pq_compute
from detr.model.fuse import optimize_for_inference
from detr.postprocess import postprocess_detections, postprocess_masks
from test_panoptic_data import VAL_IMAGES, subset_instances

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

STUFF = {44, 62, 67}  # bottle, chair, dining table become stuff (several per image: merged)
BACKGROUND = 200  # a stuff category only the predictions use, for pixels no other segment takes
STEP = 4  # torchmetrics' row-unique costs ~2 s per full-size image on this CPU: subsample the maps 4x
TOLERANCE = 1e-6  # torchmetrics computes each IoU in float32


def write_panoptic(folder: Path, json_path: Path, items: dict, categories: list | None = None) -> None:
    """items: image_id -> (id map [H, W], segments_info) -> PNGs + json."""
    folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for image_id, (ids, segments) in sorted(items.items()):
        name = f"{image_id:012d}.png"
        (folder / name).write_bytes(segment_ids_to_png(torch.from_numpy(ids.astype(np.int64))))
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": segments})
    data = {"annotations": annotations}
    if categories is not None:
        data["categories"] = categories
    json_path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """coco-mini val subset converted (full size), and a subsampled variant with stuff categories."""
    root = tmp_path_factory.mktemp("pq")
    instances = subset_instances(root / "instances.json")
    panoptic_from_instances(instances, root / "panoptic.json", root / "png")
    converted = json.loads((root / "panoptic.json").read_text())

    categories = [{**c, "isthing": int(c["id"] not in STUFF)} for c in converted["categories"]]
    categories.append({"id": BACKGROUND, "name": "background", "isthing": 0})
    mixed = {}
    for entry in converted["annotations"]:
        ids = read_segment_ids(root / "png" / entry["file_name"])[::STEP, ::STEP].astype(np.int64)
        segments, first_of = [], {}
        for s in entry["segments_info"]:
            category = s["category_id"]
            if category in STUFF:
                assert not s["iscrowd"]
                if category in first_of:  # one segment per stuff category: merge into the first
                    ids[ids == s["id"]] = first_of[category]
                    continue
                first_of[category] = s["id"]
            segments.append({"id": s["id"], "category_id": category, "iscrowd": s["iscrowd"]})
        for s in segments:
            s["area"] = int((ids == s["id"]).sum())
        mixed[entry["image_id"]] = (ids, [s for s in segments if s["area"] > 0])
    write_panoptic(root / "mixed", root / "mixed.json", mixed, categories)
    return {"root": root, "instances": instances, "json": root / "panoptic.json", "png": root / "png",
            "converted": converted, "mixed": mixed, "categories": categories}


# ----------------------------------------------------------------------------------------------
# Predictions: perturbed ground truth
# ----------------------------------------------------------------------------------------------


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    x = torch.from_numpy(mask).float()[None, None]
    return F.max_pool2d(x, 2 * k + 1, stride=1, padding=k)[0, 0].numpy() > 0


def _perturb(mask: np.ndarray, op: str, rng: np.random.Generator) -> np.ndarray:
    if op == "dilate":
        return _dilate(mask, int(rng.integers(1, 4)))
    if op == "erode":
        return ~_dilate(~mask, int(rng.integers(1, 3)))
    if op == "shift":
        dy, dx = rng.integers(-8, 9, size=2)
        shifted = np.zeros_like(mask)
        h, w = mask.shape
        shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
            max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
        ]
        return shifted
    return mask


def make_prediction(ids: np.ndarray, segments: list, category_ids: list, rng: np.random.Generator, ops: tuple):
    """A prediction covering every pixel: perturbed ground-truth segments painted in random order over a
    BACKGROUND segment, then one segment per crowd region exactly on it; one segment per stuff category."""
    layers = []
    for s in segments:
        if s["iscrowd"]:
            continue
        op = ops[int(rng.integers(len(ops)))]
        category = s["category_id"]
        if op == "drop":
            continue
        if op == "swap":
            category = int(rng.choice([c for c in category_ids if c != category]))
        layers.append((_perturb(ids == s["id"], op, rng), category))
    if "add" in ops:  # false segments: random boxes of random categories
        h, w = ids.shape
        for _ in range(int(rng.integers(1, 4))):
            y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
            box = np.zeros_like(ids, dtype=bool)
            box[y : y + int(rng.integers(3, h // 2)), x : x + int(rng.integers(3, w // 2))] = True
            layers.append((box, int(rng.choice(category_ids))))
    layers = [layers[i] for i in rng.permutation(len(layers))]
    layers += [(ids == s["id"], s["category_id"]) for s in segments if s["iscrowd"]]

    category = np.full(ids.shape, BACKGROUND, dtype=np.int64)
    instance = np.zeros(ids.shape, dtype=np.int64)
    for index, (mask, c) in enumerate(layers, start=1):
        category[mask] = c
        instance[mask] = 0 if c in STUFF or c == BACKGROUND else index  # stuff: one segment per category
    pairs, pred_ids = np.unique(category * 10_000 + instance, return_inverse=True)
    pred_ids = pred_ids.reshape(ids.shape) + 1
    segments_info = [{"id": i + 1, "category_id": int(p // 10_000)} for i, p in enumerate(pairs)]
    return pred_ids, segments_info


def to_torchmetrics(ids: np.ndarray, segments: list, *, crowd_is_void: bool) -> torch.Tensor:
    """Id map + segments -> [1, H, W, 2] (category, instance); unlisted pixels (and crowd) get category 0,
    which is no category: void."""
    category = np.zeros(ids.shape, dtype=np.int64)
    for s in segments:
        if not (crowd_is_void and s.get("iscrowd", 0)):
            category[ids == s["id"]] = s["category_id"]
    return torch.from_numpy(np.stack([category, ids.astype(np.int64)], axis=-1))[None]


def torchmetrics_pq(gt: dict, pred: dict, categories: list) -> dict:
    things = {c["id"] for c in categories if c["isthing"]}
    stuffs = {c["id"] for c in categories if not c["isthing"]}
    metric = PanopticQuality(things=things, stuffs=stuffs, allow_unknown_preds_category=True,
                             return_sq_and_rq=True, compute_with_cache=False)
    for image_id, (gt_ids, gt_segments) in gt.items():
        pred_ids, pred_segments = pred[image_id]
        metric.update(to_torchmetrics(pred_ids, pred_segments, crowd_is_void=False),
                      to_torchmetrics(gt_ids, gt_segments, crowd_is_void=True))
    overall = metric.compute().tolist()  # [PQ, SQ, RQ]
    metric.return_per_class = True
    per_class = metric.compute()  # [C, 3], things then stuffs, each sorted
    order = sorted(things) + sorted(stuffs)
    counts = torch.stack([metric.true_positives, metric.false_positives, metric.false_negatives], 1).tolist()
    return {"overall": overall, "order": order, "per_class": per_class.tolist(), "counts": counts,
            "things": things}


def assert_same_as_torchmetrics(ours: dict, theirs: dict) -> float:
    """Compare every number; return the largest absolute difference."""
    diffs = [abs(a - b) for a, b in zip([ours["All"][k] for k in ("pq", "sq", "rq")], theirs["overall"], strict=True)]
    present = {"Things": [], "Stuff": []}
    for category, values, counts in zip(theirs["order"], theirs["per_class"], theirs["counts"], strict=True):
        mine = ours["per_class"][category]
        assert [mine["tp"], mine["fp"], mine["fn"]] == counts, category
        diffs += [abs(mine[k] - v) for k, v in zip(("pq", "sq", "rq"), values, strict=True)]
        if sum(counts):
            present["Things" if category in theirs["things"] else "Stuff"].append(values)
    for name, rows in present.items():
        assert ours[name]["n"] == len(rows)
        if rows:
            diffs += [abs(ours[name][k] - v) for k, v in zip(("pq", "sq", "rq"), np.mean(rows, 0), strict=True)]
    assert max(diffs) <= TOLERANCE, max(diffs)
    return max(diffs)


SCENARIOS = {
    "keep": ("keep",),
    "mild": ("keep", "dilate", "erode", "shift"),
    "heavy": ("keep", "dilate", "erode", "shift", "swap", "drop", "add"),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_perturbed_predictions_match_torchmetrics(data, scenario, tmp_path):
    rng = np.random.default_rng(sorted(SCENARIOS).index(scenario))
    category_ids = [c["id"] for c in data["categories"]]
    preds = {image_id: make_prediction(ids, segments, category_ids, rng, SCENARIOS[scenario])
             for image_id, (ids, segments) in data["mixed"].items()}
    write_panoptic(tmp_path / "pred", tmp_path / "pred.json", preds)
    ours = pq_compute(data["root"] / "mixed.json", data["root"] / "mixed", tmp_path / "pred.json", tmp_path / "pred")
    assert_same_as_torchmetrics(ours, torchmetrics_pq(data["mixed"], preds, data["categories"]))

    counts = np.array([[c["tp"], c["fp"], c["fn"]] for c in ours["per_class"].values()]).sum(0)
    assert ours["Stuff"]["n"] >= 3 and counts[0] > 0
    if scenario == "keep":  # crowd and background segments are ignored, everything else matches exactly
        assert ours["All"]["pq"] == 1.0 and counts[1] == counts[2] == 0
    else:
        assert counts[1] > 0 and counts[2] > 0 and 0.1 < ours["All"]["pq"] < 0.95


def test_ground_truth_against_itself(data):
    for name, folder in (("panoptic.json", "png"), ("mixed.json", "mixed")):
        root = data["root"]
        ours = pq_compute(root / name, root / folder, root / name, root / folder)
        assert ours["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": ours["All"]["n"]} and ours["All"]["n"] > 20
        assert ours["num_images"] == len(data["converted"]["annotations"])
    assert ours["Stuff"]["pq"] == 1.0 and ours["Stuff"]["n"] == 3  # the background category never occurs
    assert_same_as_torchmetrics(ours, torchmetrics_pq(data["mixed"], data["mixed"], data["categories"]))


def test_empty_prediction_scores_zero(data, tmp_path):
    gt = data["converted"]
    empty = {}
    for entry in gt["annotations"]:
        info = next(i for i in gt["images"] if i["id"] == entry["image_id"])
        empty[entry["image_id"]] = (np.zeros((info["height"], info["width"]), dtype=np.int64), [])
    write_panoptic(tmp_path / "pred", tmp_path / "pred.json", empty)
    ours = pq_compute(data["json"], data["png"], tmp_path / "pred.json", tmp_path / "pred")
    non_crowd = [s for e in gt["annotations"] for s in e["segments_info"] if not s["iscrowd"]]
    assert ours["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": len({s["category_id"] for s in non_crowd})}
    assert sum(c["fn"] for c in ours["per_class"].values()) == len(non_crowd)
    assert ours["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}  # no stuff category: 0, not a ZeroDivisionError


# ----------------------------------------------------------------------------------------------
# The COCO rules, counted by hand on 10 x 20 maps
# ----------------------------------------------------------------------------------------------

CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 3, "isthing": 0}]


def _map(*blocks: tuple[int, int, int, int, int]) -> np.ndarray:
    """(id, row0, row1, col0, col1) blocks, half-open, painted in order on a 10 x 20 map of zeros."""
    ids = np.zeros((10, 20), dtype=np.int64)
    for seg_id, r0, r1, c0, c1 in blocks:
        ids[r0:r1, c0:c1] = seg_id
    return ids


def _segs(*specs: tuple) -> list[dict]:
    return [{"id": i, "category_id": c, "iscrowd": crowd, "area": area} for i, c, crowd, area in specs]


def _counts(acc: PQAccumulator) -> dict:
    return {k: (round(v.iou, 12), v.tp, v.fp, v.fn) for k, v in acc.counts.items() if v.tp + v.fp + v.fn}


def test_void_is_left_out_of_the_union_but_crowd_is_not():
    acc = PQAccumulator(CATEGORIES)
    # 50 gt pixels; the prediction adds 25 void pixels: IoU = 50 / (75 + 50 - 50 - 25) = 1.
    acc.add_image(_map((1, 0, 5, 0, 10)), _segs((1, 1, 0, 50)), _map((7, 0, 5, 0, 15)), _segs((7, 1, 0, None)))
    assert _counts(acc) == {1: (1.0, 1, 0, 0)}
    acc = PQAccumulator(CATEGORIES)
    # gt: 50-pixel segment over a 50-pixel crowd region of its category, a category-2 block on the right.
    gt = _map((1, 0, 5, 0, 10), (2, 5, 10, 0, 10), (3, 0, 10, 10, 20))
    gt_segments = _segs((1, 1, 0, 50), (2, 1, 1, 50), (3, 2, 0, 100))
    # pred 1 takes 10 crowd pixels: IoU = 50 / (60 + 50 - 50) = 5/6 (crowd stays in the union);
    # pred 2 (category 1) lies on the crowd region: ignored; pred 4 (category 2) on it too: a false positive.
    pred = _map((1, 0, 6, 0, 10), (2, 6, 8, 0, 10), (4, 8, 10, 0, 10), (3, 0, 10, 10, 20))
    acc.add_image(gt, gt_segments, pred, _segs((1, 1, 0, None), (2, 1, 0, None), (4, 2, 0, None), (3, 2, 0, None)))
    assert _counts(acc) == {1: (round(5 / 6, 12), 1, 0, 0), 2: (1.0, 1, 1, 0)}
    result = acc.summarize()
    assert result["per_class"][2] == {"pq": 1 / 1.5, "sq": 1.0, "rq": 1 / 1.5, "tp": 1, "fp": 1, "fn": 0}
    assert result["All"] == pytest.approx({"pq": (5 / 6 + 1 / 1.5) / 2, "sq": (5 / 6 + 1) / 2,
                                           "rq": (1 + 1 / 1.5) / 2, "n": 2})
    assert result["Stuff"]["n"] == 0 and result["per_class"][3]["pq"] == 0.0


def test_thresholds_are_strict():
    acc = PQAccumulator(CATEGORIES)
    # IoU exactly 0.5 (40 / (60 + 60 - 40)) is no match: a false negative and a false positive.
    gt = _map((1, 0, 6, 0, 10), (2, 6, 10, 0, 10))
    pred = _map((5, 2, 8, 0, 10))
    acc.add_image(gt, _segs((1, 1, 0, 60), (2, 2, 0, 40)), pred, _segs((5, 1, 0, None)))
    assert _counts(acc) == {1: (0.0, 0, 1, 1), 2: (0.0, 0, 0, 1)}
    acc = PQAccumulator(CATEGORIES)
    # An unmatched prediction exactly half on void counts; one pixel more on void and it is ignored.
    gt = _map((1, 0, 5, 0, 10))
    acc.add_image(gt, _segs((1, 1, 0, 50)), _map((4, 0, 10, 0, 10)), _segs((4, 2, 0, None)))
    assert _counts(acc) == {1: (0.0, 0, 0, 1), 2: (0.0, 0, 1, 0)}
    acc.add_image(gt, _segs((1, 1, 0, 50)), _map((4, 0, 10, 0, 10), (4, 9, 10, 10, 11)), _segs((4, 2, 0, None)))
    assert _counts(acc) == {1: (0.0, 0, 0, 2), 2: (0.0, 0, 1, 0)}
    # A prediction json may list id 0: then it is a segment, not unlabeled.
    acc = PQAccumulator(CATEGORIES)
    acc.add_image(_map((1, 0, 10, 0, 20)), _segs((1, 3, 0, 200)), _map(), _segs((0, 3, 0, None)))
    assert _counts(acc) == {3: (1.0, 1, 0, 0)} and acc.summarize()["Stuff"]["pq"] == 1.0


def test_inconsistent_predictions_are_named(data, tmp_path):
    acc = PQAccumulator(CATEGORIES)
    gt, gt_segments = _map((1, 0, 5, 0, 10)), _segs((1, 1, 0, 50))
    with pytest.raises(ValueError, match=r"img7.*\[4\] are in the PNG"):
        acc.add_image(gt, gt_segments, _map((4, 0, 2, 0, 2)), [], image="img7")
    with pytest.raises(ValueError, match=r"\[4\] are in the json"):
        acc.add_image(gt, gt_segments, _map(), _segs((4, 1, 0, None)))
    with pytest.raises(ValueError, match=r"category ids \[9\]"):
        acc.add_image(gt, gt_segments, _map((4, 0, 2, 0, 2)), _segs((4, 9, 0, None)))
    with pytest.raises(ValueError, match="ground truth is"):
        acc.add_image(gt, gt_segments, gt[:5], gt_segments)
    write_panoptic(tmp_path / "pred", tmp_path / "pred.json", {1: (np.zeros((2, 2)), [])})  # not a val image
    with pytest.raises(ValueError, match=r"pred.json: no prediction for image id"):
        pq_compute(data["json"], data["png"], tmp_path / "pred.json", tmp_path / "pred")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pq_compute(data["json"], data["png"], tmp_path / "pred.json", tmp_path / "nowhere")


def test_cli_prints_the_metrics_as_json(data, tmp_path, capsys):
    rng = np.random.default_rng(7)
    category_ids = [c["id"] for c in data["categories"]]
    preds = {i: make_prediction(ids, segs, category_ids, rng, SCENARIOS["heavy"]) for i, (ids, segs) in
             data["mixed"].items()}
    write_panoptic(tmp_path / "pred", tmp_path / "pred.json", preds)
    parser = argparse.ArgumentParser(prog="detr")
    add_data_parsers(parser.add_subparsers(dest="command", required=True))
    root = data["root"]
    args = parser.parse_args(["eval-panoptic", "--gt-json", str(root / "mixed.json"), "--gt-folder",
                              str(root / "mixed"), "--pred-json", str(tmp_path / "pred.json"), "--pred-folder",
                              str(tmp_path / "pred")])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    ours = pq_compute(root / "mixed.json", root / "mixed", tmp_path / "pred.json", tmp_path / "pred")
    assert printed == json.loads(json.dumps(ours))  # per_class keys become strings in json
    assert set(printed) == {"All", "Things", "Stuff", "per_class", "num_images"}
    assert set(printed["All"]) == {"pq", "sq", "rq", "n"} and 0 < printed["All"]["pq"] < 1


# ----------------------------------------------------------------------------------------------
# Evaluating models: postprocess -> prediction files -> PQ, plus bbox/segm AP
# ----------------------------------------------------------------------------------------------


class OracleModel(nn.Module):
    """Predicts the ground truth of each image in turn (batches of one): +-20 mask logits, confident
    labels, plus one query of a category the ground truth does not have."""

    def __init__(self, targets: CocoPanoptic, num_classes: int = 91, num_queries: int = 100) -> None:
        super().__init__()
        self.targets, self.index = targets, 0
        self.num_classes, self.num_queries = num_classes, num_queries

    def forward(self, images):
        _, target = self.targets[self.index]
        self.index += 1
        masks, labels = target["masks"], target["labels"]
        n, (h, w) = len(labels), masks.shape[1:]
        assert images.pixels.shape[-2:] == (h, w)
        logits = torch.full((1, self.num_queries, self.num_classes + 1), -10.0)
        logits[0, n + 1 :, -1] = 10.0  # the rest: no object
        logits[0, torch.arange(n), labels] = 10.0
        logits[0, n, 0] = 10.0  # category 0 is no COCO category: dropped at evaluation
        pred_masks = torch.full((1, self.num_queries, h, w), -20.0)
        pred_masks[0, :n][masks] = 20.0
        pred_masks[0, n, :8, :8] = 30.0
        boxes = torch.zeros(1, self.num_queries, 4)
        boxes[0, :n] = target["boxes"]
        return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": pred_masks}


def test_evaluate_panoptic_with_an_oracle(data, tmp_path):
    transforms = make_coco_transforms("val", scales=[160], max_size=240)
    dataset = CocoPanoptic(VAL_IMAGES, data["json"], data["png"], transforms=transforms, return_masks=False)
    oracle = OracleModel(CocoPanoptic(VAL_IMAGES, data["json"], data["png"], transforms=transforms))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(5)), batch_size=1, collate_fn=collate_detection)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(data["instances"]))
        result = evaluate_panoptic(oracle, loader, gt_json=data["json"], gt_folder=data["png"], output_dir=tmp_path,
                                   coco_gt=coco_gt, progress=False)
    assert result["num_images"] == 5 and result["dropped_segments"] == 5
    pq = result["panoptic"]
    assert pq["num_images"] == 5 and pq["All"]["pq"] > 0.8 and pq["All"]["rq"] > 0.85
    assert result["segm"]["AP"] > 0.5 and result["bbox"]["AP"] > 0.5
    written = json.loads(Path(result["predictions"]["json"]).read_text())["annotations"]
    rescored = pq_compute(data["json"], data["png"], result["predictions"]["json"], result["predictions"]["folder"],
                          image_ids=[entry["image_id"] for entry in written])
    assert rescored == pq
    for entry in written:  # the PNGs are at the original size, ids 1..N (0 = unlabeled)
        ids = read_segment_ids(Path(result["predictions"]["folder"]) / entry["file_name"])
        assert ids.shape == read_segment_ids(data["png"] / f"{entry['image_id']:012d}.png").shape
        assert [s["id"] for s in entry["segments_info"]] == list(range(1, len(entry["segments_info"]) + 1))
        assert (ids == 0).any()  # the dropped category-0 query left unlabeled pixels


def _eval_args(checkpoint: Path, gt_json: Path, gt_folder: Path, instances: Path, out: Path) -> argparse.Namespace:
    return build_parser().parse_args([  # the `detr eval` flags
        "eval", "--checkpoint", str(checkpoint), "--panoptic", "--panoptic_json", str(gt_json), "--panoptic_folder",
        str(gt_folder), "--val_images", str(VAL_IMAGES), "--val_json", str(instances), "--val_scale", "96",
        "--max_size", "160", "--panoptic_threshold", "0", "--num_workers", "0", "--no_progress", "--output_dir",
        str(out),
    ])


def _own_instances(checkpoint: Path, dataset: CocoPanoptic, path: Path) -> Path:
    """An instances json of every detection (box, label, binary mask) the checkpoint's model makes on
    ``dataset`` in batches of 2, for the queries whose label is a category and whose mask is not empty."""
    model = load_checkpoint(checkpoint).eval()
    annotations = []
    with torch.inference_mode():
        for images, targets in DataLoader(dataset, batch_size=2, collate_fn=collate_detection):
            outputs = model(images)
            orig_sizes = torch.stack([t["orig_size"] for t in targets])
            results = postprocess_detections(outputs, orig_sizes)
            postprocess_masks(results, outputs["pred_masks"], torch.stack([t["size"] for t in targets]), orig_sizes)
            for target, found in zip(targets, results, strict=True):
                for box, label, mask in zip(found["boxes"].tolist(), found["labels"].tolist(), found["masks"],
                                            strict=True):
                    if label not in dataset.categories or not mask.any():
                        continue
                    rle = mask_utils.encode(np.asfortranarray(mask[0].numpy()))
                    x0, y0, x1, y1 = box
                    annotations.append({"id": len(annotations) + 1, "image_id": int(target["image_id"]),
                                        "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                        "segmentation": {**rle, "counts": rle["counts"].decode()},
                                        "area": float(mask_utils.area(rle)), "iscrowd": 0})
    images = [dataset.images[i] for i in dataset.ids]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": list(dataset.categories.values())}))
    return path


def test_eval_command_with_a_reference_panoptic_checkpoint(reference, data, tmp_path, capsys):
    entry = reference["panoptic"]
    checkpoint = tmp_path / "detr-panoptic.pth"
    torch.save({"model": {k: v.float() for k, v in entry["state_dict"].items()},
                "args": argparse.Namespace(**entry["config"])}, checkpoint)
    gt = data["converted"]
    subset = {**gt, "annotations": gt["annotations"][:3]}  # three images keep it fast
    (tmp_path / "gt.json").write_text(json.dumps(subset))
    args = _eval_args(checkpoint, tmp_path / "gt.json", data["png"], data["instances"], tmp_path / "eval")
    assert cmd_eval(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert printed == metrics and metrics["num_images"] == 3 and metrics["panoptic"]["num_images"] == 3
    written = json.loads((tmp_path / "eval" / "panoptic_pred.json").read_text())["annotations"]
    assert sum(len(a["segments_info"]) for a in written) + metrics["dropped_segments"] > 0
    rescored = pq_compute(tmp_path / "gt.json", data["png"], tmp_path / "eval" / "panoptic_pred.json",
                          tmp_path / "eval" / "panoptic_pred")
    assert rescored == json.loads(json.dumps(metrics["panoptic"]), object_hook=_int_keys)
    # Every number equals evaluate_panoptic in Python on the model the command runs (norms folded) and the
    # data its flags name.
    transforms = make_coco_transforms("val", scales=[96], max_size=160)
    dataset = CocoPanoptic(VAL_IMAGES, tmp_path / "gt.json", data["png"], transforms=transforms, return_masks=False)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = evaluate_panoptic(
            optimize_for_inference(load_checkpoint(checkpoint)), DataLoader(dataset, batch_size=2,
                                                                            collate_fn=collate_detection),
            gt_json=tmp_path / "gt.json", gt_folder=data["png"], output_dir=tmp_path / "python",
            coco_gt=COCO(str(data["instances"])), threshold=0.0, progress=False)
    for key in ("bbox", "segm", "dropped_segments", "num_images"):
        assert metrics[key] == expected[key], key
    assert metrics["panoptic"] == json.loads(json.dumps(expected["panoptic"]))

    # Against its own predictions (the panoptic files it wrote; the instances of the model as loaded,
    # without folding, computed here): PQ, box AP and mask AP of 1.
    own_json = tmp_path / "own.json"
    own_json.write_text(json.dumps({**subset, "annotations": written}))
    instances = _own_instances(checkpoint, dataset, tmp_path / "own_instances.json")
    assert cmd_eval(_eval_args(checkpoint, own_json, tmp_path / "eval" / "panoptic_pred", instances,
                                        tmp_path / "own")) == 0
    own = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert [own["panoptic"]["All"][m] for m in ("pq", "sq", "rq")] == [1.0, 1.0, 1.0]
    assert own["panoptic"]["All"]["n"] == len({s["category_id"] for a in written for s in a["segments_info"]}) > 0
    for iou_type in ("bbox", "segm"):
        assert {k: own[iou_type][k] for k in ("AP", "AP50", "AP75", "AR100")} == dict.fromkeys(
            ("AP", "AP50", "AP75", "AR100"), 1.0), (iou_type, own[iou_type])

    args.checkpoint = str(COCO_MINI / "missing.pth")
    with pytest.raises(FileNotFoundError):
        cmd_eval(args)


def _int_keys(d: dict) -> dict:
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}
