"""Image files -> fully decoded RGB PIL images, with errors that name the file.

Colour handling follows the reference, which calls ``Image.convert("RGB")`` on whatever Pillow opens:
grayscale, palette, CMYK and YCbCr images are converted by Pillow; alpha (RGBA, LA, PA, palette
transparency) is dropped, not composited, unless a ``background`` colour is given. The one deviation is
16/32-bit integer images (``I;16``, ``I``), which ``convert`` would clip at 255 (mostly white); they
are scaled from the 16-bit range to 8 bits instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 include a 90-degree rotation, so the displayed image has width and height swapped.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class ImageLoadError(OSError, ValueError):
    """An image file is missing, truncated, corrupt or inconsistent with its annotation."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def open_decoded(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image file in its stored mode and orientation.

    Decoding everything now (``load()``) is what surfaces truncated and corrupt data here, with the
    file name attached, instead of later inside a transform.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}", path)
    try:
        image = Image.open(path)
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"not a readable image (corrupt or unknown format): {path}", path) from err
    except OSError as err:
        raise ImageLoadError(f"cannot open image {path}: {err}", path) from err
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        image.close()
        raise ImageLoadError(f"cannot decode image {path} (truncated or corrupt): {err}", path) from err
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8) of an opened image; 1 (as stored) when absent or invalid."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (TypeError, ValueError, OSError, SyntaxError):
        return 1
    return value if 1 <= value <= 8 else 1


def oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(w, h) of an image of stored ``size`` (w, h) after applying an EXIF ``orientation``."""
    return (size[1], size[0]) if orientation in _SWAPPING_ORIENTATIONS else size


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip the stored pixels as the EXIF orientation tag says (a no-op without the tag)."""
    if exif_orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    ``background=None`` drops alpha as ``Image.convert("RGB")`` does (the reference's behaviour);
    a colour composites transparent pixels onto it instead.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow opens 16-bit PNG/TIFF in these modes; map 0..65535 onto 0..255 instead of clipping.
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
    if background is not None and (image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def load_image(
    path: str | os.PathLike[str], *, exif: bool = True, background: tuple[int, int, int] | None = None
) -> Image.Image:
    """Load an image file as a fully decoded RGB PIL image.

    exif: apply the EXIF orientation tag (``ImageOps.exif_transpose``) so the image is upright as
    viewers show it. Datasets whose annotations describe the stored pixels (COCO) should decide per
    image instead; see ``detr.data.coco``.
    Raises ImageLoadError (an OSError and a ValueError) naming the file if it is missing, truncated
    or corrupt.
    """
    image = open_decoded(path)
    if exif:
        image = apply_exif_orientation(image)
    return to_rgb(image, background)
