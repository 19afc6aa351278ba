"""Hugging Face transformers DETR: its key names mapped to ours, its config.json read.

A ``save_pretrained`` directory of ``DetrForObjectDetection`` / ``DetrForSegmentation`` built on
transformers' own ResNet (``use_timm_backbone=False``). Files keep transformers' v4 names
(``conv_encoder``, ``out_proj``, ``fc1``, the mask head's ``lay1``...) while v5 models name some
differently in memory (``o_proj``, ``mlp.fc1``, ``mask_head.conv1.conv``...); both are read. The
computation is the same as ours (post-norm layers, positions added to queries and keys only, frozen
BatchNorm with eps 1e-5, the same sine encoding, a final decoder LayerNorm): only the names and the
separate q/k/v projections (packed here into ``in_proj_weight``) differ.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import BackboneConfig, DetrConfig, LossConfig, MatcherConfig, TransformerConfig
from .formats import Checkpoint, CheckpointError, read_safetensors, safe_torch_load
from .ours import FORMAT
from .reference import infer_config

log = logging.getLogger(__name__)

HF_MODEL_TYPE = "detr"
_HF_BACKBONE = r"model\.backbone\.(?:conv_encoder\.)?model\."
_HF_STAGE = _HF_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
_HF_MASK_HEAD = {
    "conv1.conv": "lay1", "conv1.norm": "gn1", "conv2.conv": "lay2", "conv2.norm": "gn2", "output_conv": "out_lay",
    **{f"fpn_stages.{i}.fpn_adapter": f"adapter{i + 1}" for i in range(3)},
    **{f"fpn_stages.{i}.refine.conv": f"lay{i + 3}" for i in range(3)},
    **{f"fpn_stages.{i}.refine.norm": f"gn{i + 3}" for i in range(3)},
}


# --- key names ---------------------------------------------------------------------------------

def _hf_block(m: re.Match[str]) -> str:
    # transformers counts stages from 0 and names a block's convs layer.0..2; torchvision: layer1.., conv1..
    return f"backbone.body.layer{int(m[1]) + 1}.{m[2]}."


def _hf_layer(m: re.Match[str]) -> str | None:
    kind, index, part = m[1], m[2], m[3]
    part = part.removeprefix("mlp.").replace(".o_proj", ".out_proj")
    names = {"fc1": "linear1", "fc2": "linear2", "self_attn_layer_norm": "norm1"}
    if kind == "encoder":
        names["final_layer_norm"] = "norm2"
    else:  # the decoder's cross-attention ("encoder_attn") is our multihead_attn
        names.update(encoder_attn_layer_norm="norm2", final_layer_norm="norm3")
    attn = re.fullmatch(r"(self_attn|encoder_attn)\.([qkv]_proj|out_proj)", part)
    if attn and (kind == "decoder" or attn[1] == "self_attn"):  # q/k/v are packed into in_proj_* afterwards
        new = ("self_attn" if attn[1] == "self_attn" else "multihead_attn") + "." + attn[2]
    elif part in names:
        new = names[part]
    else:
        return None
    return f"transformer.{kind}.layers.{index}.{new}"


def _hf_mask_head(m: re.Match[str]) -> str | None:
    part = m[1]
    if re.fullmatch(r"lay[1-5]|gn[1-5]|adapter[1-3]|out_lay", part):  # the file layout: the reference's names
        return f"mask_head.{part}"
    return f"mask_head.{_HF_MASK_HEAD[part]}" if part in _HF_MASK_HEAD else None


# (module path pattern, our module path): matched against the name without its last part (weight, bias...)
_HF_RULES: tuple[tuple[str, str | Callable[[re.Match[str]], str | None]], ...] = (
    (_HF_BACKBONE + r"embedder\.embedder\.convolution", "backbone.body.conv1"),
    (_HF_BACKBONE + r"embedder\.embedder\.normalization", "backbone.body.bn1"),
    (_HF_STAGE + r"layer\.(\d)\.convolution", lambda m: f"{_hf_block(m)}conv{int(m[3]) + 1}"),
    (_HF_STAGE + r"layer\.(\d)\.normalization", lambda m: f"{_hf_block(m)}bn{int(m[3]) + 1}"),
    (_HF_STAGE + r"shortcut\.convolution", lambda m: f"{_hf_block(m)}downsample.0"),
    (_HF_STAGE + r"shortcut\.normalization", lambda m: f"{_hf_block(m)}downsample.1"),
    # v4 kept the learned encoding inside the backbone wrapper, v5 beside it
    (r"model\.(?:backbone\.)?position_embedding\.row_embeddings", "position.row_embed"),
    (r"model\.(?:backbone\.)?position_embedding\.column_embeddings", "position.col_embed"),
    (r"model\.input_projection", "input_proj"),
    (r"model\.query_position_embeddings", "query_embed"),
    (r"model\.decoder\.layernorm", "transformer.decoder.norm"),
    (r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", _hf_layer),
    (r"class_labels_classifier", "class_embed"),
    (r"bbox_predictor\.layers\.(\d+)", r"bbox_embed.layers.\1"),
    (r"bbox_attention\.([qk])_(?:linear|proj)", r"bbox_attention.\1_linear"),
    (r"mask_head\.(.+)", _hf_mask_head),
)


def hf_key_to_ours(key: str) -> str | None:
    """Our name for a transformers DETR weight (q/k/v projections keep ``q_proj``... until packed),
    or None when the key is not part of a DETR with transformers' ResNet."""
    prefix = "detr." if key.startswith("detr.") else ""  # DetrForSegmentation wraps the detector as .detr
    module, _, param = key[len(prefix):].rpartition(".")
    for pattern, new in _HF_RULES:
        if m := re.fullmatch(pattern, module):
            mapped = new(m) if callable(new) else m.expand(new)
            if mapped is None:
                return None
            # the mask head sits beside the detector in both layouts
            return f"{'' if mapped.startswith(('mask_head.', 'bbox_attention.')) else prefix}{mapped}.{param}"
    return None


