"""How a model sees its input: the resize and normalization it was trained and validated with.

A model trained at 128 pixels and shown an 800-pixel image gives wrong boxes, not an error, so the input
transform travels with our checkpoints (``InputConfig``, written by ``detr train``, ``detr demo`` and the
benchmarks) and every consumer (eval, predict, attention, export, ``Detector``) starts from it:

    spec, origin = resolve_input(checkpoint.input, size=args.size, max_size=args.max_size)

Explicit values win over the checkpoint's; a checkpoint that does not say (the reference's and
transformers' formats, bare state dicts) gets the reference's 800 / 1333 and ImageNet statistics, which
are theirs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The reference's training scales: short sides 480..800 in steps of 32.
COCO_TRAIN_SCALES = tuple(range(480, 801, 32))
# An explicit size more than this factor away from the trained one (either way) is worth a warning.
FAR_FACTOR = 2.0


@dataclass(frozen=True)
class InputConfig:
    """The validation resize (short side ``size``, long side at most ``max_size``), the training scales and
    the per-channel normalization (of pixels in [0, 1]). The defaults are the reference's."""

    size: int = 800
    max_size: int | None = 1333
    train_scales: tuple[int, ...] | None = None  # None: the reference's 480..800 step 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists
        if self.train_scales is not None:
            object.__setattr__(self, "train_scales", tuple(int(s) for s in self.train_scales))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.size < 1 or (self.max_size is not None and self.max_size < self.size):
            raise ValueError(f"input size must be >= 1 and max_size >= size, got size {self.size}, "
                             f"max_size {self.max_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"input mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")
        if self.train_scales is not None and (not self.train_scales or min(self.train_scales) < 1):
            raise ValueError(f"input train_scales must be positive sides, got {self.train_scales}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputConfig:
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping of input fields, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown InputConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def for_training(cls, *, train_scales: list[int] | tuple[int, ...] | None, val_scale: int | None,
                     max_size: int | None) -> InputConfig:
        """What a run with these data options trains and validates at (validation: ``val_scale``, else the
        largest training scale, as the reference)."""
        scales = tuple(train_scales) if train_scales else None
        size = val_scale or max(scales or COCO_TRAIN_SCALES)
        return cls(size=size, max_size=1333 if max_size is None else max_size, train_scales=scales)

    def example_hw(self, aspect: float = 4 / 3, multiple: int = 32) -> tuple[int, int]:
        """A typical (height, width) of this input: the short side, and a landscape long side rounded up to
        ``multiple`` within ``max_size`` (800 -> (800, 1088))."""
        width = math.ceil(self.size * aspect / multiple) * multiple
        if self.max_size is not None:
            width = max(self.size, min(width, self.max_size))
        return self.size, width

    def describe(self) -> str:
        cap = f", long side <= {self.max_size}" if self.max_size is not None else ""
        return f"short side {self.size}{cap}"


def resolve_input(stored: InputConfig | None, *, size: int | None = None, max_size: int | None = None,
                  what: str = "the checkpoint") -> tuple[InputConfig, str]:
    """The input a consumer uses, and where it came from: explicit ``size`` / ``max_size`` override the
    ``stored`` one (``what`` names it in messages); without a stored one, the reference's defaults.

    Logs the size used and its origin; warns when an explicit size is more than 2x away from the trained one.
    An explicit ``size`` alone keeps the stored cap, raised to the stored long/short ratio when the size grows
    past it (a model trained at 128 / 256 asked for 512 gets 512 / 1024), so the cap cannot undo the size.
    """
    base = stored if stored is not None else InputConfig()
    origin = what if stored is not None else "the reference's default (the checkpoint does not say)"
    if size is None and max_size is None:
        spec = base
    else:
        flags = " and ".join(n for n, v in (("size", size), ("max_size", max_size)) if v is not None)
        origin = f"explicit {flags} (over {origin})"
        if max_size is None and size is not None and base.max_size is not None:
            max_size = max(base.max_size, round(base.max_size * size / base.size))
        spec = dataclasses.replace(base, size=size if size is not None else base.size,
                                   max_size=max_size if max_size is not None else base.max_size)
        if stored is not None and size is not None and not 1 / FAR_FACTOR <= size / stored.size <= FAR_FACTOR:
            log.warning("input size %d is more than %gx away from the %d that %s was trained at: expect wrong "
                        "boxes (leave the size out to use the trained one)", size, FAR_FACTOR, stored.size, what)
    log.info("input: %s, from %s", spec.describe(), origin)
    return spec, origin
