"""Per-sample frame budgets (Hybrid-Frame): the allocation methods behind one interface.

A method scores each clip at every budget m of a grid with a *distance to the largest budget* M (zero at M;
smaller is closer) and allocates the smallest m whose distance is within the method's tolerance (the
largest budget when none is). To add a method, subclass :class:`BudgetMethod` and decorate it with
:func:`register`; ``gradprobe budget --method NAME`` then finds it.

* ``redundancy``: do the m sampled frames cover the clip? Every frame of the largest budget is embedded
  (by the model's own vision tower, or a local Hugging Face image model), and the distance at m is
  ``1 − min_f max_s cos(e_f, e_s)`` over the largest budget's frames f and the frames s the sampler shows at
  m. It reads pixels only, not the question (the paper's inter-frame-similarity baseline, in the form of a
  coverage rule).
* ``sufficiency``: does the answer still hold at m? The distance is the answer loss (mean per answer token,
  nats) at m minus that at M: Eq. 24 read operationally, with the model itself as the judge of what the
  clip must show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from gradprobe.errors import InputError

#: registered methods by name
METHODS: dict[str, type[BudgetMethod]] = {}


def register(cls: type[BudgetMethod]) -> type[BudgetMethod]:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def method_named(name: str) -> type[BudgetMethod]:
    """The registered method called ``name``.

    Raises:
        InputError: unknown name.
    """
    if name not in METHODS:
        raise InputError(f"method: unknown {name!r}; use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


@dataclass
class Context:
    """What a method may read: the model and its adapter, the clips, the grid and the settings."""

    model: torch.nn.Module
    adapter: Any
    store: Any  # a ClipStore holding every budget of the grid
    grid: list[int]
    tolerance: float
    embedder: str | None = None
    log: Callable[[str], None] = field(default=lambda s: None)


class BudgetMethod:
    """Scores a clip at each budget of the grid; allocates the smallest budget within the tolerance."""

    name: ClassVar[str] = ""
    #: what the per-budget score is, for the summary
    statistic: ClassVar[str] = ""
    default_tolerance: ClassVar[float] = 0.0

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def scores(self, sample: Any) -> dict[int, float]:
        """The distance to the largest budget at every budget of the grid (0 at the largest)."""
        raise NotImplementedError

    def choose(self, scores: dict[int, float]) -> int:
        """The smallest budget whose distance is within the tolerance (the largest when none is)."""
        for m in self.ctx.grid:
            if scores[m] <= self.ctx.tolerance:
                return m
        return self.ctx.grid[-1]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pool(out: Any, n: int) -> torch.Tensor:
    """One vector per image from what ``get_image_features`` returns (it differs between families and
    transformers releases): the mean of each image's visual tokens."""
    feats = getattr(out, "pooler_output", None)
    if feats is None:
        feats = getattr(out, "last_hidden_state", out)
    if isinstance(feats, list | tuple):
        if len(feats) == n:
            return torch.stack([f.reshape(-1, f.shape[-1]).float().mean(0) for f in feats])
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    feats = feats.float()
    if feats.dim() >= 3 and feats.shape[0] == n:
        return feats.reshape(n, -1, feats.shape[-1]).mean(1)
    flat = feats.reshape(-1, feats.shape[-1])
    if flat.shape[0] % n:
        raise RuntimeError(f"cannot split {flat.shape[0]} visual tokens between {n} frames")
    return flat.reshape(n, -1, flat.shape[-1]).mean(1)


class FrameEmbedder:
    """Frame embeddings: the model's own vision tower (each frame as an image, its visual tokens averaged),
    or a local Hugging Face image model (``AutoModel`` + ``AutoImageProcessor``: its pooled output, else the
    mean of its last hidden state)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        if ctx.embedder:
            from transformers import AutoImageProcessor, AutoModel

            try:
                self.processor = AutoImageProcessor.from_pretrained(ctx.embedder)
                self.model = AutoModel.from_pretrained(ctx.embedder).eval()
            except (OSError, ValueError) as e:
                raise InputError(f"embedder: cannot load an image model from {ctx.embedder} ({e})") from None
        else:
            self.processor = ctx.adapter.processor.image_processor
            self.model = ctx.model

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 frames → (n, D) unit vectors."""
        images = list(frames)
        inputs = self.processor(images=images, return_tensors="pt")
        device = _device(self.model)
        dtype = next(self.model.parameters()).dtype
        kw = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if self.ctx.embedder:
            out = self.model(**kw)
            pooled = getattr(out, "pooler_output", None)
            vec = pooled.float() if pooled is not None else out.last_hidden_state.float().mean(1)
        else:
            keep = {k: v for k, v in kw.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
            vec = _pool(self.model.get_image_features(**keep), len(images))
        return torch.nn.functional.normalize(vec.reshape(len(images), -1), dim=-1)


@register
class Redundancy(BudgetMethod):
    name = "redundancy"
    statistic = "1 − min over the largest budget's frames of the best cosine to a frame shown at m"
    default_tolerance = 0.02

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.embed = FrameEmbedder(ctx)

    def scores(self, sample: Any) -> dict[int, float]:
        store, big = self.ctx.store, self.ctx.grid[-1]
        ref = store.clip(sample, big)
        emb = self.embed(ref.frames)
        by_index = {int(i): k for k, i in enumerate(ref.indices)}
        out = {}
        for m in self.ctx.grid:
            idx = store.clip(sample, m).indices
            missing = [int(i) for i in idx if int(i) not in by_index]
            if missing:  # a frame the largest budget does not show: embed it too
                clip = store.clip(sample, m)
                extra = self.embed(clip.frames)
                shown = torch.stack([emb[by_index[int(i)]] if int(i) in by_index else extra[j]
                                     for j, i in enumerate(idx)])
            else:
                shown = emb[[by_index[int(i)] for i in idx]]
            cover = (emb @ shown.T).max(dim=1).values.min().item()
            out[m] = max(0.0, 1.0 - cover)
        out[big] = 0.0
        return out


@register
class Sufficiency(BudgetMethod):
    name = "sufficiency"
    statistic = "answer loss at m minus at the largest budget (nats per answer token)"
    default_tolerance = 0.05

    @torch.no_grad()
    def scores(self, sample: Any) -> dict[int, float]:
        from gradprobe.models.base import strip_info

        model, device = self.ctx.model, _device(self.ctx.model)
        dtype = next(model.parameters()).dtype
        loss = {}
        for m in self.ctx.grid:
            batch = strip_info(self.ctx.adapter.collate([sample], store=self.ctx.store, m=m, with_info=False))
            batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                     if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss[m] = float(model(**batch).loss)
        ref = loss[self.ctx.grid[-1]]
        return {m: loss[m] - ref for m in self.ctx.grid}


def grid_target(m_min: int, grid: Sequence[int]) -> int | None:
    """The smallest budget of the grid that reaches ``m_min`` (None when none does)."""
    return next((m for m in grid if m >= m_min), None)
