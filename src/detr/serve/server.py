"""Run the app under uvicorn, with a draining shutdown: on SIGTERM new requests get 503 while the ones in
flight finish (at most ``drain_s``), then the server stops; a second signal stops it at once."""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType

import uvicorn

from ..inference.predictor import Detector
from .app import create_app
from .options import ServeOptions

log = logging.getLogger("detr.serve")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def host_warning(host: str) -> str | None:
    """The warning for a bind address other hosts can reach (None on loopback)."""
    if host in LOOPBACK:
        return None
    return (f"binding {host}: every host that can reach this machine can use the service"
            + ("" if os.environ.get("DETR_API_KEY") else "; consider --api_key (or DETR_API_KEY)")
            + " and a TLS-terminating proxy in front")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_s: float) -> None:
        super().__init__(config)
        self.drain_s = drain_s
        self._drain_until: float | None = None

    @property
    def service(self):
        return self.config.app.state.service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_until is None:
            log.info("SIGTERM: draining (new requests get 503; %d in flight)", self.service.in_flight)
            self.service.draining = True
            self._drain_until = time.monotonic() + self.drain_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and (self.service.in_flight == 0 or time.monotonic() > self._drain_until):
            self.should_exit = True
        return await super().on_tick(counter)


def serve(detector: Detector, options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000,
          model_name: str = "detr", log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (blocking)."""
    warning = host_warning(host)
    if warning:
        log.warning(warning)
    app = create_app(detector, options, model_name=model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(options.drain_s) + 1)
    DrainingServer(config, options.drain_s).run()
