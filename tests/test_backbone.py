"""Backbone options: which stages train, and the trained GroupNorm for from-scratch trunks."""

import pytest
import torch
from torch import nn

from detr.checkpoint import infer_config, load_checkpoint, save_checkpoint
from detr.cli import build_parser, model_config_from_args
from detr.config import BackboneConfig, preset
from detr.model import build_detr
from detr.model.backbone import Backbone, FrozenBatchNorm2d


def _trainable_prefixes(backbone: Backbone) -> set[str]:
    return {name.split(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}


def test_reference_backbone_freezes_stem_and_layer1():
    backbone = Backbone(BackboneConfig(name="resnet18"))
    assert _trainable_prefixes(backbone) == {"layer2", "layer3", "layer4"}
    assert all(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules() if "Norm" in type(m).__name__)


@pytest.mark.parametrize(("frozen", "expected"), [
    (0, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
    (2, {"layer3", "layer4"}),
    (4, set()),
])
def test_frozen_stages(frozen, expected):
    backbone = Backbone(BackboneConfig(name="resnet18", norm="group_norm", frozen_stages=frozen))
    assert _trainable_prefixes(backbone) == expected


def test_untrainable_backbone_freezes_everything():
    backbone = Backbone(BackboneConfig(name="resnet18", norm="group_norm", frozen_stages=0, trainable=False))
    assert _trainable_prefixes(backbone) == set()


def test_group_norm_backbone_normalizes_and_learns():
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name="resnet18", norm="group_norm", frozen_stages=0))
    norms = [m for m in backbone.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    # Inputs 100x too large give the same features: the trunk normalizes (a frozen identity BN would not).
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    small, big = backbone(x, mask)[0][0], backbone(100 * x, mask)[0][0]
    torch.testing.assert_close(small, big, rtol=1e-3, atol=1e-3)
    # Every norm trains; the zero-initialized last norm of each residual branch gets a gradient at once.
    backbone(x, mask)[0][0].square().mean().backward()
    assert all(m.weight.grad is not None and m.bias.grad is not None for m in norms)
    last = [blk.bn2 for stage in ("layer1", "layer2", "layer3", "layer4") for blk in getattr(backbone.body, stage)]
    assert all(float(m.weight.detach().abs().sum()) == 0 and float(m.weight.grad.abs().sum()) > 0 for m in last)


def test_group_norm_is_recognized_in_saved_weights(tmp_path):
    config = preset("shapes-small").with_backbone(norm="group_norm", frozen_stages=0)
    model = build_detr(config)
    assert infer_config(model.state_dict()).backbone.norm == "group_norm"
    assert infer_config(build_detr(preset("shapes-small").with_backbone(norm="frozen_bn")).state_dict()
                        ).backbone.norm == "frozen_bn"
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config.backbone == config.backbone
    x = [torch.randn(3, 64, 80)]
    model.eval()
    torch.testing.assert_close(loaded(x)["pred_boxes"], model(x)["pred_boxes"], rtol=0, atol=0)


def test_bad_backbone_options_are_named():
    with pytest.raises(ValueError, match="backbone.norm"):
        BackboneConfig(norm="batch_norm")
    with pytest.raises(ValueError, match="frozen_stages"):
        BackboneConfig(frozen_stages=5)


def test_cli_backbone_flags():
    args = build_parser().parse_args(["train", "--preset", "r50", "--backbone_norm", "group_norm",
                                      "--frozen_stages", "0"])
    backbone = model_config_from_args(args).backbone
    assert (backbone.norm, backbone.frozen_stages) == ("group_norm", 0)
