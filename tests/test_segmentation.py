"""The mask head (detr.model.segmentation): masks on demand (QueryMasks) are the full head's rows."""

from __future__ import annotations

import pytest
import torch

from detr.config import preset
from detr.model import build_detr
from detr.model.segmentation import DETRsegm, QueryMasks

# (image, query) pairs in no particular order, one asked twice
IMAGE = torch.tensor([1, 0, 1, 0, 1, 0])
QUERY = torch.tensor([5, 2, 0, 2, 3, 5])


@pytest.fixture(scope="module")
def model() -> DETRsegm:
    torch.manual_seed(0)
    config = preset("shapes-small", masks=True, num_queries=6).with_transformer(enc_layers=1, dec_layers=2)
    model = build_detr(config)
    assert isinstance(model, DETRsegm) and config.transformer.dropout == 0.0  # training mode is deterministic
    return model.train()


def images() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(3, 64, 96), torch.randn(3, 80, 48)]  # different sizes: a padded batch


def forward(model: DETRsegm, on_demand: bool) -> dict:
    model.zero_grad(set_to_none=True)
    model.masks_on_demand = on_demand
    try:
        return model(images())
    finally:
        model.masks_on_demand = False


def test_rows_equal_the_full_heads_rows(model):
    full = forward(model, on_demand=False)
    masks = full["pred_masks"]  # [B, Q, H/4, W/4]
    assert masks.shape == (2, 6, 20, 24) and "mask_logits_of" not in full
    weights = torch.randn(len(IMAGE), *masks.shape[-2:])
    (masks[IMAGE, QUERY] * weights).sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    demand = forward(model, on_demand=True)
    assert "pred_masks" not in demand and isinstance(demand["mask_logits_of"], QueryMasks)
    assert torch.equal(demand["pred_logits"], full["pred_logits"]) and torch.equal(demand["pred_boxes"],
                                                                                   full["pred_boxes"])
    rows = demand["mask_logits_of"](IMAGE, QUERY)  # [M, H/4, W/4]
    assert rows.shape == (len(IMAGE), 20, 24)
    torch.testing.assert_close(rows, masks[IMAGE, QUERY].detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(rows[1], rows[3])  # the same pair twice, the same row
    assert not torch.allclose(rows[0], rows[5], atol=1e-3)  # query 5 of image 1 vs of image 0: other rows
    # The same gradients reach the mask head, the attention map and the detector through the rows.
    (rows * weights).sum().backward()
    demand_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert demand_grads.keys() == full_grads.keys()
    assert any(n.startswith("mask_head.") for n in demand_grads) and any(n.startswith("detr.") for n in demand_grads)
    # float32 sums in another order: equal to ~1e-6 of each gradient's size (and ~1e-5 absolute for the
    # biases in front of a GroupNorm, whose gradient is 0 up to rounding)
    for name, grad in full_grads.items():
        assert (demand_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-5, name


def test_no_rows_asked_no_rows_given(model):
    rows = forward(model, on_demand=True)["mask_logits_of"](torch.tensor([], dtype=torch.int64),
                                                            torch.tensor([], dtype=torch.int64))
    assert rows.shape == (0, 20, 24)


def test_evaluation_always_gives_every_mask(model):
    model.eval()
    try:
        model.masks_on_demand = True
        with torch.no_grad():
            out = model(images())
    finally:
        model.masks_on_demand = False
        model.train()
    assert out["pred_masks"].shape == (2, 6, 20, 24) and "mask_logits_of" not in out
