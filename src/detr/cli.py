"""``detr`` command line: train | eval | demo | convert | plot | predict | attention | export |
eval-panoptic | data. Thin: flags -> API.

Flag names follow the reference implementation's main.py where it has one, so its users can switch
without rereading docs (``--coco_path --batch_size --lr --lr_backbone --lr_drop --epochs ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import (
    BACKBONE_NORMS,
    BACKBONES,
    PRESETS,
    PROPOSAL_LOSSES,
    QUERY_POSITIONS,
    SPATIAL_POSITIONS,
    DetrConfig,
    preset,
)

log = logging.getLogger("detr")


# --- shared flag groups ----------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# flag -> (section of DetrConfig, field); "" is DetrConfig itself
MODEL_FLAGS: dict[str, tuple[str, str]] = {
    "num_classes": ("", "num_classes"), "num_queries": ("", "num_queries"),
    "position_embedding": ("", "position_embedding"), "masks": ("", "masks"),
    "backbone": ("backbone", "name"), "dilation": ("backbone", "dilation"), "backbone_norm": ("backbone", "norm"),
    "frozen_stages": ("backbone", "frozen_stages"), "backbone_widths": ("backbone", "widths"),
    "backbone_depths": ("backbone", "depths"),
    **{name: ("transformer", name) for name in ("enc_layers", "dec_layers", "dim_feedforward", "hidden_dim", "dropout",
                                                "nheads", "pre_norm", "spatial_pos", "query_pos")},
    "anchor_queries": ("queries", "anchors"), "two_stage": ("queries", "two_stage"),
    "anchor_size": ("queries", "anchor_size"), "denoising": ("queries", "denoising_groups"),
    "label_noise": ("queries", "label_noise"), "box_noise": ("queries", "box_noise"),
    "query_groups": ("queries", "groups"),
    "set_cost_class": ("matcher", "cost_class"), "set_cost_bbox": ("matcher", "cost_bbox"),
    "set_cost_giou": ("matcher", "cost_giou"),
    "bbox_loss_coef": ("loss", "bbox"), "giou_loss_coef": ("loss", "giou"), "mask_loss_coef": ("loss", "mask"),
    "dice_loss_coef": ("loss", "dice"), "eos_coef": ("loss", "eos_coef"), "aux_loss": ("loss", "aux_loss"),
    "proposal_loss": ("loss", "proposal_loss"),
}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults: the paper's DETR-R50, or --preset)")
    g.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)}")
    g.add_argument("--num_classes", type=int, default=None,
                   help="K, the class head has K+1 outputs; default: max category id + 1 of the training json")
    g.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="a ResNet, or 'small': a GroupNorm CNN for training from scratch (--backbone_widths)")
    g.add_argument("--dilation", action="store_true", default=None, help="DC5: dilation in the last stage")
    g.add_argument("--backbone_norm", choices=BACKBONE_NORMS, default=None,
                   help="frozen_bn (the reference; for ImageNet weights) or group_norm (trained; from scratch)")
    g.add_argument("--frozen_stages", type=int, default=None,
                   help="leading backbone stages that never train: 1 = stem + layer1 (the reference), 0 = none")
    g.add_argument("--backbone_widths", type=_ints, default=None,
                   help="small backbone: channels of each stride-2 stage, e.g. 32,64,128 (stride 8)")
    g.add_argument("--backbone_depths", type=_ints, default=None,
                   help="small backbone: extra 3x3 convolutions per stage, e.g. 0,1,2")
    g.add_argument("--position_embedding", choices=("sine", "learned"), default=None)
    g.add_argument("--enc_layers", type=int, default=None)
    g.add_argument("--dec_layers", type=int, default=None)
    g.add_argument("--dim_feedforward", type=int, default=None, help="0 removes the feed-forward networks")
    g.add_argument("--hidden_dim", type=int, default=None)
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--nheads", type=int, default=None)
    g.add_argument("--num_queries", type=int, default=None)
    g.add_argument("--pre_norm", action="store_true", default=None)
    g.add_argument("--spatial_pos", choices=SPATIAL_POSITIONS, default=None,
                   help="image positions added in every attention (DETR), once at the input, or nowhere")
    g.add_argument("--query_pos", choices=QUERY_POSITIONS, default=None,
                   help="learned query positions added in every decoder layer (DETR) or once at the input")
    g.add_argument("--masks", action="store_true", default=None, help="train the panoptic mask head")
    g = p.add_argument_group("convergence options (DETR's successors; all off by default)")
    g.add_argument("--anchor_queries", action="store_true", default=None,
                   help="anchor-box queries with per-layer box refinement (DAB-DETR, Deformable DETR)")
    g.add_argument("--two_stage", action="store_true", default=None,
                   help="reference boxes from the top encoder proposals (needs --anchor_queries)")
    g.add_argument("--anchor_size", type=float, default=None,
                   help="initial width/height of anchors and proposals (normalized, default 0.1)")
    g.add_argument("--denoising", type=int, default=None, metavar="GROUPS",
                   help="denoising training with GROUPS groups of noised ground truth (DN-DETR; needs "
                        "--anchor_queries)")
    g.add_argument("--label_noise", type=float, default=None, help="denoising: fraction of labels flipped (0.5)")
    g.add_argument("--box_noise", type=float, default=None, help="denoising: box noise scale (0.4)")
    g.add_argument("--query_groups", type=int, default=None, metavar="G",
                   help="one-to-many training with G groups of queries (Group DETR); inference uses one")
    g.add_argument("--proposal_loss", choices=PROPOSAL_LOSSES, default=None,
                   help="class loss of the two-stage proposals: focal (default) or ce")
    g = p.add_argument_group("loss")
    g.add_argument("--no_aux_loss", dest="aux_loss", action="store_false", default=None)
    g.add_argument("--set_cost_class", type=float, default=None)
    g.add_argument("--set_cost_bbox", type=float, default=None)
    g.add_argument("--set_cost_giou", type=float, default=None)
    g.add_argument("--mask_loss_coef", type=float, default=None)
    g.add_argument("--dice_loss_coef", type=float, default=None)
    g.add_argument("--bbox_loss_coef", type=float, default=None)
    g.add_argument("--giou_loss_coef", type=float, default=None)
    g.add_argument("--eos_coef", type=float, default=None)


def model_config_from_args(args: argparse.Namespace, num_classes: int | None = None,
                           base: DetrConfig | None = None) -> DetrConfig:
    """``base`` (else the preset, else the paper's defaults) with every model flag the user gave applied."""
    config = base or (preset(args.preset) if getattr(args, "preset", None) else DetrConfig())
    changes: dict[str, dict[str, Any]] = {"": {}, "backbone": {}, "transformer": {}, "queries": {}, "matcher": {},
                                          "loss": {}}
    if num_classes is not None:
        changes[""]["num_classes"] = num_classes
    for flag, (section, name) in MODEL_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            changes[section][name] = value
    if changes["backbone"].get("name") == "small":  # trained from scratch: a norm that learns, nothing frozen
        changes["backbone"].setdefault("norm", "group_norm")
        changes["backbone"].setdefault("frozen_stages", 0)
    if getattr(args, "lr_backbone", None) is not None:
        changes["backbone"]["trainable"] = args.lr_backbone > 0
    sections = {name: dataclasses.replace(getattr(config, name), **fields)
                for name, fields in changes.items() if name and fields}
    return dataclasses.replace(config, **changes[""], **sections)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--coco_path", "--data_path", dest="coco_path", default=None,
                   help="the data folder: COCO (train2017/ val2017/ annotations/), YOLO (data.yaml or images/ + "
                        "labels/) or Pascal VOC (Annotations/ ImageSets/Main/ JPEGImages/)")
    g.add_argument("--dataset_format", choices=("coco", "yolo", "voc"), default=None,
                   help="the layout of --coco_path (default: detected when unambiguous)")
    g.add_argument("--train_split", default=None, help="yolo/voc: the training split's name (default train)")
    g.add_argument("--val_split", default=None, help="yolo/voc: the validation split's name (default val)")
    g.add_argument("--dataset_file", choices=("coco", "coco_panoptic"), default="coco",
                   help="coco: instances json (+ masks with --masks); coco_panoptic: panoptic json + PNGs, as in "
                        "the reference (stage 1 boxes of all segments, stage 2 --masks --frozen_weights)")
    g.add_argument("--coco_panoptic_path", default=None,
                   help="panoptic layout: annotations/panoptic_{train,val}2017.json + annotations/panoptic_{train,"
                        "val}2017/ (or panoptic_{split}2017/); images stay under --coco_path; default: --coco_path")
    g.add_argument("--train_images", default=None, help="custom data: image folder (with --train_json)")
    g.add_argument("--train_json", default=None)
    g.add_argument("--val_images", default=None)
    g.add_argument("--val_json", default=None)
    g.add_argument("--batch_size", type=int, default=2)
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--train_scales", type=int, nargs="+", default=None,
                   help="short sides of the training resize (default 480..800 step 32)")
    g.add_argument("--max_size", type=int, default=1333)
    g.add_argument("--val_scale", type=int, default=None, help="short side at evaluation (default 800)")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="skip unreadable images (counted and reported) instead of stopping")
    g.add_argument("--no_augment", dest="augment", action="store_false",
                   help="train on evaluation-resized images (no flip, crop or multi-scale)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    g.add_argument("--no_progress", dest="progress", action="store_false")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _train_num_classes(args: argparse.Namespace) -> int | None:
    """max category id + 1 of the training annotations (the reference's meaning of num_classes)."""
    from .data.formats import category_count, detect_format, load_split
    from .engine.train import TrainOptions, _split_paths

    if args.dataset_file == "coco_panoptic":
        from .data.panoptic import coco_panoptic_paths

        root = args.coco_panoptic_path or args.coco_path
        if root is None:
            raise SystemExit("--dataset_file coco_panoptic needs --coco_panoptic_path DIR (or --coco_path DIR)")
        return category_count(coco_panoptic_paths(root, "train")[1])
    if args.coco_path and not args.train_images:
        fmt = args.dataset_format or detect_format(args.coco_path)
        if fmt != "coco":
            loaded = load_split(args.coco_path, "train", fmt, split_name=args.train_split,
                                skip_bad_images=args.skip_bad_images)
            return max(int(c["id"]) for c in loaded.dataset["categories"]) + 1
    opts = TrainOptions(coco_path=args.coco_path, train_images=args.train_images, train_json=args.train_json)
    return category_count(_split_paths(opts, "train")[1])


# --- commands --------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from .engine.train import NonFiniteLossError, TrainOptions, train

    if args.eval:
        if not args.resume:
            raise SystemExit("--eval needs --resume CHECKPOINT (as in the reference)")
        args.checkpoint = args.resume
        return cmd_eval(args)
    num_classes = None if args.num_classes is not None else _train_num_classes(args)
    config = model_config_from_args(args, num_classes)
    options = TrainOptions(
        coco_path=args.coco_path, dataset_file=args.dataset_file, coco_panoptic_path=args.coco_panoptic_path,
        train_images=args.train_images, train_json=args.train_json, val_images=args.val_images,
        val_json=args.val_json, output_dir=args.output_dir, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, lr_backbone=args.lr_backbone, weight_decay=args.weight_decay,
        lr_drop=args.lr_drop, clip_max_norm=args.clip_max_norm, seed=args.seed, num_workers=args.num_workers,
        device=args.device, amp=args.amp, resume=args.resume, pretrained=args.pretrained,
        frozen_weights=args.frozen_weights, train_scales=args.train_scales, max_size=args.max_size,
        val_scale=args.val_scale, eval_every=args.eval_every, skip_bad_images=args.skip_bad_images, ema=args.ema,
        progress=args.progress, augment=args.augment, backbone_weights=args.backbone_weights,
        tensorboard=args.tensorboard, dataset_format=args.dataset_format, train_split=args.train_split,
        val_split=args.val_split,
    )
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
    if getattr(args, "panoptic", False):
        from .engine.panoptic_commands import cmd_eval_panoptic

        return cmd_eval_panoptic(args)

    from .checkpoint import load_checkpoint
    from .engine.distributed import init_distributed
    from .engine.evaluate import evaluate
    from .engine.train import TrainOptions, build_dataset, build_loader
    from .model.fuse import compile_for_inference, optimize_for_inference
    from .model.segmentation import DETRsegm
    from .runtime import amp_dtype

    info = init_distributed(args.device)
    model = optimize_for_inference(load_checkpoint(args.checkpoint)).to(args.device)
    options = TrainOptions(coco_path=args.coco_path, val_images=args.val_images, val_json=args.val_json,
                           batch_size=args.batch_size, num_workers=args.num_workers, val_scale=args.val_scale,
                           max_size=args.max_size, train_scales=args.train_scales,
                           skip_bad_images=args.skip_bad_images, dataset_format=args.dataset_format,
                           val_split=args.val_split)
    masks = isinstance(model, DETRsegm)
    if args.compile:
        model = compile_for_inference(model)
    dataset = build_dataset(options, "val", train_augment=False, masks=masks)
    loader = build_loader(dataset, options, info, train=False)
    amp = amp_dtype(args.amp or getattr(args, "precision", None), args.device)
    result = evaluate(model, loader, coco_gt=dataset.coco, device=args.device,
                      iou_types=("bbox", "segm") if masks else ("bbox",), amp_dtype=amp, progress=args.progress)
    if info.is_main:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.output_dir, minutes=args.minutes, seed=args.seed, progress=args.progress)
    print(json.dumps(result))
    print(f"held-out AP {result['AP']:.3f}, AP50 {result['AP50']:.3f} after {result['train_seconds']:.0f} s of "
          f"training ({result['images']} images); drawings in {Path(args.output_dir) / 'predictions'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint

    out = convert_checkpoint(args.input, args.output)
    print(f"wrote {out}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from .data.formats import convert

    summary = convert(args.source, args.out, from_format=args.from_format, to=args.to, split=args.split,
                      images=args.images)
    print(json.dumps(summary))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .engine.plot import plot_log

    out = plot_log(args.log, args.out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr", description="DETR: train, evaluate and run detectors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or fine-tune, or resume) a detector")
    add_model_flags(p)
    add_data_flags(p)
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--lr_backbone", type=float, default=1e-5)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--lr_drop", type=int, default=200)
    g.add_argument("--clip_max_norm", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (bf16 on CPU)")
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
    g.add_argument("--tensorboard", action="store_true",
                   help="also write log.jsonl's scalars as TensorBoard events to OUTPUT/tensorboard "
                        "(needs the tensorboard package)")
    g.add_argument("--frozen_weights", default=None, help="panoptic stage 2: frozen detector weights")
    g.add_argument("--eval", action="store_true", help="only evaluate --resume on the val split")
    g.add_argument("--eval_every", type=int, default=1)
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.9998): evaluated, and saved "
                        "as model_ema.safetensors beside the raw weights")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO AP of a checkpoint on a val split")
    p.add_argument("--checkpoint", required=True)
    add_data_flags(p)
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16: autocast the model (same as --amp; pays with bf16 hardware or a GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (Inductor): faster per image after ~1 min of compilation per shape")
    p.add_argument("--output_dir", default="outputs/eval")
    from .engine.panoptic_commands import add_panoptic_eval_flags, add_panoptic_parsers

    add_panoptic_eval_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train a detector from scratch on shapes rendered on the fly, evaluate, draw")
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default: the demo's 9)")
    p.add_argument("--seed", type=int, default=0, help="model initialization and training images")
    p.add_argument("--no_progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="convert a checkpoint: .pth (reference layout) <-> .safetensors (ours)")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plot", help="draw the loss/AP curves of a training log.jsonl to a PNG")
    p.add_argument("log")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_plot)

    from .inference.commands import add_inference_parsers

    add_inference_parsers(sub)
    from .export import add_export_parser

    add_export_parser(sub)
    data_sub = add_panoptic_parsers(sub)
    p = data_sub.add_parser(
        "convert", help="a YOLO or Pascal VOC dataset -> COCO json (or any of coco/yolo/voc -> another)",
        description="Reads the dataset as `detr train --dataset_format` does (same class ids, clipping and counts) "
                    "and writes it: a COCO json (pair it with the image folder it prints), or a YOLO/VOC folder "
                    "whose images link to the originals.",
    )
    p.add_argument("source", help="the dataset folder (yolo, voc), or the COCO json (coco, with --images)")
    p.add_argument("--from", dest="from_format", choices=("yolo", "voc", "coco"), default=None,
                   help="the source layout (default: detected; a .json file is coco)")
    p.add_argument("--to", choices=("coco", "yolo", "voc"), default="coco")
    p.add_argument("--out", required=True, help="the json file to write (--to coco) or the folder (yolo, voc)")
    p.add_argument("--split", default=None,
                   help="the split to read (yolo: images/SPLIT or a data.yaml key; voc: ImageSets/Main/SPLIT.txt; "
                        "default: every image) and, --to yolo|voc, the split name written (default train)")
    p.add_argument("--images", default=None, help="--from coco: the image folder the json describes")
    p.set_defaults(func=cmd_data_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import DownloadError

    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run() -> int:
    """The ``detr`` console script: :func:`main` in a process tuned for large tensors (see detr.runtime)."""
    from .runtime import keep_freed_memory

    keep_freed_memory()
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
