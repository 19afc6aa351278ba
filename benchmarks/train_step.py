"""One DETR-R50 training step (forward, matching, loss, backward, clip, step) at batch 2 of ~512x683 images.

    python benchmarks/train_step.py --json [--runs 5] [--amp bf16] [--compare] [--profile] [--deformable]

One JSON line: images/s and the median seconds of each phase; ``matcher_loss_share`` is the share of
the step spent in the Hungarian matcher and the losses (the issue's goal: under 5%). The process
reuses large freed blocks as ``detr train`` does (``detr.runtime.keep_freed_memory``); ``--baseline``
leaves malloc alone.

``--amp bf16`` runs our forward under bf16 autocast (as ``detr train --amp bf16``) and also times our
fp32 step. ``--compare`` also times transformers' ``DetrForObjectDetection`` (random weights, fp32,
trained with ``labels``) made to train what ours trains: backbone stages 2-4 (transformers' own freezing
matches no parameter name of its ResNet and freezes the whole trunk), auxiliary losses, dropout 0.1 in
the attention weights and the feed-forward layers as in the paper (transformers' defaults: 0); its
defaults instead with ``--hf_defaults``. The systems' steps alternate (ours, reference, ours, ...), so
load from other processes hits both alike; ``speedup`` is the ratio of median step times, with the
ratio's spread over the rounds. ``--profile`` prints torch.profiler's top operators (self milliseconds a
step, the mean of two steps after the timed rounds; CPU time, or GPU kernel time with ``--device cuda``) of
every system timed, side by side, to stderr. ``--tiny`` (tests): 64x96 images, one run.

``--device cuda`` times the step on a GPU (synchronized at each phase boundary; the JSON names the device);
``--batch N --size S`` trains N images of short side S (long sides alternating 4:3 and 5:4, as the default
batch's 512x683 + 512x640), e.g. the GPU check ``--device cuda --batch 8 --size 800 [--amp bf16] [--compile]``.
``--compile`` wraps our model in ``torch.compile`` (the matcher and the losses stay eager); its first step,
the compilation, is reported apart as ``compile_seconds`` and kept out of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from detr import build_detr, preset
from detr.engine.optim import build_optimizer, parameter_groups
from detr.loss import SetCriterion
from detr.runtime import CPU_BF16_FLAGS, cpu_flags, cpu_model, keep_freed_memory, native_bf16

SIZES = ((512, 683), (512, 640))
TINY_SIZES = ((64, 96), (64, 80))

PHASES = ("forward", "matcher_loss", "backward", "clip_step")

Step = Callable[[], dict[str, float]]


def batch_sizes(batch: int, size: int) -> list[tuple[int, int]]:
    """``batch`` image sizes of short side ``size``, long sides alternating as the default batch's (4:3, 5:4)."""
    return [(size, round(size * (683 if i % 2 == 0 else 640) / 512)) for i in range(batch)]


def targets(generator: torch.Generator, count: int, num_objects: int = 7) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(count):
        centers = torch.rand(num_objects, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(num_objects, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(1, 91, (num_objects,), generator=generator)
        out.append({"boxes": torch.cat([centers, sizes], dim=1), "labels": labels})
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def clock(device: torch.device) -> Callable[[], float]:
    """perf_counter after the device's queued work is done (a GPU runs asynchronously)."""
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def ours_step(images: list[torch.Tensor], batch_targets: list[dict], amp: str, name: str = "r50", *,
              compile: bool = False) -> Step:
    """Our training step as ``detr.engine.train.Stepper`` runs it: autocast forward, fp32 matching and loss."""
    device = images[0].device
    config = preset(name)
    model = build_detr(config).train().to(device)
    forward = torch.compile(model) if compile else model
    criterion = SetCriterion.from_config(config)
    optimizer = build_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    bf16 = amp == "bf16"
    now = clock(device)

    def step() -> dict[str, float]:
        t0 = now()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = forward(images)
        t1 = now()
        result = criterion(outputs, batch_targets)
        t2 = now()
        optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        t3 = now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        t4 = now()
        return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))

    return step


