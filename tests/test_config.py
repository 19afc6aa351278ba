"""Configs (detr.config): to and from the reference's checkpoint ``args``, and what the reference cannot express."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from detr.config import (
    BackboneConfig,
    DetrConfig,
    LossConfig,
    MatcherConfig,
    QueryConfig,
    TransformerConfig,
    from_reference_args,
    preset,
    to_reference_args,
)

# Every value the reference's flags set, away from its defaults.
UNUSUAL = DetrConfig(
    num_classes=20,
    num_queries=37,
    position_embedding="learned",
    backbone=BackboneConfig(name="resnet34", dilation=True),
    transformer=TransformerConfig(hidden_dim=96, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=160,
                                  dropout=0.25, pre_norm=True),
    matcher=MatcherConfig(cost_class=2.0, cost_bbox=3.0, cost_giou=4.0),
    loss=LossConfig(bbox=6.0, giou=7.0, mask=8.0, dice=9.0, eos_coef=0.05, aux_loss=False),
)
VANILLA = {
    **{name: preset(name) for name in ("r50", "r50-dc5", "r101", "r101-dc5", "panoptic")},
    "unusual": UNUSUAL,
    "frozen backbone": preset("r50").with_backbone(trainable=False),
    "resnet18": preset("r50", num_classes=4).with_backbone(name="resnet18"),
}


@pytest.mark.parametrize("name", sorted(VANILLA))
def test_round_trip_through_the_reference_args(name):
    config = VANILLA[name]
    args = to_reference_args(config)
    assert from_reference_args(args, num_classes=config.num_classes) == config
    # as the reference stores them: an argparse.Namespace in the checkpoint
    assert from_reference_args(argparse.Namespace(**args), num_classes=config.num_classes) == config


def test_reference_args_carry_the_reference_names_and_values():
    args = to_reference_args(UNUSUAL)
    assert args == {
        "backbone": "resnet34", "dilation": True, "lr_backbone": 1e-5, "position_embedding": "learned",
        "hidden_dim": 96, "nheads": 4, "enc_layers": 2, "dec_layers": 3, "dim_feedforward": 160, "dropout": 0.25,
        "pre_norm": True, "num_queries": 37, "masks": False, "aux_loss": False, "set_cost_class": 2.0,
        "set_cost_bbox": 3.0, "set_cost_giou": 4.0, "bbox_loss_coef": 6.0, "giou_loss_coef": 7.0,
        "mask_loss_coef": 8.0, "dice_loss_coef": 9.0, "eos_coef": 0.05, "num_classes": 20, "dataset_file": "coco",
    }
    assert to_reference_args(preset("r50").with_backbone(trainable=False))["lr_backbone"] == 0.0
    assert to_reference_args(preset("panoptic"))["dataset_file"] == "coco_panoptic"


@pytest.mark.parametrize("entry", ["detection", "detection_prenorm_learned_dc5", "panoptic"])
def test_the_fixtures_reference_args_round_trip(reference, entry):
    """The args the reference itself wrote: read, written back, the same values for every flag we know."""
    args = reference[entry]["config"]
    config = from_reference_args(argparse.Namespace(**args), num_classes=reference[entry]["num_classes"])
    assert config.is_vanilla
    written = to_reference_args(config)
    shared = sorted(set(written) & set(args))
    assert len(shared) >= 12, shared
    assert {k: written[k] for k in shared} == {k: args[k] for k in shared}
    assert from_reference_args(written, num_classes=config.num_classes) == config


def test_missing_args_take_the_reference_defaults():
    assert from_reference_args({}) == preset("r50")  # dataset_file "coco": 91 classes
    assert from_reference_args({"dataset_file": "coco_panoptic", "masks": True}) == preset("panoptic")
    assert from_reference_args({"lr_backbone": 0}).backbone.trainable is False
    assert from_reference_args({"dataset_file": "coco"}, num_classes=7).num_classes == 7  # the class head wins


NOT_VANILLA = {
    "small backbone": preset("shapes-fast"),
    "group norm backbone": preset("shapes-small"),  # ResNet-18 with GroupNorm: no FrozenBatchNorm statistics
    "every stage trains": preset("r50").with_backbone(frozen_stages=0),
    "two stages frozen": preset("r50").with_backbone(frozen_stages=2),
    "anchor queries": preset("r50").with_queries(anchors=True),
    "group detr": preset("r50").with_queries(groups=3),
    "no feed-forward": preset("r50").with_transformer(dim_feedforward=0),
    "positions at the input": preset("r50").with_transformer(spatial_pos="input"),
    "query positions at the input": preset("r50").with_transformer(query_pos="input"),
}


@pytest.mark.parametrize("name", sorted(NOT_VANILLA))
def test_a_config_the_reference_cannot_build_is_refused(name):
    config = NOT_VANILLA[name]
    assert not config.is_vanilla
    with pytest.raises(ValueError, match="no flags for this configuration"):
        to_reference_args(config)


def test_a_frozen_backbone_ignores_its_frozen_stages():
    # lr_backbone 0 freezes every stage in the reference: how many stages "would" train does not matter
    config = preset("r50").with_backbone(trainable=False, frozen_stages=0)
    assert config.is_vanilla
    assert from_reference_args(to_reference_args(config)).backbone.trainable is False


def test_our_dict_round_trip_keeps_every_field():
    for config in (*VANILLA.values(), *NOT_VANILLA.values()):
        assert DetrConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown DetrConfig fields"):
        DetrConfig.from_dict({**preset("r50").to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown TransformerConfig fields"):
        DetrConfig.from_dict({**preset("r50").to_dict(), "transformer": {"hidden": 3}})
    assert dataclasses.replace(QueryConfig()) == QueryConfig()


# A changed value per field type; strings name a valid alternative of their field.
_OTHER_STRINGS = {"norm": "group_norm", "spatial_pos": "input", "query_pos": "input", "class_loss": "focal"}


def test_every_field_the_reference_cannot_express_makes_a_config_not_vanilla():
    # is_vanilla reads the fields themselves: a new option is not vanilla until someone says otherwise
    from detr.config import _VANILLA_FREE_FIELDS

    base = DetrConfig()
    assert base.is_vanilla
    checked = set()
    for section in ("", "backbone", "transformer", "queries", "matcher", "loss"):
        part = getattr(base, section) if section else base
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if dataclasses.is_dataclass(value) or (section, f.name) in _VANILLA_FREE_FIELDS:
                continue
            if isinstance(value, bool):
                other = not value
            elif isinstance(value, float):
                other = value / 2
            elif isinstance(value, int):
                other = value + 1
            else:
                other = _OTHER_STRINGS[f.name]  # a KeyError names a new string field: give it an alternative
            try:
                config = (dataclasses.replace(base, **{f.name: other}) if not section else
                          dataclasses.replace(base, **{section: dataclasses.replace(part, **{f.name: other})}))
            except ValueError:  # needs another option first (e.g. two_stage needs anchors): not alone
                continue
            assert not config.is_vanilla, (section, f.name)
            checked.add(f.name)
    # the rest (two_stage, denoising, ...) need anchor-box queries; anchors alone already is not vanilla
    assert checked >= {"norm", "spatial_pos", "query_pos", "anchors", "anchor_size", "groups", "label_noise",
                       "class_loss"}
