"""The flags that build a model config and the data options, shared by the commands that need them.

Flag names follow the reference implementation's main.py where it has one, so its users can switch
without rereading docs (``--coco_path --batch_size --lr --lr_backbone --lr_drop --epochs ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..config import (
    ATTENTIONS,
    BACKBONE_NORMS,
    BACKBONES,
    PRESETS,
    PROPOSAL_LOSSES,
    QUERY_POSITIONS,
    SPATIAL_POSITIONS,
    DetrConfig,
    preset,
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# flag -> (section of DetrConfig, field); "" is DetrConfig itself
MODEL_FLAGS: dict[str, tuple[str, str]] = {
    "num_classes": ("", "num_classes"), "num_queries": ("", "num_queries"),
    "position_embedding": ("", "position_embedding"), "masks": ("", "masks"),
    "num_feature_levels": ("", "num_feature_levels"), "attention": ("transformer", "attention"),
    "n_points": ("transformer", "n_points"), "box_refine": ("queries", "box_refine"),
    "backbone": ("backbone", "name"), "dilation": ("backbone", "dilation"), "backbone_norm": ("backbone", "norm"),
    "frozen_stages": ("backbone", "frozen_stages"), "backbone_widths": ("backbone", "widths"),
    "backbone_depths": ("backbone", "depths"),
    **{name: ("transformer", name) for name in ("enc_layers", "dec_layers", "dim_feedforward", "hidden_dim", "dropout",
                                                "nheads", "pre_norm", "spatial_pos", "query_pos")},
    "anchor_queries": ("queries", "anchors"), "two_stage": ("queries", "two_stage"),
    "encoder_content": ("queries", "encoder_content"), "look_forward_twice": ("queries", "look_forward_twice"),
    "anchor_size": ("queries", "anchor_size"), "denoising": ("queries", "denoising_groups"),
    "label_noise": ("queries", "label_noise"), "box_noise": ("queries", "box_noise"),
    "query_groups": ("queries", "groups"),
    "set_cost_class": ("matcher", "cost_class"), "set_cost_bbox": ("matcher", "cost_bbox"),
    "set_cost_giou": ("matcher", "cost_giou"),
    "bbox_loss_coef": ("loss", "bbox"), "giou_loss_coef": ("loss", "giou"), "mask_loss_coef": ("loss", "mask"),
    "dice_loss_coef": ("loss", "dice"), "eos_coef": ("loss", "eos_coef"), "aux_loss": ("loss", "aux_loss"),
    "cls_loss_coef": ("loss", "ce"), "proposal_loss": ("loss", "proposal_loss"), "class_loss": ("loss", "class_loss"),
    "focal_alpha": ("loss", "focal_alpha"), "focal_gamma": ("loss", "focal_gamma"),
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
    g = p.add_argument_group("multi-scale deformable attention (Deformable DETR; off by default)")
    g.add_argument("--attention", choices=ATTENTIONS, default=None,
                   help="full (DETR) or deformable: the encoder and the decoder's cross-attention sample "
                        "--n_points points per head and level around a reference point")
    g.add_argument("--num_feature_levels", type=int, default=None,
                   help="feature levels the transformer reads (1: DETR; Deformable DETR: 4 = C3-C5 + a stride-64 "
                        "map); more than 1 needs --attention deformable")
    g.add_argument("--n_points", type=int, default=None, help="deformable attention: points per head and level (4)")
    g.add_argument("--box_refine", action="store_true", default=None,
                   help="Deformable DETR's iterative box refinement of its learned queries (per-layer heads); "
                        "with --two_stage, its two-stage variant")
    g = p.add_argument_group("convergence options (DETR's successors; all off by default)")
    g.add_argument("--anchor_queries", action="store_true", default=None,
                   help="anchor-box queries with per-layer box refinement (DAB-DETR, Deformable DETR)")
    g.add_argument("--two_stage", action="store_true", default=None,
                   help="reference boxes from the top encoder proposals (needs --anchor_queries, or "
                        "--attention deformable --box_refine)")
    g.add_argument("--encoder_content", action="store_true", default=None,
                   help="content queries from the selected encoder tokens, not learned (RT-DETR; needs --two_stage)")
    g.add_argument("--no_encoder_content", dest="encoder_content", action="store_false", default=None,
                   help="learned content queries where a preset selects encoder content (shapes-fast)")
    g.add_argument("--look_forward_twice", action="store_true", default=None,
                   help="each layer's box loss also trains the previous layer's box head (DINO; needs "
                        "--anchor_queries)")
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
    g.add_argument("--focal_loss", dest="class_loss", action="store_const", const="focal", default=None,
                   help="sigmoid focal classification over K classes, no 'no object' class (Deformable DETR, DINO): "
                        "focal matching cost and loss, top-Q (query, class) scores at inference. Their recipe also "
                        "sets --set_cost_class 2 and --cls_loss_coef 2; the defaults stay 1")
    g.add_argument("--focal_alpha", type=float, default=None, help="with --focal_loss: the positives' weight (0.25)")
    g.add_argument("--focal_gamma", type=float, default=None, help="with --focal_loss: the focusing exponent (2)")
    g = p.add_argument_group("loss")
    g.add_argument("--no_aux_loss", dest="aux_loss", action="store_false", default=None)
    g.add_argument("--set_cost_class", type=float, default=None)
    g.add_argument("--set_cost_bbox", type=float, default=None)
    g.add_argument("--set_cost_giou", type=float, default=None)
    g.add_argument("--mask_loss_coef", type=float, default=None)
    g.add_argument("--dice_loss_coef", type=float, default=None)
    g.add_argument("--bbox_loss_coef", type=float, default=None)
    g.add_argument("--giou_loss_coef", type=float, default=None)
    g.add_argument("--cls_loss_coef", type=float, default=None,
                   help="weight of the class loss (1; Deformable DETR's name, its focal recipe uses 2)")
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
    g.add_argument("--max_size", type=int, default=None,
                   help="cap on the long side (default 1333; detr eval: the checkpoint's)")
    g.add_argument("--val_scale", type=int, default=None,
                   help="short side at evaluation (default: the largest training scale, 800; detr eval: the "
                        "checkpoint's)")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="skip unreadable images (counted and reported) instead of stopping")
    g.add_argument("--no_augment", dest="augment", action="store_false",
                   help="train on evaluation-resized images (no flip, crop or multi-scale)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    g.add_argument("--no_progress", dest="progress", action="store_false")
