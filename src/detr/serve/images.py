"""Request bytes -> a checked, fully decoded RGB image, or a ``Rejected`` with the HTTP status and why.

The pixel limit is checked on the header (Pillow's ``open`` is lazy: it reads the size, not the data), so a
decompression bomb is refused before any of it is decoded.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ..data.images import apply_exif_orientation, to_rgb


class Rejected(Exception):
    """A request the service refuses: ``status`` (4xx/5xx) and a message naming the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes of an image file -> RGB PIL image (EXIF orientation applied). Raises ``Rejected``: 400 when
    the bytes are empty, not an image or truncated/corrupt; 413 when the header announces more than
    ``max_pixels`` pixels."""
    if not data:
        raise Rejected(400, "empty body: send the image file's bytes (raw body, or a multipart field 'image')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # lazy: header only
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        if isinstance(err, Image.DecompressionBombWarning | Image.DecompressionBombError):
            raise Rejected(413, f"image too large: over max_pixels {max_pixels} and Pillow's own bomb limit "
                                f"({err}; checked on the header, nothing decoded)") from err
        raise Rejected(400, "not an image: the body is no format Pillow reads (JPEG, PNG, WebP, ...)") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise Rejected(400, f"not a readable image: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected(413, f"image too large: {width}x{height} = {width * height} pixels, over max_pixels "
                            f"{max_pixels} (checked on the header, nothing decoded)")
    if width < 1 or height < 1:
        raise Rejected(400, f"image has no pixels: {width}x{height}")
    try:
        image.load()
        image = to_rgb(apply_exif_orientation(image))
    except (OSError, ValueError, SyntaxError) as err:
        raise Rejected(400, f"image truncated or corrupt ({image.format}): {err}") from err
    return image
