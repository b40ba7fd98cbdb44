"""Bytes -> RGB uint8 array, or a recorded rejection.

EXIF orientation is applied; every PIL mode (CMYK, 16-bit, palette, alpha, ...) becomes
RGB; the dimensions are checked from the header before any pixels are decoded, so a
decompression bomb is rejected without allocating it.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class Rejected(Exception):
    """An input that cannot become a training sample; ``str(exc)`` is the recorded reason."""


@dataclass
class Decoded:
    rgb: np.ndarray  # (H, W, 3) uint8
    info: dict = field(default_factory=dict)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any mode; high bit depths are rescaled, alpha is composited
    on black (the same colour as the crop's padding)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "I" and arr.max() <= 65535:
            top = 65535.0 if arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
    elif mode == "LA" or mode == "La":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        arr = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = arr[..., 3:4] / 255.0
        return np.clip(arr[..., :3] * alpha + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, *, min_size: int, max_pixels: int, max_bytes: int) -> Decoded:
    """Decode ``data``; raises :class:`Rejected` with the reason for unusable input."""
    if len(data) == 0:
        raise Rejected("empty file")
    if len(data) > max_bytes:
        raise Rejected(f"file too large ({len(data)} bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise Rejected(f"decompression bomb ({w}x{h} pixels)")
            fmt = img.format
            frames = getattr(img, "n_frames", 1)
            img.seek(0)
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            img = ImageOps.exif_transpose(img)
            original_mode = img.mode
            rgb = _to_rgb(img)
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Rejected("decompression bomb") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise Rejected(f"corrupt or truncated image: {err}") from None
    h, w = rgb.shape[:2]
    if min(h, w) < min_size:
        raise Rejected(f"too small ({w}x{h})")
    return Decoded(rgb=np.ascontiguousarray(rgb), info={
        "format": fmt, "mode": original_mode, "frames": int(frames),
        "exif_orientation": int(orientation), "width": int(w), "height": int(h),
    })
