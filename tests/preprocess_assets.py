"""Test inputs for the preprocessing tests: real photos and a corpus of bad files."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "test-assets"
INSIGHTFACE_VERSION = "0.7.3"
T1_MEMBER = f"insightface-{INSIGHTFACE_VERSION}/insightface/data/images/t1.jpg"


def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def t1_path() -> Path:
    """insightface's t1.jpg group photo (6 faces), from its sdist on PyPI (cached)."""
    out = CACHE / "t1.jpg"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"insightface-{INSIGHTFACE_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        f"insightface=={INSIGHTFACE_VERSION}",
                        "-d", str(CACHE)], check=True, capture_output=True)
    with tarfile.open(sdist) as tar:
        member = tar.getmember(T1_MEMBER)  # exact name: nothing else is extracted
        if not member.isfile():
            raise RuntimeError(f"{T1_MEMBER} is not a regular file")
        data = tar.extractfile(member).read()
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bad_corpus(root: Path, t1: Path) -> dict[str, str | None]:
    """Write the bad-input corpus under ``root/<identity>/``; returns {relative path:
    expected reason substring (None = must be ok)}."""
    face = Image.fromarray(astronaut())
    good_jpg = _save(face, "JPEG", quality=92)
    files: dict[str, tuple[bytes, str | None]] = {}
    files["eileen/good.jpg"] = (good_jpg, None)
    files["eileen/corrupt.jpg"] = (good_jpg[:20] + bytes(range(256)) * 8, "corrupt|not an image")
    files["eileen/truncated.jpg"] = (good_jpg[: len(good_jpg) // 2], "truncated")
    files["eileen/empty.jpg"] = (b"", "empty")
    files["eileen/text.jpg"] = (b"this is not a picture\n", "not an image")
    files["eileen/cmyk.jpg"] = (_save(face.convert("CMYK"), "JPEG"), None)
    grey16 = (np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    files["eileen/grey16.png"] = (_save(Image.fromarray(grey16), "PNG"), None)
    files["eileen/palette.png"] = (_save(face.convert("P", palette=Image.ADAPTIVE), "PNG"), None)
    rgba = face.convert("RGBA")
    rgba.putalpha(255)
    files["eileen/alpha.png"] = (_save(rgba, "PNG"), None)
    frames = [face, face.transpose(Image.FLIP_LEFT_RIGHT)]
    files["eileen/animated.gif"] = (_save(frames[0], "GIF", save_all=True,
                                          append_images=frames[1:]), None)
    files["eileen/tiny.png"] = (_save(Image.new("RGB", (1, 1)), "PNG"), "too small")
    # A valid PNG header claiming 100000 x 100000 pixels: rejected from the header alone.
    bomb = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    bomb[16:29] = ihdr
    bomb[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    files["eileen/bomb.png"] = (bytes(bomb), "decompression bomb")
    # EXIF orientation 6 (rotate 90 CW to view): store the face rotated the other way.
    exif = Image.Exif()
    exif[0x0112] = 6
    files["eileen/exif_rotated.jpg"] = (_save(face.rotate(90, expand=True), "JPEG",
                                              exif=exif.tobytes()), None)
    noise = np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8)
    files["eileen/noface.png"] = (_save(Image.fromarray(noise), "PNG"), "no face")
    files["group/t1.jpg"] = (t1.read_bytes(), None)
    files["group/notes.txt"] = (b"not an input: wrong extension\n", "SKIP")
    out = {}
    for rel, (data, reason) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if reason != "SKIP":
            out[rel] = reason
    return out
