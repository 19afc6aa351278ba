"""optimize_for_inference: folded frozen norms and channels-last convolutions, same outputs."""

import pytest
import torch

from detr import build_detr, preset
from detr.checkpoint import save_checkpoint
from detr.model.backbone import FrozenBatchNorm2d, GroupNorm32
from detr.model.fuse import fold_frozen_batchnorm, optimize_for_inference


def _randomize_norms(model: torch.nn.Module) -> None:
    # Identity statistics would hide a wrong fold; give every norm its own scale and shift.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for buf, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.5, 0.5)), (m.running_mean, (-0.5, 0.5)),
                                  (m.running_var, (0.5, 2.0))):
                buf.copy_(torch.rand(buf.shape, generator=g) * (hi - lo) + lo)


def test_fold_counts_and_outputs_r18():
    torch.manual_seed(0)
    model = build_detr(preset("r50").with_backbone(name="resnet18")).eval()
    _randomize_norms(model)
    fast = optimize_for_inference(model)
    # resnet18: stem 1 + 8 blocks x 2 + 3 downsamples = 20 norms, all gone from the copy, none from the original
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = [torch.randn(3, 96, 128), torch.randn(3, 112, 80)]  # padded batch: the mask path too
    with torch.inference_mode():
        ref, out = model(images), fast(images)
    assert (ref["pred_logits"] - out["pred_logits"]).abs().max() < 1e-4
    assert (ref["pred_boxes"] - out["pred_boxes"]).abs().max() < 1e-5


def test_fold_counts_r50_and_group_norm_untouched():
    model = build_detr(preset("r50"))
    assert fold_frozen_batchnorm(model) == 53  # stem 1 + 16 blocks x 3 + 4 downsamples
    gn = build_detr(preset("shapes-small"))
    assert fold_frozen_batchnorm(gn) == 0
    assert sum(isinstance(m, GroupNorm32) for m in gn.modules()) == 20


def test_optimized_model_is_not_saved(tmp_path):
    fast = optimize_for_inference(build_detr(preset("shapes-small")))
    with pytest.raises(ValueError, match="optimize_for_inference"):
        save_checkpoint(fast, tmp_path / "x.safetensors")
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training


def test_compiled_detector_matches_eager():
    # torch.compile (Inductor, frozen weights) must not change what a Detector finds.
    from PIL import Image

    from detr.inference.predictor import Detector

    torch.manual_seed(0)
    # a small model: Inductor's compile time grows with the graph, and any graph shows a wrong compile
    model = build_detr(preset("shapes-fast").with_transformer(enc_layers=1, dec_layers=1))
    image = Image.fromarray((torch.rand(60, 80, 3) * 255).byte().numpy())
    eager = Detector(model, threshold=0.0, size=64, max_size=100)
    compiled = Detector(model, threshold=0.0, size=64, max_size=100, compile=True)
    a, b = eager(image), compiled(image)
    assert len(a) == len(b) == model.num_queries and compiled._compiled
    for x, y in zip(a, b, strict=True):
        assert x.label == y.label and abs(x.score - y.score) < 1e-5
        assert max(abs(u - v) for u, v in zip(x.box, y.box, strict=True)) < 1e-3  # pixels
