"""Dropout with CPU masks drawn as float32 uniforms (detr.model.dropout)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr.model.dropout import Dropout, cpu_uniforms, dropout


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


def test_the_mask_follows_torch_seed_and_the_gradient_is_the_mask():
    x = torch.randn(3, 50, 70, requires_grad=True)
    torch.manual_seed(7)
    out = dropout(x, 0.2)
    out.backward(torch.ones_like(out))
    keep = (x.grad != 0).float()
    torch.testing.assert_close(x.grad, keep / 0.8, rtol=0, atol=0)  # the gradient: 0 or 1 / (1 - p)
    torch.testing.assert_close(out, x.detach() * keep / 0.8, rtol=1e-6, atol=0)  # the same mask forward
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.2), out)  # the seed decides the mask
    state = torch.get_rng_state()  # as exact resume restores it
    again = dropout(x, 0.2)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.2), again)
    assert not torch.equal(again, out)  # the next call, the next mask
    torch.manual_seed(8)
    assert not torch.equal(dropout(x, 0.2), out)  # another seed, another mask


def test_uniforms_are_uniform_24_bit_and_independent_between_calls():
    torch.manual_seed(0)
    u, v = cpu_uniforms((1 << 20,)), cpu_uniforms((1 << 20,))
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u * 2**24, (u * 2**24).floor())  # multiples of 2**-24
    counts = torch.histc(u, bins=16, min=0, max=1)  # chi-square over 16 bins, 15 d.o.f.: p = 1e-6 at 50.5
    expected = u.numel() / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 50.5
    # two calls are two streams: their correlation is ~N(0, 1/sqrt(n)) = 0.001
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.006


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
