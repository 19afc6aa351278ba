"""Hugging Face transformers Deformable DETR: its key names mapped to ours, its config.json read.

A ``save_pretrained`` directory of ``DeformableDetrForObjectDetection``: plain, with box refinement
(``with_box_refine``) or two-stage (``two_stage``, with box refinement). Both backbone layouts are read:
transformers' own ResNet (``use_timm_backbone=False``) and timm's, which the released Hub models use
(its names are torchvision's). transformers saves tied heads once: one ``class_embed.0`` for every
decoder layer (box refinement), the per-layer box heads under ``model.decoder.bbox_embed``; the head
one past the last decoder layer scores the two-stage proposals.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import RESNETS, BackboneConfig, DetrConfig, LossConfig, MatcherConfig, QueryConfig, TransformerConfig
from .formats import Checkpoint, CheckpointError
from .huggingface import _HF_BACKBONE, _HF_RULES, _hf_layer, _read_hf_weights, rename_and_pack

HF_DEFORMABLE_MODEL_TYPE = "deformable_detr"
_DEPTHS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
_HEAD = re.compile(r"(?:model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)")

_RULES: tuple[tuple[str, Any], ...] = (
    *(rule for rule in _HF_RULES if rule[0].startswith(_HF_BACKBONE)),  # transformers' own ResNet
    (_HF_BACKBONE + r"((?:conv1|bn1|layer\d\.\d+\.(?:conv|bn)\d|layer\d\.0\.downsample\.[01]))", r"backbone.body.\1"),
    (r"model\.input_proj\.(\d+)\.([01])", r"input_proj.\1.\2"),
    (r"model\.(query_position_embeddings)", "deformable_queries.query_embed"),
    (r"model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)", r"deformable_queries.\1"),
    (r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", lambda m: _deformable_layer(m)),
)


def _deformable_layer(m: re.Match[str]) -> str | None:
    part = m[3].removeprefix("mlp.").replace(".o_proj", ".out_proj")
    deformable = re.fullmatch(r"(self_attn|encoder_attn)\.(sampling_offsets|attention_weights|value_proj|output_proj)",
                              part)
    if deformable and (m[1] == "decoder") == (deformable[1] == "encoder_attn"):
        attention = "self_attn" if m[1] == "encoder" else "multihead_attn"
        return f"transformer.{m[1]}.layers.{m[2]}.{attention}.{deformable[2]}"
    return _hf_layer(re.fullmatch(r"(encoder|decoder)\.(\d+)\.(.+)", f"{m[1]}.{m[2]}.{part}"))  # type: ignore[arg-type]


def _rename(key: str) -> str | None:
    if key == "model.level_embed":
        return "level_embed"
    module, _, param = key.rpartition(".")
    for pattern, new in _RULES:
        if m := re.fullmatch(pattern, module):
            mapped = new(m) if callable(new) else m.expand(new)
            return None if mapped is None else f"{mapped}.{param}"
    return None


def hf_deformable_to_ours(state_dict: dict[str, Tensor], *, num_layers: int, box_refine: bool, two_stage: bool,
                          where: str | Path = "state dict") -> dict[str, Tensor]:
    """Rename a transformers Deformable DETR state dict to our layout: pack the decoder self-attention's
    q/k/v, spread the (tied, saved once) heads over the layers that use them."""
    heads: dict[tuple[str, int], dict[str, Tensor]] = {}
    rest = {}
    for key, value in state_dict.items():
        if m := _HEAD.fullmatch(key):
            heads.setdefault((m[1], int(m[2])), {})[m[3]] = value
        else:
            rest[key] = value
    ours = rename_and_pack(rest, _rename, model="Deformable DETR", where=where)
    for kind, ours_name in (("class_embed", "class_embed"), ("bbox_embed", "deformable_queries.box_heads")):
        indices = sorted(i for k, i in heads if k == kind)
        if not indices or indices[0] != 0:
            raise CheckpointError(f"{where}: no {kind}.0 weights")
        layered = box_refine  # one head per decoder layer; a missing one is tied to head 0
        for layer in range(num_layers if layered else 1):
            source = heads.get((kind, layer), heads[(kind, 0)])
            prefix = f"{ours_name}.{layer}" if layered or kind == "bbox_embed" else ours_name
            ours.update({f"{prefix}.{name}": v for name, v in source.items()})
        if two_stage:  # the head one past the decoder's scores and boxes the proposals
            if (kind, num_layers) not in heads:
                raise CheckpointError(f"{where}: two-stage needs {kind}.{num_layers} (the proposal head)")
            target = "deformable_queries.proposal_class" if kind == "class_embed" else "deformable_queries.proposal_box"
            ours.update({f"{target}.{name}": v for name, v in heads[(kind, num_layers)].items()})
    return ours


def _backbone_name(hf: dict[str, Any], sd: dict[str, Tensor], where: Path) -> str:
    backbone = hf.get("backbone_config")
    if isinstance(backbone, dict) and backbone.get("model_type") == "resnet":
        depths = tuple(backbone.get("depths", (3, 4, 6, 3)))
        if depths not in _DEPTHS or backbone.get("layer_type", "bottleneck") != ("basic" if depths == (2, 2, 2, 2)
                                                                                 else "bottleneck"):
            raise CheckpointError(f"{where}: backbone_config depths {list(depths)} are not a supported ResNet")
        return _DEPTHS[depths]
    name = hf.get("backbone")  # timm layout: the model's name
    if isinstance(name, str) and name in RESNETS:
        return name
    blocks = {int(m[1]) for k in sd if (m := re.match(r"backbone\.body\.layer3\.(\d+)\.", k))}
    by_count = {6: "resnet50", 23: "resnet101"}
    if blocks and max(blocks) + 1 in by_count:
        return by_count[max(blocks) + 1]
    raise CheckpointError(f"{where}: cannot tell the backbone (backbone {hf.get('backbone')!r}); only ResNets are read")


def read_hf_deformable_checkpoint(path: Path, hf: dict[str, Any]) -> Checkpoint:
    """Read a ``DeformableDetrForObjectDetection`` directory; ``hf`` is its parsed config.json."""
    where = path / "config.json"
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"),
                     ("encoder_n_points", "decoder_n_points")):
        if hf.get(enc, 0) != hf.get(dec, 0):
            raise CheckpointError(f"{where}: {enc} ({hf.get(enc)}) != {dec} ({hf.get(dec)}); ours shares one value")
    if hf.get("activation_function", "relu") != "relu":
        raise CheckpointError(f"{where}: activation_function {hf['activation_function']!r} is not supported (relu)")
    two_stage, box_refine = bool(hf.get("two_stage")), bool(hf.get("with_box_refine"))
    if two_stage and not box_refine:
        raise CheckpointError(f"{where}: two_stage without with_box_refine is not a Deformable DETR variant")
    layers = int(hf.get("decoder_layers", 6))
    raw, weights_file = _read_hf_weights(path)
    sd = hf_deformable_to_ours(raw, num_layers=layers, box_refine=box_refine, two_stage=two_stage, where=weights_file)
    levels = int(hf.get("num_feature_levels", 4))
    stages = sum(1 for k, v in sd.items() if re.fullmatch(r"input_proj\.\d+\.0\.weight", k) and v.shape[-1] == 1)
    if stages != max(1, min(levels - 1, 3)):
        raise CheckpointError(f"{where}: the model projects {stages} backbone stage(s) into {levels} feature levels; "
                              f"this implementation reads Deformable DETR's {max(1, min(levels - 1, 3))} (the last "
                              f"stages, C3-C5 for 4 levels: backbone out_features stage2..stage4)")
    num_classes = int(sd["class_embed.0.weight" if box_refine else "class_embed.weight"].shape[0])
    queries = int(hf.get("two_stage_num_proposals", 300)) if two_stage else int(hf.get("num_queries", 300))
    config = DetrConfig(
        num_classes=num_classes, num_queries=queries, num_feature_levels=levels,
        position_embedding=hf.get("position_embedding_type", "sine"),
        backbone=BackboneConfig(name=_backbone_name(hf, sd, where)),
        transformer=TransformerConfig(
            hidden_dim=int(hf.get("d_model", 256)), nheads=int(hf.get("encoder_attention_heads", 8)),
            enc_layers=int(hf.get("encoder_layers", 6)), dec_layers=layers,
            dim_feedforward=int(hf.get("encoder_ffn_dim", 1024)), dropout=float(hf.get("dropout", 0.1)),
            attention="deformable", n_points=int(hf.get("encoder_n_points", 4)),
        ),
        queries=QueryConfig(box_refine=box_refine, two_stage=two_stage),
        matcher=MatcherConfig(cost_class=float(hf.get("class_cost", 1)), cost_bbox=float(hf.get("bbox_cost", 5)),
                              cost_giou=float(hf.get("giou_cost", 2))),
        loss=LossConfig(class_loss="focal", focal_alpha=float(hf.get("focal_alpha", 0.25)),
                        bbox=float(hf.get("bbox_loss_coefficient", 5)), giou=float(hf.get("giou_loss_coefficient", 2))),
    )
    metadata: dict[str, Any] = {}
    if isinstance(hf.get("id2label"), dict):
        metadata["class_names"] = {str(int(k)): str(v) for k, v in hf["id2label"].items()}
    return Checkpoint(sd, "detr", "huggingface", config, metadata=metadata)
