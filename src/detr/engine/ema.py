"""An exponential moving average of the weights (``--ema DECAY``), as every recent DETR trainer keeps.

The average is what evaluation scores and what is saved beside the raw weights: late in training it
smooths the last steps' noise out of the boxes. The decay ramps up from 0 (``decay * (1 - exp(-n /
warmup))`` after n updates), so that the average does not drag the random initialization along.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """``ModelEMA(model, decay)``; call ``update(model)`` after each optimizer step; ``module`` is the average."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: float = 2000.0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        averaged = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = averaged[name]
            if target.dtype.is_floating_point:
                target.lerp_(value.detach(), 1 - d)  # target = d * target + (1 - d) * value
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
