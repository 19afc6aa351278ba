"""``detr train``, ``detr eval``, ``detr demo`` and ``detr plot``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..engine.options import DataOptions, OptimOptions, RunOptions, TrainOptions, pick
from .flags import add_data_flags, add_model_flags, model_config_from_args

log = logging.getLogger("detr")


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine.data import training_num_classes
    from ..engine.train import NonFiniteLossError, train

    if args.eval:
        if not args.resume:
            raise SystemExit("--eval needs --resume CHECKPOINT (as in the reference)")
        args.checkpoint = args.resume
        return cmd_eval(args)
    options = TrainOptions(pick(DataOptions, args), pick(OptimOptions, args), pick(RunOptions, args))
    num_classes = None if args.num_classes is not None else training_num_classes(options.data)
    config = model_config_from_args(args, num_classes)
    log.info("model: %s", json.dumps(config.to_dict()))
    try:
        record = train(config, options)
    except NonFiniteLossError as e:
        print(f"error: {e}. Training stopped; the last checkpoint in {args.output_dir} is untouched.",
              file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..engine.eval_checkpoint import evaluate_checkpoint, evaluate_panoptic_checkpoint

    data = pick(DataOptions, args)
    precision = args.amp or getattr(args, "precision", None)
    if getattr(args, "panoptic", False):
        result = evaluate_panoptic_checkpoint(
            args.checkpoint, data, panoptic_json=args.panoptic_json, panoptic_folder=args.panoptic_folder,
            threshold=args.panoptic_threshold, device=args.device, precision=precision, progress=args.progress,
            output_dir=args.output_dir)
    else:
        result = evaluate_checkpoint(args.checkpoint, data, device=args.device, precision=precision,
                                     compile=getattr(args, "compile", False), progress=args.progress,
                                     output_dir=args.output_dir)
    from ..distributed import is_main_process

    if is_main_process():
        print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    result = run_demo(args.output_dir, minutes=args.minutes, seed=args.seed, progress=args.progress, amp=args.amp)
    print(json.dumps(result))
    print(f"held-out AP {result['AP']:.3f}, AP50 {result['AP50']:.3f} after {result['train_seconds']:.0f} s of "
          f"training ({result['images']} images); drawings in {Path(args.output_dir) / 'predictions'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..engine.plot import plot_log

    print(f"wrote {plot_log(args.log, args.out)}")
    return 0


def _add_optimization_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--lr_backbone", type=float, default=1e-5)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--lr_drop", type=int, default=200)
    g.add_argument("--clip_max_norm", type=float, default=0.1)
    g.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (bf16 on CPU)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.9998): evaluated, and saved "
                        "as model_ema.safetensors beside the raw weights")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output_dir", default="outputs")
    g.add_argument("--resume", default=None, help="continue a run from its checkpoint.pth")
    g.add_argument("--pretrained", default=None,
                   help="start from these weights (any format, a name such as detr-r50, or a URL); a class head "
                        "of another size is re-initialized")
    g.add_argument("--backbone_weights", default=None, metavar="imagenet|NAME|PATH|URL|none",
                   help="ImageNet weights for the backbone: imagenet (torchvision's, of --backbone's depth), a name "
                        "(resnet50), a torchvision/timm file or a URL; downloaded once into $DETR_CACHE. Default: "
                        "imagenet for a frozen-BatchNorm backbone (the reference), none for --backbone_norm "
                        "group_norm. --pretrained takes precedence")
    g.add_argument("--frozen_weights", default=None, help="panoptic stage 2: frozen detector weights")
    g.add_argument("--eval", action="store_true", help="only evaluate --resume on the val split")
    g.add_argument("--eval_every", type=int, default=1)
    g.add_argument("--skip_memory_check", action="store_true",
                   help="train even when a step's estimated peak memory (measured at small sizes before the "
                        "first step, read at the largest batch) exceeds the device's free memory")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write log.jsonl's scalars as TensorBoard events to OUTPUT/tensorboard "
                        "(needs the tensorboard package)")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a file, a released name (detr-r50) or a URL")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16: autocast the model (same as --amp; pays with bf16 hardware or a GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (Inductor): faster per image after ~1 min of compilation per shape")
    p.add_argument("--output_dir", default="outputs/eval")
    g = p.add_argument_group("panoptic (with --panoptic)")
    g.add_argument("--panoptic", action="store_true",
                   help="also compute PQ/SQ/RQ (COCO panoptic) of a panoptic checkpoint; AP needs an instances json")
    g.add_argument("--panoptic_json", default=None, help="custom data: ground-truth panoptic json")
    g.add_argument("--panoptic_folder", default=None, help="custom data: ground-truth PNG folder")
    g.add_argument("--panoptic_threshold", type=float, default=0.85,
                   help="class probability a query needs to become a segment (the reference's 0.85)")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("train", help="train (or fine-tune, or resume) a detector")
    add_model_flags(p)
    add_data_flags(p)
    _add_optimization_flags(p)
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO AP (or PQ, --panoptic) of a checkpoint on a val split")
    add_data_flags(p)
    _add_eval_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train a detector from scratch on shapes rendered on the fly, evaluate, draw")
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default: the demo's)")
    p.add_argument("--seed", type=int, default=0, help="model initialization and training images")
    p.add_argument("--amp", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training precision: auto = bf16 autocast where the CPU has bf16 instructions (avx512_bf16, "
                        "amx_bf16 or Arm bf16), else fp32")
    p.add_argument("--no_progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="draw the loss/AP curves of a training log.jsonl to a PNG")
    p.add_argument("log")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_plot)
