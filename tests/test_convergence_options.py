"""The convergence options of DetrConfig.queries / transformer / backbone: each trains, saves, loads,
exports, and its defining property holds (a broken piece fails here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import detr
from detr.checkpoint import load_checkpoint, save_checkpoint
from detr.checkpoint.reference import to_reference_args
from detr.config import BackboneConfig, DetrConfig, QueryConfig, TransformerConfig, preset
from detr.data.shapes import ShapesParams, ShapesStream
from detr.export import export_onnx
from detr.loss import SetCriterion
from detr.model import denoising as denoising_module
from detr.model.queries import inverse_sigmoid

SIZE = 64


def tiny(queries: QueryConfig | None = None, **transformer) -> DetrConfig:
    return DetrConfig(
        num_classes=4, num_queries=6,
        backbone=BackboneConfig(name="small", norm="group_norm", frozen_stages=0, widths=(16, 32, 64),
                                depths=(0, 1, 1)),
        transformer=TransformerConfig(**{"hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 2,
                                         "dim_feedforward": 64, "dropout": 0.0, **transformer}),
        queries=queries or QueryConfig(),
    )


OPTIONS = {
    "anchors": tiny(QueryConfig(anchors=True, anchor_size=0.3)),
    "two_stage": tiny(QueryConfig(anchors=True, two_stage=True, anchor_size=0.3)),
    "two_stage_ce": dataclasses.replace(tiny(QueryConfig(anchors=True, two_stage=True)), loss=detr.config.LossConfig(
        proposal_loss="ce")),
    "encoder_content": tiny(QueryConfig(anchors=True, two_stage=True, encoder_content=True, anchor_size=0.3)),
    "look_forward_twice": tiny(QueryConfig(anchors=True, look_forward_twice=True, anchor_size=0.3)),
    "denoising": tiny(QueryConfig(anchors=True, denoising_groups=3)),
    "groups": tiny(QueryConfig(groups=3)),
    "everything": tiny(QueryConfig(anchors=True, two_stage=True, denoising_groups=2, groups=2)),
    "spatial_pos_input": tiny(spatial_pos="input"),
    "spatial_pos_none": tiny(spatial_pos="none"),
    "query_pos_input": tiny(query_pos="input"),
    "no_ffn": tiny(dim_feedforward=0),
    # multi-scale deformable attention: three levels (the small backbone's stride-4 and -8 stages + a stride-16 conv)
    "deformable": tiny(attention="deformable").replace(num_feature_levels=3),
    "deformable_refine": tiny(QueryConfig(box_refine=True), attention="deformable").replace(num_feature_levels=3),
    "deformable_two_stage": dataclasses.replace(
        tiny(QueryConfig(box_refine=True, two_stage=True), attention="deformable").replace(num_feature_levels=3),
        loss=detr.config.LossConfig(class_loss="focal")),
    "deformable_anchors": tiny(QueryConfig(anchors=True, two_stage=True, denoising_groups=2, groups=2, anchor_size=0.3),
                               attention="deformable").replace(num_feature_levels=3),
}
# options that change the inference graph (the rest exist only in training)
INFERENCE_OPTIONS = ["anchors", "two_stage", "encoder_content", "spatial_pos_input", "spatial_pos_none",
                     "query_pos_input", "no_ffn", "deformable", "deformable_refine", "deformable_two_stage",
                     "deformable_anchors"]


@pytest.fixture(scope="module")
def batch():
    """Four real rendered shapes images with their targets."""
    stream = ShapesStream(ShapesParams(num_train=0, num_val=0, image_size=SIZE, seed=5, min_objects=1, max_objects=3,
                                       min_object_size=0.2, max_object_size=0.5))
    return stream.batch(0, 4)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_trains_every_parameter(name, batch):
    config = OPTIONS[name]
    torch.manual_seed(0)
    model = detr.build_detr(config).train()
    criterion = SetCriterion.from_config(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # Two steps: the zero-initialized last layers of the box heads pass no gradient back in the first one.
    for _ in range(2):
        optimizer.zero_grad()
        result = criterion(model(batch.images, batch.targets), batch.targets)
        assert torch.isfinite(result.total)
        result.total.backward()
        optimizer.step()
    q = config.queries
    expected = {"loss_ce_enc": q.two_stage, "loss_bbox_dn": q.denoising_groups > 0, "loss_giou_g1_0": q.groups > 1}
    for term, present in expected.items():
        assert (term in result.terms) == present, term
    # Every weight is in the graph, and the option's own modules learn. (Not every weight moves yet: where the
    # decoder's content starts from zeros, its first self-attention sees identical values.)
    own = ("anchor_queries.", "proposals.", "label_embedding.", "query_embed.", "class_embed.", "bbox_embed.",
           "deformable_queries.", "input_proj.", "level_embed")
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), f"{pname} gets no gradient"
        if pname.startswith(own):
            assert param.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_round_trips_through_our_checkpoint(name, batch, tmp_path):
    torch.manual_seed(1)
    model = detr.build_detr(OPTIONS[name]).eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert loaded.config == model.config
    with torch.no_grad():
        a, b = model(batch.images), loaded(batch.images)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    with pytest.raises(ValueError, match="no flags for this configuration"):
        to_reference_args(model.config)


@pytest.mark.parametrize("name", INFERENCE_OPTIONS)
def test_inference_option_exports_to_onnx(name, tmp_path):
    """The export verifies itself: onnxruntime at another image size and batch against PyTorch."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(2)
    model = detr.build_detr(OPTIONS[name]).eval()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=(64, 96), verify=True)
    assert path.is_file()


