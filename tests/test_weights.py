"""Weights by name and URL: a real HTTP server on 127.0.0.1 serves small files; nothing else is reached.

Downloads: a good file arrives once (the second call makes no request), a file whose sha256 does not
match its name is refused, a connection cut mid-file, an HTTP error and an unreachable host leave
nothing in the cache; names go through DETR_WEIGHTS_MIRROR, the cache through DETR_CACHE.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

import detr
from conftest import COCO_MINI
from detr.checkpoint import DETR_HOST, TORCHVISION_HOST, DownloadError, WeightsEntry, load_checkpoint, resolve
from detr.checkpoint import downloads as weights
from detr.cli import main


def sha_prefix(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def register(monkeypatch, name: str, file_name: str, kind: str = "detr", host: str = DETR_HOST) -> WeightsEntry:
    folder = "detr" if host == DETR_HOST else "models"
    e = WeightsEntry(name, f"{host}/{folder}/{file_name}", kind, "resnet50")
    monkeypatch.setitem(weights.NAMES, name, e)
    return e


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def reference_file_bytes(reference) -> bytes:
    entry = reference["detection"]
    return torch_bytes({"model": entry["state_dict"], "args": argparse.Namespace(**entry["config"])})


# --- the names table ----------------------------------------------------------------------------

def test_names_table_holds_the_released_files():
    detr_files = {e.name: e.file_name for e in weights.NAMES.values() if e.kind != "backbone"}
    assert detr_files == {
        "detr-r50": "detr-r50-e632da11.pth", "detr-r50-dc5": "detr-r50-dc5-f0fb7ef5.pth",
        "detr-r101": "detr-r101-2c7b67e5.pth", "detr-r101-dc5": "detr-r101-dc5-a2e86def.pth",
        "detr-r50-panoptic": "detr-r50-panoptic-00ce5173.pth",
        "detr-r50-dc5-panoptic": "detr-r50-dc5-panoptic-da08f1b1.pth",
        "detr-r101-panoptic": "detr-r101-panoptic-40021d53.pth", "detr-demo": "detr_demo-da2a99e9.pth",
    }
    backbones = {e.name: e.url for e in weights.NAMES.values() if e.kind == "backbone"}
    assert backbones == {
        "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
        "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    }
    for e in weights.NAMES.values():
        assert e.url.startswith((DETR_HOST + "/detr/", TORCHVISION_HOST + "/models/"))
        assert len(e.hash_prefix) == 8 and e.file_name.split(".")[0].endswith(e.hash_prefix)
    assert weights.entry("detr-r50-e632da11.pth") is weights.NAMES["detr-r50"]
    assert weights.hash_prefix_of("checkpoint.pth") is None
    assert weights.hash_prefix_of("model-1a2b3c4d.pth.tar") == "1a2b3c4d"


def test_mirror_replaces_the_host_and_keeps_the_path(monkeypatch):
    monkeypatch.delenv("DETR_WEIGHTS_MIRROR")
    assert weights.source_url(weights.NAMES["detr-r50"]) == weights.NAMES["detr-r50"].url
    monkeypatch.setenv("DETR_WEIGHTS_MIRROR", "http://mirror.example/weights/")
    assert weights.source_url(weights.NAMES["detr-r50"]) == "http://mirror.example/weights/detr/detr-r50-e632da11.pth"
    assert weights.source_url(weights.NAMES["resnet50"]) == "http://mirror.example/weights/models/resnet50-0676ba61.pth"


# --- downloads ----------------------------------------------------------------------------------

def test_good_file_downloads_once_then_comes_from_the_cache(server, cache, monkeypatch):
    data = b"weights " * 50_000  # 400 kB: several reads
    name = f"tiny-{sha_prefix(data)}.pth"
    register(monkeypatch, "tiny", name)
    server.files[f"/detr/{name}"] = data
    monkeypatch.setenv("DETR_WEIGHTS_MIRROR", server.base)
    first = resolve("tiny", progress=False)
    assert first == cache / name and first.read_bytes() == data
    assert server.count(f"/detr/{name}") == 1
    assert cache_files(cache) == [name]  # no temporary file left beside it
    second = resolve("tiny", progress=False)
    assert second == first and server.count(f"/detr/{name}") == 1  # no second request


def test_file_whose_hash_does_not_match_its_name_is_refused(server, cache, monkeypatch):
    data = b"the real file"
    name = f"tampered-{sha_prefix(b'another file')}.pth"
    server.files[f"/x/{name}"] = data
    url = f"{server.base}/x/{name}"
    with pytest.raises(DownloadError) as err:
        resolve(url, progress=False)
    message = str(err.value)
    assert url in message and hashlib.sha256(data).hexdigest() in message and sha_prefix(b"another file") in message
    assert "place the file by hand" in message and str(cache / name) in message
    assert cache_files(cache) == []


def test_connection_cut_mid_file_leaves_nothing_cached(server, cache, monkeypatch):
    data = bytes(range(256)) * 4000
    name = f"cut-{sha_prefix(data)}.pth"
    register(monkeypatch, "cut", name)
    server.files[f"/detr/{name}"] = data
    server.cut.add(f"/detr/{name}")
    monkeypatch.setenv("DETR_WEIGHTS_MIRROR", server.base)
    with pytest.raises(DownloadError, match=rf"closed after \d+ of {len(data)} bytes") as err:
        resolve("cut", progress=False)
    assert f"{server.base}/detr/{name}" in str(err.value)
    assert cache_files(cache) == []


def test_http_error_and_unreachable_host_are_clear_errors(server, cache, nowhere):
    with pytest.raises(DownloadError, match=r"HTTP 404.*place the file by hand"):
        resolve(f"{server.base}/missing-0123abcd.pth", progress=False)
    url = f"{nowhere}/detr-r50-e632da11.pth"  # connection refused, as offline
    with pytest.raises(DownloadError, match=r"offline, or the host cannot be reached") as err:
        resolve(url, progress=False)
    assert url in str(err.value)
    assert cache_files(cache) == []
    assert main(["predict", "--checkpoint", url, "--no_progress", "x.jpg"]) == 1  # a message, not a traceback


def test_url_without_hash_is_fetched_and_local_paths_are_untouched(server, cache, tmp_path):
    server.files["/plain/model.bin"] = b"abc"
    assert resolve(f"{server.base}/plain/model.bin", progress=False).read_bytes() == b"abc"
    local = tmp_path / "detr-r50"  # a local file wins over the name of the same spelling
    local.write_bytes(b"mine")
    assert resolve(local) == local and resolve(str(local)) == local
    assert resolve(tmp_path / "absent.pth") == tmp_path / "absent.pth"
    assert server.requests == ["/plain/model.bin"]


# --- names and URLs wherever a path works -------------------------------------------------------

def test_checkpoint_by_name_and_by_url_everywhere(server, cache, monkeypatch, reference, reference_file_bytes,
                                                  tmp_path, capsys):
    name = f"small-detr-{sha_prefix(reference_file_bytes)}.pth"
    register(monkeypatch, "small-detr", name)
    server.files[f"/detr/{name}"] = reference_file_bytes
    monkeypatch.setenv("DETR_WEIGHTS_MIRROR", server.base)
    by_name = load_checkpoint("small-detr")
    assert server.count(f"/detr/{name}") == 1
    local = tmp_path / "local.pth"
    local.write_bytes(reference_file_bytes)
    expected = load_checkpoint(local)
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), expected.state_dict().values(),
                                                 strict=True))
    # a URL where a path goes: the Python API and `detr predict --checkpoint URL`
    server.files[f"/elsewhere/{name}"] = reference_file_bytes
    url = f"{server.base}/elsewhere/{name}"
    detector = detr.Detector.from_checkpoint(url, threshold=0.0, size=64, max_size=96)
    assert detector.num_classes == expected.config.num_classes
    assert server.count(f"/elsewhere/{name}") == 0  # same file name: the cached copy is used
    image = next(iter(sorted((COCO_MINI / "val2017").glob("*.jpg"))))
    capsys.readouterr()
    code = main(["predict", "--checkpoint", "small-detr", str(image), "--out", str(tmp_path / "pred"), "--size", "64",
                 "--max_size", "96", "--threshold", "0.0", "--no_draw", "--no_progress"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(rows) == expected.config.num_queries
    assert server.count(f"/detr/{name}") == 1


def test_hub_factory_weights_coco_downloads_the_released_model(server, cache, monkeypatch, reference_file_bytes):
    name = f"detr-r50-{sha_prefix(reference_file_bytes)}.pth"  # stands in for detr-r50-e632da11.pth
    register(monkeypatch, "detr-r50", name)
    server.files[f"/detr/{name}"] = reference_file_bytes
    monkeypatch.setenv("DETR_WEIGHTS_MIRROR", server.base)
    model = detr.detr_resnet50(weights="coco")
    assert server.requests == [f"/detr/{name}"]
    assert model.config.backbone.name == "resnet50" and not model.training
    assert detr.detr_resnet50(weights="detr-r50").config == model.config
    assert len(server.requests) == 1


def test_unknown_name_says_what_names_exist(cache):
    with pytest.raises(FileNotFoundError, match=r"detr-r5O is neither a file nor a known name .*detr-r50"):
        load_checkpoint("detr-r5O")
