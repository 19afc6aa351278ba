"""Convergence side by side: train option sets from scratch on the shapes task for an equal budget.

    python benchmarks/convergence.py --minutes 10 --seeds 0 1 --jobs 2 \\
        --set vanilla= --set anchors=--anchor_queries --set "two-stage=--anchor_queries --two_stage" \\
        --out outputs/convergence

The budget is ``--minutes`` of training time, ``--steps``, or ``--images`` (each set trains images / its
batch size steps, so sets with other batch sizes see as many images).

Each ``--set NAME=FLAGS`` is the base configuration (``--base``, default: the demo's model with every
convergence option off: a small stride-8 GroupNorm CNN, hidden 128, 2 + 3 layers, 20 queries) with
``detr train``'s model flags applied, plus the stream flags of this script in FLAGS (``--lr``,
``--batch_size``, ``--ema``, ``--lr_drop``, ``--warmup_steps``, ``--amp bf16``). Every run sees fresh training images
(the demo's stream, seeded) and is scored on the demo's fixed 128 held-out images every
``--eval_every`` minutes of training time (evaluations do not count against the budget).

Output: one JSON line per evaluation and per 50 steps in OUT/NAME_sSEED.jsonl (relayed to stdout), and
at the end one line per run: {"set", "seed", "images_per_s", "evals": [[train_s, AP, AP50], ...]}.
``--jobs 2 --threads 1`` runs two option sets at once, one thread each (the best use of 2 cores);
``--table FILE...`` prints the markdown table of finished runs instead of training.

``--small`` trains and scores on the small-objects variant instead (3-10 shapes of 4-24 px on 256 px
images, ``detr.demo.SMALL_SHAPES``: every object is COCO "small", so AP is APs; each evaluation line also
has APs, APm, APl), e.g. single-scale two-stage against multi-scale deformable attention at equal images:

    python benchmarks/convergence.py --small --images 6000 --eval_every_images 2000 --jobs 2 \\
        --set "two-stage=--anchor_queries --two_stage" \\
        --set "deformable=--attention deformable --num_feature_levels 3 --box_refine --two_stage" \\
        --out outputs/convergence-small
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def base_config(name: str):
    from detr.config import QueryConfig, preset

    if name == "vanilla-small":  # the demo's model without the convergence options
        return preset("shapes-fast").replace(queries=QueryConfig())
    return preset(name)


def stream_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr_backbone", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--ema", type=float, default=None)
    p.add_argument("--lr_drop", type=float, default=1.0, help="fraction of the budget (1: no drop)")
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--clip_max_norm", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--amp", choices=("fp32", "bf16"), default="fp32", help="autocast the forward (bf16)")
    return p


def run_one(args: argparse.Namespace) -> int:
    """One option set, one seed: train and evaluate, JSON lines to --log."""
    import torch

    from detr import build_detr
    from detr.cli import add_model_flags, model_config_from_args
    from detr.demo import shapes_task, train_shapes
    from detr.engine.log import JsonLog
    from detr.engine.stream import StreamSchedule

    torch.set_num_threads(args.threads)
    parser = argparse.ArgumentParser(parents=[stream_flags()], add_help=False)
    add_model_flags(parser)
    flags = parser.parse_args(shlex.split(args.flags))
    config = model_config_from_args(flags, base=base_config(args.base))
    steps = args.images // flags.batch_size if args.images else args.steps
    budget = {"minutes": args.minutes} if steps is None else {"steps": steps}
    schedule = StreamSchedule(
        **budget, batch_size=flags.batch_size, lr=flags.lr, lr_backbone=flags.lr_backbone,
        weight_decay=flags.weight_decay, clip_max_norm=flags.clip_max_norm, lr_drop=flags.lr_drop,
        warmup_steps=flags.warmup_steps, ema=flags.ema, amp=flags.amp,
        eval_every_minutes=args.eval_every if steps is None else None,
        eval_every_steps=(args.eval_every_images // flags.batch_size if args.images else args.eval_every_steps)
        if steps is not None else None,
    )
    task = shapes_task(Path(args.out) / "shapes", args.seed, small=args.small)
    log_file = JsonLog(Path(args.log))
    try:
        params = sum(p.numel() for p in build_detr(config).parameters())
        log_file.write({"type": "run", "set": args.name, "seed": args.seed, "flags": args.flags,
                        "threads": args.threads, "amp": schedule.amp, "model": config.to_dict(),
                        "params": params})
        result = train_shapes(config, task, schedule, seed=args.seed, log_file=log_file, progress=False)
        log_file.write({"type": "done", "steps": result.steps, "images": result.images,
                        "train_s": round(result.train_seconds, 1),
                        "images_per_s": round(result.images / result.train_seconds, 2)})
    finally:
        log_file.close()
    return 0


def summary(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    run = next(r for r in lines if r["type"] == "run")
    done = next((r for r in lines if r["type"] == "done"), {})
    evals = [[r["train_s"], r["AP"], r["AP50"], r["images"]] for r in lines if r["type"] == "eval"]
    return {"set": run["set"], "seed": run["seed"], "flags": run["flags"], "images_per_s": done.get("images_per_s"),
            "images": done.get("images"), "evals": evals}


def table(paths: list[Path], marks: list[float], by_images: bool = False) -> str:
    """Markdown: one row per run, AP / AP50 at each mark (minutes, or thousands of images with
    ``by_images``): the last evaluation at or before it."""
    unit = "k images" if by_images else " min"
    head = "| set | seed | img/s | " + " | ".join(f"AP / AP50 at {m:g}{unit}" for m in marks) + " |"
    rows = [head, "|" + "---|" * (3 + len(marks))]
    for path in paths:
        s = summary(path)
        cells = []
        for m in marks:
            before = [e for e in s["evals"] if (e[3] <= 1000 * m if by_images else e[0] <= 60 * m + 1)]
            cells.append(f"{before[-1][1]:.3f} / {before[-1][2]:.3f}" if before else "-")
        rows.append(f"| {s['set']} | {s['seed']} | {s['images_per_s']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="NAME=FLAGS")
    p.add_argument("--base", default="vanilla-small", help="vanilla-small, or a preset name")
    p.add_argument("--minutes", type=float, default=10.0, help="training-time budget per run")
    p.add_argument("--steps", type=int, default=None, help="a step budget instead of minutes")
    p.add_argument("--images", type=int, default=None,
                   help="an image budget instead of minutes: each set trains images / its batch size steps")
    p.add_argument("--eval_every", type=float, default=2.5, help="minutes of training between evaluations")
    p.add_argument("--eval_every_steps", type=int, default=500, help="with --steps")
    p.add_argument("--eval_every_images", type=int, default=4000, help="with --images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default="outputs/convergence")
    p.add_argument("--small", action="store_true", help="the small-objects task (4-24 px shapes on 256 px images)")
    p.add_argument("--table", type=Path, nargs="+", default=None, help="print the table of these run logs")
    p.add_argument("--marks", type=float, nargs="+", default=[5, 10],
                   help="minutes to report in the table (thousands of images with --images or --by_images)")
    p.add_argument("--by_images", action="store_true", help="--table: marks are thousands of images")
    # one run (used by the parent for each option set and seed)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--flags", default="", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table, args.marks, args.by_images))
        return 0
    if args.log:
        return run_one(args)
    if not args.set:
        p.error("give at least one --set NAME=FLAGS")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from detr.demo import shapes_task

    shapes_task(out / "shapes", small=args.small)  # the held-out split, written once before the runs read it
    queue = [(name, flags, seed) for seed in args.seeds for name, _, flags in (s.partition("=") for s in args.set)]
    running: list[tuple[subprocess.Popen, Path]] = []
    logs = []
    while queue or running:
        while queue and len(running) < args.jobs:
            name, flags, seed = queue.pop(0)
            log = out / f"{name}_s{seed}.jsonl"
            log.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--name", name, "--flags", flags, "--seed", str(seed), "--log", str(log),
                   "--base", args.base, "--threads", str(args.threads), "--out", str(out),
                   "--eval_every", str(args.eval_every), "--eval_every_steps", str(args.eval_every_steps)]
            cmd += ["--eval_every_images", str(args.eval_every_images)] + (["--small"] if args.small else [])
            if args.images is not None:
                cmd += ["--images", str(args.images)]
            elif args.steps is not None:
                cmd += ["--steps", str(args.steps)]
            else:
                cmd += ["--minutes", str(args.minutes)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            running.append((subprocess.Popen(cmd, env=env), log))
            logs.append(log)
        time.sleep(2)
        for proc, log in list(running):
            if proc.poll() is not None:
                running.remove((proc, log))
                if proc.returncode != 0:
                    print(json.dumps({"set": log.stem, "error": f"exit status {proc.returncode}"}), flush=True)
                else:
                    print(json.dumps(summary(log)), flush=True)
    print(table([log for log in logs if log.exists()], args.marks, args.images is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
