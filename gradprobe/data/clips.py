"""Clips at every frame budget of a run, decoded once.

A :class:`ClipStore` knows the run's budgets, sampler and the size each frame is resized to at
each budget (the adapter's pixel policy). The first time a clip is asked for, it decodes the union
of the frames every budget needs, at the largest size any budget uses, and keeps them; each budget
then takes its frames (resized further when the policy gives it a smaller size). Paired budgets
therefore read the same clips without decoding them again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradprobe.data.records import Sample
from gradprobe.data.sampling import check_sampler, sample_indices, uniform_indices
from gradprobe.data.video import VideoInfo, _resize, probe_video, read_video_frames

#: size_of(height, width, m) -> (height, width) each frame is resized to, or None to keep it.
SizeOf = Callable[[int, int, int], "tuple[int, int] | None"]


@dataclass(frozen=True)
class Clip:
    """A clip at one budget: the frames shown and where they sit in the clip."""

    frames: np.ndarray  # (m, H, W, 3) uint8
    indices: np.ndarray  # the frames shown, per the sampler
    positions: np.ndarray  # nominal positions (uniform indices): what timestamps are built from
    total: int
    fps: float | None
    short: bool  # fewer frames than m: frames repeat


def resolve(root: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


class ClipStore:
    """Decoded frames of every clip at every budget of a run (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], frames: Sequence[int], sampler: str = "uniform",
                 size_of: SizeOf | None = None, *, keep: bool = True) -> None:
        self.root = Path(root)
        self.budgets = sorted({int(m) for m in frames})
        #: keep decoded frames (probes read the same clips at every budget); a training run reads
        #: each clip at one budget per epoch and keeps nothing
        self.keep = keep
        self.sampler = check_sampler(sampler)
        self.size_of = size_of or (lambda h, w, m: None)
        self._info: dict[str, VideoInfo] = {}
        self._frames: dict[str, dict[int, np.ndarray]] = {}

    def info(self, sample: Sample) -> VideoInfo:
        if sample.media not in self._info:
            self._info[sample.media] = probe_video(resolve(self.root, sample.media))
        return self._info[sample.media]

    def _plan(self, sample: Sample, m: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
        info = self.info(sample)
        idx = sample_indices(info.total, m, self.sampler, key=sample.media)
        return idx, uniform_indices(info.total, m), self.size_of(info.height, info.width, m)

    def _decode(self, sample: Sample, budgets: Sequence[int]) -> dict[int, np.ndarray]:
        plans = [self._plan(sample, m) for m in budgets]
        sizes = [s for _, _, s in plans if s is not None]
        biggest = max(sizes, key=lambda s: s[0] * s[1]) if sizes else None
        union = sorted({int(i) for idx, _, _ in plans for i in idx})
        return read_video_frames(resolve(self.root, sample.media), union, biggest)

    def load(self, sample: Sample) -> None:
        """Decode what every budget needs of this clip (a no-op once done).

        Raises:
            DataError: missing, undecodable or empty video.
        """
        if sample.media not in self._frames:
            self._frames[sample.media] = self._decode(sample, self.budgets)

    def clip(self, sample: Sample, m: int) -> Clip:
        if self.keep:
            self.load(sample)
            stored = self._frames[sample.media]
        else:
            stored = self._decode(sample, [m])
        info = self.info(sample)
        idx, pos, size = self._plan(sample, m)
        frames = np.stack([_resize(stored[int(i)], size) for i in idx])
        fps = info.fps if info.fps else (float(sample.extra["fps"]) if "fps" in sample.extra else None)
        return Clip(frames=frames, indices=idx, positions=pos, total=info.total, fps=fps, short=info.total < m)