def hf_to_ours(state_dict: dict[str, Tensor], *, where: str | Path = "state dict") -> dict[str, Tensor]:
    """Rename a transformers DETR state dict to our layout and pack each attention's q/k/v."""
    if any(re.match(r"(detr\.)?" + _HF_BACKBONE + r"(conv1|bn1|layer\d)\.", k) for k in state_dict):
        raise CheckpointError(
            f"{where}: the backbone is in the timm layout (use_timm_backbone=True), which is not supported; "
            "use weights saved with transformers' own ResNet (use_timm_backbone=False, the hub's 'no_timm' revisions)"
        )
    return rename_and_pack(state_dict, hf_key_to_ours, model="DETR", where=where)


def rename_and_pack(state_dict: dict[str, Tensor], rename: Callable[[str], str | None], *, model: str,
                    where: str | Path) -> dict[str, Tensor]:
    """Rename every weight with ``rename`` (None: not part of ``model``, an error naming the keys) and pack
    each attention's separate q/k/v projections into ``in_proj_weight`` / ``in_proj_bias``."""
    ours: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = rename(key)
        if new is None:
            unknown.append(key)
        elif m := re.fullmatch(r"(.+\.(?:self_attn|multihead_attn))\.([qkv])_proj\.(weight|bias)", new):
            qkv.setdefault(f"{m[1]}.in_proj_{m[3]}", {})[m[2]] = value
        else:
            ours[new] = value
    if unknown:
        raise CheckpointError(f"{where}: weights that are not part of a transformers {model}: {unknown[:6]}")
    for key, parts in qkv.items():
        if parts.keys() != {"q", "k", "v"}:
            raise CheckpointError(f"{where}: {key} needs q, k and v projections, found only {sorted(parts)}")
        # nn.MultiheadAttention's packing: rows [0, C) project queries, [C, 2C) keys, [2C, 3C) values
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # [3C, C] or [3C]
    return ours


# --- directories -------------------------------------------------------------------------------

