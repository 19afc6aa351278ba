from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "detr_reference.pt"
COCO_MINI = SHARED / "data" / "coco-mini"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it), for a rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def reference() -> dict:
    """The tensors computed by the reference implementation (see ../shared/fixtures/README.md)."""
    if not FIXTURE.exists():
        raise FileNotFoundError(f"reference fixture missing: {FIXTURE} (../shared must sit next to the repo)")
    return torch.load(FIXTURE, weights_only=True)


class FileServer:
    """Serves ``files`` (URL path -> bytes); ``cut`` paths announce more bytes than they send, then close."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if self.path in server.cut:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def count(self, path: str) -> int:
        return self.requests.count(path)


@pytest.fixture
def server():
    s = FileServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


# Named weights would come from the official hosts; in tests they come from 127.0.0.1 or nowhere.
@pytest.fixture(scope="session")
def nowhere() -> Iterator[str]:
    """The URL of a port this session holds without listening: every connection to it is refused, and no
    other program can take the port while the tests run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _no_downloads_from_outside(tmp_path_factory, monkeypatch, nowhere) -> None:
    """Every test (and the processes it starts) gets an empty weights cache and a mirror that refuses
    connections, unless it points DETR_WEIGHTS_MIRROR at its own local server."""
    home = tmp_path_factory.mktemp("weights-home")
    monkeypatch.setenv("DETR_CACHE", str(home / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch-home"))  # no files from a real torch.hub cache
    monkeypatch.setenv("DETR_WEIGHTS_MIRROR", nowhere)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty weights cache (DETR_CACHE) and torch.hub folder for this test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DETR_CACHE", str(folder))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return folder
