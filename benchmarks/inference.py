"""Inference speed of DETR-R50 against the machine's FLOP floor, and against Hugging Face's DETR.

    python benchmarks/inference.py --json [--precision bf16] [--runs 5] [--no_hf] [--device cuda]

One JSON line: seconds per image (median of --runs timed runs after a warm-up) for one 800x1066 image
and for a batch of 4 mixed-size images, the model's FLOPs (torch.utils.flop_counter), the machine's
measured matmul throughput (fp32, and bf16), the floor = FLOPs / throughput, ``ratio_to_floor`` and
``speedup_vs_hf`` (transformers' DetrForObjectDetection, same architecture, random weights).
Random weights are fine: the work does not depend on the values. With ``--precision bf16`` the line adds
``speedup_vs_fp32`` (against the same model in fp32), ``speedup_vs_plain_fp32`` (against the unoptimized
model in fp32, the reference's way of running) and ``bf16_max_abs_diff`` (bf16 outputs vs fp32 ones).
On ``--device cuda`` every timed call ends with a synchronize, and the matmul is timed on the GPU.

By default the model runs the way ``detr predict`` / ``detr eval`` run it: through
``optimize_for_inference`` (frozen norms folded into the convolutions, channels-last) in a process whose
malloc keeps large freed blocks (``detr.runtime.keep_freed_memory``; it applies to the Hugging Face
model too). ``--baseline`` measures the plain model with malloc left alone (the "before" numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from detr import build_detr, preset
from detr.model.fuse import compile_for_inference, optimize_for_inference
from detr.runtime import keep_freed_memory

SINGLE = (800, 1066)
CPU = torch.device("cpu")
MIXED = ((800, 1066), (800, 1201), (736, 1104), (800, 983))  # a batch of 4 COCO-like sizes (padded inside)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_throughput(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0,
                      device: torch.device = CPU) -> float:
    """Sustained FLOP/s of an n x n matrix product in ``dtype`` (best of repeated runs)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    synchronize(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def median_seconds(fn: Callable[[], object], runs: int, warmup: int = 2,
                   device: torch.device = CPU) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def count_flops(model: torch.nn.Module, images: list[torch.Tensor]) -> int:
    # The counter needs ordinary tensors (not inference_mode); the model's parameters are frozen.
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def max_abs_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: float(f"{(a[k].float() - b[k].float()).abs().max().item():.2g}") for k in ("pred_logits", "pred_boxes")}


def hf_model() -> torch.nn.Module:
    from transformers import DetrConfig, DetrForObjectDetection

    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91)
    return DetrForObjectDetection(config).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--no_hf", action="store_true", help="skip the Hugging Face comparison")
    p.add_argument("--baseline", action="store_true", help="the plain model, malloc untouched (before speed work)")
    p.add_argument("--compile", action="store_true",
                   help="also time compile_for_inference (torch.compile; ~1-2 min of compilation per shape)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no_tf32", action="store_true", help="cuda: fp32 convolutions and matmuls without TF32")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    malloc_tuned = False if args.baseline else keep_freed_memory()
    torch.manual_seed(0)
    model = build_detr(preset("r50")).eval().requires_grad_(False).to(device)
    flops_model = model
    if not args.baseline:
        model = optimize_for_inference(model)
    single = [torch.randn(3, *SINGLE, device=device)]
    mixed = [torch.randn(3, *size, device=device) for size in MIXED]

    def cast(precision: str = args.precision) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def ours(images: list[torch.Tensor], net: torch.nn.Module = model, precision: str = args.precision
             ) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode(), cast(precision):
                return net(images)
        return run

    # FLOPs of the model as defined (folding removes the norms' few elementwise FLOPs; the floor stays put)
    flops_single = count_flops(flops_model, single)
    flops_mixed = count_flops(flops_model, mixed)
    gpu = device.type == "cuda"
    fp32 = matmul_throughput(torch.float32, n=8192 if gpu else 2048, device=device)
    # Small on CPU: CPUs without bf16 instructions run bf16 matmuls hundreds of times slower than fp32.
    bf16 = matmul_throughput(torch.bfloat16, n=8192 if gpu else 512, device=device)
    peak = bf16 if args.precision == "bf16" else fp32
    t_single = median_seconds(ours(single), args.runs, device=device)
    t_mixed = median_seconds(ours(mixed), args.runs, device=device) / len(mixed)
    result = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "precision": args.precision, "threads": torch.get_num_threads(), "runs": args.runs,
        "tf32": gpu and torch.backends.cudnn.allow_tf32,
        "optimized": not args.baseline, "malloc_tuned": malloc_tuned,
        "seconds_per_image": round(t_single, 4), "seconds_per_image_batch4": round(t_mixed, 4),
        "gflops": round(flops_single / 1e9, 2), "gflops_batch4_per_image": round(flops_mixed / len(mixed) / 1e9, 2),
        "matmul_gflops_fp32": round(fp32 / 1e9, 1), "matmul_gflops_bf16": round(bf16 / 1e9, 1),
        "floor_seconds": round(flops_single / peak, 4),
        "ratio_to_floor": round(t_single / (flops_single / peak), 3),
        "ratio_to_floor_batch4": round(t_mixed / (flops_mixed / len(mixed) / peak), 3),
    }
    if not args.baseline:
        with torch.inference_mode():
            plain = flops_model(single)  # the unoptimized model: what the optimized ones must reproduce
        result["optimized_max_abs_diff"] = max_abs_diff(ours(single, precision="fp32")(), plain)
    if args.precision == "bf16":
        t_fp32 = median_seconds(ours(single, precision="fp32"), args.runs, device=device)
        t_plain = median_seconds(ours(single, net=flops_model, precision="fp32"), args.runs, device=device)
        t_fp32_mixed = median_seconds(ours(mixed, precision="fp32"), args.runs, device=device) / len(mixed)
        result.update({
            "fp32_seconds_per_image": round(t_fp32, 4), "plain_fp32_seconds_per_image": round(t_plain, 4),
            "speedup_vs_fp32": round(t_fp32 / t_single, 3), "speedup_vs_plain_fp32": round(t_plain / t_single, 3),
            "speedup_vs_fp32_batch4": round(t_fp32_mixed / t_mixed, 3),
            "bf16_max_abs_diff": max_abs_diff(ours(single)(), ours(single, precision="fp32")()),
        })
    if args.compile and not args.baseline:
        compiled = compile_for_inference(model)

        def run_compiled() -> object:
            with torch.inference_mode(), cast():
                return compiled(single)

        start = time.perf_counter()
        out = run_compiled()
        synchronize(device)
        compile_seconds = time.perf_counter() - start
        diff = max_abs_diff(out, plain)
        t_compiled = median_seconds(run_compiled, args.runs, device=device)
        result.update({"compiled_seconds_per_image": round(t_compiled, 4), "compile_seconds": round(compile_seconds, 1),
                       "compiled_ratio_to_floor": round(t_compiled / (flops_single / peak), 3),
                       "compiled_max_abs_diff": diff})
    if not args.no_hf:
        hf = hf_model().to(device)
        pixels = single[0][None]

        def run_hf() -> object:
            with torch.inference_mode(), cast():
                return hf(pixel_values=pixels)

        t_hf = median_seconds(run_hf, args.runs, device=device)
        result.update({"hf_seconds_per_image": round(t_hf, 4), "speedup_vs_hf": round(t_hf / t_single, 3),
                       "hf_ratio_to_floor": round(t_hf / (flops_single / peak), 3)})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
