"""ONNX export: onnxruntime against PyTorch (and the reference's numbers) at sizes other than the traced one."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json

import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from PIL import Image

import detr
from conftest import COCO_MINI
from detr.checkpoint import save_checkpoint
from detr.cli.export import add_parsers as add_export_parser
from detr.cli.export import cmd_export
from detr.config import preset
from detr.data.images import load_image
from detr.data.transforms import Normalize, to_tensor
from detr.export import ExportError, export_onnx
from detr.model import backbone as backbone_module
from detr.model.backbone import FrozenBatchNorm2d
from detr.model.minimal import DemoConfig, DETRdemo
from detr.preprocessing import InputConfig
from detr.structures import ImageBatch

TRACE_SIZE = (160, 192)  # every size the tests run differs from it


def coco_image(index: int, size: tuple[int, int]) -> torch.Tensor:
    """A real coco-mini val image resized to ``size`` (h, w) and normalized: [3, h, w]."""
    files = sorted((COCO_MINI / "val2017").glob("*.jpg"))
    image = load_image(files[index]).resize((size[1], size[0]), Image.BILINEAR)
    return Normalize()(to_tensor(image), None)[0]


@functools.cache
def onnx_session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_onnx(path, **inputs: torch.Tensor) -> list[torch.Tensor]:
    session = onnx_session(str(path))
    return [torch.from_numpy(x) for x in session.run(None, {k: v.numpy() for k, v in inputs.items()})]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def graph_dims(path) -> dict[str, list]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}


def small_model(**overrides) -> torch.nn.Module:
    """A random ResNet-18 DETR whose frozen BatchNorms have non-trivial statistics."""
    torch.manual_seed(0)
    model = detr.build_detr(preset("shapes-small", **overrides)).eval()
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def detection(reference, tmp_path_factory):
    """The fixture's `detection` weights, loaded from a reference-format file like any release."""
    entry = reference["detection"]
    path = tmp_path_factory.mktemp("detection") / "checkpoint.pth"
    weights = {k: v.float() for k, v in entry["state_dict"].items()}
    torch.save({"model": weights, "args": argparse.Namespace(**entry["config"])}, path)
    return path, detr.load_checkpoint(path)


@pytest.fixture(scope="module")
def exported(detection, tmp_path_factory):
    """The main case: pixels only, dynamic batch/height/width (the tests below do the verifying)."""
    path, _ = detection
    return export_onnx(path, tmp_path_factory.mktemp("onnx") / "detr.onnx", image_size=TRACE_SIZE, verify=False)


def test_graph_signature_is_dynamic(exported):
    dims = graph_dims(exported)
    assert dims == {
        "pixels": ["batch", 3, "height", "width"],
        "pred_logits": ["batch", 20, 92],
        "pred_boxes": ["batch", 20, 4],
    }
    props = {p.key: p.value for p in onnx.load(str(exported), load_external_data=False).metadata_props}
    assert detr.DetrConfig.from_dict(json.loads(props["detr.config"])).num_queries == 20


@pytest.mark.parametrize("size", [(256, 341), (320, 240)])
def test_onnx_matches_pytorch_on_real_images(detection, exported, size):
    _, model = detection
    pixels = coco_image(0, size)[None]  # [1, 3, H, W]
    logits, boxes = run_onnx(exported, pixels=pixels)
    with torch.no_grad():
        expected = model(pixels)
    assert max_abs(logits, expected["pred_logits"]) <= 1e-4
    assert max_abs(boxes, expected["pred_boxes"]) <= 1e-4


def test_onnx_batch_of_two(detection, exported):
    _, model = detection
    pixels = torch.stack([coco_image(0, (288, 352)), coco_image(1, (288, 352))])  # [2, 3, H, W]
    logits, boxes = run_onnx(exported, pixels=pixels)
    with torch.no_grad():
        expected = model(pixels)
    assert logits.shape == (2, 20, 92)
    assert max_abs(logits, expected["pred_logits"]) <= 1e-4
    assert max_abs(boxes, expected["pred_boxes"]) <= 1e-4
    # the two images really differ, so a batch dimension that mixed them up would show
    assert max_abs(logits[0], logits[1]) > 1e-2


def test_padding_mask_input_reproduces_the_reference(reference, detection, tmp_path):
    """A padded batch of two images of different sizes, against the reference implementation's numbers."""
    path, model = detection
    out = export_onnx(path, tmp_path / "masked.onnx", image_size=TRACE_SIZE, padding_mask=True, verify=False)
    assert graph_dims(out)["padding_mask"] == ["batch", "height", "width"]
    batch = ImageBatch.from_images(reference["images"])
    assert batch.padding_mask.any()  # the fixture's images differ in size
    logits, boxes = run_onnx(out, pixels=batch.pixels, padding_mask=batch.padding_mask)
    with torch.no_grad():
        ours = model(batch)
    assert max_abs(logits, ours["pred_logits"]) <= 1e-4
    assert max_abs(boxes, ours["pred_boxes"]) <= 1e-4
    expected = reference["detection"]["outputs"]
    for got, ref in ((logits, expected["pred_logits"]), (boxes, expected["pred_boxes"])):
        assert ((got - ref).abs() / ref.abs().clamp(min=1.0)).max().item() <= 1e-4


