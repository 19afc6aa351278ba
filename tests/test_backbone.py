"""Backbone options: which stages train, and the trained GroupNorm for from-scratch trunks."""

import pytest
import torch
from torch import nn

from detr.checkpoint import infer_config, load_checkpoint, save_checkpoint
from detr.cli import build_parser, model_config_from_args
from detr.config import BackboneConfig, preset
from detr.model import build_detr
from detr.model.backbone import Backbone, FrozenBatchNorm2d, conv_norm, set_norm_folding


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


def _training_step(model, criterion, images, targets, *, fold: bool, channels_last: bool):
    set_norm_folding(model, fold)
    model.backbone.body.channels_last = channels_last
    model.zero_grad()
    result = criterion(model(images), targets)
    result.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    set_norm_folding(model, True)
    model.backbone.body.channels_last = True
    return result.total.detach(), grads


def test_folded_channels_last_training_step_gives_the_plain_loss_and_gradients():
    """The training levers (frozen norms folded into the convolutions, channels-last trunk) change rounding only:
    same loss, same gradients of every trainable weight (the backbone's convolutions included)."""
    from detr.loss import SetCriterion

    torch.manual_seed(0)
    config = preset("r50").with_transformer(dropout=0.0)
    model = build_detr(config).train()
    for module in model.modules():  # non-trivial frozen statistics, so a fold that ignored them would show
        if isinstance(module, FrozenBatchNorm2d):
            for buffer, low, high in (("weight", 0.5, 1.5), ("bias", -0.2, 0.2), ("running_mean", -0.2, 0.2),
                                      ("running_var", 0.5, 2.0)):
                getattr(module, buffer).uniform_(low, high)
    criterion = SetCriterion.from_config(config)
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 112)]
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]), "labels": torch.tensor([3, 7])},
               {"boxes": torch.tensor([[0.4, 0.5, 0.5, 0.3]]), "labels": torch.tensor([1])}]
    plain_loss, plain = _training_step(model, criterion, images, targets, fold=False, channels_last=False)
    fast_loss, fast = _training_step(model, criterion, images, targets, fold=True, channels_last=True)
    # float64 truth: through 50 layers with these statistics float32 itself is ~5e-5 off on some gradients.
    model.double()
    truth_loss, truth = _training_step(model, criterion.double(), [x.double() for x in images],
                                       [{**t, "boxes": t["boxes"].double()} for t in targets],
                                       fold=False, channels_last=False)
    model.float()
    assert abs(fast_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    assert set(fast) == set(plain) == set(truth) and "backbone.body.layer2.0.conv1.weight" in plain
    assert not any(n.startswith("backbone.body.layer1.") for n in plain)  # frozen: no gradient either way
    for name, grad in truth.items():
        scale = grad.norm().clamp(min=1e-6)  # a few are zero (the first decoder layer sees zeros)
        plain_error = ((plain[name] - grad).norm() / scale).item()
        fast_error = ((fast[name].double() - grad).norm() / scale).item()
        assert fast_error <= max(3 * plain_error, 1e-5), (name, fast_error, plain_error)  # a wrong fold: ~1


def test_conv_norm_folds_only_frozen_norms_under_autograd():
    conv, norm = nn.Conv2d(4, 6, 3, padding=1, bias=False), FrozenBatchNorm2d(6)
    norm.running_var.uniform_(0.5, 2.0)
    norm.bias.uniform_(-1, 1)
    x = torch.randn(1, 4, 8, 8)
    folded = conv_norm(conv, norm, x)
    assert folded.grad_fn is not None and "Convolution" in type(folded.grad_fn).__name__  # no separate mul/add
    torch.testing.assert_close(folded, norm(conv(x)), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)), rtol=0, atol=0)  # as written


def test_the_stages_a_caller_takes_are_the_last_ones_in_the_usual_layout():
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name="resnet18"), num_outputs=2).train()
    pixels = torch.randn(1, 3, 96, 128)
    features, masks = backbone(pixels, torch.zeros(1, 96, 128, dtype=torch.bool))  # autograd on: channels-last trunk
    every = backbone.body.forward_stages(pixels)
    assert [f.shape for f in features] == [e.shape for e in every[-2:]] == [(1, 256, 6, 8), (1, 512, 3, 4)]
    for feature, expected in zip(features, every[-2:], strict=True):
        assert feature.is_contiguous()  # NCHW for the projection and the mask head
        torch.testing.assert_close(feature, expected, rtol=0, atol=0)
    assert [m.shape for m in masks] == [(1, 6, 8), (1, 3, 4)]
