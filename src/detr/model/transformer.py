"""DETR's encoder-decoder transformer, with full or multi-scale deformable attention.

Batch-first internally ([B, S, C]); parameter names and shapes follow the released checkpoints
(packed ``in_proj_weight``, ``multihead_attn`` for cross-attention, ``norm1..3``). Positional
encodings are added to queries and keys (never values) in every attention of every layer.

With ``attention="deformable"`` (Deformable DETR) the encoder's self-attention and the decoder's
cross-attention are ``MultiScaleDeformableAttention`` over the flattened feature levels: each query
samples around a reference point (an encoder token's centre; a decoder query's reference point or box).
The decoder's self-attention stays full attention; the layers are the same residual sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TransformerConfig
from .deformable import MultiScaleDeformableAttention
from .dropout import Dropout, dropout
from .levels import FeatureLevels


class MultiheadAttention(nn.Module):
    """Multi-head attention over ``scaled_dot_product_attention``, state-dict compatible with
    ``torch.nn.MultiheadAttention`` (packed q/k/v projection).

    Set ``keep_weights = True`` to also return the head-averaged attention weights [B, Lq, Lk]
    (an opt-in path for visualisation; a forward hook on this module then sees them).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.keep_weights = False
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)  # [B, h, N, d]

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """query [B, Lq, E], key/value [B, Lk, E], key_padding_mask [B, Lk] (True = ignore),
        attn_mask [Lq, Lk] (True = may attend; isolates query groups in training)."""
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: one matmul for q and k
            q, k = F.linear(query, w[: 2 * e], b[: 2 * e]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:e], b[:e])
            k = F.linear(key, w[e : 2 * e], b[e : 2 * e])
        v = F.linear(value, w[2 * e :], b[2 * e :])
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        allowed = None  # True = may attend, broadcast to [B, h, Lq, Lk]
        if key_padding_mask is not None:
            allowed = ~key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk]
        if attn_mask is not None:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        out, weights = _attention_core(q, k, v, allowed, self.dropout if self.training else 0.0, self.keep_weights)
        out = out.transpose(1, 2).flatten(2)  # [B, Lq, E]
        return self.out_proj(out), weights


def _attention_core(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, dropout_p: float,
                    keep_weights: bool) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(d) where allowed) v with dropout on the weights: q [B, h, Lq, d], k/v [B, h, Lk, d]
    -> [B, h, Lq, d], and with ``keep_weights`` the head-averaged weights [B, Lq, Lk].

    On the CPU a bf16/fp16 core (autocast) runs in float32: at DETR's head widths (16-32) its bf16 kernels lose
    to fp32 (2-core AVX-512 BF16 machine: fused attention forward + backward 1.7-2.7x slower, batched matmuls
    at a quarter of bf16's matmul throughput), and the softmax wants fp32 anyway. With dropout on the CPU the
    weights are materialized (as ``scaled_dot_product_attention`` does then) and the mask drawn by
    ``detr.model.dropout``; otherwise ``scaled_dot_product_attention`` runs its fused kernel.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out, weights = _attention_core(q.float(), k.float(), v.float(), allowed, dropout_p, keep_weights)
        return out.to(v.dtype), weights
    if not keep_weights and not (dropout_p and q.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p), None
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, h, Lq, Lk]
    if allowed is not None:
        # -inf added rather than filled: the same scores, and the backward passes the gradient through instead of
        # filling it again (the softmax's gradient is already 0 there); in place: the matmul saves its inputs
        scores.add_(torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
            ~allowed, float("-inf")))
    probs = scores.softmax(-1)
    weights = probs.mean(dim=1) if keep_weights else None
    return dropout(probs, dropout_p) @ v, weights


def _feed_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """The position-wise MLP both layer kinds share (kept as linear1/linear2 for checkpoint names)."""
    return layer.linear2(layer.dropout(F.relu(layer.linear1(x))))


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def _residual(x: Tensor, sublayer: Callable[[Tensor], Tensor], norm: nn.Module, dropout: nn.Module,
              pre_norm: bool) -> Tensor:
    """One sublayer with its residual connection: ``x + dropout(sublayer(norm(x)))`` (pre-norm) or
    ``norm(x + dropout(sublayer(x)))`` (post-norm, the paper's). Every layer is a sequence of these,
    whatever its attention."""
    if pre_norm:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