def is_hf_directory(path: Path) -> bool:
    """Whether ``path`` is a transformers ``save_pretrained`` directory: its config.json names a model_type."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and meta.get("format") != FORMAT


def _read_hf_weights(path: Path) -> tuple[dict[str, Tensor], Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    pickled = path / "pytorch_model.bin"
    if single.exists():
        return read_safetensors(single)[0], single
    if index.exists():  # sharded: the index maps every weight to its shard file
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(read_safetensors(path / shard)[0])
        return sd, index
    if pickled.exists():
        obj = safe_torch_load(pickled)  # weights_only: tensors and plain containers, nothing else
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{pickled}: expected a state dict of tensors")
        return obj, pickled
    raise CheckpointError(f"{path}: a transformers model directory needs model.safetensors or pytorch_model.bin")


def _check_hf_backbone(hf: dict[str, Any], where: Path) -> None:
    backbone = hf.get("backbone_config")
    kind = backbone.get("model_type") if isinstance(backbone, dict) else None
    # v4 files say use_timm_backbone (default True); v5 files name the backbone's model_type
    if kind == "timm_backbone" or (kind is None and hf.get("use_timm_backbone", True)):
        raise CheckpointError(
            f"{where}: use_timm_backbone / a timm backbone_config is not supported; use weights saved with "
            "transformers' own ResNet (use_timm_backbone=False, the hub's 'no_timm' revisions)"
        )
    if kind is None:  # transformers' default ResNetConfig: the weights tell its depth
        return
    if kind != "resnet":
        raise CheckpointError(f"{where}: backbone_config.model_type {kind!r} is not supported (only 'resnet')")
    # what a torchvision-style ResNet (v1.5: stride on the 3x3 convolution) needs; absent = transformers' default
    expected = {
        "num_channels": 3, "embedding_size": 64, "hidden_act": "relu",
        "downsample_in_first_stage": False, "downsample_in_bottleneck": False,
    }
    for name, value in expected.items():
        if backbone.get(name, value) != value:
            raise CheckpointError(
                f"{where}: backbone_config.{name} = {backbone[name]!r} is not supported (a torchvision-style "
                f"ResNet needs {value!r})"
            )
    out = backbone.get("out_features") or ["stage4"]
    if out[-1] != "stage4":
        raise CheckpointError(f"{where}: backbone_config.out_features {out} must end with 'stage4'")


def _hf_base_config(hf: dict[str, Any], where: Path) -> DetrConfig:
    """The fields the weights cannot tell (head count, dilation, dropout, loss settings)."""
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(enc) != hf.get(dec):
            raise CheckpointError(f"{where}: {enc} ({hf.get(enc)}) != {dec} ({hf.get(dec)}); ours shares one value")
    if hf.get("activation_function", "relu") != "relu":
        raise CheckpointError(f"{where}: activation_function {hf['activation_function']!r} is not supported (relu)")
    position = hf.get("position_embedding_type", "sine")
    if position not in ("sine", "learned"):
        raise CheckpointError(f"{where}: position_embedding_type {position!r} is not supported (sine, learned)")
    d_model = int(hf.get("d_model", 256))
    if hf.get("dilation"):
        log.warning(
            "%s: dilation=True: building the DC5 model the config describes, although transformers' own ResNet "
            "ignores this flag (it acts only on timm backbones); pass dilation=False to reproduce transformers",
            where,
        )
    if hf.get("auxiliary_loss"):
        log.warning(
            "%s: auxiliary_loss=True: transformers then feeds each decoder layer the normalized output of the "
            "previous one, unlike DETR; this model follows DETR, so its outputs differ from transformers'",
            where,
        )
    return DetrConfig(
        position_embedding=position,
        backbone=BackboneConfig(dilation=bool(hf.get("dilation", False))),
        transformer=TransformerConfig(
            hidden_dim=d_model, nheads=int(hf.get("encoder_attention_heads", 8)), dropout=float(hf.get("dropout", 0.1))
        ),
        matcher=MatcherConfig(
            cost_class=float(hf.get("class_cost", 1)),
            cost_bbox=float(hf.get("bbox_cost", 5)),
            cost_giou=float(hf.get("giou_cost", 2)),
        ),
        loss=LossConfig(
            bbox=float(hf.get("bbox_loss_coefficient", 5)),
            giou=float(hf.get("giou_loss_coefficient", 2)),
            mask=float(hf.get("mask_loss_coefficient", 1)),
            dice=float(hf.get("dice_loss_coefficient", 1)),
            eos_coef=float(hf.get("eos_coefficient", 0.1)),
        ),
    )


def read_hf_checkpoint(path: str | Path) -> Checkpoint:
    """Read a transformers ``save_pretrained`` directory (config.json + model.safetensors, or
    pytorch_model.bin loaded with weights_only) of ``DetrForObjectDetection`` or ``DetrForSegmentation``
    with transformers' ResNet backbone. ``id2label`` becomes ``metadata["class_names"]`` ({"id": name})."""
    path = Path(path)
    cfg_file = path / "config.json"
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_file}: {e}") from None
    if hf.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(
            f"{cfg_file}: model_type {hf.get('model_type')!r} is not supported; only transformers' DETR "
            f"(model_type 'detr': DetrForObjectDetection, DetrForSegmentation) and Deformable DETR "
            f"(model_type 'deformable_detr': DeformableDetrForObjectDetection) are read"
        )
    _check_hf_backbone(hf, cfg_file)
    base = _hf_base_config(hf, cfg_file)
    raw, weights_file = _read_hf_weights(path)
    sd = hf_to_ours(raw, where=weights_file)
    config = infer_config(sd, base=base)  # depth, sizes, queries and classes from the weights
    metadata: dict[str, Any] = {}
    if isinstance(hf.get("id2label"), dict):
        metadata["class_names"] = {str(int(k)): str(v) for k, v in hf["id2label"].items()}
    return Checkpoint(sd, "detr", "huggingface", config, metadata=metadata)
