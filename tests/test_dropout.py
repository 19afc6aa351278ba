"""Dropout with CPU masks drawn as float32 uniforms (detr.model.dropout)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr.model.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_mask_keeps_one_minus_p_and_scales_the_kept(p):
    torch.manual_seed(0)
    n = 1 << 20
    out = dropout(torch.ones(n), p)
    scale = 1 / (1 - p)
    kept = out != 0
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), scale))  # nothing but 0 or 1/(1-p)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int(kept.sum()) - n * (1 - p)) < 5 * sd


def test_the_mask_is_the_seeded_uniforms_at_least_p_and_the_gradient_is_the_mask():
    x = torch.randn(3, 50, 70, requires_grad=True)
    torch.manual_seed(7)
    out = dropout(x, 0.2)
    out.backward(torch.ones_like(out))
    torch.manual_seed(7)
    keep = (torch.rand(x.shape) >= 0.2).float()
    torch.testing.assert_close(out, x.detach() * keep / 0.8, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, keep / 0.8, rtol=1e-6, atol=0)
    torch.manual_seed(8)
    assert not torch.equal(dropout(x, 0.2), out)  # another seed, another mask


def test_bf16_activations_draw_float32_uniforms():
    """At p = 0.999 a bf16 uniform never reaches p (its grid near 1 is 2**-9 apart), so bf16 draws would
    drop everything; float32 draws keep 0.1% as they should."""
    torch.manual_seed(0)
    n = 1 << 20
    out = dropout(torch.ones(n, dtype=torch.bfloat16), 0.999)
    assert out.dtype == torch.bfloat16
    kept = int((out != 0).sum())
    assert abs(kept - n * 0.001) < 5 * math.sqrt(n * 0.001 * 0.999)


def test_no_dropout_outside_training_or_at_zero():
    x = torch.randn(4, 5)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_module_is_nn_dropout_with_the_fast_masks():
    module = Dropout(0.25)
    assert isinstance(module, nn.Dropout) and module.state_dict() == {} and module.p == 0.25
    x = torch.randn(20, 30)
    torch.manual_seed(3)
    out = module(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, dropout(x, 0.25), rtol=0, atol=0)
    assert module.eval()(x) is x