def _memory_attention(c: TransformerConfig, n_levels: int) -> nn.Module:
    """The attention that reads the image tokens: full, or multi-scale deformable over ``n_levels``."""
    if c.deformable:
        return MultiScaleDeformableAttention(hidden_dim=c.hidden_dim, n_heads=c.nheads, n_levels=n_levels,
                                             n_points=c.n_points)
    return MultiheadAttention(c.hidden_dim, c.nheads, c.dropout)


class EncoderLayer(nn.Module):
    """dim_feedforward = 0 leaves out the feed-forward network and its norm (the paper's Table 4)."""

    def __init__(self, c: TransformerConfig, n_levels: int = 1) -> None:
        super().__init__()
        d_model, dim_feedforward, dropout = c.hidden_dim, c.dim_feedforward, c.dropout
        self.has_ffn = dim_feedforward > 0
        # registration order as the reference's: it decides the random initialization
        self.self_attn = _memory_attention(c, n_levels)
        if self.has_ffn:
            self.linear1 = nn.Linear(d_model, dim_feedforward)
            self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        if self.has_ffn:
            self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = c.pre_norm

    def forward(self, src: Tensor, padding_mask: Tensor | None, pos: Tensor | None,
                levels: FeatureLevels | None = None, reference_points: Tensor | None = None) -> Tensor:
        """Deformable attention also takes the levels' geometry and each token's reference points
        [B, S, L, 2]."""
        def attend(x: Tensor) -> Tensor:
            qk = _with_pos(x, pos)
            if isinstance(self.self_attn, MultiScaleDeformableAttention):
                assert levels is not None and reference_points is not None
                return self.self_attn(qk, reference_points, x, levels.sizes, padding_mask)
            return self.self_attn(qk, qk, x, padding_mask)[0]

        src = _residual(src, attend, self.norm1, self.dropout, self.pre_norm)
        if self.has_ffn:
            src = _residual(src, partial(_feed_forward, self), self.norm2, self.dropout, self.pre_norm)
        return src


class DecoderLayer(nn.Module):
    def __init__(self, c: TransformerConfig, n_levels: int = 1) -> None:
        super().__init__()
        d_model, dim_feedforward, dropout = c.hidden_dim, c.dim_feedforward, c.dropout
        self.has_ffn = dim_feedforward > 0
        self.self_attn = MultiheadAttention(d_model, c.nheads, dropout)
        self.multihead_attn = _memory_attention(c, n_levels)
        if self.has_ffn:
            self.linear1 = nn.Linear(d_model, dim_feedforward)
            self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        if self.has_ffn:
            self.norm3 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = c.pre_norm

    def forward(
        self, tgt: Tensor, memory: Tensor, padding_mask: Tensor | None, pos: Tensor | None,
        query_pos: Tensor | None, self_attn_mask: Tensor | None = None,
        levels: FeatureLevels | None = None, reference_points: Tensor | None = None,
    ) -> Tensor:
        """Deformable cross-attention also takes the levels' geometry and each query's reference points
        or boxes [B, Q, L, 2 or 4] (scaled by the valid ratios)."""
        deformable = isinstance(self.multihead_attn, MultiScaleDeformableAttention)
        memory_keys = None if deformable else _with_pos(memory, pos)

        def attend_queries(x: Tensor) -> Tensor:
            qk = _with_pos(x, query_pos)
            return self.self_attn(qk, qk, x, attn_mask=self_attn_mask)[0]

        def attend_memory(x: Tensor) -> Tensor:
            if deformable:
                assert levels is not None and reference_points is not None
                return self.multihead_attn(_with_pos(x, query_pos), reference_points, memory,
                                           levels.sizes, padding_mask)
            return self.multihead_attn(_with_pos(x, query_pos), memory_keys, memory, padding_mask)[0]

        tgt = _residual(tgt, attend_queries, self.norm1, self.dropout, self.pre_norm)
        tgt = _residual(tgt, attend_memory, self.norm2, self.dropout, self.pre_norm)
        if self.has_ffn:
            tgt = _residual(tgt, partial(_feed_forward, self), self.norm3, self.dropout, self.pre_norm)
        return tgt


def _stack(layer: type[EncoderLayer] | type[DecoderLayer], c: TransformerConfig, count: int,
           n_levels: int) -> nn.ModuleList:
    return nn.ModuleList(layer(c, n_levels) for _ in range(count))


