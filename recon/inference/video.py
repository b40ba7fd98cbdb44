"""Video frames in and out with imageio (FFmpeg from imageio-ffmpeg's bundled binary for MP4
and other containers, Pillow for GIF). Frames are (H, W, 3) uint8 RGB. Writes are atomic
(``recon.formats.files.atomic_path``)."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from recon.formats.files import atomic_path

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
ANIMATION_SUFFIXES = (".gif",)


def is_video(path: str | os.PathLike) -> bool:
    """A file the frame reader treats as a video (by suffix; GIF counts)."""
    return Path(str(path)).suffix.lower() in VIDEO_SUFFIXES + ANIMATION_SUFFIXES


def video_fps(path: str | os.PathLike, default: float = 25.0) -> float:
    """Frames per second recorded in the file (``default`` when it has none)."""
    import imageio.v2 as iio

    path = Path(path)
    if path.suffix.lower() in ANIMATION_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            duration = im.info.get("duration")
        return 1000.0 / float(duration) if duration else default
    with iio.get_reader(path, format="FFMPEG") as reader:
        fps = reader.get_meta_data().get("fps")
    return float(fps) if fps else default


def read_frames(path: str | os.PathLike, every: int = 1, limit: int | None = None
                ) -> Iterator[np.ndarray]:
    """The frames of a video or animated GIF, (H, W, 3) uint8; every ``every``-th frame, at
    most ``limit`` of them."""
    path = Path(path)
    taken = 0
    for i, frame in enumerate(_frames(path)):
        if i % max(1, every):
            continue
        yield frame
        taken += 1
        if limit is not None and taken >= limit:
            return


def _frames(path: Path) -> Iterator[np.ndarray]:
    if path.suffix.lower() in ANIMATION_SUFFIXES:
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                yield np.asarray(frame.convert("RGB"), dtype=np.uint8)
        return
    import imageio.v2 as iio

    with iio.get_reader(path, format="FFMPEG") as reader:
        for frame in reader:
            frame = np.asarray(frame)
            if frame.ndim == 2:
                frame = np.repeat(frame[..., None], 3, axis=2)
            yield np.ascontiguousarray(frame[..., :3]).astype(np.uint8)


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 25.0) -> Path:
    """Write frames (H, W, 3) uint8 as MP4 (H.264, yuv420p: plays everywhere; sides are
    padded to even sizes) or GIF (looping), chosen by the suffix. Returns the path."""
    import imageio.v2 as iio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"{path}: write .mp4 or .gif")
    n = 0
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix == ".gif":
            from PIL import Image

            images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
            n = len(images)
            if n:
                images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                               duration=round(1000.0 / fps), loop=0)
        else:
            with iio.get_writer(str(tmp), format="FFMPEG", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1,
                                ffmpeg_log_level="error") as writer:
                for frame in frames:
                    writer.append_data(_even(np.asarray(frame, dtype=np.uint8)))
                    n += 1
        if n == 0:
            raise ValueError(f"{path}: no frames to write")
    return path


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even height and width (yuv420p needs them) by repeating the last row/column."""
    h, w = frame.shape[:2]
    return np.ascontiguousarray(np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge"))


def count_frames(path: str | os.PathLike) -> int:
    """Decode a video back and count its frames (a playable-file check)."""
    return sum(1 for _ in read_frames(path))


__all__ = ["ANIMATION_SUFFIXES", "VIDEO_SUFFIXES", "count_frames", "is_video", "read_frames",
           "video_fps", "write_video"]