def hf_model(defaults: bool = False, deformable: bool = False) -> torch.nn.Module:
    """transformers' DETR-R50 (or Deformable DETR-R50) with random weights; unless ``defaults``, training what
    the paper trains."""
    if deformable:
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

        # Deformable DETR trains with auxiliary losses and dropout 0.1 after each sublayer (no attention maps)
        same = {} if defaults else {"auxiliary_loss": True, "activation_dropout": 0.1}
        config = DeformableDetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91,
                                      backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
                                      **same)
        model = DeformableDetrForObjectDetection(config).train()
    else:
        from transformers import DetrConfig, DetrForObjectDetection

        same = {} if defaults else {"auxiliary_loss": True, "attention_dropout": 0.1, "activation_dropout": 0.1}
        model = DetrForObjectDetection(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                                                  num_labels=91, **same)).train()
    if not defaults:  # stages 2-4 of the trunk train (its names are encoder.stages.1..3)
        for name, param in model.model.backbone.named_parameters():
            param.requires_grad_(".stages.0." not in name and ".embedder." not in name)
    return model


def hf_step(images: list[torch.Tensor], batch_targets: list[dict], defaults: bool, deformable: bool = False) -> Step:
    device = images[0].device
    model = hf_model(defaults, deformable).to(device)
    now = clock(device)
    # The reference trains with torch's AdamW as it comes, same groups and learning rates as ours.
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-4, 1e-5), lr=1e-4, weight_decay=1e-4)
    height, width = (max(s) for s in zip(*(x.shape[-2:] for x in images), strict=True))
    pixels = torch.stack([F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2])) for x in images])
    pixel_mask = torch.zeros(len(images), height, width, dtype=torch.long, device=device)  # 1 = image
    for i, x in enumerate(images):
        pixel_mask[i, : x.shape[-2], : x.shape[-1]] = 1
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in batch_targets]

    def step() -> dict[str, float]:
        t0 = now()
        loss = model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss  # matching + loss inside
        t1 = now()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        t3 = now()
        return {"forward_and_loss": t1 - t0, "backward": t2 - t1, "clip_step": t3 - t2}

    return step