def test_training_only_options_leave_inference_unchanged(batch):
    """Group DETR and denoising add queries in training only: in eval mode the model is the plain one."""
    torch.manual_seed(3)
    full = detr.build_detr(OPTIONS["everything"]).eval()
    with torch.no_grad():
        out = full(batch.images, batch.targets)
    assert out["pred_logits"].shape[1] == 6 and "dn_outputs" not in out and "group_outputs" not in out


def _main_outputs(model, batch, targets):
    with torch.no_grad():
        out = model(batch.images, targets)
    return out["pred_logits"], out["pred_boxes"]


def _perturbed(targets):
    """The same images with other ground truth: other labels, other boxes."""
    changed = []
    for t in targets:
        t = dict(t)
        t["labels"] = (t["labels"] % 3) + 1
        t["boxes"] = (t["boxes"] * 0.5 + 0.2).clamp(0.05, 0.95)
        changed.append(t)
    return changed


def test_denoising_mask_keeps_the_ground_truth_from_the_matching_queries(batch, monkeypatch):
    torch.manual_seed(4)
    model = detr.build_detr(OPTIONS["denoising"]).train()
    torch.manual_seed(0)
    logits, boxes = _main_outputs(model, batch, batch.targets)
    torch.manual_seed(0)
    logits2, boxes2 = _main_outputs(model, batch, _perturbed(batch.targets))
    assert torch.equal(logits, logits2) and torch.equal(boxes, boxes2)  # the answer did not leak
    # ... and the check has teeth: without the mask, the matching queries see the noised ground truth
    monkeypatch.setattr("detr.model.detr.group_attention_mask", lambda sizes, dn, device: None)
    torch.manual_seed(0)
    leaky = _main_outputs(model, batch, batch.targets)
    torch.manual_seed(0)
    leaky2 = _main_outputs(model, batch, _perturbed(batch.targets))
    assert not torch.allclose(leaky[0], leaky2[0])


def test_query_groups_are_blind_to_each_other(batch, monkeypatch):
    """With G groups in training, the first group's outputs are exactly what the model gives at inference."""
    torch.manual_seed(5)
    model = detr.build_detr(OPTIONS["groups"])
    eval_logits, _ = _main_outputs(model.eval(), batch, None)
    train_logits, _ = _main_outputs(model.train(), batch, batch.targets)
    torch.testing.assert_close(train_logits, eval_logits, rtol=0, atol=1e-5)
    monkeypatch.setattr("detr.model.detr.group_attention_mask", lambda sizes, dn, device: None)
    leaky, _ = _main_outputs(model.train(), batch, batch.targets)
    assert (leaky - eval_logits).abs().max() > 1e-3


