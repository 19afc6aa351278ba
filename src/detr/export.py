"""Export a detector to ONNX: ``export_onnx(model or checkpoint, "detr.onnx")`` and ``detr export``.

The graph takes ``pixels`` [B, 3, H, W] (resized and normalized as the model was trained: the graph's
``detr.input`` metadata holds the short side, the long-side cap and the mean/std, ImageNet's by default)
and, when exported with ``padding_mask=True``, also ``padding_mask`` [B, H, W] bool (True = padding,
as in ``ImageBatch``). Without it every image is taken as unpadded (the usual case: one image per
call, or a batch of images of one size). Batch, height and width are dynamic unless ``dynamic=False``.
Outputs: ``pred_logits`` [B, Q, K+1] (a focal-loss model: [B, Q, K] sigmoid scores, as ``detr.pred_logits``
in the graph's metadata says), ``pred_boxes`` [B, Q, 4] (cx, cy, w, h normalized to each
image's unpadded size) and, for the panoptic model, ``pred_masks`` [B, Q, H/4, W/4] (mask logits).
Auxiliary (per decoder layer) outputs are training-only and not exported.

Exporter: the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``). With torch 2.13 the
dynamo-based exporter also gives a correct detector, but it took 20-40x longer (41 s against 2 s for
the R50 test model, 28 s for a ResNet-18 one), needs ``onnxscript``, writes the weights to a separate
``.data`` file, and on the panoptic model silently specialized the batch to the example's size of 1.
The traced graph keeps every size symbolic: shapes are read with ``tensor.shape`` (never turned into
Python ints), so the mask resizing, the sine positions and the attention reshapes follow the input.
The padding mask reaches the feature maps by an explicit nearest-index selection (``downsample_mask``)
rather than ``F.interpolate``: ONNX's Resize computes nearest indices with other float rounding and
picked other mask pixels for some sizes (e.g. a width of 150 -> 5).
A deformable-attention model samples with ``grid_sample`` in the graph (opset 16+) and takes images of the
traced size only (its feature levels' sizes are traced as constants); its batch stays free.
Learned position embeddings cover feature maps up to 50x50; beyond that onnxruntime raises
"invalid expand shape" (PyTorch raises a ValueError).

Every export is checked before it lands at ``out_path`` (``verify=True``): onnxruntime runs the new
graph on an input of another size (and a batch of 2 when dynamic) and must agree with PyTorch, so a
size baked into the graph fails the export instead of surfacing later as wrong boxes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint
from .files import atomic_write
from .model.deformable import MultiScaleDeformableAttention
from .model.detr import DETR
from .model.minimal import DETRdemo
from .model.segmentation import DETRsegm
from .preprocessing import InputConfig, resolve_input
from .structures import ImageBatch

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
DEFAULT_OPSET = 17  # the first with LayerNormalization; onnxruntime, TensorRT and OpenVINO all run it
MIN_OPSET = 14  # scaled_dot_product_attention has no ONNX translation before opset 14
DEFAULT_IMAGE_SIZE = InputConfig().example_hw()  # (800, 1088): the reference's evaluation size, a multiple of 32
VERIFY_TOLERANCE = 1e-3  # |onnx - torch| / max(|torch|, 1); a baked-in size gives errors of order 1


class ExportError(ValueError):
    """The model cannot be exported, or the exported graph disagrees with PyTorch."""


class OnnxDetector(nn.Module):
    """The exported signature: forward(pixels [, padding_mask]) -> (pred_logits, pred_boxes[, pred_masks]).

    pixels [B, 3, H, W] normalized; padding_mask [B, H, W] bool (True = padding), or None for
    unpadded images. A tuple of tensors, because ONNX graphs return positional outputs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, DETRdemo):
            raise ExportError(
                "the demo model (DETRdemo) cannot be exported: its torch.nn.Transformer bakes the sequence "
                "length of the traced image into the graph. Export a DETR or DETRsegm checkpoint instead."
            )
        if not isinstance(model, DETR | DETRsegm):
            raise ExportError(f"can export DETR or DETRsegm models, got {type(model).__name__}")
        self.model = model
        self.output_names = ["pred_logits", "pred_boxes"] + (["pred_masks"] if isinstance(model, DETRsegm) else [])

    def forward(self, pixels: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, ...]:
        images = pixels if padding_mask is None else ImageBatch(pixels, padding_mask)
        out = self.model(images)
        return tuple(out[name] for name in self.output_names)


