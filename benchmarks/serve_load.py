"""Load on `detr serve` over loopback: throughput, latency percentiles, statuses, batch sizes, server RSS.

    python benchmarks/serve_load.py --model demo --compare            # batching on vs --max_batch 1, then overload
    python benchmarks/serve_load.py --model r50 --seconds 60 --clients 8 --max_batch 8
    python benchmarks/serve_load.py --checkpoint runs/mine/checkpoint_best.pth --rate 40 --seconds 120

Starts `python -m detr.cli serve` as a child process on a free 127.0.0.1 port (weights: --checkpoint, or a
random-weight model of --model saved to a temporary file: the work does not depend on the values), waits
for /healthz, warms it up (``--warmup_seconds`` of the closed loop), then either runs ``--clients``
closed-loop clients (each sends its next request when the last one is answered) or, with ``--rate R``,
an open loop offering R requests/s whatever the answers (the overload run). Every run stops by itself
after ``--seconds`` (requests still open then get at most ``--timeout_s`` + 5 s). Prints one JSON line
per run: requests/s of 200s, p50/p95/p99 latency of the 200s, counts by status (and client errors),
mean images per forward from /metrics, the server's RSS after the warm-up and at the end. ``--compare``
runs batching on, batching off (--max_batch 1), then the open loop at 2x the batching-on throughput for
``--overload_seconds``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # --model: preset, image size served (short side, cap), test image (w, h)
    "demo": ("shapes-fast", 128, 256, (128, 128)),
    "r50": ("r50", 800, 1333, (640, 480)),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_image(size: tuple[int, int], seed: int = 0) -> bytes:
    """A noise image with a few flat rectangles (JPEG bytes, as clients usually send)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        pixels[y : y + size[1] // 3, x : x + size[0] // 3] = rng.integers(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


class Server:
    """`detr serve` in a child process."""

    def __init__(self, checkpoint: str, args: argparse.Namespace, max_batch: int, max_queue: int) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "detr.cli", "serve", "--checkpoint", checkpoint, "--port", str(self.port),
                   "--size", str(args.size), "--max_size", str(args.max_size), "--max_batch", str(max_batch),
                   "--batch_wait_ms", str(args.batch_wait_ms), "--max_queue", str(max_queue),
                   "--timeout_s", str(args.timeout_s), "--threshold", "0.5", "--log_level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"detr serve exited with {self.process.returncode}")
            try:
                if self.get("/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("detr serve did not start in 300 s")
            time.sleep(0.2)

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the detect batch-size histogram."""
        text = self.get("/metrics")[1].decode()
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith("detr_batch_size_") and 'kind="detect"' in line}
        return values.get('detr_batch_size_sum{kind="detect"}', 0.0), values.get('detr_batch_size_count{kind="detect"}',
                                                                                   0.0)

    def stop(self) -> int:
        self.process.terminate()  # SIGTERM: drains, then exits 0
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


class Client:
    """One keep-alive connection; reconnects after the server closes it (503s close theirs)."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.connection: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> tuple[int | str, float]:
        start = time.perf_counter()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.connection.request("POST", "/v1/detect", body=body, headers={"Content-Type": "image/jpeg"})
            response = self.connection.getresponse()
            response.read()
            status: int | str = response.status
            if response.getheader("connection", "").lower() == "close":
                self.close()
        except (OSError, http.client.HTTPException) as err:
            status = type(err).__name__
            self.close()
        return status, (time.perf_counter() - start) * 1000

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run_load(server: Server, body: bytes, *, clients: int, seconds: float, rate: float | None,
             timeout: float) -> dict:
    """Closed loop (``rate`` None: each client sends again when answered) or open loop at ``rate`` req/s
    spread over ``clients`` senders (a request is sent at its scheduled time or as soon as a sender is free)."""
    results: list[tuple[int | str, float]] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + seconds
    schedule = iter(range(10**9))

    def sender() -> None:
        client = Client(server.port, timeout)
        while True:
            if rate is not None:
                with lock:
                    due = start + next(schedule) / rate
                if due >= stop_at:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
            elif time.monotonic() >= stop_at:
                break
            outcome = client.post(body)
            with lock:
                results.append(outcome)
        client.close()

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(clients)]
    sum0, count0 = server.batch_stats()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    elapsed = time.monotonic() - start
    sum1, count1 = server.batch_stats()
    ok = [ms for status, ms in results if status == 200]
    statuses = Counter(str(status) for status, _ in results)
    return {
        "requests": len(results), "seconds": round(elapsed, 1), "ok_per_s": round(len(ok) / elapsed, 2),
        "offered_per_s": None if rate is None else round(rate, 2), "sent_per_s": round(len(results) / elapsed, 2),
        "p50_ms": percentile(ok, 50), "p95_ms": percentile(ok, 95), "p99_ms": percentile(ok, 99),
        "mean_ms": round(statistics.fmean(ok), 2) if ok else None, "statuses": dict(sorted(statuses.items())),
        "mean_batch": round((sum1 - sum0) / (count1 - count0), 2) if count1 > count0 else None,
    }


def one_run(checkpoint: str, body: bytes, args: argparse.Namespace, *, max_batch: int, rate: float | None,
            seconds: float, label: str) -> dict:
    max_queue = args.max_queue
    server = Server(checkpoint, args, max_batch, max_queue)
    try:
        # Warm up at full batch size: the first forwards of each batch shape allocate; RSS counts from here.
        run_load(server, body, clients=args.clients, seconds=args.warmup_seconds, rate=None, timeout=args.timeout_s)
        rss_start = rss_mib(server.process.pid)
        result = run_load(server, body, clients=args.clients if rate is None else args.senders, seconds=seconds,
                          rate=rate, timeout=args.timeout_s)
        rss_end = rss_mib(server.process.pid)
    finally:
        exit_code = server.stop()
    return {"run": label, "model": args.model or checkpoint, "max_batch": max_batch,
            "batch_wait_ms": args.batch_wait_ms, "max_queue": max_queue,
            "clients": args.clients if rate is None else args.senders, **result,
            "rss_start_mib": round(rss_start, 1), "rss_end_mib": round(rss_end, 1),
            "rss_growth": round(rss_end / rss_start - 1, 4), "exit_code": exit_code}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint (default: random weights of --model)")
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    p.add_argument("--senders", type=int, default=32, help="open loop: concurrent senders")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=None, help="open loop at this many requests/s")
    p.add_argument("--max_batch", type=int, default=8)
    p.add_argument("--batch_wait_ms", type=float, default=5.0)
    p.add_argument("--max_queue", type=int, default=16)
    p.add_argument("--timeout_s", type=float, default=30.0)
    p.add_argument("--warmup_seconds", type=float, default=5.0, help="closed-loop warm-up before measuring")
    p.add_argument("--compare", action="store_true", help="batching on, off, then overload at 2x")
    p.add_argument("--overload_seconds", type=float, default=120.0)
    args = p.parse_args(argv)
    preset_name, args.size, args.max_size, image_size = MODELS[args.model]
    body = test_image(image_size)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch

            from detr import build_detr, preset
            from detr.checkpoint import save_checkpoint

            torch.manual_seed(0)
            model = build_detr(preset(preset_name)).eval()
            checkpoint = str(save_checkpoint(model, Path(tmp) / f"{args.model}.safetensors"))
        if not args.compare:
            print(json.dumps(one_run(checkpoint, body, args, max_batch=args.max_batch, rate=args.rate,
                                     seconds=args.seconds, label="open" if args.rate else "closed")), flush=True)
            return
        on = one_run(checkpoint, body, args, max_batch=args.max_batch, rate=None, seconds=args.seconds,
                     label="batching")
        print(json.dumps(on), flush=True)
        off = one_run(checkpoint, body, args, max_batch=1, rate=None, seconds=args.seconds, label="one_at_a_time")
        print(json.dumps({**off, "batching_speedup": round(on["ok_per_s"] / off["ok_per_s"], 2)}), flush=True)
        over = one_run(checkpoint, body, args, max_batch=args.max_batch, rate=2 * on["ok_per_s"],
                       seconds=args.overload_seconds, label="overload_2x")
        print(json.dumps(over), flush=True)


if __name__ == "__main__":
    main()
