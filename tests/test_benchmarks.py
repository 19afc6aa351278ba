"""The benchmark scripts' pieces that can be checked quickly (their timed runs live in benchmarks/)."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import COCO_MINI

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overfit_subset_keeps_the_first_images_and_their_annotations(tmp_path):
    overfit = _load("overfit")
    source = COCO_MINI / "annotations" / "instances_train2017.json"
    images, objects = overfit.subset_annotations(source, 10, tmp_path / "subset.json")
    data, full = json.loads((tmp_path / "subset.json").read_text()), json.loads(source.read_text())
    assert [im["id"] for im in data["images"]] == [im["id"] for im in full["images"][:10]] and images == 10
    ids = {im["id"] for im in data["images"]}
    expected = [a for a in full["annotations"] if a["image_id"] in ids]
    assert data["annotations"] == expected and data["categories"] == full["categories"]
    assert objects == sum(1 for a in expected if not a["iscrowd"]) > 0
    with pytest.raises(ValueError, match="--images"):
        overfit.subset_annotations(source, len(full["images"]) + 1, tmp_path / "x.json")


def test_train_step_targets_are_valid_boxes():
    import torch

    targets = _load("train_step").targets(torch.Generator().manual_seed(0), 2)
    for t in targets:
        boxes = t["boxes"]
        assert boxes.shape == (7, 4) and (boxes[:, :2] - boxes[:, 2:] / 2 >= 0).all()
        assert (boxes[:, :2] + boxes[:, 2:] / 2 <= 1).all() and ((t["labels"] >= 1) & (t["labels"] <= 90)).all()


def test_overfit_panoptic_subset_is_both_splits(tmp_path):
    overfit = _load("overfit")
    subset, images, segments = overfit.panoptic_subset(str(COCO_MINI), 2, tmp_path)
    assert images == 2 and json.loads(subset.read_text())["images"][1]["id"] > 0
    train = json.loads((tmp_path / "annotations" / "panoptic_train2017.json").read_text())
    val = json.loads((tmp_path / "annotations" / "panoptic_val2017.json").read_text())
    assert train == val and len(train["annotations"]) == 2
    assert segments == sum(len(a["segments_info"]) for a in train["annotations"]) > 0
    assert len(list((tmp_path / "annotations" / "panoptic_val2017").glob("*.png"))) == 2
    with pytest.raises(SystemExit):
        overfit.main(["--coco_path", str(COCO_MINI), "--masks", "--resume", "x.pth"])


@pytest.mark.parametrize("flag", [["--pretrained", "x.safetensors"], ["--unfrozen"]])
def test_overfit_mask_stage_flags_need_masks(flag, capsys):
    with pytest.raises(SystemExit):
        _load("overfit").main(["--coco_path", str(COCO_MINI), *flag])
    assert "need --masks" in capsys.readouterr().err


def test_overfit_backbone_lr_needs_unfrozen(capsys):
    with pytest.raises(SystemExit):
        _load("overfit").main(["--coco_path", str(COCO_MINI), "--masks", "--mask_lr_backbone", "1e-4"])
    assert "needs --unfrozen" in capsys.readouterr().err


def _overfit_options(monkeypatch, capsys, *flags: str):
    """overfit.py's training options and its JSON line for ``flags``, its training replaced by a recorder."""
    overfit = _load("overfit")
    seen = {}

    def fake_train(config, options):
        seen["options"] = options
        return {"bbox_AP": 0.5, "bbox_AP50": 0.75, "train_loss": 1.0}

    monkeypatch.setattr(overfit, "train", fake_train)
    assert overfit.main(["--coco_path", str(COCO_MINI), "--json", *flags]) == 0
    return seen["options"], json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(("flags", "expected"), [([], 20), (["--lr_drop", "25"], 25)])
def test_overfit_lr_drop_reaches_the_training_options(flags, expected, monkeypatch, capsys):
    options, line = _overfit_options(monkeypatch, capsys, "--epochs", "30", *flags)
    assert options.optim.lr_drop == expected  # default: two thirds of 30
    assert line["lr_drop"] == expected


