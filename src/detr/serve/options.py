"""What ``detr serve`` is allowed to do: batching, backpressure and input limits (one frozen dataclass)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeOptions:
    """Service limits. Every field is a ``detr serve`` flag of the same name."""

    max_batch: int = 8  # images per forward pass
    batch_wait_ms: float = 10.0  # after the first request of a batch, wait this long for more
    max_queue: int = 64  # requests waiting for the model; beyond it: 503 + Retry-After
    timeout_s: float = 30.0  # per-request deadline (queue + model); beyond it: 504
    max_image_bytes: int = 20 * 1024 * 1024  # request body; beyond it: 413
    max_pixels: int = 40_000_000  # width x height from the image header; beyond it: 413, nothing decoded
    threshold: float = 0.7  # default score threshold of /v1/detect
    max_detections: int = 100  # default (and cap) of detections per image
    api_key: str | None = None  # if set, /v1/* and /metrics need "Authorization: Bearer KEY"
    images_dir: Path | None = None  # --images: a folder the explorer may browse (nothing outside it)
    drain_s: float = 60.0  # on SIGTERM, wait at most this long for in-flight requests

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_image_bytes", "max_pixels", "max_detections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "drain_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.images_dir is not None and not Path(self.images_dir).is_dir():
            raise ValueError(f"images: not a folder: {self.images_dir}")
