"""`detr serve` through real HTTP on 127.0.0.1: every route, limit and error, batching, backpressure,
deadlines, the API key, the image folder's confinement and the draining shutdown on SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, free_port
from detr.checkpoint import save_checkpoint
from detr.cli import build_parser
from detr.coco_panoptic import rgb_to_segment_ids
from detr.config import preset
from detr.inference.predictor import Detector
from detr.model import build_detr
from detr.preprocessing import InputConfig
from detr.serve import ServeOptions
from detr.serve.server import host_warning
from serve_helpers import SIZE, png, running, tiny_model, wait_for

IMAGE = png(120, 90)
OTHER = png(100, 130, seed=1)  # another size (another input shape)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def single(model) -> Detector:
    """The one-image reference: the Python API, one image per forward."""
    return Detector(model, threshold=0.0, **SIZE)


@pytest.fixture(scope="module")
def server(model):
    options = ServeOptions(max_batch=4, batch_wait_ms=2, threshold=0.0, max_image_bytes=200_000, max_pixels=100_000)
    with running(Detector(model, threshold=0.0, batch_size=4, **SIZE), options) as s:
        yield s


def as_pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def expected_json(detector: Detector, data: bytes, threshold: float, top: int) -> list[dict]:
    found = [d for d in detector(as_pil(data), threshold=threshold)][:top]
    return [{"box_xyxy": list(d.box), "box_xywh": list(d.box_xywh), "label": d.label, "name": d.name,
             "score": d.score} for d in found]


def multipart(data: bytes, field: str = "image") -> tuple[bytes, dict[str, str]]:
    boundary = "detr-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# --- the routes -----------------------------------------------------------------------------------


def test_detect_raw_and_multipart_match_the_python_api(server, single):
    raw = server.call("POST", "/v1/detect?threshold=0.1&max_detections=5", IMAGE)
    assert raw.status == 200 and raw.headers["content-type"] == "application/json"
    body = raw.json
    assert body["image"] == {"width": 120, "height": 90} and body["model"] == "tiny"
    assert body["ms"] > 0 and body["model_ms"] > 0
    expected = expected_json(single, IMAGE, 0.1, 5)
    assert len(expected) == 5  # the random model scores every query above 0.1
    assert body["detections"] == expected
    first = body["detections"][0]
    x0, y0, x1, y1 = first["box_xyxy"]
    assert first["box_xywh"] == [x0, y0, x1 - x0, y1 - y0]
    form, headers = multipart(IMAGE)
    from_form = server.call("POST", "/v1/detect?threshold=0.1&max_detections=5", form, headers)
    assert from_form.json["detections"] == expected
    # Defaults: the server's threshold (0 here) and max_detections (100): every query.
    assert len(server.call("POST", "/v1/detect", IMAGE).json["detections"]) == 8
    high = sorted(d["score"] for d in expected)[2]  # keeps exactly the two above it
    assert server.call("POST", f"/v1/detect?threshold={high}", IMAGE).json["detections"] == expected[:2]


def test_attention_matches_the_python_api(server, single, model):
    reply = server.call("POST", "/v1/attention?threshold=0&max_detections=3&points=5,5;110,80&heads=1", OTHER)
    assert reply.status == 200
    body = reply.json
    maps = single.attention(as_pil(OTHER), top_k=3, threshold=0.0, points=[(5.0, 5.0), (110.0, 80.0)])
    h, w = maps.feature_size
    assert body["feature_size"] == {"height": h, "width": w} and body["stride"] == 8
    assert body["input_size"] == {"height": maps.input_size[0], "width": maps.input_size[1]} == {"height": 124,
                                                                                                    "width": 96}
    assert [d["query"] for d in body["detections"]] == maps.query_indices
    assert [d["score"] for d in body["detections"]] == [d.score for d in maps.detections]
    decoder = torch.tensor(body["decoder"])
    assert decoder.shape == (3, h, w) and torch.allclose(decoder, maps.decoder, atol=1e-5)
    encoder = torch.tensor(body["encoder"])
    assert body["points"] == [[5.0, 5.0], [110.0, 80.0]] and torch.allclose(encoder, maps.encoder, atol=1e-5)
    heads = torch.tensor(body["decoder_heads"])  # [k, heads, h, w]: their mean is the averaged map
    assert heads.shape == (3, 8, h, w) and torch.allclose(heads.mean(1), maps.decoder, atol=1e-5)
    assert not torch.allclose(heads[:, 0], heads[:, 1], atol=1e-3)
    # Reference boxes of anchor queries: the learned anchors, in the image's pixels.
    anchors = model.anchor_queries.anchors.detach().sigmoid()[maps.query_indices]  # [k, 4] cxcywh
    xyxy = torch.cat([anchors[:, :2] - anchors[:, 2:] / 2, anchors[:, :2] + anchors[:, 2:] / 2], 1)
    assert torch.allclose(torch.tensor(body["reference_boxes"]), xyxy * torch.tensor([100, 130, 100, 130]), atol=1e-3)
    # queries= keeps only those; without points the encoder maps sit at the detections' centres.
    picked = server.call("POST", f"/v1/attention?threshold=0&max_detections=8&queries={maps.query_indices[1]}",
                         OTHER).json
    assert [d["query"] for d in picked["detections"]] == [maps.query_indices[1]]
    assert torch.allclose(torch.tensor(picked["decoder"][0]), maps.decoder[1], atol=1e-5)
    assert picked["decoder_heads"] is None


def test_model_health_and_metrics(server):
    info = server.call("GET", "/v1/model").json
    assert info["name"] == "tiny" and info["type"] == "DETR" and info["num_classes"] == 4
    assert info["num_queries"] == 8 and info["panoptic"] is False and info["anchor_queries"] is True
    assert info["config"]["transformer"]["nheads"] == 8 and info["inference"]["size"] == 96
    assert info["serve"]["max_batch"] == 4 and info["serve"]["api_key"] is False
    assert server.call("GET", "/healthz").json == {"status": "ok", "queue": 0}
    before = server.metric('detr_requests_total{route="/v1/detect",status="200"}')
    assert server.call("POST", "/v1/detect", IMAGE).status == 200
    assert server.call("POST", "/v1/detect", b"not an image").status == 400
    text = server.call("GET", "/metrics").body.decode()
    assert server.metric('detr_requests_total{route="/v1/detect",status="200"}') == before + 1
    assert 'detr_requests_total{route="/v1/detect",status="400"}' in text
    assert 'detr_request_seconds_bucket{le="+Inf",route="/v1/detect"}' in text
    assert "detr_queue_length 0.0" in text and 'detr_batch_size_count{kind="detect"}' in text
    assert server.call("GET", "/").body.startswith(b"<!doctype html>")
    assert server.call("GET", "/static/explorer.js").status == 200


def test_bad_requests_get_json_errors_and_the_service_goes_on(server):
    truncated = IMAGE[: len(IMAGE) // 2]
    cases = [
        ("POST", "/v1/detect", b"", {}, 400, "empty body"),
        ("POST", "/v1/detect", b"GIF89a but not really", {}, 400, "not an image"),
        ("POST", "/v1/detect", truncated, {}, 400, "truncated"),
        ("POST", "/v1/detect", b"x" * 200_001, {}, 413, "max_image_bytes"),
        ("POST", "/v1/detect", bomb(1000, 1000), {}, 413, "1000x1000 = 1000000 pixels, over max_pixels 100000"),
        ("POST", "/v1/detect", bomb(20_000, 20_000), {}, 413, "nothing decoded"),  # past Pillow's own limit too
        ("POST", "/v1/detect?threshold=high", IMAGE, {}, 400, "threshold"),
        ("POST", "/v1/detect?threshold=1.5", IMAGE, {}, 400, "threshold"),
        ("POST", "/v1/detect?max_detections=0", IMAGE, {}, 400, "max_detections"),
        ("POST", "/v1/attention?points=1;2", IMAGE, {}, 400, "points"),
        ("POST", "/v1/attention?queries=a", IMAGE, {}, 400, "queries"),
        ("POST", "/v1/detect", *multipart(IMAGE, field="other")[0:1], {"Content-Type": "multipart/form-data"},
         400, "multipart"),
        ("POST", "/v1/panoptic", IMAGE, {}, 400, "not panoptic"),
        ("GET", "/v1/detect", None, {}, 405, "method GET not allowed"),
        ("DELETE", "/v1/model", None, {}, 405, "not allowed"),
        ("GET", "/v2/detect", None, {}, 404, "no route"),
        ("GET", "/v1/images", None, {}, 404, "--images"),
    ]
    for method, path, body, headers, status, words in cases:
        reply = server.call(method, path, body, headers)
        assert reply.status == status, (path, words, reply.body)
        assert reply.json["status"] == status and words in reply.json["error"], (words, reply.json)
    # A streamed body with no length announced (http.client sends an iterable chunked) is cut at the limit too.
    def chunks():
        for _ in range(30):
            yield b"y" * 10_000
    reply = server.call("POST", "/v1/detect", chunks())
    assert reply.status == 413 and "max_image_bytes" in reply.json["error"]
    assert server.call("POST", "/v1/detect?max_detections=2", IMAGE).status == 200
    assert len(server.call("POST", "/v1/detect?max_detections=2", IMAGE).json["detections"]) == 2


def bomb(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height but whose data is garbage: decoding it would fail with a
    400, so a 413 proves the header alone was read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def test_the_bomb_is_a_real_png_header():
    with Image.open(io.BytesIO(bomb(300, 200))) as image:  # small: Pillow opens it, decoding fails
        assert image.size == (300, 200)
        with pytest.raises((OSError, SyntaxError, zlib.error)):
            image.load()


# --- batching, backpressure, deadlines -------------------------------------------------------------


def test_concurrent_requests_are_batched_by_size_with_one_image_results(model, single):
    # The worker waits (up to 5 s) until 4 requests are queued: 2 of each size -> two forwards of 2 images.
    options = ServeOptions(max_batch=4, batch_wait_ms=5000, threshold=0.0)
    with running(Detector(model, threshold=0.0, batch_size=4, **SIZE), options) as s:
        images = [IMAGE, OTHER, IMAGE, OTHER]
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda data: s.call("POST", "/v1/detect", data), images))
        assert [r.status for r in replies] == [200] * 4
        assert [r.json["batch_size"] for r in replies] == [2] * 4
        assert s.metric('detr_batch_size_count{kind="detect"}') == 2
        assert s.metric('detr_batch_size_sum{kind="detect"}') == 4
        for data, reply in zip(images, replies, strict=True):
            expected = expected_json(single, data, 0.0, 100)
            got = reply.json["detections"]
            assert [d["label"] for d in got] == [d["label"] for d in expected]
            assert np.allclose([d["score"] for d in got], [d["score"] for d in expected], rtol=1e-5, atol=1e-6)
            assert np.allclose([d["box_xyxy"] for d in got], [d["box_xyxy"] for d in expected], rtol=1e-5, atol=1e-3)


class GatedDetector(Detector):
    """Blocks in ``detect`` until ``gate`` is set: a model that is busy exactly as long as the test wants."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def detect(self, images, *, threshold=None):
        self.entered.set()
        assert self.gate.wait(30)
        return super().detect(images, threshold=threshold)