def test_overfit_amp_reaches_the_training_options(monkeypatch, capsys):
    options, line = _overfit_options(monkeypatch, capsys, "--epochs", "3", "--amp", "bf16")
    assert options.optim.amp == "bf16" and line["amp"] == "bf16"


def test_inference_bf16_line_compares_with_fp32(monkeypatch, capsys):
    """The whole benchmark at tiny image sizes: the bf16 line carries its fp32 comparison."""
    inference = _load("inference")
    monkeypatch.setattr(inference, "SINGLE", (64, 96))
    monkeypatch.setattr(inference, "MIXED", ((64, 96), (96, 64)))
    monkeypatch.setattr(inference, "keep_freed_memory", lambda: False)  # a process-wide setting: not in tests
    monkeypatch.setattr(inference, "matmul_throughput", lambda dtype, n=0, seconds=0, device=None: 1e11)
    assert inference.main(["--precision", "bf16", "--runs", "1", "--no_hf", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["device"] == "cpu" and line["precision"] == "bf16" and line["fp32_seconds_per_image"] > 0
    ratio = line["fp32_seconds_per_image"] / line["seconds_per_image"]
    assert line["speedup_vs_fp32"] == pytest.approx(ratio, rel=0.05)
    assert 0 < line["bf16_max_abs_diff"]["pred_boxes"] < 0.1 and line["optimized_max_abs_diff"]["pred_boxes"] < 1e-4


def _synthetic_panoptic(tmp_path: Path, ids, segments) -> tuple[Path, Path]:
    import torch

    from detr.coco_panoptic import segment_ids_to_png

    folder = tmp_path / "png"
    folder.mkdir()
    (folder / "1.png").write_bytes(segment_ids_to_png(torch.as_tensor(ids)))
    gt = {"images": [{"id": 1, "file_name": "1.jpg", "height": ids.shape[0], "width": ids.shape[1]}],
          "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": segments}],
          "categories": [{"id": c, "name": str(c), "isthing": 1} for c in (1, 2, 3)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return tmp_path / "gt.json", folder


def test_pq_ceiling_is_exact_on_the_stride_grid_and_loses_what_a_cell_cannot_hold(tmp_path):
    import numpy as np

    ceilings = _load("pq_ceiling").ceilings
    ids = np.zeros((64, 96), dtype=np.int64)
    ids[8:40, 4:52] = 1  # edges on the 4-pixel grid: representable exactly at the native size
    ids[12:60, 60:92] = 2
    segments = [{"id": i, "category_id": i, "area": int((ids == i).sum()), "iscrowd": 0} for i in (1, 2)]
    gt_json, folder = _synthetic_panoptic(tmp_path, ids, segments)
    assert ceilings(gt_json, folder, [(64, 96)])[0]["pq_things"] == 1.0

    ids[20:22, 20:22] = 3  # 2x2 pixels inside segment 1: a quarter of one cell, always outvoted
    segments = [{"id": i, "category_id": i, "area": int((ids == i).sum()), "iscrowd": 0} for i in (1, 2, 3)]
    (tmp_path / "b").mkdir()
    gt_json, folder = _synthetic_panoptic(tmp_path / "b", ids, segments)
    (line,) = ceilings(gt_json, folder, [(64, 96)])
    assert line["segments"] == 3 and line["rq_things"] == pytest.approx(2 / 3, abs=1e-4)
    assert line["pq_things"] == pytest.approx((1 + 1532 / 1536) / 3, abs=1e-4)  # segment 1 keeps 4 extra pixels


def test_pq_ceiling_on_converted_coco_mini(tmp_path, capsys):
    overfit, script = _load("overfit"), _load("pq_ceiling")
    overfit.panoptic_subset(str(COCO_MINI), 2, tmp_path)
    annotations = tmp_path / "annotations"
    assert script.main(["--panoptic_json", str(annotations / "panoptic_val2017.json"),
                        "--panoptic_folder", str(annotations / "panoptic_val2017"), "--sizes", "32", "512"]) == 0
    small, large = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (small["size"], large["size"], large["max_size"]) == (32, 512, 853)
    assert 0 < small["pq_things"] < large["pq_things"] <= 1 and large["segments"] == small["segments"] > 0


def _convergence_run(tmp_path, name: str, flags: str, images: int) -> list[dict]:
    """One convergence.py run in its single-run form (--name/--flags/--log) on ``images`` images: its log lines."""
    import torch

    log = tmp_path / f"{name}_s0.jsonl"
    argv = ["--name", name, "--flags", flags, "--seed", "0", "--log", str(log), "--images", str(images),
            "--eval_every_images", "4", "--out", str(tmp_path), "--threads", str(torch.get_num_threads())]
    assert _load("convergence").main(argv) == 0
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_convergence_run_spends_the_image_budget_and_tables_its_evaluations(tmp_path):
    convergence = _load("convergence")
    log = tmp_path / "anchors_s0.jsonl"
    lines = _convergence_run(tmp_path, "anchors", "--anchor_queries --batch_size 4", images=8)
    run, done = lines[0], lines[-1]
    assert run["type"] == "run" and run["model"]["queries"]["anchors"] is True
    assert run["model"]["queries"]["two_stage"] is False
    assert done["type"] == "done" and (done["steps"], done["images"]) == (2, 8)  # 8 images / batch 4
    evals = [r for r in lines if r["type"] == "eval"]
    assert [e["images"] for e in evals] == [4, 8]
    summary = convergence.summary(log)
    assert summary["evals"] == [[e["train_s"], e["AP"], e["AP50"], e["images"]] for e in evals]
    table = convergence.table([log], [0.004, 0.008], by_images=True).splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:2] == ["anchors", "0"]
    assert cells[3:] == [f"{e['AP']:.3f} / {e['AP50']:.3f}" for e in evals]


def test_convergence_amp_flag_reaches_the_schedule_and_trains(tmp_path, monkeypatch):
    import detr.demo

    real, seen = detr.demo.train_shapes, {}

    def spy(config, task, schedule, **kwargs):
        seen["amp"] = schedule.amp
        return real(config, task, schedule, **kwargs)

    monkeypatch.setattr(detr.demo, "train_shapes", spy)
    lines = _convergence_run(tmp_path, "bf16", "--amp bf16 --batch_size 4", images=4)
    assert seen["amp"] == "bf16" and lines[0]["amp"] == "bf16"
    assert lines[-1]["type"] == "done" and lines[-1]["images"] == 4


def test_train_step_tiny_prints_images_per_second(capsys):
    # --baseline: malloc left alone, since the tuning would last for the rest of this test process
    assert _load("train_step").main(["--tiny", "--json", "--baseline"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images_per_s"] > 0 and result["runs"] == 1 and not result["malloc_tuned"]
    assert 0 < result["matcher_loss_share"] < 1
    assert isinstance(result["native_bf16"], bool) and result["forward_seconds"] > 0
    from detr.runtime import CPU_BF16_FLAGS, cpu_flags, cpu_model

    assert result["cpu"] == cpu_model() and result["cpu_bf16_flags"] == sorted(cpu_flags() & CPU_BF16_FLAGS)


def test_train_step_batch_and_size_set_the_images(capsys):
    assert _load("train_step").main(["--batch", "3", "--size", "48", "--runs", "1", "--json", "--baseline"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch"] == 3 and result["sizes"] == [[48, 64], [48, 60], [48, 64]]  # as 512x683, 512x640
    assert result["device"] == result["cpu"] and result["compile"] is False and "compile_seconds" not in result


def test_train_step_compile_traces_our_training_forward_as_one_graph(monkeypatch, capsys):
    """--compile wraps our model in torch.compile; with fullgraph=True any graph break (the CPU dropout's numpy
    generator, say) would raise. The eager backend keeps the test to the tracing (Inductor's code generation
    takes minutes on 2 cores)."""
    import functools

    import torch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager", fullgraph=True))
    assert _load("train_step").main(["--tiny", "--json", "--baseline", "--compile"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compile"] is True and set(result["compile_seconds"]) == {"ours"}
    assert result["images_per_s"] > 0


def test_deformable_training_forward_traces_as_one_graph():
    """The deformable attention takes its levels' sizes as ints: no size read back from a tensor, so no graph
    break (there were 21: the sampling core, the token-count check, the custom backward's context). One encoder
    and one decoder layer: the breaks were per layer."""
    import torch

    from detr import build_detr, preset

    torch.manual_seed(0)
    config = preset("deformable-r50").with_transformer(enc_layers=1, dec_layers=1, dropout=0.0)  # no draws: comparable
    model = build_detr(config).train()
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 80)]
    outputs = torch.compile(model, backend="eager", fullgraph=True)(images)  # raises at a graph break
    eager = model(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[key], eager[key], rtol=0, atol=0)
    outputs["pred_logits"].sum().backward()  # the sampling core's own backward, on the traced forward's output
    assert model.transformer.encoder.layers[0].self_attn.value_proj.weight.grad.abs().sum() > 0


def test_train_step_profile_puts_the_systems_side_by_side():
    """--profile's table: one row per operator, one column per system, the totals last. Two small real steps
    (a convolution's forward and backward; a matrix product) show each operator under the system that ran it."""
    import torch

    profile_table = _load("train_step").profile_table
    x, w = torch.randn(2, 32, 64, 64), torch.randn(32, 32, 3, 3, requires_grad=True)
    a, b = torch.randn(512, 512), torch.randn(512, 512)  # ~1 ms: above the table's 0.1 ms resolution
    systems = {"conv": lambda: torch.nn.functional.conv2d(x, w).sum().backward(), "matmul": lambda: a @ b}
    header, rule, *rows = profile_table(systems, torch.device("cpu"), rows=40).splitlines()
    assert header == "| operator (self CPU ms a step) | conv | matmul |" and rule == "|---|---|---|"
    cells = {row.split(" | ")[0].lstrip("| "): [float(v) for v in row.rstrip(" |").split(" | ")[1:]] for row in rows}
    assert cells["aten::convolution_backward"][0] > 0 and cells["aten::convolution_backward"][1] == 0
    assert cells["aten::mm"][1] > 0 and cells["aten::mm"][0] == 0
    assert list(cells)[-1] == "total"
    for column in (0, 1):  # every operator of the step, so at least the listed ones (each rounded to 0.05 ms)
        assert cells["total"][column] >= sum(v[column] for k, v in cells.items() if k != "total") - 0.05 * len(rows)


def test_train_step_deformable_times_ours_against_transformers_deformable_detr(capsys):
    assert _load("train_step").main(["--tiny", "--json", "--baseline", "--deformable", "--compare"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "deformable-r50" and result["reference_config"] == "trains what ours trains"
    assert result["images_per_s"] > 0 and result["reference"]["images_per_s"] > 0
    assert result["speedup_vs_reference"] == pytest.approx(
        result["reference"]["step_seconds"] / result["step_seconds"], rel=1e-2)


def test_convergence_small_task_has_only_small_objects_and_scores_aps(tmp_path):
    import torch

    convergence = _load("convergence")
    log = tmp_path / "two-stage_s0.jsonl"
    argv = ["--name", "two-stage", "--flags", "--anchor_queries --two_stage --batch_size 2", "--seed", "0",
            "--log", str(log), "--images", "2", "--eval_every_images", "2", "--out", str(tmp_path), "--small",
            "--threads", str(torch.get_num_threads())]
    assert convergence.main(argv) == 0
    held_out = json.loads((tmp_path / "shapes" / "annotations" / "instances_val2017.json").read_text())
    assert {(i["width"], i["height"]) for i in held_out["images"]} == {(256, 256)}
    extents = [(a["bbox"][2] * a["bbox"][3]) ** 0.5 for a in held_out["annotations"]]
    assert 4 - 0.5 <= min(extents) and max(extents) <= 24 + 0.5  # box extents 4-24 px (pixel-rounded polygons)
    assert max(a["area"] for a in held_out["annotations"]) < 32 ** 2  # every object is COCO "small"
    assert len(held_out["annotations"]) >= 3 * len(held_out["images"])
    (evaluation,) = [json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line]
    assert {"APs", "APm", "APl"} <= set(evaluation) and evaluation["APm"] == evaluation["APl"] == -1.0
