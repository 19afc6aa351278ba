"""Training on an endless stream of fresh samples, for a wall-clock or step budget.

What the demo and the convergence benchmark run: no epochs, no image seen twice (the stream renders
sample ``i`` on demand), a learning-rate drop at a fraction of the budget, an optional EMA of the
weights, and evaluations at intervals that do not count against the budget. Under torchrun each
process takes its own slice of every global batch, so the processes together see the images one
process would see with the global batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import distributed as dist_utils
from ..data.batch import DetectionBatch
from ..loss import SetCriterion
from ..runtime import amp_dtype
from .ema import ModelEMA
from .log import JsonLog
from .optim import build_optimizer
from .train import Stepper, grad_scaler

log = logging.getLogger(__name__)

Stream = Callable[[int, int], DetectionBatch]  # (first sample index, count) -> batch
Evaluate = Callable[[nn.Module], dict[str, Any]]  # the model to score (the EMA when there is one) -> metrics


@dataclass
class StreamSchedule:
    """The optimization of a stream run. The budget is ``minutes`` of training time, or ``steps``."""

    minutes: float | None = None
    steps: int | None = None
    batch_size: int = 8
    lr: float = 2e-4
    lr_backbone: float | None = None  # None: the same as lr (a backbone trained from scratch)
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: float = 0.8  # learning rates x0.1 after this fraction of the budget (1: never)
    warmup_steps: int = 0  # linear warm-up of the learning rates
    ema: float | None = None
    amp: str | None = None  # None/"fp32", "bf16" (or "fp16" on CUDA): the forward's autocast (``amp_dtype``)
    eval_every_minutes: float | None = None  # evaluations during training (the end is always evaluated)
    eval_every_steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the log, not used

    def __post_init__(self) -> None:
        if (self.minutes is None) == (self.steps is None):
            raise ValueError("give exactly one budget: minutes or steps")
        if not 0 < self.lr_drop <= 1:
            raise ValueError(f"lr_drop is a fraction of the budget in (0, 1], got {self.lr_drop}")

    def progress(self, step: int, seconds: float) -> float:
        """How much of the budget is spent, in [0, 1]."""
        if self.steps is not None:
            return min(1.0, step / self.steps)
        assert self.minutes is not None
        return min(1.0, seconds / (60 * self.minutes))


@dataclass
class StreamResult:
    model: nn.Module  # the trained model (unwrapped)
    evaluated: nn.Module  # what the evaluations scored: the EMA when there is one, else the model
    steps: int
    images: int
    train_seconds: float
    evaluations: list[dict[str, Any]]
    last_losses: dict[str, float]


def train_on_stream(
    model: nn.Module, criterion: SetCriterion, stream: Stream, schedule: StreamSchedule, *,
    device: torch.device | str = "cpu", evaluate: Evaluate | None = None, log_file: JsonLog | None = None,
    progress: bool = True,
) -> StreamResult:
    """Train ``model`` on ``stream`` until the budget is spent; evaluate at the intervals and at the end."""
    device = torch.device(device)
    info = dist_utils.current()
    model.to(device).train()
    criterion.to(device).train()
    lr_backbone = schedule.lr if schedule.lr_backbone is None else schedule.lr_backbone
    optimizer = build_optimizer(model, lr=schedule.lr, lr_backbone=lr_backbone, weight_decay=schedule.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    ema = ModelEMA(model, schedule.ema) if schedule.ema else None
    train_model = dist_utils.wrap_for_training(model, device)
    autocast = amp_dtype(schedule.amp, device)
    stepper = Stepper(train_model, criterion, optimizer, device, schedule.clip_max_norm, autocast,
                      grad_scaler(autocast), ema)
    evaluated = ema.module if ema is not None else model
    bar = _ProgressBar(schedule) if progress and info.is_main else None

    evaluations: list[dict[str, Any]] = []
    step, seconds, dropped = 0, 0.0, False
    next_eval_s = 60 * schedule.eval_every_minutes if schedule.eval_every_minutes else None
    running: dict[str, float] = {}
    stats: dict[str, float] = {}
    local = schedule.batch_size // info.world_size
    if local * info.world_size != schedule.batch_size:
        raise ValueError(f"batch size {schedule.batch_size} is not divisible by {info.world_size} processes")
    while schedule.progress(step, seconds) < 1:
        start = time.perf_counter()
        fraction = schedule.progress(step, seconds)
        scale = 0.1 if fraction >= schedule.lr_drop else 1.0
        if scale < 1 and not dropped:
            dropped = True
            log.info("learning rates x0.1 at step %d (%.0f%% of the budget)", step, 100 * fraction)
        warm = min(1.0, (step + 1) / schedule.warmup_steps) if schedule.warmup_steps else 1.0
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * scale * warm
        batch = stream(step * schedule.batch_size + info.rank * local, local)
        stats = stepper.step(batch, f"step {step}")
        step += 1
        # every process must agree on when the budget ends: take rank 0's clock
        seconds += dist_utils.broadcast_float(time.perf_counter() - start)
        for k, v in stats.items():
            running[k] = 0.98 * running.get(k, v) + 0.02 * v  # a smoothed loss for the progress bar
        if log_file is not None and step % 50 == 0:
            log_file.write({"type": "step", "step": step, "images": step * schedule.batch_size,
                            "train_s": round(seconds, 2), "lr": optimizer.param_groups[0]["lr"], **stats})
        if bar is not None:
            bar.update(step, seconds, running.get("loss", stats["loss"]))
        due = (schedule.eval_every_steps and step % schedule.eval_every_steps == 0) or (
            next_eval_s is not None and seconds >= next_eval_s)
        if due and evaluate is not None and schedule.progress(step, seconds) < 1:
            evaluations.append(_evaluate(evaluate, evaluated, step, schedule, seconds, log_file))
            if next_eval_s is not None:
                next_eval_s += 60 * (schedule.eval_every_minutes or 0)
    if bar is not None:
        bar.close()
    if evaluate is not None:
        evaluations.append(_evaluate(evaluate, evaluated, step, schedule, seconds, log_file))
    return StreamResult(model, evaluated, step, step * schedule.batch_size, seconds, evaluations, stats)


def _evaluate(evaluate: Evaluate, model: nn.Module, step: int, schedule: StreamSchedule, seconds: float,
              log_file: JsonLog | None) -> dict[str, Any]:
    start = time.perf_counter()
    metrics = evaluate(model)
    record = {"type": "eval", "step": step, "images": step * schedule.batch_size, "train_s": round(seconds, 1),
              "eval_s": round(time.perf_counter() - start, 1), **metrics}
    if log_file is not None:
        log_file.write(record)
    return record


class _ProgressBar:
    """A tqdm bar over the budget (seconds or steps) with the smoothed loss and the time left."""

    def __init__(self, schedule: StreamSchedule) -> None:
        from tqdm import tqdm

        self.schedule = schedule
        self.by_time = schedule.minutes is not None
        total = round(60 * schedule.minutes) if schedule.minutes is not None else schedule.steps
        unit = "s" if self.by_time else "step"
        self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, desc="train",
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")

    def update(self, step: int, seconds: float, loss: float) -> None:
        done = seconds if self.by_time else step
        left_s = (60 * self.schedule.minutes - seconds if self.by_time
                  else seconds / max(step, 1) * (self.schedule.steps - step))  # type: ignore[operator]
        self.bar.n = min(self.bar.total, round(done))
        rate = step * self.schedule.batch_size / max(seconds, 1e-9)
        self.bar.set_postfix_str(f"loss {loss:.3f}, {rate:.0f} img/s, step {step}, {_clock(left_s)} left")

    def close(self) -> None:
        self.bar.n = self.bar.total
        self.bar.refresh()
        self.bar.close()


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
