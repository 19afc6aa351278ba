"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, eq. 3).

Each query attends, per head and per feature level, to ``n_points`` locations at learned offsets from
its reference point; the sampled values (bilinear, zero outside the map) are summed with weights that a
linear layer predicts and a softmax normalizes over levels x points:

    out(q) = W_o sum_h [ sum_l sum_p A_hlqp * V_h^l(phi_l(p_q) + dp_hlqp) ]

The sampling core is a pure function (``multiscale_deformable_sample``); the module only predicts the
offsets and weights around it. Parameter names follow Deformable DETR's ``MSDeformAttn`` (and therefore
transformers' ``DeformableDetrMultiscaleDeformableAttention``): ``sampling_offsets``,
``attention_weights``, ``value_proj``, ``output_proj``.

Pixel convention (that of Deformable DETR's CUDA kernel and of ``grid_sample(align_corners=False)``): a
normalized location (x, y) in [0, 1] is the pixel (x * W - 0.5, y * H - 0.5); pixel centres sit at
integers and a corner outside the map contributes zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable


def _pixels(locations: Tensor, size: Tensor) -> Tensor:
    """Normalized locations -> pixel coordinates, location * size - 0.5 (pixel centres at integers).

    In float32 it is computed as ``grid_sample``'s CPU kernel does, fma((2 * loc - 1) + 1, size / 2, -0.5)
    (one rounding, emulated in float64), so that coordinates match it and transformers bit for bit instead
    of within one float32 ulp (7.6e-6 px at x ~ 100, ~1e-5 in the output)."""
    if locations.dtype != torch.float32:
        return locations * size - 0.5
    return ((locations * 2 - 1 + 1).double() * (size / 2) - 0.5).float()


LevelShapes = Tensor | Sequence[tuple[int, int]]  # [L, 2] integer (h, w), or the same as Python ints


def level_sizes(spatial_shapes: LevelShapes) -> list[tuple[int, int]]:
    """The levels' (h, w) as Python ints. A tensor is read here (a device sync on a GPU, a graph break under
    ``torch.compile``), so the model hands the sizes in as ints (``FeatureLevels.sizes``)."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def _sample_by_gather(value: Tensor, spatial_shapes: LevelShapes, sampling_locations: Tensor,
                      attention_weights: Tensor) -> Tensor:
    """The core as one weighted gather: every (batch, query, head) is a bag of 4*L*P value rows (the four
    bilinear corners of each sampling point), weighted by bilinear weight x attention weight and summed by
    ``F.embedding_bag`` without materializing the gathered rows. Value rows [D] are contiguous in
    [B, S, H, D], so neither the values nor the output are permuted.

    Each level gets a one-pixel border of zeros and coordinates are clamped to [-1, size]: a corner
    outside the map then reads a zero row, so no validity masks are computed (most of the cost of the
    core is elementwise work on [B, Q, H, L, P]-sized tensors, not the gather)."""
    b, s, n_heads, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    dtype, device = sampling_locations.dtype, sampling_locations.device
    sizes = level_sizes(spatial_shapes)
    padded = [F.pad(v.view(b, h, w, n_heads * d), (0, 0, 1, 1, 1, 1))  # [B, h+2, w+2, H*D]
              for v, (h, w) in zip(value.split([h * w for h, w in sizes], 1), sizes, strict=True)]
    table = torch.cat([v.flatten(1, 2) for v in padded], 1).view(-1, d)  # [B * S' * H, D], S' padded tokens
    s_padded = table.shape[0] // (b * n_heads)
    index = torch.int32 if table.shape[0] < 2**31 else torch.int64  # int32: half the index traffic
    # per-(level, point) constants [L, P], contiguous: broadcast against [..., L, P] they keep a 16-long
    # contiguous inner loop (a trailing broadcast dim of size 2 makes elementwise ops several times slower)
    height = torch.tensor([h for h, _ in sizes], dtype=dtype, device=device)[:, None].repeat(1, n_points)
    width = torch.tensor([w for _, w in sizes], dtype=dtype, device=device)[:, None].repeat(1, n_points)
    row_len = [w + 2 for _, w in sizes]  # padded row length
    starts = torch.tensor([0] + [(h + 2) * (w + 2) for h, w in sizes][:-1], device=device).cumsum(0)
    # index of the padded pixel (0, 0) of each level, and of the four corners relative to the top-left one
    origin = ((starts + torch.tensor(row_len, device=device) + 1) * n_heads)[:, None].repeat(1, n_points)
    step = torch.tensor([[[0, n_heads], [r * n_heads, (r + 1) * n_heads]] for r in row_len], device=device)
    step = step.to(index).permute(1, 2, 0)[..., None].expand(2, 2, n_levels, n_points).contiguous()  # [2, 2, L, P]
    x = _pixels(sampling_locations[..., 0], width).clamp(min=-1).minimum(width)  # [B, Q, H, L, P]
    y = _pixels(sampling_locations[..., 1], height).clamp(min=-1).minimum(height)
    # floor, kept below the last pixel border so that the next corner stays inside the padded map
    x0, y0 = x.floor().minimum(width - 1), y.floor().minimum(height - 1)
    fx, fy = (x - x0)[:, :, :, None, None], (y - y0)[:, :, :, None, None]  # [B, Q, H, 1, 1, L, P]
    first, sign = x.new_tensor([1.0, 0.0]), x.new_tensor([-1.0, 1.0])  # (1 - f, f): lower, upper neighbour
    wx = torch.addcmul(first.view(2, 1, 1), sign.view(2, 1, 1), fx)  # [B, Q, H, 1, 2, L, P]
    wy = torch.addcmul(first.view(2, 1, 1, 1), sign.view(2, 1, 1, 1), fy)  # [B, Q, H, 2, 1, L, P]
    coef = wy * (wx * attention_weights[:, :, :, None, None])  # [B, Q, H, 2, 2, L, P]
    offset = (torch.arange(b, device=device) * (s_padded * n_heads)).view(b, 1, 1, 1, 1)
    offset = (offset + torch.arange(n_heads, device=device).view(n_heads, 1, 1) + origin).to(index)  # [B,1,H,L,P]
    top_left = (y0.to(index) * torch.tensor(row_len, dtype=index, device=device)[:, None] + x0.to(index))
    top_left = top_left * n_heads + offset  # [B, Q, H, L, P] rows of the table
    corners = top_left[:, :, :, None, None] + step  # [B, Q, H, 2, 2, L, P]
    out = F.embedding_bag(corners.view(b * q * n_heads, -1), table,
                          per_sample_weights=coef.view(b * q * n_heads, -1), mode="sum")  # [B*Q*H, D]
    return out.view(b, q, n_heads * d)


def _grid_layout(sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor]:
    """``grid_sample``'s layout: heads folded into the batch, points before queries ->
    (grids [B*H, L, P, Q, 2] in [-1, 1], weights [B*H, L, P, Q])."""
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).flatten(0, 1)
    return grids, attention_weights.permute(0, 2, 3, 4, 1).flatten(0, 1)


def _sample_by_grid(value: Tensor, spatial_shapes: LevelShapes, sampling_locations: Tensor,
                    attention_weights: Tensor) -> Tensor:
    """The core with ``F.grid_sample`` per level, heads folded into the batch (the formulation ONNX can
    export: GridSample exists from opset 16). Points come before queries in the grid so the weighted sum
    over points runs over contiguous [Q] rows."""
    b, s, n_heads, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = level_sizes(spatial_shapes)
    grids, weights = _grid_layout(sampling_locations, attention_weights)  # [B*H, L, P, Q, 2], [B*H, L, P, Q]
    out = value.new_zeros(b * n_heads, d, q)
    for level, values in enumerate(value.split([h * w for h, w in sizes], 1)):
        h, w = sizes[level]
        values = values.permute(0, 2, 3, 1).reshape(b * n_heads, d, h, w)  # [B*H, D, h, w]
        sampled = F.grid_sample(values, grids[:, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # [B*H, D, P, Q]
        for point in range(n_points):  # one pass per point over contiguous [Q] rows, no [B*H, D, P, Q] product
            out = torch.addcmul(out, sampled[:, :, point], weights[:, level, None, point])  # [B*H, D, Q]
    return out.view(b, n_heads * d, q).transpose(1, 2).contiguous()  # [B, Q, H*D], head-major channels


class _GatherSample(torch.autograd.Function):
    """The gather core forward, ``grid_sample``'s backward kernel backward.

    The gradient of a weighted gather is a scatter-add into the value rows; ``embedding_bag``'s own
    backward sorts every index for it (on CPU 80x its forward: 3.3 s of a 4.6 s forward + backward of
    one 8-image, 5376-token encoder layer). The same function's gradient through ``grid_sampler_2d_backward``,
    which adds into the maps point by point without sorting, takes a fifth of that; the attention
    weights' gradient is the dot product of the output gradient with each point's bilinear sample."""

    @staticmethod
    def forward(ctx: FunctionCtx, value: Tensor, spatial_shapes: LevelShapes, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.sizes = level_sizes(spatial_shapes)
        return _sample_by_gather(value, ctx.sizes, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        value, locations, weights = ctx.saved_tensors
        need_value, _, need_locations, need_weights = ctx.needs_input_grad
        b, s, n_heads, d = value.shape
        _, q, _, n_levels, n_points, _ = locations.shape
        dtype = torch.promote_types(value.dtype, locations.dtype)
        # the layout of _sample_by_grid: heads folded into the batch, points before queries
        g = grad_out.to(dtype).view(b, q, n_heads, d).permute(0, 2, 3, 1).reshape(b * n_heads, d, 1, q)  # [BH,D,1,Q]
        grids, w = _grid_layout(locations.to(dtype), weights.to(dtype))  # [B*H, L, P, Q, 2], [B*H, L, P, Q]
        grad_values, grad_grids, grad_weights = [], [], []
        for level, values in enumerate(value.to(dtype).split([h * w_ for h, w_ in ctx.sizes], 1)):
            h, w_ = ctx.sizes[level]
            values = values.permute(0, 2, 3, 1).reshape(b * n_heads, d, h, w_)  # [B*H, D, h, w]
            if need_weights:
                sampled = F.grid_sample(values, grids[:, level], mode="bilinear", padding_mode="zeros",
                                        align_corners=False)  # [B*H, D, P, Q]
                grad_weights.append(torch.einsum("ndpq,ndq->npq", sampled, g[:, :, 0]))  # [B*H, P, Q]
            if need_value or need_locations:
                point_grad = g * w[:, level, None]  # [B*H, D, P, Q]: each point's share of the output gradient
                # interpolation 0 = bilinear, padding 0 = zeros, align_corners False
                grad_map, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
                    point_grad, values, grids[:, level], 0, 0, False, [need_value, need_locations])
                if need_value:
                    grad_values.append(grad_map.view(b, n_heads, d, h * w_).permute(0, 3, 1, 2))  # [B, hw, H, D]
                if need_locations:
                    grad_grids.append(grad_grid)  # [B*H, P, Q, 2]
        grad_value = torch.cat(grad_values, 1).to(value.dtype) if need_value else None
        grad_locations = grad_weights_out = None
        if need_locations:  # d grid / d location = 2
            stacked = torch.stack(grad_grids, 1).view(b, n_heads, n_levels, n_points, q, 2)
            grad_locations = (2 * stacked).permute(0, 4, 1, 2, 3, 5).to(locations.dtype)  # [B, Q, H, L, P, 2]
        if need_weights:
            stacked = torch.stack(grad_weights, 1).view(b, n_heads, n_levels, n_points, q)
            grad_weights_out = stacked.permute(0, 4, 1, 2, 3).to(weights.dtype)  # [B, Q, H, L, P]
        return grad_value, None, grad_locations, grad_weights_out


def multiscale_deformable_sample(value: Tensor, spatial_shapes: LevelShapes, sampling_locations: Tensor,
                                 attention_weights: Tensor, *,
                                 method: Literal["gather", "grid_sample"] = "gather") -> Tensor:
    """Multi-scale deformable sampling: per head, the attention-weighted sum of bilinear samples.

    value [B, S, H, D] (S = sum of h_l * w_l, the levels flattened one after the other, row-major);
    spatial_shapes [L, 2] integer (h, w) per level, a tensor or Python ints (ints: nothing is read back from a
    tensor); sampling_locations [B, Q, H, L, P, 2] normalized (x, y), 0 and 1 the maps' outer edges (anything
    outside samples zeros); attention_weights [B, Q, H, L, P]. Returns [B, Q, H * D] (head-major channels).

    ``method="gather"`` (default) is a weighted ``embedding_bag`` over the bilinear corners, ~6x faster
    on CPU than per-level ``grid_sample``; ``method="grid_sample"`` is the same function through
    ``F.grid_sample`` (for ONNX export). Both are differentiable in all three float inputs.
    """
    if method == "gather":
        if torch.is_grad_enabled() and (value.requires_grad or sampling_locations.requires_grad
                                        or attention_weights.requires_grad):
            return _GatherSample.apply(value, spatial_shapes, sampling_locations, attention_weights)
        return _sample_by_gather(value, spatial_shapes, sampling_locations, attention_weights)
    if method == "grid_sample":
        return _sample_by_grid(value, spatial_shapes, sampling_locations, attention_weights)
    raise ValueError(f"method must be 'gather' or 'grid_sample', got {method!r}")


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's multi-scale deformable attention (``MSDeformAttn``).

    Reference points are 2-d (cx, cy) — offsets are in pixels of each level, divided by (w_l, h_l) —
    or 4-d boxes (cx, cy, w, h) — offsets are divided by ``n_points`` and scaled by half the box size, as
    with box refinement. Values at padding positions are zeroed before sampling.
    """

    def __init__(self, *, hidden_dim: int, n_heads: int, n_levels: int, n_points: int,
                 method: Literal["gather", "grid_sample"] = "gather") -> None:
        super().__init__()
        if hidden_dim % n_heads:
            raise ValueError(f"hidden_dim {hidden_dim} not divisible by n_heads {n_heads}")
        self.hidden_dim, self.n_heads, self.n_levels, self.n_points = hidden_dim, n_heads, n_levels, n_points
        self.method = method
        self.sampling_offsets = nn.Linear(hidden_dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(hidden_dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(hidden_dim, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialization: head h's points start on the ray at angle 2*pi*h/H (scaled so
        the larger coordinate is 1), point p at distance p + 1; uniform weights; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)  # [H, 2]
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())  # [H, L, P, 2] flattened
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def sampling(self, query: Tensor, reference_points: Tensor,
                 spatial_shapes: LevelShapes) -> tuple[Tensor, Tensor]:
        """Where each query looks and with what weight: query [B, Q, C] (positions added),
        reference_points [B, Q, L, 2 or 4] normalized, spatial_shapes [L, 2] (h, w) ->
        (sampling_locations [B, Q, H, L, P, 2] (x, y) normalized, attention_weights [B, Q, H, L, P])."""
        b, q, _ = query.shape
        h, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(b, q, h, n_levels, n_points, 2)
        weights = self.attention_weights(query).view(b, q, h, n_levels * n_points)
        weights = weights.softmax(-1).view(b, q, h, n_levels, n_points)  # softmax over levels x points
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by the level's (w, h)
            size = torch.tensor([(w, h) for h, w in level_sizes(spatial_shapes)], dtype=offsets.dtype,
                                device=offsets.device)  # [L, 2] (w, h)
            locations = reference_points[:, :, None, :, None, :] + offsets / size[:, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets relative to the box: n_points points span half its width/height
            centre, wh = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / n_points * wh * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        return locations, weights

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: LevelShapes,
                padding_mask: Tensor | None = None) -> Tensor:
        """query [B, Q, C] (positions already added); reference_points [B, Q, L, 2] (cx, cy) or
        [B, Q, L, 4] (cx, cy, w, h), normalized per level (already scaled by the valid ratios);
        value [B, S, C] (the flattened levels, without positions); spatial_shapes [L, 2] (h, w), a tensor or
        Python ints (``FeatureLevels.sizes``: nothing read back from a tensor);
        padding_mask [B, S] (True = padding) or None. Returns [B, Q, C]."""
        b, s, c = value.shape
        sizes = level_sizes(spatial_shapes)
        if sum(h * w for h, w in sizes) != s:
            raise ValueError(f"spatial_shapes {sizes} do not add up to {s} value tokens")
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)  # padding contributes nothing
        value = value.view(b, s, self.n_heads, c // self.n_heads)  # [B, S, H, D]
        locations, weights = self.sampling(query, reference_points, sizes)
        out = multiscale_deformable_sample(value, sizes, locations, weights, method=self.method)
        return self.output_proj(out)
