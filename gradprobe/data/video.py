"""Video files through PyAV: write frames to MP4, read them back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gradprobe.errors import DataError


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 8) -> None:
    """Write ``frames`` (T, H, W, 3) uint8 RGB as an H.264 (or MPEG-4) MP4 file."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "12", "preset": "veryfast"}
        except Exception:  # noqa: BLE001 - codec availability depends on the PyAV build
            stream = container.add_stream("mpeg4", rate=fps)
            stream.bit_rate = 2_000_000
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_frames(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode every frame of a video file as (T, H, W, 3) uint8 RGB.

    Raises:
        DataError: if the file is missing or cannot be decoded.
    """
    import av

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: video file not found")
    try:
        with av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise DataError(f"{p}: cannot decode video ({e})") from None
    if not frames:
        raise DataError(f"{p}: video has no frames")
    return np.stack(frames)
