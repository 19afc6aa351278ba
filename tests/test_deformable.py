"""Multi-scale deformable attention: the sampling core against its loop definition and gradcheck, the
module against transformers' Deformable DETR attention, the feature-level bundle against its encoder."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from detr.model.deformable import MultiScaleDeformableAttention, multiscale_deformable_sample
from detr.model.levels import FeatureLevels, valid_ratios

METHODS = ["gather", "grid_sample"]
SHAPES = [(3, 5), (2, 3)]  # two levels of different sizes, (h, w)


def loop_sample(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """The definition, one sampling point at a time: the pixel (x * w - 0.5, y * h - 0.5) of level l, its
    four neighbours weighted by (1 - |dx|)(1 - |dy|), a neighbour outside the map counting as zero."""
    b_size, _, n_heads, d = value.shape
    _, q_size, _, n_levels, n_points, _ = locations.shape
    out = [[[value.new_zeros(d) for _ in range(n_heads)] for _ in range(q_size)] for _ in range(b_size)]
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(n_levels)]
    for b in range(b_size):
        for q in range(q_size):
            for head in range(n_heads):
                for level, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        x = locations[b, q, head, level, p, 0] * w - 0.5  # 0-d tensors: differentiable
                        y = locations[b, q, head, level, p, 1] * h - 0.5
                        for row in (math.floor(y.item()), math.floor(y.item()) + 1):
                            for col in (math.floor(x.item()), math.floor(x.item()) + 1):
                                if 0 <= row < h and 0 <= col < w:
                                    bilinear = (1 - abs(x - col)) * (1 - abs(y - row))
                                    token = starts[level] + row * w + col
                                    out[b][q][head] = out[b][q][head] + (
                                        weights[b, q, head, level, p] * bilinear * value[b, token, head])
    return torch.stack([torch.stack([torch.cat(heads) for heads in row]) for row in out])  # [B, Q, H*D]


def sampling_inputs(dtype: torch.dtype, seed: int = 0, b: int = 2, q: int = 3, heads: int = 2, points: int = 3,
                    d: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, heads, d, generator=g, dtype=dtype)
    locations = torch.rand(b, q, heads, len(SHAPES), points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    # exact borders, pixel centres, the last pixel's centre, and far outside
    special = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5 / 5, 0.5 / 3], [4.5 / 5, 2.5 / 3],
                            [-3.0, 0.4], [0.6, 7.0], [1.0, 0.5], [-0.1, -0.1]], dtype=dtype)
    flat = locations.view(-1, 2)
    flat[: len(special)] = special
    weights = torch.rand(b, q, heads, len(SHAPES), points, generator=g, dtype=dtype)
    return value, torch.tensor(SHAPES), locations, weights


@pytest.mark.parametrize("method", METHODS)
def test_core_is_the_loop_definition(method):
    value, shapes, locations, weights = sampling_inputs(torch.float64)
    expected = loop_sample(value, SHAPES, locations, weights)
    out = multiscale_deformable_sample(value, shapes, locations, weights, method=method)
    assert out.shape == expected.shape == (2, 3, 8)
    assert (out - expected).abs().max() < 1e-12
    assert expected.abs().max() > 0.1 and (expected[0, 0] == 0).sum() < 8  # the inputs really sample values


def test_core_methods_agree_in_float32():
    value, shapes, locations, weights = sampling_inputs(torch.float32, seed=1)
    gather = multiscale_deformable_sample(value, shapes, locations, weights, method="gather")
    grid = multiscale_deformable_sample(value, shapes, locations, weights, method="grid_sample")
    assert (gather - grid).abs().max() < 1e-6


def test_a_point_on_a_pixel_centre_reads_that_pixel_and_one_half_a_pixel_out_reads_half_of_it():
    value = torch.arange(15, dtype=torch.float64).view(1, 15, 1, 1) + 1  # one level 3x5, one head
    locations = torch.tensor([[2.5 / 5, 1.5 / 3], [0.0, 1.5 / 3], [4.5 / 5, 1.0]], dtype=torch.float64)
    weights = torch.ones(1, 3, 1, 1, 1, dtype=torch.float64)
    out = multiscale_deformable_sample(value, torch.tensor([(3, 5)]), locations.view(1, 3, 1, 1, 1, 2), weights)
    # pixel (2, 1) holds 8; x = 0 is half a pixel left of pixel (0, 1) = 6; y = 1 is half below (4, 2) = 15
    assert out.flatten().tolist() == [8.0, 3.0, 7.5]


@pytest.mark.parametrize("method", METHODS)
def test_core_gradcheck(method):
    value, shapes, locations, weights = sampling_inputs(torch.float64, seed=2, b=1, q=2, heads=2, points=2, d=2)
    locations = torch.rand(locations.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    locations = locations * 1.4 - 0.2  # some points partly outside; none on a pixel boundary (a kink)
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multiscale_deformable_sample(v, shapes, loc, w, method=method), inputs)


def test_gradients_reach_value_locations_and_weights():
    value, shapes, locations, weights = sampling_inputs(torch.float64, seed=4)
    # random points only: on a pixel boundary (the special points) the two one-sided derivatives differ
    locations = torch.rand(locations.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.4 - 0.2
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    multiscale_deformable_sample(value, shapes, locations, weights).square().sum().backward()
    expected = torch.autograd.grad(loop_sample(value, SHAPES, locations, weights).square().sum(), inputs)
    for tensor, grad in zip(inputs, expected, strict=True):
        assert (tensor.grad - grad).abs().max() < 1e-10 and grad.abs().max() > 0


# --- the module against transformers ----------------------------------------------------------------


def hf_attention(ours: MultiScaleDeformableAttention):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    config = transformers.DeformableDetrConfig(d_model=ours.hidden_dim, encoder_attention_heads=ours.n_heads,
                                               num_feature_levels=ours.n_levels, encoder_n_points=ours.n_points)
    theirs = hf.DeformableDetrMultiscaleDeformableAttention(config, num_heads=ours.n_heads, n_points=ours.n_points)
    assert set(theirs.state_dict()) == set(ours.state_dict())  # same names: the mapping is the identity
    theirs.load_state_dict(ours.state_dict())
    return theirs.eval()


def hf_forward(module, query, pos, value, reference_points, shapes, padding_mask):
    """Call transformers' attention by the argument names of the installed version (its mask is the
    valid mask: True = keep)."""
    areas = shapes[:, 0] * shapes[:, 1]
    arguments = {
        "hidden_states": query, "position_embeddings": pos, "encoder_hidden_states": value,
        "attention_mask": None if padding_mask is None else ~padding_mask, "reference_points": reference_points,
        "spatial_shapes": shapes, "spatial_shapes_list": [tuple(s) for s in shapes.tolist()],
        "level_start_index": torch.cumsum(areas, 0) - areas,
    }
    accepted = inspect.signature(module.forward).parameters
    missing = {"hidden_states", "encoder_hidden_states", "reference_points", "spatial_shapes"} - set(accepted)
    assert not missing, missing
    return module(**{k: v for k, v in arguments.items() if k in accepted})[0]


def randomized(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


@pytest.mark.parametrize("coordinates", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_module_matches_transformers(coordinates, method):
    torch.manual_seed(0)
    ours = randomized(MultiScaleDeformableAttention(hidden_dim=16, n_heads=4, n_levels=2, n_points=3,
                                                    method=method), seed=5)
    theirs = hf_attention(ours)
    shapes = torch.tensor([(6, 8), (3, 4)])
    b, q, s = 2, 7, 6 * 8 + 3 * 4
    g = torch.Generator().manual_seed(6)
    query, pos = torch.randn(b, q, 16, generator=g), torch.randn(b, q, 16, generator=g)
    value = torch.randn(b, s, 16, generator=g)
    padding_mask = torch.rand(b, s, generator=g) < 0.3
    reference = torch.rand(b, q, 2, coordinates, generator=g)
    if coordinates == 4:
        reference[..., 2:] = reference[..., 2:] * 0.5 + 0.05  # box sizes
    ours_out = ours(query + pos, reference, value, shapes, padding_mask)
    theirs_out = hf_forward(theirs, query, pos, value, reference, shapes, padding_mask)
    assert ours_out.shape == theirs_out.shape == (b, q, 16)
    assert (ours_out - theirs_out).abs().max() < 1e-5
    assert theirs_out.abs().max() > 0.1
    # the sizes as Python ints (what the model passes: nothing read back from a tensor) give the same, bit for bit
    assert torch.equal(ours(query + pos, reference, value, [(6, 8), (3, 4)], padding_mask), ours_out)


def test_module_init_is_deformable_detrs():
    module = MultiScaleDeformableAttention(hidden_dim=16, n_heads=4, n_levels=2, n_points=3)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # head h at angle h * 90deg
    expected = directions.view(4, 1, 1, 2) * torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)  # point p at p + 1
    assert torch.allclose(module.sampling_offsets.bias.view(4, 2, 3, 2), expected.expand(4, 2, 3, 2), atol=1e-6)
    for tensor in (module.sampling_offsets.weight, module.attention_weights.weight, module.attention_weights.bias,
                   module.value_proj.bias, module.output_proj.bias):
        assert torch.count_nonzero(tensor) == 0
    bound = math.sqrt(6 / 32)  # xavier uniform, 16 -> 16
    assert 0.5 * bound < module.value_proj.weight.abs().max() <= bound


def test_padding_does_not_contribute():
    module = randomized(MultiScaleDeformableAttention(hidden_dim=8, n_heads=2, n_levels=2, n_points=2), seed=7)
    shapes = torch.tensor([(4, 4), (2, 2)])
    g = torch.Generator().manual_seed(8)
    query, value = torch.randn(1, 5, 8, generator=g), torch.randn(1, 20, 8, generator=g)
    padding_mask = torch.zeros(1, 20, dtype=torch.bool)
    padding_mask[0, [3, 7, 11, 15, 17, 19]] = True  # the last column of both levels
    reference = torch.rand(1, 5, 2, 2, generator=g)
    out = module(query, reference, value, shapes, padding_mask)
    changed = value.clone()
    changed[padding_mask] = torch.randn(6, 8, generator=g) * 100
    assert torch.equal(module(query, reference, changed, shapes, padding_mask), out)
    assert not torch.allclose(module(query, reference, changed, shapes, None), out)  # the mask is what did it


def test_module_refuses_shapes_that_do_not_add_up():
    module = MultiScaleDeformableAttention(hidden_dim=8, n_heads=2, n_levels=1, n_points=1)
    with pytest.raises(ValueError, match="add up"):
        module(torch.zeros(1, 2, 8), torch.zeros(1, 2, 1, 2), torch.zeros(1, 5, 8), torch.tensor([(2, 3)]))
    with pytest.raises(ValueError, match=r"\[\(2, 3\)\] do not add up to 5"):
        module(torch.zeros(1, 2, 8), torch.zeros(1, 2, 1, 2), torch.zeros(1, 5, 8), [(2, 3)])


# --- the feature-level bundle ------------------------------------------------------------------------


def padded_levels(seed: int = 9) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    maps, masks, positions = [], [], []
    for (h, w), (valid_h, valid_w) in zip([(6, 8), (3, 4)], [((6, 4), (8, 5)), ((3, 2), (4, 3))], strict=True):
        maps.append(torch.randn(2, 4, h, w, generator=g))
        positions.append(torch.randn(2, 4, h, w, generator=g))
        mask = torch.ones(2, h, w, dtype=torch.bool)
        for i in range(2):
            mask[i, : valid_h[i], : valid_w[i]] = False  # image top-left, padding bottom/right
        masks.append(mask)
    return maps, masks, positions


def test_one_level_is_todays_flatten():
    maps, masks, positions = (x[:1] for x in padded_levels())
    levels = FeatureLevels.flatten(maps, masks, positions)
    # Transformer.encode flattens the single map batch-first: src.flatten(2).transpose(1, 2) -> [B, HW, C]
    assert torch.equal(levels.tokens, maps[0].flatten(2).transpose(1, 2))
    assert torch.equal(levels.positions, positions[0].flatten(2).transpose(1, 2))
    assert torch.equal(levels.padding_mask, masks[0].flatten(1))
    assert levels.spatial_shapes.tolist() == [[6, 8]] and levels.level_start_index.tolist() == [0]
    assert torch.equal(levels.valid_ratios, torch.tensor([[[1.0, 1.0]], [[5 / 8, 4 / 6]]]))  # (w, h)


def test_levels_concatenate_in_order_and_split_back():
    maps, masks, positions = padded_levels()
    embed = torch.randn(2, 4)
    levels = FeatureLevels.flatten(maps, masks, positions, level_embed=embed)
    assert levels.n_levels == 2 and levels.sizes == ((6, 8), (3, 4))
    assert levels.spatial_shapes.tolist() == [[6, 8], [3, 4]] and levels.level_start_index.tolist() == [0, 48]
    assert torch.equal(levels.tokens[:, 48 + 4 * 1 + 2], maps[1][:, :, 1, 2])  # level 1, row 1, column 2
    assert torch.equal(levels.positions[:, 48 + 4 * 1 + 2], positions[1][:, :, 1, 2] + embed[1])
    assert torch.equal(levels.padding_mask[:, 48 + 4 * 1 + 2], masks[1][:, 1, 2])
    assert all(torch.equal(a, b) for a, b in zip(levels.split(levels.tokens), maps, strict=True))


def test_valid_ratios_and_reference_points_match_transformers():
    pytest.importorskip("transformers")
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    maps, masks, positions = padded_levels()
    levels = FeatureLevels.flatten(maps, masks, positions)
    # transformers' get_valid_ratio is a model method that reads only its mask (True = valid)
    expected_ratios = torch.stack([hf.DeformableDetrModel.get_valid_ratio(None, ~m) for m in masks], 1)
    assert torch.equal(levels.valid_ratios, expected_ratios)
    assert torch.equal(valid_ratios(masks[1]), expected_ratios[:, 1])
    expected = hf.DeformableDetrEncoder.get_reference_points(list(levels.sizes), expected_ratios, "cpu")
    points = levels.encoder_reference_points()
    assert points.shape == expected.shape == (2, 60, 2, 2)
    assert (points - expected).abs().max() < 1e-6
    # the second image's first token: the centre of its valid 4x5 region's first cell, placed in level 1's
    # valid 2x3 region (the 3x4 map's fraction 3/4 x 2/3)
    assert torch.allclose(points[1, 0, 1], torch.tensor([0.5 / 5 * 3 / 4, 0.5 / 4 * 2 / 3]), atol=1e-7)


def test_training_backward_is_the_gathers_own_gradient_in_float32():
    # the gather core's backward goes through grid_sample's kernel (no index sort); it must be the gradient
    # autograd takes through the embedding_bag formulation itself
    from detr.model.deformable import _sample_by_gather

    value, shapes, locations, weights = sampling_inputs(torch.float32, seed=6, b=2, q=30, heads=4, points=3, d=8)
    locations = torch.rand(locations.shape, generator=torch.Generator().manual_seed(7)) * 1.4 - 0.2
    grad_out = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(8))
    grads = []
    for core in (lambda *a: multiscale_deformable_sample(*a), _sample_by_gather):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = core(inputs[0], shapes, inputs[1], inputs[2])
        grads.append(torch.autograd.grad(out, inputs, grad_out))
    for ours, plain in zip(*grads, strict=True):
        assert (ours - plain).abs().max() < 1e-5 * max(1.0, plain.abs().max())