def test_segmentation_model_exports_masks(tmp_path):
    model = small_model(masks=True, num_queries=3)
    out = export_onnx(model, tmp_path / "segm.onnx", image_size=(64, 96), padding_mask=True)
    assert graph_dims(out)["pred_masks"] == ["batch", 3, "mask_height", "mask_width"]
    # padded to 96x150; 150 -> 5 columns at stride 32 is a size where ONNX's Resize picked other mask pixels
    batch = ImageBatch.from_images([coco_image(2, (96, 120)), coco_image(3, (70, 150))])
    logits, boxes, masks = run_onnx(out, pixels=batch.pixels, padding_mask=batch.padding_mask)
    with torch.no_grad():
        expected = model(batch)
    assert masks.shape == (2, 3, 24, 38)
    assert max_abs(logits, expected["pred_logits"]) <= 1e-4
    assert max_abs(boxes, expected["pred_boxes"]) <= 1e-4
    assert max_abs(masks, expected["pred_masks"]) <= 1e-4 * max(1.0, expected["pred_masks"].abs().max().item())


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_exports_a_checkpoint_file(tmp_path, capsys):
    model = small_model(num_classes=3, num_queries=5)
    checkpoint = save_checkpoint(model, tmp_path / "model.safetensors")
    out = tmp_path / "exported" / "model.onnx"
    args = _export_parser().parse_args(["export", "--checkpoint", str(checkpoint), "--format", "onnx", str(out),
                                        "--opset", "18", "--height", "96", "--width", "128", "--static"])
    assert args.func(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temporary file left behind
    assert onnx.load(str(out), load_external_data=False).opset_import[0].version == 18
    assert graph_dims(out)["pixels"] == [1, 3, 96, 128]
    pixels = coco_image(4, (96, 128))[None]
    logits, boxes = run_onnx(out, pixels=pixels)
    with torch.no_grad():
        expected = model(pixels)
    assert max_abs(logits, expected["pred_logits"]) <= 1e-4
    assert max_abs(boxes, expected["pred_boxes"]) <= 1e-4
    with pytest.raises(InvalidArgument, match="invalid dimensions"):  # --static: the graph takes nothing else
        run_onnx(out, pixels=coco_image(4, (128, 96))[None])


def test_cli_traces_at_the_checkpoints_input_size(tmp_path, capsys):
    """No --height/--width: the example input is the size the checkpoint was trained at (short side 96, a 4:3
    landscape width rounded up to 32), and the graph records that input's resize and normalization."""
    spec = InputConfig(size=96, max_size=160, train_scales=(96,), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    checkpoint = save_checkpoint(small_model(num_classes=3, num_queries=5), tmp_path / "m.safetensors", input=spec)
    out = tmp_path / "model.onnx"
    args = _export_parser().parse_args(["export", "--checkpoint", str(checkpoint), str(out), "--static",
                                        "--no_verify"])
    assert args.func(args) == 0
    assert graph_dims(out)["pixels"] == [1, 3, 96, 128]
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert InputConfig.from_dict(json.loads(props["detr.input"])) == spec
    assert json.loads(props["detr.image_mean"]) == [0.5, 0.5, 0.5]
    half = _export_parser().parse_args(["export", "--checkpoint", str(checkpoint), str(out), "--height", "96"])
    with pytest.raises(SystemExit, match="both --height and --width"):
        half.func(half)


def test_cli_rejects_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _export_parser().parse_args(["export", "--checkpoint", "c.pth", "--format", "tflite", "out.tflite"])
    assert exc.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    args = argparse.Namespace(format="tflite", checkpoint="c.pth", output=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="unknown export format 'tflite'; supported: onnx"):
        cmd_export(args)


def test_baked_in_size_fails_verification_and_leaves_old_file(tmp_path, monkeypatch):
    """The usual trap, on purpose: a Python int from a shape freezes the traced size into the graph."""

    def baked_downsample_mask(padding_mask, size):
        h, w = int(size[0]), int(size[1])
        return torch.nn.functional.interpolate(padding_mask[None].float(), size=(h, w), mode="nearest")[0].bool()

    monkeypatch.setattr(backbone_module, "downsample_mask", baked_downsample_mask)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="on a 2x3x99x141 input"):  # the size export_onnx checks on
        export_onnx(small_model(), out, image_size=(64, 96))
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_bad_arguments_are_refused(tmp_path, monkeypatch):
    model = small_model()
    with monkeypatch.context() as m:  # as without the `export` extra
        find_spec = importlib.util.find_spec
        m.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
        with pytest.raises(ExportError, match=r"needs onnxruntime: pip install 'detr-pytorch\[export\]'"):
            export_onnx(model, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="opset 13"):
        export_onnx(model, tmp_path / "a.onnx", opset=13)
    with pytest.raises(ExportError, match="at least 32"):
        export_onnx(model, tmp_path / "a.onnx", image_size=(16, 128))
    demo = DETRdemo(DemoConfig(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_queries=5))
    with pytest.raises(ExportError, match="DETRdemo"):
        export_onnx(demo, tmp_path / "a.onnx")
    assert not any(tmp_path.iterdir())


def test_mask_downsampling_is_exactly_nearest_interpolation():
    """downsample_mask spells out F.interpolate(mode="nearest") so that the ONNX graph agrees with it
    (ONNX's Resize rounds differently, e.g. 150 -> 5); in PyTorch the two must be identical."""
    generator = torch.Generator().manual_seed(0)
    for size_in in range(1, 300):
        mask = torch.rand(2, size_in, 3, generator=generator) > 0.5
        sizes_out = set(range(1, min(size_in, 40) + 1)) | {-(-size_in // s) for s in (4, 8, 16, 32)}
        for size_out in sizes_out:
            expected = torch.nn.functional.interpolate(mask[None].float(), size=(size_out, 3), mode="nearest")[0]
            assert torch.equal(backbone_module.downsample_mask(mask, (size_out, 3)), expected.bool())