def test_full_queue_answers_503_and_deadline_504(model):
    detector = GatedDetector(model, threshold=0.0, **SIZE)
    options = ServeOptions(max_batch=1, batch_wait_ms=0, max_queue=1, timeout_s=1.0, threshold=0.0)
    with running(detector, options) as s:
        worker = s.service.worker
        replies = {}
        first = threading.Thread(target=lambda: replies.__setitem__("a", s.call("POST", "/v1/detect", IMAGE)))
        first.start()
        assert detector.entered.wait(30)  # A is in the model (the worker is busy)
        second = threading.Thread(target=lambda: replies.__setitem__("b", s.call("POST", "/v1/detect", IMAGE)))
        second.start()
        wait_for(lambda: worker.queue_length() == 1, what="B queued")
        busy = s.call("POST", "/v1/detect", IMAGE)  # C: the queue (1) is full
        assert busy.status == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json["error"]
        first.join(30)
        second.join(30)
        for name in "ab":  # both past their 1 s deadline
            assert replies[name].status == 504 and "timeout_s" in replies[name].json["error"], replies[name].body
        detector.gate.set()
        wait_for(lambda: not worker.busy and worker.queue_length() == 0, what="worker idle")
        assert s.metric("detr_expired_jobs_total") == 1  # B was dropped, not run
        assert s.metric('detr_batch_size_count{kind="detect"}') == 1  # only A ran
        assert s.call("POST", "/v1/detect", IMAGE).status == 200
        assert s.metric('detr_requests_total{route="/v1/detect",status="503"}') == 1
        assert s.metric('detr_requests_total{route="/v1/detect",status="504"}') == 2


