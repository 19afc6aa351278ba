"""The HTTP routes (Starlette): detection, panoptic, attention, model info, health, metrics, the explorer.

Every error is JSON ``{"error": message, "status": code}``. Bodies are read with the size limit applied as
they stream in; images are decoded off the event loop; the model runs only in the batching worker.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..inference.predictor import Detector
from .images import Rejected, decode_image
from .inference import AttentionParams, DetectParams, PanopticParams
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .options import ServeOptions
from .worker import BatchWorker, Job, QueueFull

STATIC = Path(__file__).parent / "static"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_LISTED_IMAGES = 2000
# Known routes name the metrics' "route" label; anything else is "other" (no label per unknown URL).
ROUTES = ("/v1/detect", "/v1/panoptic", "/v1/attention", "/v1/model", "/v1/images", "/healthz", "/metrics", "/")
WORK_ROUTES = ("/v1/detect", "/v1/panoptic", "/v1/attention")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


class ServiceState:
    """What the routes and the server share: the worker, the metrics, and the draining flag."""

    def __init__(self, detector: Detector, options: ServeOptions, model_name: str) -> None:
        self.detector, self.options, self.model_name = detector, options, model_name
        self.metrics: Metrics = Metrics(options.max_batch, lambda: self.worker.queue_length())
        self.worker = BatchWorker(detector, max_batch=options.max_batch, batch_wait_ms=options.batch_wait_ms,
                                  max_queue=options.max_queue,
                                  on_batch=lambda kind, n: self.metrics.batch_size.labels(kind).observe(n),
                                  on_expired=self.metrics.expired.inc)
        self.draining = False
        self.in_flight = 0  # requests to the work routes being answered


def route_label(path: str) -> str:
    if path.startswith("/v1/images/"):
        return "/v1/images/{path}"
    if path.startswith("/static/"):
        return "/static"
    return path if path in ROUTES else "other"


class Guard:
    """ASGI middleware: metrics per route and status, the draining 503, the bearer-key check."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, state, start = scope["path"], self.state, time.perf_counter()
        route, status = route_label(path), 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        work = path in WORK_ROUTES
        if work:
            state.in_flight += 1
            state.metrics.in_flight.inc()
        try:
            response = self._refusal(scope, path)
            if response is not None:
                await response(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            if work:
                state.in_flight -= 1
                state.metrics.in_flight.dec()
            state.metrics.observe(route, status, time.perf_counter() - start)

    def _refusal(self, scope: Scope, path: str) -> Response | None:
        if self.state.draining:
            return error(503, "shutting down: try another replica or retry later",
                         {"Retry-After": "1", "Connection": "close"})
        key = self.state.options.api_key
        if key is not None and (path.startswith("/v1/") or path == "/metrics"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            expected = b"Bearer " + key.encode()
            if not hmac.compare_digest(given, expected):  # constant time: no key prefix leaks by timing
                return error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             {"WWW-Authenticate": "Bearer"})
        return None


# --- request parsing ---------------------------------------------------------------------------


def _float(request: Request, name: str, default: float, low: float, high: float) -> float:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise Rejected(400, f"{name}: expected a number, got {text!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise Rejected(400, f"{name}: must be in [{low}, {high}], got {text}")
    return value


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise Rejected(400, f"{name}: expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise Rejected(400, f"{name}: must be in [{low}, {high}], got {value}")
    return value


def _points(request: Request) -> tuple[tuple[float, float], ...] | None:
    """``points=x,y;x,y`` (image pixels)."""
    text = request.query_params.get("points")
    if text is None or text == "":
        return None
    points = []
    for item in text.split(";")[:64]:
        try:
            x, y = (float(v) for v in item.split(","))
        except ValueError:
            raise Rejected(400, f"points: expected x,y;x,y in image pixels, got {item!r}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise Rejected(400, f"points: not finite: {item!r}")
        points.append((x, y))
    return tuple(points)


def _queries(request: Request) -> tuple[int, ...] | None:
    text = request.query_params.get("queries")
    if text is None or text == "":
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise Rejected(400, f"queries: expected comma-separated query indices, got {text!r}") from None


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes, announced or streamed."""
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise Rejected(413, f"body too large: {announced} bytes, over max_image_bytes {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"body too large: over max_image_bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, limit: int) -> bytes:
    """The image from a raw body, or from the multipart field ``image`` (else the first file field)."""
    body = await _body(request, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=4, max_fields=32,
                                     max_part_size=limit).parse()
    except Exception as err:  # python-multipart's and Starlette's parse errors
        raise Rejected(400, f"malformed multipart body: {err}") from err
    try:
        item = form.get("image")
        if not isinstance(item, UploadFile):
            item = next((v for _, v in form.multi_items() if isinstance(v, UploadFile)), None)
        if item is None:
            raise Rejected(400, "multipart body without a file: send the image in a field named 'image'")
        return await item.read()
    finally:
        await form.close()


# --- routes ------------------------------------------------------------------------------------


def create_app(detector: Detector, options: ServeOptions | None = None, *, model_name: str = "detr") -> Starlette:
    """The service around ``detector`` (which the worker thread owns from now on)."""
    options = options or ServeOptions()
    state = ServiceState(detector, options, model_name)

    async def run_job(request: Request, kind: str, params: Any) -> dict:
        start = time.monotonic()
        deadline = start + options.timeout_s
        if state.worker.queue_length() >= options.max_queue:  # refuse before reading and decoding
            raise Rejected(503, f"busy: {options.max_queue} requests already queued", {"Retry-After": "1"})
        data = await _image_bytes(request, options.max_image_bytes)
        image: Image.Image = await run_in_threadpool(decode_image, data, max_pixels=options.max_pixels)
        loop = asyncio.get_running_loop()
        job = Job(kind, image, params, deadline, loop, loop.create_future())
        try:
            state.worker.submit(job)
        except QueueFull:
            raise Rejected(503, f"busy: {options.max_queue} requests already queued", {"Retry-After": "1"}) from None
        try:
            result = await asyncio.wait_for(job.future, max(deadline - time.monotonic(), 0.0))
        except TimeoutError:  # wait_for cancelled the future: the worker drops the job
            raise Rejected(504, f"timed out after {options.timeout_s} s (timeout_s)") from None
        return {**result, "model": model_name, "ms": round((time.monotonic() - start) * 1000, 2)}

    async def detect(request: Request) -> Response:
        params = DetectParams(_float(request, "threshold", options.threshold, 0.0, 1.0),
                              _int(request, "max_detections", options.max_detections, 1, options.max_detections))
        return JSONResponse(await run_job(request, "detect", params))

    async def panoptic(request: Request) -> Response:
        if not detector.is_panoptic:
            raise Rejected(400, f"model {model_name} is not panoptic (no mask head): use /v1/detect")
        params = PanopticParams(_float(request, "threshold", detector.panoptic_threshold, 0.0, 1.0))
        return JSONResponse(await run_job(request, "panoptic", params))

    async def attention(request: Request) -> Response:
        if type(detector.detection_model).__name__ != "DETR" or getattr(detector.detection_model, "deformable", False):
            raise Rejected(400, f"model {model_name} ({type(detector.model).__name__}) has no attention maps"
                           + (" (deformable attention: `detr attention` draws its sampling points)"
                              if getattr(detector.detection_model, "deformable", False) else ""))
        params = AttentionParams(
            threshold=_float(request, "threshold", options.threshold, 0.0, 1.0),
            max_detections=_int(request, "max_detections", 10, 1, options.max_detections),
            points=_points(request), queries=_queries(request),
            heads=request.query_params.get("heads", "0") in ("1", "true", "yes"))
        return JSONResponse(await run_job(request, "attention", params))

    async def model_info(request: Request) -> Response:
        model = detector.detection_model
        config = detector.model.config
        served = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.__dict__.items() if k != "api_key"}
        return JSONResponse({
            "name": model_name, "type": type(detector.model).__name__, "num_classes": detector.num_classes,
            "num_queries": int(getattr(model, "num_queries", config.num_queries)),
            "class_names": {str(k): v for k, v in detector.class_names.items()},
            "panoptic": detector.is_panoptic,
            "attention": type(model).__name__ == "DETR" and not getattr(model, "deformable", False),
            "anchor_queries": bool(getattr(model, "anchor_queries", None) is not None),
            "config": config.to_dict() if hasattr(config, "to_dict") else None,
            "inference": {"device": str(detector.device), "size": detector.size, "max_size": detector.max_size,
                          "input": detector.input.to_dict(), "input_from": detector.input_origin,
                          "precision": detector.precision, "panoptic_threshold": detector.panoptic_threshold},
            "serve": {**served, "api_key": options.api_key is not None},
        })

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queue": state.worker.queue_length()})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    def images_root() -> Path:
        if options.images_dir is None:
            raise Rejected(404, "no image folder: start the server with --images DIR")
        return Path(options.images_dir).resolve()

    async def list_images(request: Request) -> Response:
        root = images_root()
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve().is_relative_to(root))
        return JSONResponse({"images": found[:MAX_LISTED_IMAGES], "truncated": len(found) > MAX_LISTED_IMAGES})

    async def get_image(request: Request) -> Response:
        root = images_root()
        name = request.path_params["path"]
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name:
            raise Rejected(403, f"refused: {name!r} is not a relative path inside the images folder")
        target = (root / name).resolve()
        if not target.is_relative_to(root):  # a symlink out of the folder
            raise Rejected(403, f"refused: {name!r} leads outside the images folder")
        if not target.is_file() or target.suffix.lower() not in IMAGE_SUFFIXES:
            raise Rejected(404, f"no image {name!r} in the images folder")
        return FileResponse(target)

    async def rejected(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Rejected)
        return error(exc.status, exc.message, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        messages = {404: f"no route {path}", 405: f"method {request.method} not allowed on {path}"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    routes = [
        Route("/v1/detect", detect, methods=["POST"]),
        Route("/v1/panoptic", panoptic, methods=["POST"]),
        Route("/v1/attention", attention, methods=["POST"]),
        Route("/v1/model", model_info, methods=["GET"]),
        Route("/v1/images", list_images, methods=["GET"]),
        Route("/v1/images/{path:path}", get_image, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={Rejected: rejected, HTTPException: http_error, Exception: server_error})
    app.state.service = state
    app.add_middleware(Guard, state=state)
    return app
