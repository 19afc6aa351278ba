"""The model against the reference implementation's own numbers (../shared/fixtures).

Weights go through ``detr.load_checkpoint`` from a file in the reference's released format.
"""

from __future__ import annotations

import argparse

import pytest
import torch

import detr
from detr.checkpoint import reference_key_to_ours
from detr.config import from_reference_args
from detr.loss import HungarianMatcher, SetCriterion

CONFIGS = ["detection", "detection_prenorm_learned_dc5", "panoptic"]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    """Max error, absolute for |values| <= 1 and relative above; asserts it is within ``tol``."""
    err = ((actual - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
    assert err <= tol, f"max error {err:.3g} > {tol}"
    return err


@pytest.fixture(scope="module")
def models(reference, tmp_path_factory) -> dict:
    out = {}
    for name in CONFIGS:
        entry = reference[name]
        path = tmp_path_factory.mktemp(name) / "checkpoint.pth"
        weights = {k: v.float() for k, v in entry["state_dict"].items()}
        torch.save({"model": weights, "args": argparse.Namespace(**entry["config"])}, path)
        out[name] = detr.load_checkpoint(path)
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_loaded_architecture(reference, models, name):
    entry = reference[name]
    model = models[name]
    assert not model.training
    assert model.config == from_reference_args(entry["config"], entry["num_classes"])
    assert isinstance(model, detr.DETRsegm if entry["config"]["masks"] else detr.DETR)


@pytest.mark.parametrize("name", CONFIGS)
def test_outputs_match_reference(reference, models, name):
    expected = reference[name]["outputs"]
    with torch.no_grad():
        out = models[name](reference["images"])
    close(out["pred_logits"], expected["pred_logits"], 1e-4)
    close(out["pred_boxes"], expected["pred_boxes"], 1e-4)
    assert len(out["aux_outputs"]) == len(expected["aux_outputs"])
    for ours, theirs in zip(out["aux_outputs"], expected["aux_outputs"], strict=True):
        close(ours["pred_logits"], theirs["pred_logits"], 1e-4)
        close(ours["pred_boxes"], theirs["pred_boxes"], 1e-4)
    if "pred_masks" in expected:
        assert out["pred_masks"].shape == expected["pred_masks"].shape
        close(out["pred_masks"], expected["pred_masks"], 1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_losses_and_gradients_match_reference(reference, models, name):
    entry = reference[name]
    model = models[name]
    config = model.config
    criterion = SetCriterion(
        num_classes=config.num_classes,
        matcher=HungarianMatcher.from_config(config.matcher),
        loss=config.loss,
        masks=config.masks,
    )
    model.zero_grad()
    result = criterion(model(reference["images"]), reference["targets"])
    for (pred, tgt), (ref_pred, ref_tgt) in zip(result.indices, entry["indices"], strict=True):
        assert torch.equal(pred, ref_pred) and torch.equal(tgt, ref_tgt)
    rel = abs(result.total.item() - entry["total_loss"].item()) / abs(entry["total_loss"].item())
    assert rel < 1e-4
    result.total.backward()
    params = dict(model.named_parameters())
    for ref_name, expected in entry["grads"].items():
        grad = params[reference_key_to_ours(ref_name)].grad
        assert grad is not None, ref_name
        if isinstance(expected, dict):
            flat = grad.flatten()
            assert abs(flat.norm().item() - expected["norm"].item()) <= 1e-3 * expected["norm"].item()
            scale = expected["first_4096"].abs().max().item()
            assert (flat[:4096] - expected["first_4096"]).abs().max().item() <= 1e-3 * scale, ref_name
        else:
            scale = expected.abs().max().item()
            assert (grad - expected).abs().max().item() <= 1e-3 * scale, ref_name
    model.zero_grad()
