"""Weights by name: the released files, a cache folder, verified downloads (``detr.checkpoint.downloads``).

One home for what the field's tools do with ``torch.hub.load_state_dict_from_url``: a name (or a URL)
resolves to a local file in a cache folder, downloaded on first use with a progress bar, verified
against the sha256 prefix in the released file name, written to a temporary file and renamed only
once complete and verified. Local paths are returned untouched.

    path = resolve("detr-r50")          # ~/.cache/detr/detr-r50-e632da11.pth (downloaded once)
    path = resolve("resnet50")          # torchvision's ImageNet ResNet-50 (IMAGENET1K_V1)
    path = resolve("https://host/x/model-1a2b3c4d.pth")   # any URL; "-<hex>" names are checked
    path = locate("detr-r50")           # the same, and a clear error for a name that is neither

Environment:
    DETR_CACHE            the cache folder (default ``$XDG_CACHE_HOME/detr`` or ``~/.cache/detr``)
    DETR_WEIGHTS_MIRROR   a base URL that replaces the official host of every named file, keeping
                          the path: ``$MIRROR/detr/detr-r50-e632da11.pth``, ``$MIRROR/models/resnet50-
                          0676ba61.pth`` (``file:///srv/weights`` works too)
    DETR_DOWNLOAD_TIMEOUT seconds without data before a download gives up (default 60)

Files already in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, where ``torch.hub`` and
torchvision keep them) are used in place.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "NAMES",
    "DownloadError",
    "WeightsEntry",
    "cache_dir",
    "download",
    "entry",
    "hash_prefix_of",
    "imagenet_name",
    "is_url",
    "locate",
    "resolve",
]

DETR_HOST = "https://dl.fbaipublicfiles.com"
TORCHVISION_HOST = "https://download.pytorch.org"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed or did not verify; nothing was left in the cache."""


@dataclass(frozen=True)
class WeightsEntry:
    """A released weights file. ``size_mb``: as published (MB for DETR's table, MiB for torchvision's)."""

    name: str
    url: str
    kind: str  # "detr", "panoptic", "demo" (DETR models) or "backbone" (ImageNet ResNet)
    backbone: str  # resnet18 / resnet34 / resnet50 / resnet101
    dilation: bool = False
    box_ap: float | None = None  # COCO val5k, as published
    pq: float | None = None  # COCO panoptic val5k, as published
    size_mb: float | None = None
    note: str = ""

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        prefix = hash_prefix_of(self.file_name)
        assert prefix is not None, self.url
        return prefix


def _detr(name: str, file: str, kind: str, backbone: str, **kw) -> WeightsEntry:
    return WeightsEntry(name, f"{DETR_HOST}/detr/{file}", kind, backbone, **kw)


def _resnet(depth: int, file: str, size_mb: float) -> WeightsEntry:
    return WeightsEntry(
        f"resnet{depth}", f"{TORCHVISION_HOST}/models/{file}", "backbone", f"resnet{depth}", size_mb=size_mb,
        note="torchvision IMAGENET1K_V1",
    )


# The reference README's model zoo, its notebook's demo model, and torchvision's ImageNet ResNets
# (IMAGENET1K_V1: the weights DETR was trained from; torchvision re-saved them in 2020 under these
# names, the older resnet50-19c8e357.pth holds the same weights in the legacy format).
NAMES: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        _detr("detr-r50", "detr-r50-e632da11.pth", "detr", "resnet50", box_ap=42.0, size_mb=159),
        _detr("detr-r50-dc5", "detr-r50-dc5-f0fb7ef5.pth", "detr", "resnet50", dilation=True, box_ap=43.3,
              size_mb=159),
        _detr("detr-r101", "detr-r101-2c7b67e5.pth", "detr", "resnet101", box_ap=43.5, size_mb=232),
        _detr("detr-r101-dc5", "detr-r101-dc5-a2e86def.pth", "detr", "resnet101", dilation=True, box_ap=44.9,
              size_mb=232),
        _detr("detr-r50-panoptic", "detr-r50-panoptic-00ce5173.pth", "panoptic", "resnet50", box_ap=38.8, pq=43.4,
              size_mb=165),
        _detr("detr-r50-dc5-panoptic", "detr-r50-dc5-panoptic-da08f1b1.pth", "panoptic", "resnet50", dilation=True,
              box_ap=40.2, pq=44.6, size_mb=165),
        _detr("detr-r101-panoptic", "detr-r101-panoptic-40021d53.pth", "panoptic", "resnet101", box_ap=40.1,
              pq=45.1, size_mb=237),
        _detr("detr-demo", "detr_demo-da2a99e9.pth", "demo", "resnet50",
              note="the notebook's DETRdemo (half precision)"),
        _resnet(18, "resnet18-f37072fd.pth", 44.661),
        _resnet(34, "resnet34-b627a593.pth", 83.275),
        _resnet(50, "resnet50-0676ba61.pth", 97.781),
        _resnet(101, "resnet101-63fe2227.pth", 170.511),
    )
}

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# torch.hub's convention: "name-<first hex digits of the sha256>.ext"
_HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})$")


def is_url(spec: str | os.PathLike[str]) -> bool:
    return bool(_URL.match(str(spec)))


def hash_prefix_of(file_name: str) -> str | None:
    """The sha256 prefix a released file name carries (``detr-r50-e632da11.pth`` -> ``e632da11``), or None."""
    stem = file_name.split(".", 1)[0]
    match = _HASH_SUFFIX.search(stem)
    return match.group(1) if match else None