def _as_model(model_or_checkpoint_path: nn.Module | str | Path) -> nn.Module:
    if isinstance(model_or_checkpoint_path, nn.Module):
        return model_or_checkpoint_path
    return load_checkpoint(model_or_checkpoint_path)


def _require(modules: Sequence[str]) -> None:
    """Fail before any work when the optional packages are missing (they are the ``export`` extra)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: pip install 'detr-pytorch[export]'")


def _check_arguments(model: nn.Module, opset: int, image_size: Sequence[int]) -> tuple[int, int]:
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: DETR's attention needs opset {MIN_OPSET} or later")
    if len(image_size) != 2 or any(int(s) < 32 for s in image_size):
        raise ExportError(f"image_size must be (height, width), both at least 32 pixels; got {tuple(image_size)}")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        # On a GPU, PyTorch's TF32 convolutions would not be a fair reference for the verification.
        raise ExportError(f"export a model on the CPU (call .cpu() first), not on {sorted(devices)}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ExportError(f"export a float32 model (call .float() first), not {sorted(map(str, dtypes))}")
    return int(image_size[0]), int(image_size[1])


def _dynamic_axes(input_names: list[str], output_names: list[str],
                  fixed_size: bool = False) -> dict[str, dict[int, str]]:
    axes = {"pixels": {0: "batch", 2: "height", 3: "width"}, "padding_mask": {0: "batch", 1: "height", 2: "width"}}
    if fixed_size:  # only the batch is free
        axes = {"pixels": {0: "batch"}, "padding_mask": {0: "batch"}}
    outputs = {
        "pred_logits": {0: "batch"},
        "pred_boxes": {0: "batch"},
        "pred_masks": {0: "batch", 2: "mask_height", 3: "mask_width"},
    }
    return {name: axes[name] for name in input_names} | {name: outputs[name] for name in output_names}


def _annotate(path: str, model: nn.Module, output_names: list[str], spec: InputConfig) -> None:
    """Pin the query count in the output shapes (the tracer leaves it symbolic) and store what a
    consumer needs to prepare inputs and read outputs."""
    import onnx

    proto = onnx.load(path)
    num_queries = model.num_queries
    for output in proto.graph.output:
        if output.name in output_names:
            output.type.tensor_type.shape.dim[1].dim_value = num_queries
    onnx.helper.set_model_props(proto, {
        "detr.config": json.dumps(model.config.to_dict()),
        "detr.input": json.dumps(spec.to_dict()),  # resize a consumer should apply: short side, long-side cap
        "detr.image_mean": json.dumps(spec.mean),
        "detr.image_std": json.dumps(spec.std),
        "detr.pred_boxes": "cx, cy, w, h normalized by each image's unpadded size",
        "detr.pred_logits": (
            "K sigmoid class scores, no 'no object' class (focal loss): take the sigmoid and the best Q of the "
            "Q x K (query, class) scores" if model.config.loss.focal
            else "the last class is 'no object'; take the softmax over all K+1"),
    })
    onnx.save(proto, path)


def _another_side(n: int, offset: int) -> int:
    """A side length more than 32 pixels away from ``n``, so the feature map's size changes too:
    about half of a large side (cheap to run), a bit more than a small one."""
    return n // 2 + offset if n >= 192 else n + 32 + offset


def _verification_inputs(image_size: tuple[int, int], dynamic: bool, padding_mask: bool,
                         fixed_size: bool = False) -> tuple[Tensor, ...]:
    """Random normalized images of another size than the traced one (``fixed_size``: the traced one), a
    batch of 2 with the second image padded when the graph is dynamic; the traced size and a batch of 1
    otherwise."""
    h, w = image_size
    if dynamic and not fixed_size:
        h, w = _another_side(h, 3), _another_side(w, 13)
    batch = 2 if dynamic else 1
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, h, w, generator=generator)
    if not padding_mask:
        return (pixels,)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    if batch > 1:  # the second image is half as high and wide: padded at the bottom and the right
        mask[1, h // 2 :, :] = True
        mask[1, :, w // 2 :] = True
        pixels[1][:, mask[1]] = 0.0
    return pixels, mask


def _verify(path: str, wrapper: OnnxDetector, inputs: tuple[Tensor, ...], input_names: list[str]) -> dict[str, float]:
    """Run the graph in onnxruntime and compare with PyTorch; returns the error per output."""
    import onnxruntime as ort

    with torch.no_grad():
        expected = wrapper(*inputs)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed run is reported by the exception below, not also on stderr
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    size = "x".join(str(s) for s in inputs[0].shape)
    try:
        got = session.run(wrapper.output_names, {n: t.numpy() for n, t in zip(input_names, inputs, strict=True)})
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot run the exported graph on a {size} input (a size baked into "
                          f"the graph?): {e}") from None
    errors = {}
    for name, ours, theirs in zip(wrapper.output_names, got, expected, strict=True):
        ours = torch.from_numpy(ours)
        if ours.shape != theirs.shape:
            raise ExportError(f"exported {name} has shape {tuple(ours.shape)} on a {size} input, PyTorch gives "
                              f"{tuple(theirs.shape)}")
        errors[name] = ((ours - theirs).abs() / theirs.abs().clamp(min=1.0)).max().item()
        if not errors[name] <= VERIFY_TOLERANCE:
            raise ExportError(f"exported graph disagrees with PyTorch on a {size} input: {name} error "
                              f"{errors[name]:.3g} > {VERIFY_TOLERANCE}")
    return errors


def export_onnx(
    model_or_checkpoint_path: nn.Module | str | Path,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = True,
    padding_mask: bool = False,
    verify: bool = True,
) -> Path:
    """Write a DETR / DETRsegm model (or a checkpoint file of one) as a self-contained ONNX file.

    Graph inputs: ``pixels`` [B, 3, H, W] float32, normalized; with ``padding_mask=True`` also
    ``padding_mask`` [B, H, W] bool (True = padding), for padded batches of images of different sizes.
    Outputs: ``pred_logits`` [B, Q, K+1], ``pred_boxes`` [B, Q, 4] (normalized cxcywh), and
    ``pred_masks`` [B, Q, H/4, W/4] for DETRsegm. ``image_size`` (H, W) is the size traced (default: a
    landscape image at the checkpoint's input size, ``InputConfig.example_hw``; 800 x 1088 for one that
    does not say), recorded with the input's resize and normalization in the graph's ``detr.input``; with
    ``dynamic`` (the default) batch, height and width are free, otherwise the graph takes only a
    [1, 3, H, W] input. ``verify`` compares onnxruntime with PyTorch before the file is put in place.
    The file is written atomically: a failure leaves any previous ``out_path`` untouched.
    """
    _require(["onnx", "onnxruntime"] if verify else ["onnx"])
    model = _as_model(model_or_checkpoint_path)
    wrapper = OnnxDetector(model)
    spec, _ = resolve_input(getattr(model, "input_config", None))
    h, w = _check_arguments(model, opset, image_size if image_size is not None else spec.example_hw())
    deformable = isinstance(model, DETR) and model.deformable
    if deformable and opset < 16:
        raise ExportError(f"opset {opset} is too old: deformable attention samples with GridSample (opset 16)")
    if deformable and dynamic:
        log.info("deformable attention: the graph takes %dx%d images (its feature-level sizes are traced); "
                 "the batch stays free", h, w)
    log.info("tracing a %dx%d input", h, w)
    input_names = ["pixels"] + (["padding_mask"] if padding_mask else [])
    example: tuple[Tensor, ...] = (torch.zeros(1, 3, h, w),)
    if padding_mask:
        example += (torch.zeros(1, h, w, dtype=torch.bool),)
    out_path = Path(out_path)

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is the better one for this model (see the module docstring), and
            # tracer warnings are about shapes the verification below checks for real.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            for message in (".*legacy TorchScript-based ONNX export", "The feature will be removed"):
                warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
            torch.onnx.export(
                wrapper, example, tmp, input_names=input_names, output_names=wrapper.output_names,
                dynamic_axes=_dynamic_axes(input_names, wrapper.output_names, deformable) if dynamic else None,
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        _annotate(tmp, model, wrapper.output_names, spec)
        if verify:
            inputs = _verification_inputs((h, w), dynamic, padding_mask, fixed_size=deformable)
            errors = _verify(tmp, wrapper, inputs, input_names)
            log.info("verified on a %s input: %s", "x".join(map(str, inputs[0].shape)),
                     ", ".join(f"{k} max error {v:.2g}" for k, v in errors.items()))

    was_training = model.training
    model.eval()
    # ONNX has GridSample but no weighted bag gather: sample with grid_sample while tracing
    samplers = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    methods = [m.method for m in samplers]
    try:
        for m in samplers:
            m.method = "grid_sample"
        atomic_write(out_path, write)
    finally:
        model.train(was_training)
        for m, method in zip(samplers, methods, strict=True):
            m.method = method
    return out_path