# --- access -----------------------------------------------------------------------------------------


def test_api_key(model):
    options = ServeOptions(api_key="s3cret", threshold=0.0)
    with running(Detector(model, threshold=0.0, **SIZE), options) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Bearer s3cret2"}):
            reply = s.call("POST", "/v1/detect", IMAGE, headers)
            assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
            assert "API key" in reply.json["error"]
        assert s.call("GET", "/metrics").status == 401 and s.call("GET", "/v1/model").status == 401
        good = {"Authorization": "Bearer s3cret"}
        assert s.call("POST", "/v1/detect", IMAGE, good).status == 200
        assert s.call("GET", "/v1/model", headers=good).json["serve"]["api_key"] is True  # never the key itself
        assert b"s3cret" not in s.call("GET", "/v1/model", headers=good).body
        assert s.call("GET", "/healthz").status == 200 and s.call("GET", "/").status == 200  # open: probes, the page


def test_images_folder_is_confined(model, tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(IMAGE)
    (root / "sub" / "b.png").write_bytes(OTHER)
    (root / "notes.txt").write_text("not an image")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    options = ServeOptions(images_dir=root, threshold=0.0)
    with running(Detector(model, threshold=0.0, **SIZE), options) as s:
        assert s.call("GET", "/v1/images").json == {"images": ["a.png", "sub/b.png"], "truncated": False}
        assert s.call("GET", "/v1/images/a.png").body == IMAGE
        assert s.call("GET", "/v1/images/sub/b.png").body == OTHER
        refused = ["/v1/images/../secret.png", "/v1/images/sub/../../secret.png", "/v1/images/%2e%2e/secret.png",
                   "/v1/images/..%2fsecret.png", "/v1/images//etc/passwd", "/v1/images/%2Fetc%2Fpasswd",
                   f"/v1/images/{tmp_path}/secret.png", "/v1/images/link.png", "/v1/images/..\\secret.png"]
        for path in refused:
            reply = s.call("GET", path)
            assert reply.status in (403, 404), (path, reply.status)
            assert b"secret" not in reply.body.replace(b"secret.png", b"") and reply.json["status"] == reply.status
        assert s.call("GET", "/v1/images/../secret.png").status == 403
        assert s.call("GET", "/v1/images/link.png").status == 403
        assert s.call("GET", "/v1/images/notes.txt").status == 404
        assert s.call("GET", "/v1/images/missing.png").status == 404


def test_host_warning():
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "0.0.0.0" in host_warning("0.0.0.0") and "api_key" in host_warning("0.0.0.0")


# --- panoptic ---------------------------------------------------------------------------------------


def test_panoptic_route():
    torch.manual_seed(0)
    config = preset("shapes-small", masks=True, num_queries=6).with_transformer(enc_layers=1, dec_layers=1)
    model = build_detr(config).eval()
    detector = Detector(model, threshold=0.0, panoptic_threshold=0.0, **SIZE)
    with running(Detector(model, threshold=0.0, panoptic_threshold=0.0, **SIZE), ServeOptions(threshold=0.0)) as s:
        info = s.call("GET", "/v1/model").json
        assert info["panoptic"] is True and info["type"] == "DETRsegm"
        body = s.call("POST", "/v1/panoptic?threshold=0", IMAGE).json
        expected = detector.panoptic(as_pil(IMAGE), threshold=0.0)
        assert len(body["segments"]) == len(expected.segments) > 0
        assert body["segments"] == json.loads(json.dumps(expected.segments))
        ids = rgb_to_segment_ids(torch.from_numpy(np.asarray(Image.open(io.BytesIO(
            base64.b64decode(body["segment_ids_png"]))).convert("RGB")).copy()))
        assert torch.equal(ids, expected.segment_ids.to(ids.dtype))
        assert s.call("POST", "/v1/attention", IMAGE).status == 200  # its inner DETR has attention maps too


# --- the command: flags, SIGTERM ---------------------------------------------------------------------


def test_serve_flags_parse():
    args = build_parser().parse_args(["serve", "--checkpoint", "m.safetensors", "--max_batch", "1", "--batch_wait_ms",
                                      "0", "--max_queue", "3", "--timeout_s", "2.5", "--api_key", "k", "--images",
                                      "pics", "--max_pixels", "1000", "--max_image_bytes", "10", "--port", "0"])
    assert (args.max_batch, args.batch_wait_ms, args.max_queue, args.timeout_s) == (1, 0.0, 3, 2.5)
    assert (args.api_key, args.images, args.max_pixels, args.max_image_bytes, args.host) == ("k", "pics", 1000, 10,
                                                                                             "127.0.0.1")


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(model, tmp_path):
    # The checkpoint records its input size; the command (no --size) serves at it.
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors", input=InputConfig(96, 128))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DETR_API_KEY": "k3y"}
    # A batch waits 3 s for company: the first request stays in flight while the test sends SIGTERM.
    command = [sys.executable, "-m", "detr.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
               "--max_batch", "2", "--batch_wait_ms", "3000", "--threshold", "0",
               "--log_level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        from serve_helpers import Running

        s = Running("127.0.0.1", port, None)
        key = {"Authorization": "Bearer k3y"}

        def up() -> bool:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                return s.call("GET", "/healthz", timeout=2).status == 200
            except OSError:
                return False

        wait_for(up, timeout=120, what="detr serve up")
        assert s.call("POST", "/v1/detect", IMAGE).status == 401  # DETR_API_KEY reached the server
        served = s.call("GET", "/v1/model", headers={"Authorization": "Bearer k3y"}).json["inference"]
        assert (served["size"], served["max_size"], served["input_from"]) == (96, 128, "the checkpoint")
        replies = {}
        slow = threading.Thread(target=lambda: replies.__setitem__("slow", s.call("POST", "/v1/detect", IMAGE, key)))
        slow.start()
        wait_for(lambda: s.metric("detr_in_flight_requests", key) == 1, what="request in flight")
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: s.call("GET", "/healthz").status == 503, timeout=10, what="draining")
        late = s.call("POST", "/v1/detect", IMAGE, key)
        assert late.status == 503 and "shutting down" in late.json["error"] and late.headers["retry-after"] == "1"
        slow.join(30)
        assert replies["slow"].status == 200 and len(replies["slow"].json["detections"]) == 8
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
