"""The batching worker: one thread owns the model; the event loop only enqueues and awaits.

A request becomes a ``Job`` in a bounded queue. The worker takes the first waiting job, gathers more for up
to ``batch_wait_ms`` or until ``max_batch``, drops those past their deadline, groups the rest by kind and
image size (see ``detr.serve.inference``) and runs each group as one forward, answering each job's future
on its event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..inference.predictor import Detector
from .inference import AttentionParams, DetectParams, PanopticParams, run_attention, run_detect, run_panoptic

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` jobs already."""


@dataclass(eq=False)
class Job:
    kind: str  # "detect" | "panoptic" | "attention"
    image: Image.Image
    params: DetectParams | PanopticParams | AttentionParams
    deadline: float  # time.monotonic() after which the answer is useless
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)

    def group_key(self) -> tuple:
        if self.kind == "attention":
            return ("attention", id(self))  # hooks and per-image maps: one image per forward
        if self.kind == "panoptic":
            return ("panoptic", self.image.size, self.params)
        return ("detect", self.image.size)


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the request timed out (504) or its client left
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BatchWorker:
    """Runs ``detector`` on jobs from a queue of at most ``max_queue``, ``max_batch`` images at a time.

    ``on_batch(kind, size)`` is called for every forward (the metrics); ``on_expired()`` for every job
    dropped because its deadline passed while it waited."""

    def __init__(self, detector: Detector, *, max_batch: int, batch_wait_ms: float, max_queue: int,
                 on_batch: Callable[[str, int], None] | None = None,
                 on_expired: Callable[[], None] | None = None) -> None:
        self.detector = detector
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch or (lambda kind, size: None)
        self._on_expired = on_expired or (lambda: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="detr-serve-worker", daemon=True)
        self.busy = False  # a batch is running

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def queue_length(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        """Enqueue without waiting; raises ``QueueFull``."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    # --- the thread ------------------------------------------------------------------------------

    def _gather(self) -> list[Job]:
        try:
            jobs = [self._queue.get(timeout=0.05)]
        except queue.Empty:
            return []
        until = time.monotonic() + self.batch_wait
        while len(jobs) < self.max_batch:
            remaining = until - time.monotonic()
            try:
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            jobs = self._gather()
            if not jobs:
                continue
            self.busy = True
            try:
                self._process(jobs)
            finally:
                self.busy = False

    def _process(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in jobs:
            if job.future.done() or now > job.deadline:  # answered 504 already: drop the work
                self._on_expired()
                continue
            live.append(job)
        groups: dict[tuple, list[Job]] = {}
        for job in live:
            groups.setdefault(job.group_key(), []).append(job)
        for group in groups.values():
            kind = group[0].kind
            try:
                if kind == "detect":
                    results = run_detect(self.detector, [j.image for j in group], [j.params for j in group])
                elif kind == "panoptic":
                    results = run_panoptic(self.detector, [j.image for j in group], group[0].params)
                else:
                    results = [run_attention(self.detector, group[0].image, group[0].params)]
            except Exception as err:  # a model error answers these requests 500; the worker goes on
                log.exception("%s batch of %d failed", kind, len(group))
                for job in group:
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, err)
                continue
            self._on_batch(kind, len(group))
            for job, result in zip(group, results, strict=True):
                job.loop.call_soon_threadsafe(_resolve, job.future, result)