def operator_milliseconds(step: Step, device: torch.device, steps: int = 2) -> dict[str, float]:
    """Self milliseconds of each operator in one step (torch.profiler; the mean of ``steps`` steps): CPU time on
    the CPU, the GPU's kernel time on CUDA (where the CPU's is only the launches)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    totals: dict[str, float] = {}
    for _ in range(steps):
        with profile(activities=activities) as prof:
            step()
        for event in prof.key_averages():
            micros = event.self_device_time_total if cuda else event.self_cpu_time_total
            if micros:
                totals[event.key] = totals.get(event.key, 0.0) + micros / 1e3 / steps
    return totals


def profile_table(systems: dict[str, Step], device: torch.device, rows: int = 25) -> str:
    """A markdown table of the top operators by self time, one column per system (side by side: where one
    system spends what the other does not), and each system's total."""
    columns = {name: operator_milliseconds(step, device) for name, step in systems.items()}
    ops = sorted({op for ms in columns.values() for op in ms}, key=lambda op: -max(ms.get(op, 0.0) for ms in
                                                                                   columns.values()))
    clock = "GPU" if device.type == "cuda" else "CPU"
    lines = [f"| operator (self {clock} ms a step) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for op in ops[:rows]:
        lines.append(f"| {op} | " + " | ".join(f"{ms.get(op, 0.0):.1f}" for ms in columns.values()) + " |")
    lines.append("| total | " + " | ".join(f"{sum(ms.values()):.1f}" for ms in columns.values()) + " |")
    return "\n".join(lines)


def summary(runs: list[dict[str, float]], batch: int) -> dict[str, float]:
    totals = [sum(r.values()) for r in runs]
    out = {"images_per_s": round(batch / statistics.median(totals), 3),
           "step_seconds": round(statistics.median(totals), 4),
           "step_seconds_range": [round(min(totals), 4), round(max(totals), 4)]}
    for name in runs[0]:
        out[f"{name}_seconds"] = round(statistics.median(r[name] for r in runs), 4)
    if "matcher_loss" in runs[0]:
        out["matcher_loss_share"] = round(statistics.median(r["matcher_loss"] / t for r, t in zip(runs, totals,
                                                                                                 strict=True)), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--amp", choices=("fp32", "bf16"), default="fp32", help="our forward's autocast dtype")
    p.add_argument("--compare", action="store_true", help="also time transformers' DetrForObjectDetection")
    p.add_argument("--hf_defaults", action="store_true", help="the reference with transformers' defaults")
    p.add_argument("--profile", action="store_true",
                   help="print the top operators of each system's step, side by side, to stderr")
    p.add_argument("--tiny", action="store_true", help="64x96 images, one run (a smoke test)")
    p.add_argument("--baseline", action="store_true", help="leave malloc alone (before the speed work)")
    p.add_argument("--deformable", action="store_true",
                   help="Deformable DETR-R50 (preset deformable-r50; transformers' DeformableDetrForObjectDetection)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch", type=int, default=None, help="images a step (with --size; default: the 2 above)")
    p.add_argument("--size", type=int, default=512, help="with --batch: the images' short side")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (the first step compiles)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model_name = "deformable-r50" if args.deformable else "r50"
    runs = 1 if args.tiny else args.runs
    malloc_tuned = False if args.baseline else keep_freed_memory()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sizes = TINY_SIZES if args.tiny else SIZES if args.batch is None else batch_sizes(args.batch, args.size)
    images = [torch.randn(3, *size, generator=g).to(device) for size in sizes]
    batch_targets = [{k: v.to(device) for k, v in t.items()} for t in targets(g, len(images))]
    systems: dict[str, Step] = {"ours": ours_step(images, batch_targets, args.amp, model_name, compile=args.compile)}
    if args.amp != "fp32":
        systems["ours_fp32"] = ours_step(images, batch_targets, "fp32", model_name, compile=args.compile)
    if args.compare:
        systems["reference"] = hf_step(images, batch_targets, args.hf_defaults, args.deformable)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    warm_up: dict[str, float] = {}
    for run in range(runs + 1):  # the first round is a warm-up (with --compile: the compilation)
        for name, step in systems.items():
            phases = step()
            if run:
                times[name].append(phases)
            else:
                warm_up[name] = sum(phases.values())
    if args.profile:
        print(profile_table(systems, device), file=sys.stderr)
    result: dict = {
        "model": model_name, "batch": len(images), "sizes": sizes, "runs": runs, "threads": torch.get_num_threads(),
        "malloc_tuned": malloc_tuned, "amp": args.amp, "native_bf16": native_bf16(device),
        "cpu": cpu_model(), "cpu_bf16_flags": sorted(cpu_flags() & CPU_BF16_FLAGS), "device": device_name(device),
        "compile": args.compile, **summary(times["ours"], len(images)),
    }
    if args.compile:
        result["compile_seconds"] = {name: round(warm_up[name], 1) for name in systems if name.startswith("ours")}
    for name in systems:
        if name != "ours":
            result[name] = summary(times[name], len(images))
            ratios = [sum(o.values()) and sum(t.values()) / sum(o.values())
                      for o, t in zip(times["ours"], times[name], strict=True)]
            key = "speedup_vs_reference" if name == "reference" else "speedup_vs_fp32"
            result[key] = round(result[name]["step_seconds"] / result["step_seconds"], 3)
            result[f"{key}_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    if args.compare:
        result["reference_config"] = "transformers defaults" if args.hf_defaults else "trains what ours trains"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
