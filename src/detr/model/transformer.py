"""DETR's encoder-decoder transformer.

Batch-first internally ([B, S, C]); parameter names and shapes follow the released checkpoints
(packed ``in_proj_weight``, ``multihead_attn`` for cross-attention, ``norm1..3``). Positional
encodings are added to queries and keys (never values) in every attention of every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TransformerConfig


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
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """query [B, Lq, E], key/value [B, Lk, E], key_padding_mask [B, Lk] (True = ignore)."""
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: one matmul for q and k
            q, k = F.linear(query, w[: 2 * e], b[: 2 * e]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:e], b[:e])
            k = F.linear(key, w[e : 2 * e], b[e : 2 * e])
        v = F.linear(value, w[2 * e :], b[2 * e :])
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk], True = may attend
        dropout = self.dropout if self.training else 0.0
        weights = None
        if self.keep_weights:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, h, Lq, Lk]
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            probs = scores.softmax(-1)
            weights = probs.mean(dim=1)
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = out.transpose(1, 2).flatten(2)  # [B, Lq, E]
        return self.out_proj(out), weights


def _feed_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """The position-wise MLP both layer kinds share (kept as linear1/linear2 for checkpoint names)."""
    return layer.linear2(layer.dropout(F.relu(layer.linear1(x))))


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    _ffn = _feed_forward

    def forward(self, src: Tensor, padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            qk = _with_pos(x, pos)
            src = src + self.dropout(self.self_attn(qk, qk, x, padding_mask)[0])
            return src + self.dropout(self._ffn(self.norm2(src)))
        qk = _with_pos(src, pos)
        src = self.norm1(src + self.dropout(self.self_attn(qk, qk, src, padding_mask)[0]))
        return self.norm2(src + self.dropout(self._ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    _ffn = _feed_forward

    def forward(
        self, tgt: Tensor, memory: Tensor, padding_mask: Tensor | None, pos: Tensor | None, query_pos: Tensor
    ) -> Tensor:
        memory_keys = _with_pos(memory, pos)
        if self.pre_norm:
            x = self.norm1(tgt)
            qk = x + query_pos
            tgt = tgt + self.dropout(self.self_attn(qk, qk, x)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout(self.multihead_attn(x + query_pos, memory_keys, memory, padding_mask)[0])
            return tgt + self.dropout(self._ffn(self.norm3(tgt)))
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(qk, qk, tgt)[0]))
        cross = self.multihead_attn(tgt + query_pos, memory_keys, memory, padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout(cross))
        return self.norm3(tgt + self.dropout(self._ffn(tgt)))


class Encoder(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        self.layers = nn.ModuleList(
            EncoderLayer(c.hidden_dim, c.nheads, c.dim_feedforward, c.dropout, c.pre_norm)
            for _ in range(c.enc_layers)
        )
        # Post-norm layers end normalized already; pre-norm needs a final norm.
        self.norm = nn.LayerNorm(c.hidden_dim) if c.pre_norm else None

    def forward(self, src: Tensor, padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        self.layers = nn.ModuleList(
            DecoderLayer(c.hidden_dim, c.nheads, c.dim_feedforward, c.dropout, c.pre_norm)
            for _ in range(c.dec_layers)
        )
        self.norm = nn.LayerNorm(c.hidden_dim)  # shared by every layer's output (the aux heads see it)

    def forward(
        self, tgt: Tensor, memory: Tensor, padding_mask: Tensor | None, pos: Tensor | None, query_pos: Tensor
    ) -> Tensor:
        """Returns every layer's normalized output: [L, B, Q, C]."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, padding_mask, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.d_model = config.hidden_dim
        self.nhead = config.nheads
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: Tensor, padding_mask: Tensor, query_embed: Tensor, pos: Tensor
    ) -> tuple[Tensor, Tensor]:
        """src/pos [B, C, H, W], padding_mask [B, H, W], query_embed [Q, C].

        Returns (decoded [L, B, Q, C], memory [B, C, H, W]).
        """
        b, c, h, w = src.shape
        src = src.flatten(2).transpose(1, 2)  # [B, HW, C]
        pos = pos.flatten(2).transpose(1, 2)  # [B, HW, C]
        mask = padding_mask.flatten(1)  # [B, HW]
        query_pos = query_embed[None].expand(b, -1, -1)  # [B, Q, C]
        memory = self.encoder(src, mask, pos)
        tgt = torch.zeros_like(query_pos)  # the decoder starts from zeros; queries enter as positions
        decoded = self.decoder(tgt, memory, mask, pos, query_pos)
        return decoded, memory.transpose(1, 2).reshape(b, c, h, w)
