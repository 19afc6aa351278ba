"""The attention core's training paths: CPU dropout masks and float32 attention under CPU autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detr.model.dropout import cpu_uniforms
from detr.model.transformer import MultiheadAttention


def _inputs(seed: int = 0, batch: int = 2, lq: int = 9, lk: int = 13, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, lq, dim, generator=g)
    memory = torch.randn(batch, lk, dim, generator=g)
    padding = torch.zeros(batch, lk, dtype=torch.bool)
    padding[1, -4:] = True  # the second image's last keys are padding
    return query, memory, padding


def _by_hand(mha: MultiheadAttention, query, memory, padding, keep: torch.Tensor | None, p: float):
    """softmax(q k^T / sqrt(d)) with padded keys excluded, dropout by ``keep``, times v, projected."""
    e, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q, k, v = (F.linear(x, w[i * e:(i + 1) * e], b[i * e:(i + 1) * e]) for i, x in enumerate((query, memory, memory)))
    q, k, v = (x.unflatten(-1, (h, e // h)).transpose(1, 2) for x in (q, k, v))  # [B, h, L, d]
    scores = q @ k.transpose(-2, -1) / (e // h) ** 0.5
    probs = scores.masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return mha.out_proj((probs @ v).transpose(1, 2).flatten(2))


def test_training_dropout_on_the_cpu_drops_attention_weights_with_the_seeded_mask():
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4, dropout=0.3).train()
    query, memory, padding = _inputs()
    memory.requires_grad_(True)
    torch.manual_seed(11)
    out, _ = mha(query, memory, memory, key_padding_mask=padding)
    torch.manual_seed(11)
    keep = (cpu_uniforms((2, 4, 9, 13)) >= 0.3).float()  # [B, h, Lq, Lk]: the only draw of the forward
    expected = _by_hand(mha, query, memory, padding, keep, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the gradients too: the padded keys' -inf is added in place, and no gradient may leak into them
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [mha.in_proj_weight, mha.in_proj_bias, memory], grad)
    want = torch.autograd.grad(expected, [mha.in_proj_weight, mha.in_proj_bias, memory], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got[2][1, -4:].abs().max() == 0 and got[2][1, :-4].abs().min() > 0  # padded keys: no gradient
    mha.eval()  # no dropout: the fused kernel, the same attention
    plain, _ = mha(query, memory, memory, key_padding_mask=padding)
    torch.testing.assert_close(plain, _by_hand(mha, query, memory, padding, None, 0.0), rtol=1e-5, atol=1e-6)


def test_cpu_autocast_runs_the_attention_core_in_float32():
    """Under bf16 autocast the projections are bf16 and the core is float32: the output is the float32
    attention of the bf16 projections, rounded once."""
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4).eval()
    query, memory, padding = _inputs(1, lq=40, lk=60)
    seen = {}
    mha.out_proj.register_forward_hook(lambda m, args, out: seen.update(core=args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = mha(query, memory, memory, key_padding_mask=padding)
    assert out.dtype == torch.bfloat16 and seen["core"].dtype == torch.bfloat16
    e, w, b = 32, mha.in_proj_weight.bfloat16(), mha.in_proj_bias.bfloat16()
    q, k, v = (F.linear(x.bfloat16(), w[i * e:(i + 1) * e], b[i * e:(i + 1) * e]).unflatten(-1, (4, 8)).transpose(1, 2)
               for i, x in enumerate((query, memory, memory)))  # [B, h, L, d], bf16 as autocast makes them
    allowed = ~padding[:, None, None, :]
    core = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
    expected = core.bfloat16().transpose(1, 2).flatten(2)  # [B, Lq, E]
    torch.testing.assert_close(seen["core"], expected, rtol=0, atol=0)
    in_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).flatten(2)
    assert not torch.equal(in_bf16, expected)  # the bf16 kernel would round otherwise: the check can tell