class Encoder(nn.Module):
    def __init__(self, config: TransformerConfig, n_levels: int = 1) -> None:
        super().__init__()
        c = config
        self.layers = _stack(EncoderLayer, c, c.enc_layers, n_levels)
        # Post-norm layers end normalized already; pre-norm needs a final norm.
        self.norm = nn.LayerNorm(c.hidden_dim) if c.pre_norm else None

    def forward(self, src: Tensor, padding_mask: Tensor | None, pos: Tensor | None,
                levels: FeatureLevels | None = None) -> Tensor:
        reference_points = levels.encoder_reference_points() if levels is not None else None  # [B, S, L, 2]
        for layer in self.layers:
            src = layer(src, padding_mask, pos, levels, reference_points)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    def __init__(self, config: TransformerConfig, n_levels: int = 1) -> None:
        super().__init__()
        self.layers = _stack(DecoderLayer, config, config.dec_layers, n_levels)
        # DETR: one LayerNorm shared by every layer's output (the aux heads see it). Deformable DETR's
        # post-norm layers end normalized already and have none.
        self.norm = nn.LayerNorm(config.hidden_dim) if not config.deformable or config.pre_norm else None

    def forward(
        self, tgt: Tensor, memory: Tensor, padding_mask: Tensor | None, pos: Tensor | None,
        query_pos: Tensor | None, *, self_attn_mask: Tensor | None = None,
        refiner: BoxRefiner | None = None, reference: Tensor | None = None, levels: FeatureLevels | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Every layer's normalized output [L, B, Q, C], and with a ``refiner`` every layer's boxes
        [L, B, Q, 4] (cxcywh): the refiner may turn the current reference [B, Q, 2 or 4] into each layer's
        positional queries, and makes each layer's box from its output and the reference, which moves on
        to the refined box when the refiner refines. Deformable cross-attention (``levels``) samples
        around the reference."""
        outputs, boxes = [], []
        previous = reference  # the box a layer's delta refines; the reference without look-forward-twice
        for i, layer in enumerate(self.layers):
            if refiner is not None and refiner.positions_from_boxes:
                query_pos = refiner.position(reference)  # [B, Q, C]
            points = None
            if levels is not None:
                assert reference is not None, "deformable cross-attention needs reference points"
                ratios = levels.valid_ratios  # [B, L, 2] (w, h)
                if reference.shape[-1] == 4:
                    ratios = torch.cat([ratios, ratios], -1)
                points = reference[:, :, None] * ratios[:, None]  # [B, Q, L, 2 or 4]
            tgt = layer(tgt, memory, padding_mask, pos, query_pos, self_attn_mask, levels, points)
            outputs.append(tgt if self.norm is None else self.norm(tgt))
            if refiner is not None:
                box = refiner.refine(i, outputs[-1], previous)
                boxes.append(box)
                if refiner.refines:
                    reference = box.detach()  # each layer learns its own delta (Deformable DETR)
                    # DINO: box_l's loss reaches delta_{l-1}
                    previous = box if refiner.look_forward_twice else reference
        return torch.stack(outputs), (torch.stack(boxes) if boxes else None)


class BoxRefiner(Protocol):
    """What the decoder asks of queries that own a reference (``detr.model.queries.AnchorQueries``,
    ``detr.model.deformable_queries.DeformableQueries``)."""

    look_forward_twice: bool
    positions_from_boxes: bool  # each layer's positional queries are ``position(reference)``
    refines: bool  # each layer's box becomes the next layer's reference

    def position(self, reference: Tensor) -> Tensor: ...

    def refine(self, layer: int, decoded: Tensor, reference: Tensor) -> Tensor: ...


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig, n_levels: int = 1) -> None:
        super().__init__()
        self.d_model = config.hidden_dim
        self.nhead = config.nheads
        self.spatial_pos = config.spatial_pos
        self.query_pos = config.query_pos
        self.encoder = Encoder(config, n_levels)
        self.decoder = Decoder(config, n_levels)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():  # Deformable DETR's own initialization of its sampling offsets
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()

    def encode_levels(self, levels: FeatureLevels) -> Tensor:
        """Deformable attention: the flattened levels -> memory [B, S, C]."""
        return self.encoder(levels.tokens, levels.padding_mask, levels.positions, levels)

    def encode(self, src: Tensor, padding_mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor | None]:
        """src/pos [B, C, H, W], padding_mask [B, H, W] -> (memory [B, HW, C], the positions every
        attention adds to its keys [B, HW, C], or None when they entered at the input or not at all)."""
        src = src.flatten(2).transpose(1, 2)  # [B, HW, C]
        pos_seq: Tensor | None = pos.flatten(2).transpose(1, 2)  # [B, HW, C]
        if self.spatial_pos == "input":
            src, pos_seq = src + pos_seq, None
        elif self.spatial_pos == "none":
            pos_seq = None
        return self.encoder(src, padding_mask.flatten(1), pos_seq), pos_seq