def test_group_attention_mask_layout():
    mask = denoising_module.group_attention_mask([2, 2, 3, 3], dn_groups=2, device=torch.device("cpu"))
    allowed = mask.int().tolist()
    assert allowed[0] == [1, 1, 0, 0, 1, 1, 1, 0, 0, 0]  # a denoising query: its group and the first matching group
    assert allowed[4] == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]  # a matching query: its own group only
    assert allowed[9] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_noised_queries_move_the_truth_by_the_configured_noise():
    """Many objects, so the noise's bounds and rates show: every box moves, within box_noise of its size, and
    about label_noise of the labels are redrawn (a redraw keeps the label 1 time in K)."""
    k, groups = 4, 4
    label_noise, box_noise = QueryConfig().label_noise, QueryConfig().box_noise  # the defaults, 0.5 and 0.4
    generator = torch.Generator().manual_seed(0)
    targets = []
    for count in (25, 13, 0, 20):  # different counts: padding slots, and an empty image
        wh = 0.05 + 0.3 * torch.rand(count, 2, generator=generator)
        centre = wh / 2 + (1 - wh) * torch.rand(count, 2, generator=generator)
        targets.append({"labels": torch.randint(k, (count,), generator=generator),
                        "boxes": torch.cat([centre, wh], dim=1)})
    # one-hot embeddings: the content of a query is its (noisy) label, readable back
    embedding = torch.nn.Embedding(k + 1, k + 1)
    with torch.no_grad():
        embedding.weight.copy_(torch.eye(k + 1))
    torch.manual_seed(3)
    q = denoising_module.noised_queries(targets, groups=groups, num_classes=k, label_noise=label_noise,
                                        box_noise=box_noise, label_embedding=embedding)
    most = 25
    assert q.reference.shape == (4, groups * most, 4) and q.groups == groups
    truth_boxes, truth_labels, noisy_labels = [], [], []
    for i, t in enumerate(targets):
        for g in range(groups):
            slot = slice(g * most, g * most + len(t["labels"]))
            # the truth to reconstruct is the ground truth, exactly; the reference is its noised copy
            assert torch.equal(q.boxes[i, slot], t["boxes"]) and torch.equal(q.labels[i, slot], t["labels"])
            assert q.valid[i, slot].all() and not q.valid[i, g * most + len(t["labels"]):(g + 1) * most].any()
            truth_boxes.append(t["boxes"])
            truth_labels.append(t["labels"])
            noisy_labels.append(q.content[i, slot].argmax(-1))
    truth = torch.cat(truth_boxes)  # [M, 4], M = groups * 58
    noised = q.reference[q.valid]
    assert torch.equal(q.labels[~q.valid], torch.full_like(q.labels[~q.valid], k))
    # centres move by at most box_noise * half the size, sizes by at most box_noise * the size
    bound = box_noise * torch.cat([truth[:, 2:] / 2, truth[:, 2:]], dim=1)
    ratio = (noised - truth) / bound  # uniform in [-1, 1] per coordinate
    assert ratio.abs().max() <= 1 + 1e-5
    assert (noised - truth).abs().amax(dim=1).min() > 1e-4  # every box actually moved
    assert ratio.abs().max() > 0.95 and ratio.abs().mean() == pytest.approx(0.5, abs=0.05)  # the full range
    assert ratio.mean().abs() < 0.05  # unbiased
    # the groups are noised independently
    assert not torch.allclose(q.reference[:, :most], q.reference[:, most:2 * most])
    labels, noisy = torch.cat(truth_labels), torch.cat(noisy_labels)
    assert noisy.max() < k  # never the no-object class
    changed = (noisy != labels).float().mean().item()
    assert changed == pytest.approx(label_noise * (k - 1) / k, abs=0.05)


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of paired cxcywh boxes [M, 4], written out."""
    def corners(x):
        return x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2, x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2

    ax0, ay0, ax1, ay1 = corners(a)
    bx0, by0, bx1, by1 = corners(b)
    inter_w = (torch.min(ax1, bx1) - torch.max(ax0, bx0)).clamp(min=0)
    inter = inter_w * (torch.min(ay1, by1) - torch.max(ay0, by0)).clamp(min=0)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    hull = (torch.max(ax1, bx1) - torch.min(ax0, bx0)) * (torch.max(ay1, by1) - torch.min(ay0, by0))
    return inter / union - (hull - union) / hull


def test_denoising_queries_are_decoded_from_the_noise_and_scored_against_the_truth(batch):
    config = OPTIONS["denoising"]
    groups = config.queries.denoising_groups
    torch.manual_seed(8)
    model = detr.build_detr(config).train()
    for head in model.anchor_queries.box_heads:  # predictions away from the references they start at
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    seen = {}
    model.transformer.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(reference=kwargs["reference"]), with_kwargs=True)
    torch.manual_seed(0)
    out = model(batch.images, batch.targets)
    dn = out["dn_outputs"]
    q = dn.queries
    # the decoder starts the denoising queries from the noised boxes, not from the truth
    torch.testing.assert_close(seen["reference"][:, :q.size], q.reference, rtol=0, atol=0)
    valid_ref = q.reference[q.valid]
    assert (valid_ref - q.boxes[q.valid]).abs().amax(dim=1).min() > 1e-4
    result = SetCriterion.from_config(config)(out, batch.targets)
    # by hand: each image's g-th group holds its objects in order; the targets are the ground truth
    most = max(len(t["labels"]) for t in batch.targets)
    num_boxes = sum(len(t["labels"]) for t in batch.targets)
    layers = dn.pred_boxes.shape[0]
    for layer in range(layers):
        pred_boxes, pred_logits, true_boxes, true_labels = [], [], [], []
        for i, t in enumerate(batch.targets):
            for g in range(groups):
                slot = slice(g * most, g * most + len(t["labels"]))
                pred_boxes.append(dn.pred_boxes[layer, i, slot])
                pred_logits.append(dn.pred_logits[layer, i, slot])
                true_boxes.append(t["boxes"])
                true_labels.append(t["labels"])
        pred, truth = torch.cat(pred_boxes).detach(), torch.cat(true_boxes)
        logits, labels = torch.cat(pred_logits).detach(), torch.cat(true_labels)
        suffix = "_dn" if layer == layers - 1 else f"_dn_{layer}"
        normalizer = num_boxes * groups
        expected = {
            "loss_bbox": (pred - truth).abs().sum() / normalizer,
            "loss_giou": (1 - _giou(pred, truth)).sum() / normalizer,
            "loss_ce": -logits.log_softmax(-1).gather(1, labels[:, None]).mean(),
        }
        for name, value in expected.items():
            torch.testing.assert_close(result.terms[name + suffix].detach(), value, rtol=0, atol=1e-6)
        # ... and scoring against the noised boxes would differ by far more than that
        assert ((pred - valid_ref.detach()).abs().sum() / normalizer - expected["loss_bbox"]).abs() > 1e-3


def test_anchor_boxes_are_refined_layer_by_layer(batch):
    torch.manual_seed(6)
    model = detr.build_detr(OPTIONS["anchors"]).eval()
    with torch.no_grad():
        out = model(batch.images)
    anchors = model.anchor_queries.anchors.sigmoid()
    # box heads start at zero: every layer keeps the anchors
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"], anchors.expand(4, -1, -1))
    torch.testing.assert_close(out["pred_boxes"], anchors.expand(4, -1, -1))
    for head in model.anchor_queries.box_heads:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    with torch.no_grad():
        features = model.forward_features(batch.images)
    first, last = features.boxes[0], features.boxes[1]
    delta = model.anchor_queries.box_heads[1](features.decoded[1])
    torch.testing.assert_close(last, (delta + inverse_sigmoid(first)).sigmoid())
    assert (first - anchors).abs().max() > 1e-3


GRID = SIZE // 8  # the small backbone's stride-8 feature map: GRID x GRID encoder tokens
PROPOSAL_DELTA = torch.tensor([0.3, -0.2, 0.5, -0.4])  # a known box-head output, the same for every token


def _rig_proposals(model, chosen: torch.Tensor):
    """Make the two-stage selection's answer known in advance: the class head is overridden so that the
    tokens ``chosen`` [B, Q] are the object-like ones, in this order (rank r: class r % K at logit 10 - r; the
    rest: no-object), and the box head outputs PROPOSAL_DELTA."""
    k = model.config.num_classes
    b, q = chosen.shape
    logits = torch.full((b, GRID * GRID, k + 1), -5.0)
    logits[..., k] = 5.0
    for i in range(b):
        for r in range(q):
            # spread over classes, so ranking by one class (not the best one) would pick other tokens
            logits[i, chosen[i, r], r % k] = 10.0 - r
            logits[i, chosen[i, r], k] = -5.0
    model.proposals.class_head.register_forward_hook(lambda module, args, out: logits.to(out.dtype))
    with torch.no_grad():
        model.proposals.box_head.layers[-1].weight.zero_()
        model.proposals.box_head.layers[-1].bias.copy_(PROPOSAL_DELTA)


def _expected_proposal_boxes(chosen: torch.Tensor, cell_size: float) -> torch.Tensor:
    """[B, Q, 4] from first principles: token t is the cell (row t // GRID, column t % GRID), its box is centred
    on the cell, cell_size wide and high, and moved by PROPOSAL_DELTA in logit space."""
    row, col = (chosen // GRID).float(), (chosen % GRID).float()
    cell = torch.stack([(col + 0.5) / GRID, (row + 0.5) / GRID, torch.full_like(col, cell_size),
                        torch.full_like(col, cell_size)], dim=-1)
    return (torch.logit(cell) + PROPOSAL_DELTA).sigmoid()


@pytest.mark.parametrize("name", ["two_stage", "two_stage_ce"])
def test_two_stage_references_are_the_top_proposals(batch, name):
    torch.manual_seed(7)
    model = detr.build_detr(OPTIONS[name]).eval()
    generator = torch.Generator().manual_seed(0)
    chosen = torch.stack([torch.randperm(GRID * GRID, generator=generator)[:6] for _ in range(4)])  # [B, Q]
    _rig_proposals(model, chosen)
    seen = {}
    model.transformer.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(reference=kwargs["reference"]), with_kwargs=True)
    with torch.no_grad():
        out = model(batch.images)
    expected = _expected_proposal_boxes(chosen, OPTIONS[name].queries.anchor_size)
    assert out["enc_outputs"].valid.all() and out["enc_outputs"].pred_boxes.shape == (4, GRID * GRID, 4)
    torch.testing.assert_close(seen["reference"], expected, rtol=0, atol=1e-6)
    # the first layer's box head starts at zero, so its boxes are its references
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"], expected, rtol=0, atol=1e-6)


def test_encoder_content_queries_are_the_selected_tokens(batch):
    torch.manual_seed(7)
    model = detr.build_detr(OPTIONS["encoder_content"]).eval()
    assert model.anchor_queries.content is None  # nothing learned in its place
    generator = torch.Generator().manual_seed(1)
    chosen = torch.stack([torch.randperm(GRID * GRID, generator=generator)[:6] for _ in range(4)])  # [B, Q]
    _rig_proposals(model, chosen)
    seen = {}
    model.transformer.decoder.register_forward_pre_hook(lambda module, args: seen.update(content=args[0]))
    with torch.no_grad():
        out = model(batch.images)
    hidden = out["enc_outputs"].hidden  # [B, HW, C]
    expected = torch.stack([hidden[i, chosen[i]] for i in range(4)])
    torch.testing.assert_close(seen["content"], expected, rtol=0, atol=0)
    assert seen["content"].std(dim=1).min() > 0  # the queries differ, unlike learned-free zeros


@pytest.mark.parametrize("two_stage", [False, True])
def test_look_forward_twice_trains_the_previous_box_head_through_the_next_layer(batch, two_stage):
    """Same weights, same boxes; only with the option does the last layer's box loss reach the first box head."""
    grads, boxes = {}, {}
    for lft in (False, True):
        config = tiny(QueryConfig(anchors=True, two_stage=two_stage, look_forward_twice=lft, anchor_size=0.3))
        torch.manual_seed(10)
        model = detr.build_detr(config).train()
        for head in model.anchor_queries.box_heads:  # away from the zero start, where no gradient passes back
            torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
        out = model(batch.images)
        boxes[lft] = out["pred_boxes"].detach()
        out["pred_boxes"].sum().backward()  # the last layer's boxes only
        grads[lft] = model.anchor_queries.box_heads[0].layers[-1].weight.grad
    torch.testing.assert_close(boxes[True], boxes[False], rtol=0, atol=0)
    assert grads[False] is None or grads[False].abs().sum() == 0
    assert grads[True].abs().sum() > 0


def test_deformable_two_stage_proposals_are_class_agnostic(batch):
    # Deformable DETR trains its proposals as one class: the proposal loss must not see the labels, the
    # decoder's must
    config = OPTIONS["deformable_two_stage"]
    torch.manual_seed(0)
    model = detr.build_detr(config).train()
    criterion = SetCriterion.from_config(config)
    outputs = model(batch.images)
    relabeled = [{**t, "labels": (t["labels"] + 1) % config.num_classes} for t in batch.targets]
    a, b = criterion(outputs, batch.targets).terms, criterion(outputs, relabeled).terms
    assert torch.equal(a["loss_ce_enc"], b["loss_ce_enc"]) and torch.equal(a["loss_bbox_enc"], b["loss_bbox_enc"])
    assert not torch.equal(a["loss_ce"], b["loss_ce"])
    proposals = outputs["enc_outputs"]
    assert proposals.class_agnostic and proposals.pred_logits.shape[-1] == config.num_classes


def test_deformable_decoder_samples_around_each_querys_reference(batch, monkeypatch):
    # The cross-attention's reference points are the queries' references scaled by the valid ratios; with
    # box refinement, the refined box of the previous layer (4-d) from the second layer on.
    config = OPTIONS["deformable_refine"]
    torch.manual_seed(0)
    model = detr.build_detr(config).eval()
    seen = []
    for layer in model.transformer.decoder.layers:
        layer.multihead_attn.register_forward_hook(lambda m, args, out: seen.append(args[1].detach()))
    images = [batch.images.pixels[0], batch.images.pixels[1][:, :48, :40]]  # the second one padded
    with torch.no_grad():
        features = model.forward_features(images)
    ratios = features.levels.valid_ratios  # [B, L, 2]
    q = model.deformable_queries
    position = q.query_embed.weight[:, : config.transformer.hidden_dim]
    initial = q.reference_points(position).sigmoid()  # [Q, 2]
    torch.testing.assert_close(seen[0], initial[None, :, None] * ratios[:, None], rtol=0, atol=1e-6)
    refined = features.boxes[0]  # [B, Q, 4] the first layer's box
    torch.testing.assert_close(seen[1], refined[:, :, None] * torch.cat([ratios, ratios], -1)[:, None],
                               rtol=0, atol=1e-6)
    assert ratios[1, 0].tolist() != [1.0, 1.0] and ratios[0].eq(1).all()


def test_proposal_cells_follow_the_unpadded_image():
    from detr.model.proposals import cell_boxes

    padding = torch.zeros(1, 2, 4, dtype=torch.bool)
    padding[0, :, 2:] = True  # the right half is padding
    boxes = cell_boxes(padding, 0.3)
    assert boxes[0, :, 0].tolist() == pytest.approx([0.25, 0.75, 1.25, 1.75] * 2)
    assert boxes[0, :4, 1].tolist() == pytest.approx([0.25] * 4)


def test_focal_proposal_loss_sums_over_tokens():
    """Focal: summed over tokens and classes / boxes; each matched token weighs as much as in a 20-query set."""
    crit = SetCriterion.from_config(tiny(QueryConfig(anchors=True, two_stage=True)))
    logits = torch.zeros(1, 256, 5)
    proposals = {"pred_logits": logits, "pred_boxes": torch.full((1, 256, 4), 0.5),
                 "valid": torch.ones(1, 256, dtype=torch.bool)}
    match = type("M", (), {"batch": torch.tensor([0]), "query": torch.tensor([3]),
                           "target_per_image": [torch.tensor([0])]})()
    loss = crit.loss_proposal_labels(proposals, [{"labels": torch.tensor([2])}], match, num_boxes=1.0)
    # at p = 0.5 every term is alpha' * log(2) * 0.25: 1 positive (alpha 0.25), 256 * 4 - 1 negatives (0.75)
    expected = 0.25 * (0.25 * 1 + 0.75 * (256 * 4 - 1)) * torch.log(torch.tensor(2.0))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("where", ["none", "input"])
def test_spatial_positions_enter_where_configured(where, batch, monkeypatch):
    """Positions replaced by random ones: the output changes unless the positions are not used at all."""
    torch.manual_seed(8)
    model = detr.build_detr(tiny(spatial_pos=where)).eval()
    before = _main_outputs(model, batch, None)[1]
    monkeypatch.setattr(model.position, "forward", lambda mask: torch.randn(mask.shape[0], 32, *mask.shape[1:]))
    after = _main_outputs(model, batch, None)[1]
    assert torch.equal(before, after) == (where == "none")


def test_query_positions_at_the_input_start_the_decoder(batch):
    torch.manual_seed(9)
    model = detr.build_detr(tiny(query_pos="input")).eval()
    seen = []
    layer = model.transformer.decoder.layers[0]
    layer.register_forward_hook(lambda m, args, out: seen.append((args[0], args[4])))
    _main_outputs(model, batch, None)
    tgt, query_pos = seen[0]
    assert query_pos is None and torch.equal(tgt[0], model.query_embed.weight)


def test_no_ffn_has_no_feed_forward_weights():
    model = detr.build_detr(tiny(dim_feedforward=0))
    names = [n for n, _ in model.named_parameters()]
    assert not any("linear1" in n or "linear2" in n or "norm3" in n for n in names)
    assert any("decoder.layers.0.norm2" in n for n in names)


@pytest.mark.parametrize(("widths", "stride"), [((16, 32, 64), 8), ((8, 16, 32, 64), 16), ((8, 8, 16, 32, 64), 32)])
def test_small_backbone_output_stride(widths, stride):
    config = tiny().with_backbone(widths=widths, depths=(1,) * len(widths))
    assert config.backbone.output_stride == stride
    model = detr.build_detr(config).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 128, 96))
    assert features.projected.shape[-2:] == (128 // stride, 96 // stride)


def test_invalid_combinations_say_which_option_needs_which():
    with pytest.raises(ValueError, match="two_stage needs anchor-box queries.*--anchor_queries"):
        QueryConfig(two_stage=True)
    with pytest.raises(ValueError, match="encoder_content needs two-stage selection.*--two_stage"):
        QueryConfig(anchors=True, encoder_content=True)
    with pytest.raises(ValueError, match="extra groups would be copies of the first"):
        QueryConfig(anchors=True, two_stage=True, encoder_content=True, groups=2)
    with pytest.raises(ValueError, match="look_forward_twice needs anchor-box queries.*--anchor_queries"):
        QueryConfig(look_forward_twice=True)
    with pytest.raises(ValueError, match="denoising needs anchor-box queries"):
        QueryConfig(denoising_groups=2)
    with pytest.raises(ValueError, match="query_pos='input' is for learned queries"):
        tiny(QueryConfig(anchors=True), query_pos="input")
    with pytest.raises(ValueError, match="masks=True needs a ResNet backbone"):
        dataclasses.replace(preset("shapes-fast"), masks=True)
    with pytest.raises(ValueError, match="trains from scratch with GroupNorm"):
        BackboneConfig(name="small")


def test_cli_flags_build_the_options():
    import argparse

    from detr.cli import add_model_flags, model_config_from_args

    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    args = parser.parse_args(["--backbone", "small", "--backbone_widths", "16,32,64,128", "--backbone_depths",
                              "0,1,1,1", "--anchor_queries", "--two_stage", "--encoder_content", "--look_forward_twice",
                              "--denoising", "4", "--proposal_loss", "ce", "--spatial_pos", "input",
                              "--dim_feedforward", "0"])
    config = model_config_from_args(args, num_classes=7)
    assert config.backbone == BackboneConfig(name="small", norm="group_norm", frozen_stages=0,
                                             widths=(16, 32, 64, 128), depths=(0, 1, 1, 1))
    assert config.queries == QueryConfig(anchors=True, two_stage=True, encoder_content=True, look_forward_twice=True,
                                         denoising_groups=4)
    assert config.loss.proposal_loss == "ce" and config.num_classes == 7
    assert config.transformer.spatial_pos == "input" and config.transformer.dim_feedforward == 0
    assert DetrConfig.from_dict(config.to_dict()) == config  # JSON-style round trip (tuples come back)
