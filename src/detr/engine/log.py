"""The training log: JSON lines (one object per step and per epoch), optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonLog:
    """Append-only JSON-lines log (rank 0 only); one object per step and per epoch.

    With ``tensorboard`` (a folder), every numeric value also goes to TensorBoard: step records as
    ``train/<key>`` at their global step, epoch records as ``epoch/<key>`` at their epoch.
    """

    def __init__(self, path: Path | None, *, tensorboard: Path | None = None) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115
        self._writer = None
        if tensorboard is not None and path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's writer needs the tensorboard package
                self.close()
                raise ImportError("--tensorboard needs the tensorboard package: pip install "
                                  f"'detr-pytorch[tensorboard]' (or pip install tensorboard); {e}") from None
            self._writer = SummaryWriter(log_dir=str(tensorboard))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step_record = record.get("type") == "step"
            group, step = ("train", record["step"]) if step_record else ("epoch", record["epoch"])
            for key, value in record.items():
                if key in ("type", "step", "epoch") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                self._writer.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
