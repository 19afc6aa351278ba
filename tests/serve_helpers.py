"""A detr serve app in a thread on 127.0.0.1 (a port the OS picks), and a small HTTP client for the tests."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import uvicorn
from PIL import Image

from detr.config import QueryConfig, preset
from detr.inference.predictor import Detector
from detr.model import build_detr
from detr.serve import ServeOptions, create_app

SIZE = {"size": 96, "max_size": 128}


def tiny_model(**queries):
    """A demo-like DETR (small stride-8 CNN) with anchor-box queries, 8 queries, one encoder layer."""
    torch.manual_seed(0)
    config = preset("shapes-fast", num_queries=8).with_transformer(enc_layers=1, dec_layers=2)
    config = config.replace(queries=QueryConfig(**{"anchors": True, "anchor_size": 0.3, **queries}))
    return build_detr(config).eval()


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A noise image with a bright square (PNG bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 240, 20)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


@dataclass
class Running:
    host: str
    port: int
    app: object

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def service(self):
        return self.app.state.service

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 60) -> Reply:
        """One request on its own connection; ``path`` goes out as given (no URL normalization)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """The value of one sample line of /metrics (``name`` with its labels, as Prometheus prints it)."""
        text = self.call("GET", "/metrics", headers=headers).body.decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(f"{name} not in /metrics")


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        time.sleep(0.01)


@contextmanager
def running(detector: Detector, options: ServeOptions | None = None, model_name: str = "tiny") -> Iterator[Running]:
    app = create_app(detector, options or ServeOptions(), model_name=model_name)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), what="server start")
        assert server.started, "the server did not start"
        yield Running("127.0.0.1", sock.getsockname()[1], app)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
