"""Inference speed of Deformable DETR-R50 (4 levels, 6+6 layers, 300 queries) here and in transformers.

    python benchmarks/deformable_inference.py --json [--runs 5] [--variant plain|box-refine|two-stage]
    python benchmarks/deformable_inference.py --profile   # where each system's time goes, by operator

Both models carry the same (random) weights: transformers' ``DeformableDetrForObjectDetection`` is built,
saved with ``save_pretrained`` and loaded here with ``detr.load_checkpoint``, as a user would. One 800x1066
image; the two systems' runs alternate (ours, theirs, ours, ...) so that a busy machine slows both alike;
medians of ``--runs``. One JSON line: seconds per image each, ``speedup_vs_hf``, the max abs diff of the
logits and boxes, the model's FLOPs (``torch.utils.flop_counter``: convolutions and matmuls; the sampling
itself is a gather, a few percent of the work, and not counted), the machine's fp32 matmul throughput and
``ratio_to_floor`` = seconds / (FLOPs / throughput). Ours runs as ``detr predict`` runs it (through
``optimize_for_inference``, malloc keeping freed blocks for both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from inference import count_flops, matmul_throughput, max_abs_diff

from detr import load_checkpoint
from detr.model.fuse import optimize_for_inference
from detr.runtime import keep_freed_memory

SIZE = (800, 1066)
VARIANTS = {"plain": {}, "box-refine": {"with_box_refine": True},
            "two-stage": {"with_box_refine": True, "two_stage": True}}


def hf_deformable(variant: str) -> torch.nn.Module:
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    config = DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]), num_labels=91,
        **VARIANTS[variant],
    )
    return DeformableDetrForObjectDetection(config).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="plain")
    p.add_argument("--size", type=int, nargs=2, default=SIZE, metavar=("H", "W"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", action="store_true", help="print each system's top operators (one run) and stop")
    args = p.parse_args(argv)
    malloc_tuned = keep_freed_memory()
    torch.manual_seed(0)
    hf = hf_deformable(args.variant)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        plain = load_checkpoint(folder).eval().requires_grad_(False)
    ours = optimize_for_inference(plain)
    pixels = torch.randn(1, 3, *args.size)

    def run_ours() -> dict:
        with torch.inference_mode():
            return ours([pixels[0]])

    def run_hf() -> dict:
        with torch.inference_mode():
            out = hf(pixel_values=pixels)
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}

    diff = max_abs_diff(run_ours(), run_hf())  # also the warm-up
    run_ours(), run_hf()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("ours", run_ours), ("transformers", run_hf)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return 0
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(args.runs):
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    flops = count_flops(plain, [pixels[0]])
    fp32 = matmul_throughput(torch.float32)
    print(json.dumps({
        "variant": args.variant, "image": list(args.size), "threads": torch.get_num_threads(), "runs": args.runs,
        "malloc_tuned": malloc_tuned, "seconds_per_image": round(t_ours, 4), "hf_seconds_per_image": round(t_hf, 4),
        "speedup_vs_hf": round(t_hf / t_ours, 3), "spread_ours": [round(min(times["ours"]), 4),
                                                                  round(max(times["ours"]), 4)],
        "spread_hf": [round(min(times["hf"]), 4), round(max(times["hf"]), 4)],
        "max_abs_diff_vs_hf": diff, "gflops": round(flops / 1e9, 2), "matmul_gflops_fp32": round(fp32 / 1e9, 1),
        "floor_seconds": round(flops / fp32, 4), "ratio_to_floor": round(t_ours / (flops / fp32), 3),
        "hf_ratio_to_floor": round(t_hf / (flops / fp32), 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
