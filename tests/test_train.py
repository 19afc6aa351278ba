"""Training end to end on tiny shapes data: resume after SIGKILL, DDP equality, NaN stop, fine-tuning."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port
from detr.checkpoint import read_checkpoint
from detr.config import preset
from detr.data.batch import DetectionBatch
from detr.data.shapes import generate_shapes
from detr.distributed import wrap_for_training
from detr.engine import train as train_module
from detr.engine.optim import build_optimizer
from detr.engine.options import TrainOptions
from detr.engine.plot import plot_log
from detr.engine.train import NonFiniteLossError, Stepper, train
from detr.loss import SetCriterion
from detr.model import build_detr
from detr.structures import as_image_batch

TINY = ["--preset", "shapes-small", "--hidden_dim", "32", "--dim_feedforward", "64", "--enc_layers", "1",
        "--dec_layers", "2", "--num_queries", "5", "--train_scales", "64", "--val_scale", "64", "--max_size", "128",
        "--num_workers", "0", "--no_progress", "--eval_every", "0"]


def tiny_config():
    return preset("shapes-small", num_queries=5).with_transformer(
        hidden_dim=32, dim_feedforward=64, enc_layers=1, dec_layers=2)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=4, image_size=64, seed=3)


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "detr.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def log_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_sigkill_mid_epoch_then_resume_continues_exactly(shapes, tmp_path):
    common = ["train", "--coco_path", str(shapes), *TINY, "--batch_size", "2", "--epochs", "4", "--seed", "7"]
    reference_run = run_cli([*common, "--output_dir", str(tmp_path / "straight")])
    killed_dir = tmp_path / "killed"
    victim = run_cli([*common, "--output_dir", str(killed_dir)])
    try:
        # Kill once epoch 1 is under way: the epoch-0 checkpoint exists and steps of epoch 1 are logged.
        deadline = time.monotonic() + 240
        while True:
            steps = [r for r in log_records(killed_dir / "log.jsonl") if r["type"] == "step" and r["epoch"] == 1]
            if len(steps) >= 2:
                break
            assert victim.poll() is None, victim.communicate()[0]
            if time.monotonic() > deadline:  # never got to kill it mid-epoch: nothing below would test resuming
                pytest.fail("the run logged no two steps of epoch 1 within 240 s; no kill mid-epoch happened")
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    except BaseException:
        for process in (victim, reference_run):
            process.kill()
            process.wait()
        raise
    ckpt = read_checkpoint(killed_dir / "checkpoint.pth")  # intact, readable
    assert ckpt.extra["epoch"] in (0, 1)
    assert not list(killed_dir.glob(".*.tmp"))  # at most a temp file that never replaced anything
    resumed = run_cli([*common, "--output_dir", str(killed_dir), "--resume", str(killed_dir / "checkpoint.pth")])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    out_ref, _ = reference_run.communicate(timeout=300)
    assert reference_run.returncode == 0, out_ref
    epochs = [r["epoch"] for r in log_records(killed_dir / "log.jsonl") if r["type"] == "epoch"]
    assert epochs[-1] == 3
    # Resuming reproduces the uninterrupted run bit for bit.
    straight = read_checkpoint(tmp_path / "straight" / "checkpoint.pth").state_dict
    after = read_checkpoint(killed_dir / "checkpoint.pth").state_dict
    for key, value in straight.items():
        assert torch.equal(value, after[key]), key
    plot = plot_log(killed_dir / "log.jsonl")
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("masks", [False, True], ids=["boxes", "masks"])
def test_two_process_ddp_matches_one_process(shapes, tmp_path, masks):
    # masks: the mask head runs, on demand, inside the criterion (outside DDP's forward)
    common = ["--coco_path", str(shapes), *TINY, "--no_augment", "--epochs", "1", "--seed", "1"]
    common += ["--masks", "--hidden_dim", "128"] if masks else []  # the mask head's narrowest GroupNorm needs 128
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "detr.cli", "train", *common, "--batch_size", "1", "--output_dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    single = run_cli(["train", *common, "--batch_size", "2", "--output_dir", str(tmp_path / "one")])
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out
    ddp_steps = [r for r in log_records(tmp_path / "ddp" / "log.jsonl") if r["type"] == "step"]
    one_steps = [r for r in log_records(tmp_path / "one" / "log.jsonl") if r["type"] == "step"]
    assert len(ddp_steps) == len(one_steps) == 6
    for a, b in zip(ddp_steps, one_steps, strict=True):
        for key in ("loss", "loss_ce", "loss_bbox", "loss_giou") + (("loss_mask", "loss_dice") if masks else ()):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    w_ddp = read_checkpoint(tmp_path / "ddp" / "checkpoint.pth").state_dict
    w_one = read_checkpoint(tmp_path / "one" / "checkpoint.pth").state_dict
    assert max((w_ddp[k].float() - w_one[k].float()).abs().max().item() for k in w_one) < 1e-4


def _options(shapes: Path, out: Path, **kw) -> TrainOptions:
    base = dict(coco_path=str(shapes), output_dir=str(out), epochs=2, batch_size=4, num_workers=0, progress=False,
                train_scales=[64], val_scale=64, max_size=128, eval_every=0, seed=0)
    return TrainOptions.from_flat(**{**base, **kw})


def test_nan_loss_stops_and_leaves_last_checkpoint(shapes, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real_forward = train_module.SetCriterion.forward
    calls = {"n": 0}

    def poisoned(self, outputs, targets):
        calls["n"] += 1
        result = real_forward(self, outputs, targets)
        if calls["n"] > 3:  # epoch 0 has 3 steps; poison epoch 1
            result.total = result.total * float("nan")
        return result

    monkeypatch.setattr(train_module.SetCriterion, "forward", poisoned)
    monkeypatch.setattr(train_module, "_evaluate", lambda *a, **k: {})
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 0"):
        train(tiny_config(), _options(shapes, out))
    before = (out / "checkpoint.pth").read_bytes()
    assert read_checkpoint(out / "checkpoint.pth").extra["epoch"] == 0
    assert (out / "checkpoint.pth").read_bytes() == before


def test_finetune_from_other_class_count_reinitializes_head(shapes, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_module, "_evaluate", lambda *a, **k: {"bbox_AP": 0.0})
    source = tmp_path / "src.safetensors"
    from detr.checkpoint import save_checkpoint
    from detr.model import build_detr

    other = build_detr(tiny_config().replace(num_classes=9))
    save_checkpoint(other, source)
    with caplog.at_level("WARNING"):
        train(tiny_config(), _options(shapes, tmp_path / "ft", epochs=1, pretrained=str(source)))
    assert "re-initialized" in caplog.text and "class_embed.weight" in caplog.text
    tuned = read_checkpoint(tmp_path / "ft" / "model.safetensors")
    assert tuned.config.num_classes == 4
    assert tuned.metadata["class_names"] == {"1": "rectangle", "2": "ellipse", "3": "triangle"}


def _denoising_ddp_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=60))  # a mismatch fails, not hangs
    try:
        torch.manual_seed(0)  # the same initial weights on both processes
        config = tiny_config().with_queries(anchors=True, denoising_groups=2)
        model = build_detr(config)
        optimizer = build_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
        stepper = Stepper(wrap_for_training(model, torch.device("cpu")), SetCriterion.from_config(config),
                          optimizer, torch.device("cpu"))
        torch.manual_seed(1 + rank)
        # rank 0: an image with two objects; rank 1: a background image (no object at all)
        objects = 2 if rank == 0 else 0
        target = {"labels": torch.randint(1, config.num_classes, (objects,)),
                  "boxes": torch.rand(objects, 4) * 0.4 + 0.3}
        batch = DetectionBatch(as_image_batch([torch.rand(3, 64, 64)]), [target])
        stats = [stepper.step(batch, f"step {i}") for i in range(2)]
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"stats": stats, "weights": weights}, Path(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_with_denoising_and_a_batch_without_objects(tmp_path):
    # Issue 19: a process whose local batch had no object reported no denoising terms, so the processes
    # all-reduced lists of different lengths and gloo aborted ("Received data size doesn't match").
    torch.multiprocessing.spawn(_denoising_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["stats"] == rank1["stats"]  # the same averaged terms, under the same names, on both processes
    for step in rank0["stats"]:
        # the real terms of rank 0 averaged with rank 1's zeros: present, finite, not zero
        assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0"} <= step.keys()
        assert all(step[k] > 0 for k in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"))
    assert torch.equal(rank0["weights"], rank1["weights"])  # gradients were averaged: the replicas stayed equal
