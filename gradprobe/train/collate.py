"""One data pipeline for training and evaluation: samples → a family's model inputs, through its adapter.

:class:`SampleCollator` is a ``Trainer`` ``data_collator`` (and what the evaluation and the probe
batches use): it reads images and clips the way ``gradprobe align`` does (the adapter's chat
template, answer-only labels, pixel policy and frame-budget rule, the sampler Φ_m), at one budget for
every clip or at a per-sample budget from a manifest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradprobe.data.clips import ClipStore
from gradprobe.data.records import Sample
from gradprobe.errors import BudgetError
from gradprobe.models.base import Adapter, load_image


class SampleDataset(torch.utils.data.Dataset):
    """A list of samples as a map-style dataset (the collator does the work)."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


class SampleCollator:
    """Samples (all images, or all videos) → model inputs with answer-only labels.

    Args:
        adapter: the family's adapter (it holds the processor).
        root: directory media paths are relative to.
        frames: the frame budget of every clip (videos).
        frames_of: sample id → its own budget (a manifest); ``frames`` is the fallback.
        sampler: the frame sampler Φ_m (``uniform``, ``static``, ``shuffled``).
        keep_clips: keep decoded clips in memory (fixed probe sets read at several budgets); a
            training set is decoded anew each time.

    Raises:
        BudgetError: a budget the family cannot take.
    """

    def __init__(self, adapter: Adapter, root: str | os.PathLike[str], *, frames: int | None = None,
                 frames_of: Mapping[str, int] | None = None, sampler: str = "uniform",
                 keep_clips: bool = False) -> None:
        self.adapter = adapter
        self.root = Path(root)
        self.frames = frames
        self.frames_of = dict(frames_of or {})
        budgets = sorted({m for m in [frames, *self.frames_of.values()] if m is not None})
        for m in budgets:
            adapter.check_budget(m)
        self.store = ClipStore(self.root, budgets or [1], sampler, size_of=adapter.frame_size, keep=keep_clips)

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer

    def budget(self, sample: Sample) -> int:
        m = self.frames_of.get(sample.id, self.frames)
        if m is None:
            raise BudgetError(f"{sample.where}: no frame budget for this clip (give --frames or a manifest entry)")
        return m

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        if samples and samples[0].kind == "image":
            images = {s.media: load_image(self.root, s) for s in samples if s.kind == "image"}
            return self.adapter.collate(samples, images=images, with_info=False)
        return self.adapter.collate(samples, store=self.store, m=[self.budget(s) for s in samples],
                                    with_info=False)
