"""Reading one image file: any common format and mode in, an RGB PIL image out.

Checking a file (`probe_image`) is kept cheap so that a folder of 100,000 files scans in well
under a minute: JPEGs decode at 1/8 scale through PIL's draft mode, PNGs are checked chunk by
chunk without inflating pixels, and only other formats decode in full.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

# A truncated file must fail loudly, never decode as half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Very large photos are legitimate here; the bomb check is for untrusted web servers.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 300_000_000)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def probe_image(path: Path) -> str | None:
    """Return None when `path` decodes, else a short reason why it cannot be used."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                if fmt == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
                elif fmt == "PNG":
                    im.verify()
                else:
                    im.load()
        return None
    except PermissionError:
        return "permission denied"
    except UnidentifiedImageError:
        return "not a readable image (unknown or unsupported format)"
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"cannot decode: {msg}"


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float single-channel images scaled to 8 bits."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
        arr = (arr.astype(np.float32) / 257.0).round()
    elif im.mode == "F":
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: str | Path) -> Image.Image:
    """Open any supported image (first frame of a GIF) as RGB, with EXIF orientation applied.

    Transparent pixels are composited on white so that a transparent background does not turn
    into whatever colour the encoder left under it.
    """
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im if im.mode == "RGB" else im.convert("RGB")