def entry(name: str) -> WeightsEntry | None:
    """The table entry for a name, or for a released file name with or without its extension."""
    if name in NAMES:
        return NAMES[name]
    for e in NAMES.values():
        if name in (e.file_name, e.file_name.split(".", 1)[0]):
            return e
    return None


def imagenet_name(backbone: str) -> str:
    """The name of torchvision's ImageNet weights for a backbone (``resnet50`` -> ``resnet50``)."""
    found = NAMES.get(backbone)
    if found is None or found.kind != "backbone":
        raise ValueError(f"no ImageNet weights are named for backbone {backbone!r}")
    return found.name


def cache_dir() -> Path:
    """``$DETR_CACHE``, else ``$XDG_CACHE_HOME/detr``, else ``~/.cache/detr``."""
    if os.environ.get("DETR_CACHE"):
        return Path(os.environ["DETR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "detr"


def _torch_hub_dir() -> Path:
    base = os.environ.get("TORCH_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") /
                                               "torch")
    return Path(base).expanduser() / "hub" / "checkpoints"


def source_url(e: WeightsEntry) -> str:
    """Where a named file is fetched from: the official URL, or the same path under ``DETR_WEIGHTS_MIRROR``."""
    mirror = os.environ.get("DETR_WEIGHTS_MIRROR", "").strip()
    if not mirror:
        return e.url
    return mirror.rstrip("/") + urllib.parse.urlsplit(e.url).path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _place_by_hand(url: str, dest: Path, hash_prefix: str | None) -> str:
    check = f" (its sha256 must start with {hash_prefix})" if hash_prefix else ""
    return (f"To place the file by hand, fetch {url} on a connected machine and copy it to {dest}{check}; "
            "or set DETR_WEIGHTS_MIRROR to a mirror's base URL, or pass a local path instead of a name.")


def download(url: str, dest: str | os.PathLike[str], *, hash_prefix: str | None = None,
             progress: bool = True, origin: str | None = None) -> Path:
    """Fetch ``url`` into ``dest``: streamed to a temporary file beside it, checked (length, and the
    sha256 prefix when given), then renamed. On any failure nothing is left at ``dest`` or beside it.
    ``origin``: the official URL when ``url`` is a mirror's (named in the error for fetching by hand)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("DETR_DOWNLOAD_TIMEOUT", "60"))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    log.info("downloading %s to %s", url, dest)
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "detr"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                from tqdm import tqdm

                # disable=None: a bar on a terminal, silence in logs and pipes
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                          disable=None if progress else True, file=sys.stderr, leave=False) as bar:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            # http.client returns a short body silently when the connection closes early
            if total is not None and received != total:
                raise DownloadError(f"the connection closed after {received} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if hash_prefix is not None and not actual.startswith(hash_prefix):
            raise DownloadError(
                f"the file's sha256 is {actual}, but its name promises one starting with {hash_prefix} "
                "(a corrupt or substituted file); it was not cached"
            )
        os.replace(tmp, dest)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        if isinstance(err, urllib.error.HTTPError):
            reason = f"HTTP {err.code} {err.reason}"
        elif isinstance(err, urllib.error.URLError):
            reason = f"{err.reason} (offline, or the host cannot be reached?)"
        elif isinstance(err, DownloadError | OSError | http.client.HTTPException | ValueError):
            reason = str(err) or type(err).__name__
        else:
            raise
        hand = _place_by_hand(origin or url, dest, hash_prefix)
        raise DownloadError(f"download of {url} failed: {reason}. {hand}") from None
    return dest


def _cached(file_name: str) -> Path | None:
    for folder in (cache_dir(), _torch_hub_dir()):
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    return None


def resolve(spec: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """A local path, a URL or a known name -> a local file.

    An existing local path wins and is returned as is (so is a path that does not exist and is not a
    name or URL: the caller reports it). URLs and names are looked up in the cache and downloaded
    into it on first use; a cached file is not re-hashed (it was verified when it arrived).
    """
    text = str(spec)
    if isinstance(spec, Path) or Path(text).expanduser().exists():
        return Path(text).expanduser()
    if is_url(text):
        file_name = urllib.parse.unquote(urllib.parse.urlsplit(text).path.rsplit("/", 1)[-1])
        if not file_name:
            raise DownloadError(f"cannot tell a file name from the URL {text!r}")
        found = _cached(file_name)
        if found is not None:
            return found
        return download(text, cache_dir() / file_name, hash_prefix=hash_prefix_of(file_name), progress=progress)
    e = entry(text)
    if e is None:
        return Path(text).expanduser()
    found = _cached(e.file_name)
    if found is not None:
        return found
    return download(source_url(e), cache_dir() / e.file_name, hash_prefix=e.hash_prefix, progress=progress,
                    origin=e.url)


def names_hint() -> str:
    return "known names: " + ", ".join(NAMES)


def locate(spec: str | os.PathLike[str]) -> Path:
    """A local path as is; a released name (``detr-r50``) or a URL -> the cached file, downloaded on
    first use."""
    path = resolve(spec)
    if not path.exists() and not is_url(spec) and os.sep not in str(spec) and "." not in str(spec):
        raise FileNotFoundError(f"checkpoint not found: {spec} is neither a file nor a known name ({names_hint()})")
    return path
