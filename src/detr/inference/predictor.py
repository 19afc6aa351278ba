"""The Python API for running a trained detector on images.

    detector = Detector.from_checkpoint("detr-r50.pth", threshold=0.7)
    for det in detector("street.jpg"):
        print(det.name, det.score, det.box)          # box: xyxy in the image's pixels

Images go through the validation transform the checkpoint was trained with (short side, cap on the long
side, normalization: its ``InputConfig``; the reference's 800 / 1333 and ImageNet statistics for files
that do not say), unless ``size`` / ``max_size`` say otherwise, and are batched ``batch_size`` at a time.
As in the reference, a batch pads its images to a common size and the padding reaches the backbone's features, so with
``batch_size > 1`` an image's results depend (slightly) on which images share its batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, read_checkpoint
from ..data.images import load_image
from ..data.transforms import val_transform
from ..model.detr import DETR
from ..model.fuse import compile_for_inference, optimize_for_inference
from ..model.minimal import DETRdemo
from ..model.segmentation import DETRsegm
from ..postprocess import nms, postprocess_detections, postprocess_panoptic, uses_focal
from ..preprocessing import InputConfig, resolve_input
from ..runtime import amp_dtype
from .names import COCO_LAST_THING_ID, ClassNames, resolve_class_names
from .results import Detection, ImageInput, PanopticSegmentation

if TYPE_CHECKING:
    from .attention import AttentionMaps

__all__ = ["Detection", "Detector", "ImageInput", "PanopticSegmentation", "nms"]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Detector:
    """A detector ready for images: preprocessing, batching, post-processing and class names.

    Args:
        model: a DETR, DETRsegm (panoptic; :meth:`panoptic` then works too) or DETRdemo.
        class_names: {label id: name} or a list indexed by id; default: the COCO names for 91-class
            (and 250-class panoptic) models, else ``str(id)``.
        device: where the model runs.
        threshold: keep detections with score > threshold.
        size, max_size: the validation resize (short side, cap on the long side); default: ``input``.
        input: the resize and normalization the model was trained with; default: the model's
            ``input_config`` (what ``load_checkpoint`` read from the file), else the reference's 800 / 1333.
        batch_size: images per forward pass. The default 1 makes each image's result independent of
            the others (a batch pads its images, and the padding reaches the backbone's features);
            larger batches are faster on a GPU.
        nms_iou: if given, class-wise NMS at this IoU (DETR needs none; the paper's ablation).
        panoptic_threshold: class-probability threshold of :meth:`panoptic` (the reference's 0.85).
        is_thing: category id -> thing? for :meth:`panoptic`; default: COCO's rule, id <= 90.
        optimize: run a copy made by :func:`detr.model.fuse.optimize_for_inference` (frozen norms
            folded into the convolutions, channels-last): same outputs to ~1e-5, faster on CPU.
        precision: "fp32", or "bf16"/"fp16" to run the model under autocast (post-processing stays
            float32). bf16 pays on CPUs with bf16 instructions and on GPUs; boxes move by ~1e-3.
        compile: also ``torch.compile`` the forward (:func:`detr.model.fuse.compile_for_inference`):
            faster per image, but each new image shape costs a compilation (about a minute on 2 CPU cores).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        class_names: ClassNames | None = None,
        device: str | torch.device = "cpu",
        threshold: float = 0.7,
        size: int | None = None,
        max_size: int | None = None,
        input: InputConfig | None = None,
        batch_size: int = 1,
        nms_iou: float | None = None,
        panoptic_threshold: float = 0.85,
        is_thing: Callable[[int], bool] | Mapping[int, bool] | None = None,
        optimize: bool = True,
        compile: bool = False,
        precision: str = "fp32",
    ) -> None:
        if not isinstance(model, DETR | DETRsegm | DETRdemo):
            raise TypeError(f"expected a DETR, DETRsegm or DETRdemo model, got {type(model).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.precision = precision
        self._autocast_dtype = amp_dtype(precision, self.device)  # None for fp32; checks the value
        self.model = (optimize_for_inference(model) if optimize else model).to(self.device).eval()
        self.focal = uses_focal(model)  # sigmoid scores of K classes: the best (query, class) pairs are detections
        self.threshold = threshold
        stored = input if input is not None else getattr(model, "input_config", None)
        self.input, self.input_origin = resolve_input(stored, size=size, max_size=max_size)
        self.size, self.max_size = self.input.size, self.input.max_size
        self.batch_size = batch_size
        self.nms_iou = nms_iou
        self.panoptic_threshold = panoptic_threshold
        self.is_thing = is_thing if is_thing is not None else (lambda category: category <= COCO_LAST_THING_ID)
        self.class_names = resolve_class_names(self.num_classes, explicit=class_names)
        self._transform = val_transform(self.input)
        self.compile = compile
        self._compiled: dict[int, nn.Module] = {}  # id(module) -> its compiled forward

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        threshold: float = 0.7,
        *,
        class_names: ClassNames | None = None,
        class_names_from: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Detector:
        """Load any checkpoint ``load_checkpoint`` reads. Class names: ``class_names``, else the
        categories of the dataset json ``class_names_from``, else the checkpoint's metadata
        ``class_names``, else COCO's for 91/250-class models. ``kwargs`` go to the constructor."""
        ckpt = read_checkpoint(path)
        model = load_checkpoint(path, checkpoint=ckpt)
        metadata = ckpt.metadata if class_names is None and class_names_from is None else None
        num_classes = model.config.num_classes
        names = resolve_class_names(num_classes, explicit=class_names, json_path=class_names_from, metadata=metadata)
        return cls(model, class_names=names, device=device, threshold=threshold, **kwargs)

    # --- properties ----------------------------------------------------------------------------

    @property
    def detection_model(self) -> nn.Module:
        """The module that predicts boxes (a panoptic model's inner DETR: no mask head needed for boxes)."""
        return self.model.detr if isinstance(self.model, DETRsegm) else self.model

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    @property
    def is_panoptic(self) -> bool:
        return isinstance(self.model, DETRsegm)

    def name(self, label: int) -> str:
        return self.class_names.get(int(label), str(int(label)))

    # --- input ---------------------------------------------------------------------------------

    @staticmethod
    def load(image: ImageInput) -> Image.Image:
        """A PIL image as RGB, or a file loaded as RGB with its EXIF orientation applied
        (raises ``ImageLoadError`` naming the file when it is missing or unreadable)."""
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if isinstance(image, str | os.PathLike):
            return load_image(Path(image))
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")

    def preprocess(self, image: Image.Image) -> Tensor:
        """RGB PIL image -> normalized [3, h, w] float tensor (the validation transform)."""
        pixels, _ = self._transform(image, None)
        return pixels

    def _forward(self, module: nn.Module, images: Sequence[Image.Image]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Model outputs for a batch of images, and their preprocessed tensors."""
        tensors = [self.preprocess(image).to(self.device) for image in images]
        if isinstance(module, DETRdemo):  # it has no padding mask: one image per forward
            outs = [module(t[None]) for t in tensors]
            return {k: torch.cat([o[k] for o in outs]) for k in ("pred_logits", "pred_boxes")}, tensors
        if self.compile:
            if id(module) not in self._compiled:
                self._compiled[id(module)] = compile_for_inference(module)
            module = self._compiled[id(module)]
        dtype = self._autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = module(tensors)
        if dtype is not None:
            outputs = {k: v.float() if isinstance(v, Tensor) else v for k, v in outputs.items()}
        return outputs, tensors

    # --- detection -----------------------------------------------------------------------------

    def postprocess(
        self, outputs: Mapping[str, Tensor], orig_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Every candidate detection per image (:func:`detr.postprocess.postprocess_detections`, as the model was
        trained: one per query, or with focal classification the best Q (query, class) pairs)."""
        return postprocess_detections(outputs, orig_sizes, focal=self.focal)

    def select(
        self, result: Mapping[str, Tensor], threshold: float | None, top_k: int | None = None
    ) -> Tensor:
        """Indices kept from one image's :meth:`postprocess` result (without focal: query indices; with it, its
        ``query_indices`` say each detection's query): score > threshold, NMS if configured, best ``top_k``;
        by decreasing score."""
        scores = result["scores"]
        idx = torch.arange(len(scores), device=scores.device)
        if threshold is not None:
            idx = idx[scores > threshold]
        idx = idx[scores[idx].argsort(descending=True, stable=True)]
        if self.nms_iou is not None:
            idx = idx[nms(result["boxes"][idx], scores[idx], result["labels"][idx], self.nms_iou)]
        return idx if top_k is None else idx[:top_k]

    def to_detections(self, result: Mapping[str, Tensor], indices: Tensor) -> list[Detection]:
        boxes, scores, labels = (result[k][indices].cpu() for k in ("boxes", "scores", "labels"))
        return [
            Detection(tuple(float(v) for v in box), float(score), int(label), self.name(int(label)))
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True)
        ]

    def _run(
        self, images: Sequence[Image.Image], *, panoptic: bool, threshold: float | None,
        panoptic_threshold: float | None,
    ) -> Iterator[tuple[list[Detection], PanopticSegmentation | None]]:
        """Per image: detections and, if ``panoptic``, the segmentation, from one forward per batch."""
        threshold = self.threshold if threshold is None else threshold
        panoptic_threshold = self.panoptic_threshold if panoptic_threshold is None else panoptic_threshold
        if panoptic and not self.is_panoptic:
            raise TypeError("panoptic segmentation needs a panoptic checkpoint (DETRsegm, with a mask head)")
        with torch.inference_mode():
            for chunk in _chunks(list(images), self.batch_size):
                outputs, tensors = self._forward(self.model if panoptic else self.detection_model, chunk)
                orig_sizes = [(image.height, image.width) for image in chunk]
                detections = [
                    self.to_detections(per_image, self.select(per_image, threshold))
                    for per_image in self.postprocess(outputs, orig_sizes)
                ]
                if not panoptic:
                    yield from ((dets, None) for dets in detections)
                    continue
                input_sizes = [tuple(t.shape[-2:]) for t in tensors]
                merged = postprocess_panoptic(outputs, input_sizes, orig_sizes, is_thing=self.is_thing,
                                              threshold=panoptic_threshold)
                for dets, item in zip(detections, merged, strict=True):
                    segments = [{**s, "name": self.name(s["category_id"])} for s in item["segments_info"]]
                    yield dets, PanopticSegmentation(item["segment_ids"], segments)

    def detect(self, images: Sequence[Image.Image], *, threshold: float | None = None) -> list[list[Detection]]:
        """Detections per loaded image (see :meth:`__call__`)."""
        return [dets for dets, _ in self._run(images, panoptic=False, threshold=threshold, panoptic_threshold=None)]

    def predict(
        self, images: Sequence[Image.Image], *, threshold: float | None = None, panoptic_threshold: float | None = None
    ) -> list[tuple[list[Detection], PanopticSegmentation | None]]:
        """Per loaded image: its detections and, for a panoptic model, its segmentation (one forward)."""
        return list(self._run(images, panoptic=self.is_panoptic, threshold=threshold,
                              panoptic_threshold=panoptic_threshold))

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], *, threshold: float | None = None
    ) -> list[Detection] | list[list[Detection]]:
        """Detect objects in a PIL image or an image file (-> a list of detections, by decreasing
        score), or in a list of them (-> one such list per image)."""
        single = not isinstance(images, list | tuple)
        items = [images] if single else list(images)
        results = self.detect([self.load(x) for x in items], threshold=threshold)
        return results[0] if single else results

    # --- panoptic ------------------------------------------------------------------------------

    def panoptic(
        self, images: ImageInput | Sequence[ImageInput], *, threshold: float | None = None
    ) -> PanopticSegmentation | list[PanopticSegmentation]:
        """Panoptic segmentation (the reference's merge, ``postprocess_panoptic``; class-probability
        ``threshold``, default ``panoptic_threshold``) of an image or a list of images; needs a
        panoptic (DETRsegm) model."""
        single = not isinstance(images, list | tuple)
        items = [images] if single else list(images)
        loaded = [self.load(x) for x in items]
        results = [seg for _, seg in self._run(loaded, panoptic=True, threshold=None, panoptic_threshold=threshold)]
        return results[0] if single else results

    # --- attention -----------------------------------------------------------------------------

    def attention(
        self,
        image: ImageInput,
        *,
        top_k: int = 4,
        points: Sequence[tuple[float, float]] | None = None,
        threshold: float | None = None,
    ) -> AttentionMaps:
        """Attention maps of one image: the last decoder layer's cross-attention of the ``top_k``
        best detections (score > ``threshold`` if given) and the last encoder layer's self-attention
        at ``points`` ((x, y) in image pixels; default: the centres of those detections' boxes).
        See :func:`detr.inference.attention.attention_maps`."""
        from .attention import attention_maps

        return attention_maps(self, image, top_k=top_k, points=points, threshold=threshold)
