"""Videos as files (PyAV) or folders of frame images: write, probe, and decode only the frames a budget needs."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradprobe.errors import DataError


def _av(path: Path) -> Any:
    """PyAV, or a one-line error: video files need it, frame folders do not."""
    try:
        import av
    except ImportError:
        raise DataError(f"{path}: a video file needs PyAV (pip install av); "
                        "frame folders (one image per frame) need nothing more") from None
    return av


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 8) -> None:
    """Write ``frames`` (T, H, W, 3) uint8 RGB as an H.264 (or MPEG-4) MP4 file."""
    av = _av(Path(path))
    frames = np.asarray(frames, dtype=np.uint8)
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "12", "preset": "veryfast"}
        except Exception:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.bit_rate = 2_000_000
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _rgb24() -> Callable[..., np.ndarray]:
    """``to_rgb(frame, size=None)``: a decoded frame as (H, W, 3) uint8 RGB, resized to ``size`` = (height, width).

    The same bytes as ``frame.to_ndarray(format="rgb24", width=…, height=…)``, which builds a new scaling
    context for every frame (for small frames, 20 times the cost of decoding them); one context serves a
    whole file here. Call it after :func:`_av`, which says when PyAV is missing.
    """
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()

    def to_rgb(frame: Any, size: tuple[int, int] | None = None) -> np.ndarray:
        kw = {"width": size[1], "height": size[0]} if size else {}
        return reformatter.reformat(frame, format="rgb24", **kw).to_ndarray()

    return to_rgb


def read_frames(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode every frame of a video file as (T, H, W, 3) uint8 RGB.

    Raises:
        DataError: if the file is missing or cannot be decoded.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: video file not found")
    av = _av(p)
    to_rgb = _rgb24()
    try:
        with av.open(str(p)) as container:
            frames = [to_rgb(f) for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise DataError(f"{p}: cannot decode video ({e})") from None
    if not frames:
        raise DataError(f"{p}: video has no frames")
    return np.stack(frames)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def frame_files(folder: Path) -> list[Path]:
    """The frame images of a folder, in natural order (``f2`` before ``f10``)."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural)


@dataclass(frozen=True)
class VideoInfo:
    """What is known about a clip before decoding: frame count, frame rate (None if unknown), size."""

    total: int
    fps: float | None
    height: int
    width: int


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Frame count, rate and size of a video file (counted by demuxing, without decoding) or frame folder.

    Raises:
        DataError: missing path, undecodable file, or no frames.
    """
    p = Path(path)
    if p.is_dir():  # frame folders need no PyAV
        files = frame_files(p)
        if not files:
            raise DataError(f"{p}: frame folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        from PIL import Image

        try:
            with Image.open(files[0]) as im:
                w, h = im.size
        except OSError as e:
            raise DataError(f"{files[0]}: cannot read frame image ({e})") from None
        return VideoInfo(total=len(files), fps=None, height=h, width=w)
    if not p.is_file():
        raise DataError(f"{p}: video file not found")
    av = _av(p)
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise DataError(f"{p}: no video stream")
            s = container.streams.video[0]
            fps = float(s.average_rate) if s.average_rate else None
            h, w = s.codec_context.height, s.codec_context.width
            total = sum(1 for pk in container.demux(s) if pk.size > 0)
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise DataError(f"{p}: cannot decode video ({e})") from None
    if total < 1:
        raise DataError(f"{p}: video has no frames")
    return VideoInfo(total=total, fps=fps, height=h, width=w)


def _resize(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or frame.shape[:2] == tuple(size):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))


def read_video_frames(path: str | os.PathLike[str], indices: Sequence[int],
                      size: tuple[int, int] | None = None) -> dict[int, np.ndarray]:
    """Decode only the frames at ``indices`` (one pass), resized to ``size`` = (height, width) if given.

    Raises:
        DataError: missing or undecodable file, or fewer frames than an index asks for.
    """
    p = Path(path)
    want = sorted({int(i) for i in indices})
    out: dict[int, np.ndarray] = {}
    if p.is_dir():
        from PIL import Image

        files = frame_files(p)
        for i in want:
            if i >= len(files):
                break
            try:
                with Image.open(files[i]) as im:
                    out[i] = _resize(np.array(im.convert("RGB")), size)
            except OSError as e:
                raise DataError(f"{files[i]}: cannot read frame image ({e})") from None
    else:
        if not p.is_file():
            raise DataError(f"{p}: video file not found")
        av = _av(p)
        to_rgb = _rgb24()
        wanted = set(want)
        last = want[-1] if want else -1
        try:
            with av.open(str(p)) as container:
                for i, f in enumerate(container.decode(video=0)):
                    if i in wanted:
                        out[i] = to_rgb(f, size)
                    if i >= last:
                        break
        except (av.error.FFmpegError, ValueError, IndexError) as e:
            raise DataError(f"{p}: cannot decode video ({e})") from None
    missing = [i for i in want if i not in out]
    if missing:
        raise DataError(f"{p}: frame {missing[0]} could not be read ({len(out)} of {len(want)} frames decoded)")
    return out
