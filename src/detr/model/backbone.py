"""ResNet backbones with frozen BatchNorm, parameter names as in torchvision's ResNet.

``ResNet`` keeps torchvision's names (conv1, bn1, layer1..layer4, downsample.0/1) so ImageNet weights
and released DETR checkpoints load without renaming inside the trunk. ``Backbone`` wraps a trunk
for DETR: it freezes the stem and the first stage, returns the last stage (or all four for the
mask head) and carries the padding mask down to each returned level.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackboneConfig
from ..structures import downsample_mask

NormLayer = Callable[[int], nn.Module]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, nothing trains).

    y = (x - running_mean) * weight / sqrt(running_var + eps) + bias, folded into one scale and shift.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # torchvision/ImageNet weights carry a BatchNorm counter that a frozen norm has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups (fewer for narrow layers): batch-independent, so DDP stays exact."""

    def __init__(self, num_features: int) -> None:
        super().__init__(min(32, num_features), num_features)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, *, fold: bool = True) -> Tensor:
    """``norm(conv(x))``. While autograd records (training), a frozen BatchNorm is folded into the convolution:
    conv(x; W * scale) + shift is one weight-sized multiply instead of two passes over the activation in the
    forward and one in the backward; the gradient of W flows through the multiply (W' = W * scale). Without
    autograd the two run as written (inference folds once and for all: ``detr.model.fuse``)."""
    if fold and isinstance(norm, FrozenBatchNorm2d) and torch.is_grad_enabled():
        scale, shift = norm.scale_and_shift()  # [C_out] each
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)  # [C_out, C_in, k, k]
        bias = shift if conv.bias is None else conv.bias * scale + shift
        return conv._conv_forward(x, weight, bias)
    return norm(conv(x))


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class _Block(nn.Module):
    """A residual block: relu(main(x) + shortcut(x)); the subclasses build and run the main branch.

    ``fold_norms`` (default True): frozen norms folded into the convolutions in training (``conv_norm``).
    """

    expansion = 1
    fold_norms = True

    def __init__(
        self, cin: int, planes: int, *, stride: int, dilation: int, downsample: nn.Module | None, norm: NormLayer
    ) -> None:
        super().__init__()
        self._build(cin, planes, stride, dilation, norm)  # first, as torchvision registers them (init order)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def _build(self, cin: int, planes: int, stride: int, dilation: int, norm: NormLayer) -> None:
        raise NotImplementedError

    def _main(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _shortcut(self, x: Tensor) -> Tensor:
        down = self.downsample
        if down is None:
            return x
        if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], nn.Conv2d):
            return conv_norm(down[0], down[1], x, fold=self.fold_norms)
        return down(x)

    def forward(self, x: Tensor) -> Tensor:
        identity = self._shortcut(x)
        out = self._main(x)
        out += identity  # in place: no new activation-sized tensor (autograd needs neither operand)
        return self.relu(out)


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34)."""

    def _build(self, cin: int, planes: int, stride: int, dilation: int, norm: NormLayer) -> None:
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm(planes)

    def _main(self, x: Tensor) -> Tensor:
        fold = self.fold_norms
        out = F.relu(conv_norm(self.conv1, self.bn1, x, fold=fold), inplace=True)
        return conv_norm(self.conv2, self.bn2, out, fold=fold)


class Bottleneck(_Block):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution (ResNet-50/101)."""

    expansion = 4

    def _build(self, cin: int, planes: int, stride: int, dilation: int, norm: NormLayer) -> None:
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)

    def _main(self, x: Tensor) -> Tensor:
        fold = self.fold_norms
        out = F.relu(conv_norm(self.conv1, self.bn1, x, fold=fold), inplace=True)
        out = F.relu(conv_norm(self.conv2, self.bn2, out, fold=fold), inplace=True)
        return conv_norm(self.conv3, self.bn3, out, fold=fold)


_ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """The convolutional trunk of a torchvision ResNet (no pooling head, no fc).

    Two training-only levers (applied while autograd records; inference has ``detr.model.fuse``), each measured
    to pay on a 2-core CPU (docs/performance.md): ``fold_norms`` folds the frozen norms into the convolutions
    (``conv_norm``; ``set_norm_folding`` switches a whole model), ``channels_last`` runs the trunk on
    channels-last activations, the layout oneDNN's convolutions work in (NCHW ones are reordered around
    every convolution, forward and backward). Both change float rounding only.
    """

    fold_norms = True
    channels_last = True

    def __init__(self, name: str = "resnet50", *, dilation: bool = False, norm: NormLayer = FrozenBatchNorm2d):
        super().__init__()
        if name not in _ARCHS:
            raise ValueError(f"unknown ResNet {name!r}; choose from {sorted(_ARCHS)}")
        block, depths = _ARCHS[name]
        self.inplanes, self._dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, depths[0], 1, False, norm)
        self.layer2 = self._make_stage(block, 128, depths[1], 2, False, norm)
        self.layer3 = self._make_stage(block, 256, depths[2], 2, False, norm)
        self.layer4 = self._make_stage(block, 512, depths[3], 2, dilation, norm)
        self.stage_channels = [64 * block.expansion * 2**i for i in range(4)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if norm is not FrozenBatchNorm2d:
            # From scratch: each residual branch starts as zero (its last norm's scale is 0), so the
            # trunk begins near identity and trains stably (Goyal et al., 2017).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    last = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                    nn.init.zeros_(last.weight)

    def _make_stage(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, depth: int, stride: int, dilate: bool,
        norm: NormLayer,
    ) -> nn.Sequential:
        # DC5 (torchvision's replace_stride_with_dilation): the stage keeps the resolution and
        # dilates instead; its first block still uses the previous dilation.
        first_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out, stride), norm(out))
        blocks = [block(self.inplanes, planes, stride=stride, dilation=first_dilation, downsample=downsample,
                        norm=norm)]
        self.inplanes = out
        blocks += [
            block(out, planes, stride=1, dilation=self._dilation, downsample=None, norm=norm)
            for _ in range(1, depth)
        ]
        return nn.Sequential(*blocks)

    def forward_stages(self, x: Tensor, last: int = 4) -> list[Tensor]:
        """Outputs of the ``last`` stages of layer1..layer4 (default all): strides 4, 8, 16, 32 (16 for layer4
        with DC5)."""
        if self.channels_last and torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)  # [B, 3, H, W], strides of [B, H, W, 3]
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x, fold=self.fold_norms)))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        # callers (the projection, the mask head's FPN) get the usual layout; only the stages they take
        # are copied out of channels-last (layer1's alone is 45 MB at batch 2 of 512x683)
        return [stage.contiguous() for stage in stages[4 - last:]]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_stages(x, last=1)[0]

    def load_torchvision_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load ImageNet weights saved from torchvision's ResNet (the fc layer is ignored)."""
        trunk = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(trunk, strict=False)
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"ResNet weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def set_norm_folding(model: nn.Module, enabled: bool) -> None:
    """Fold (True, the default) or not the frozen norms of every ResNet trunk in ``model`` while training."""
    for module in model.modules():
        if isinstance(module, (ResNet, _Block)):
            module.fold_norms = enabled


class SmallConvNet(nn.Module):
    """A plain GroupNorm CNN for training from scratch on small images (``BackboneConfig.name="small"``).

    Stage i: a stride-2 3x3 convolution to ``widths[i]`` channels, then ``depths[i]`` stride-1 ones, each
    followed by GroupNorm and ReLU. Output stride 2 ** len(widths). Cheap enough for a CPU, and unlike a
    stride-32 ResNet on 128 px images (4x4 tokens) it leaves the encoder a real grid to attend over.
    """

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...]) -> None:
        super().__init__()
        stages, cin = [], 3
        for width, depth in zip(widths, depths, strict=True):
            layers = [_conv3x3(cin, width, stride=2), GroupNorm32(width), nn.ReLU(inplace=True)]
            for _ in range(depth):
                layers += [_conv3x3(width, width), GroupNorm32(width), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.stage_channels = list(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_stages(self, x: Tensor, last: int | None = None) -> list[Tensor]:
        """Outputs of the ``last`` stages (default all), finest first."""
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[-(last or len(outputs)):]


_NORMS: dict[str, NormLayer] = {"frozen_bn": FrozenBatchNorm2d, "group_norm": GroupNorm32}
_STAGE_PREFIXES = (("conv1", "bn1", "layer1"), ("layer2",), ("layer3",), ("layer4",))


class Backbone(nn.Module):
    """DETR's backbone: a ResNet whose first ``frozen_stages`` stages (1: stem + layer1) never train.

    The reference's trunk uses frozen BatchNorm; ``norm="group_norm"`` trains a from-scratch trunk.

    forward(pixels [B, 3, H, W], padding_mask [B, H, W]) -> (features, masks): lists with the last
    ``num_outputs`` stages, finest first (1: DETR; 3: Deformable DETR's C3-C5; 4: the mask head's FPN).
    """

    def __init__(self, config: BackboneConfig, *, num_outputs: int = 1) -> None:
        super().__init__()
        self.body: ResNet | SmallConvNet
        if config.name == "small":
            self.body = SmallConvNet(config.widths, config.depths)
        else:
            self.body = ResNet(config.name, dilation=config.dilation, norm=_NORMS[config.norm])
        if not 1 <= num_outputs <= len(self.body.stage_channels):
            raise ValueError(f"the {config.name} backbone has {len(self.body.stage_channels)} stages, "
                             f"{num_outputs} requested")
        self.num_outputs = num_outputs
        self.num_channels = self.body.stage_channels[-1]
        self.output_channels = self.body.stage_channels[-num_outputs:]
        frozen = tuple(p for stage in _STAGE_PREFIXES[: config.frozen_stages] for p in stage)
        for name, param in self.body.named_parameters():
            param.requires_grad_(config.trainable and not name.startswith(frozen))

    def forward(self, pixels: Tensor, padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        stages = self.body.forward_stages(pixels, last=self.num_outputs)
        masks = [downsample_mask(padding_mask, feature.shape[-2:]) for feature in stages]
        return stages, masks
