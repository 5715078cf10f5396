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
* ``gradient``: does the clip teach the same thing at m? The distance is ``1 − cos`` between the clip's
  answer-loss gradients at m and at M (sketched): the redundancy of Eq. 26.
* ``judge``: a generative VLM reads the instruction alone (no frames) and names a budget.
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
    judge: str | None = None
    log: Callable[[str], None] = field(default=lambda s: None)


class BudgetMethod:
    """Scores a clip at each budget of the grid; allocates the smallest budget within the tolerance."""

    name: ClassVar[str] = ""
    #: what the per-budget score is, for the summary
    statistic: ClassVar[str] = ""
    default_tolerance: ClassVar[float] = 0.0
    #: whether scoring runs backward passes (then activation checkpointing and the memory bound apply)
    backward: ClassVar[bool] = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def scores(self, sample: Any) -> dict[int, float]:
        """The distance to the largest budget at every budget of the grid (0 at the largest)."""
        raise NotImplementedError

    def extra(self, sample: Any) -> dict[str, Any]:
        """Fields the method adds to the clip's manifest line (none by default)."""
        return {}

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

        model = self.ctx.model
        loss = {}
        for m in self.ctx.grid:
            batch = strip_info(self.ctx.adapter.collate([sample], store=self.ctx.store, m=m, with_info=False))
            loss[m] = float(model(**to_model(batch, model)).loss)
        ref = loss[self.ctx.grid[-1]]
        return {m: loss[m] - ref for m in self.ctx.grid}


def to_model(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """A collated batch on the model's device, floating tensors in its dtype."""
    device, dtype = _device(model), next(model.parameters()).dtype
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


@register
class Gradient(BudgetMethod):
    name = "gradient"
    statistic = ("1 − cos(g_vid at m, g_vid at the largest budget), the clip's answer-loss gradient over every "
                 "parameter (exact where the gradients fit in EXACT_BYTES, else sketched with k = 2^16 buckets "
                 "and each clip's sketch error in score_sd)")
    default_tolerance = 0.1
    backward = True
    #: buckets of the per-clip gradient sketches
    K = 2**16
    #: exact gradients (one float32 copy per budget) up to this size
    EXACT_BYTES = 2**28

    def __init__(self, ctx: Context) -> None:
        from gradprobe.probe.hooks import GradientProbe
        from gradprobe.probe.measure import sketch_spec
        from gradprobe.probe.select import select_parameters

        super().__init__(ctx)
        a = ctx.adapter
        self.selection = select_parameters(ctx.model, role_of=a.role_of, module_of=a.module_of)
        self.exact = self.selection.numel * 4 * len(ctx.grid) <= self.EXACT_BYTES
        self.spec = None if self.exact else sketch_spec(self.selection, self.K, seed=0)
        self.probe = None if self.exact else GradientProbe(ctx.model, self.selection, sketch=self.spec)
        self._sd: dict[str, dict[str, float]] = {}

    def _batch(self, sample: Any, m: int) -> dict[str, Any]:
        return to_model(self.ctx.adapter.collate([sample], store=self.ctx.store, m=m), self.ctx.model)

    def scores(self, sample: Any) -> dict[int, float]:
        from gradprobe.models.base import loss_fn
        from gradprobe.probe.context import measurement_mode
        from gradprobe.probe.sketch import inner_variance

        grid, big = self.ctx.grid, self.ctx.grid[-1]
        params = list(self.selection.params)
        out = {}
        with measurement_mode(self.ctx.model, self.selection):
            if self.exact:
                g = {}
                for m in grid:  # a parameter outside the graph (e.g. vision layers past the feature layer): 0
                    grads = torch.autograd.grad(loss_fn(self.ctx.model, self._batch(sample, m)), params,
                                                allow_unused=True)
                    g[m] = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                                      for x, p in zip(grads, params, strict=True)])
                for m in grid:
                    den = float(g[m].norm() * g[big].norm())
                    out[m] = 1.0 - (float(g[m] @ g[big]) / den if den > 0 else 0.0)
            else:
                sk, sq = {}, {}
                with self.probe.attached():
                    for m in grid:
                        r = self.probe.run_batch(loss_fn, self._batch(sample, m), keep_sketch=True)
                        sk[m], sq[m] = r.sketch.to(torch.float64), r.sqnorm
                sd = {}
                for m in grid:
                    dots = np.array([float(sk[m][sl] @ sk[big][sl]) for sl in self.spec.slices()])
                    den = float(np.sqrt(sq[m].sum() * sq[big].sum()))
                    cos = dots.sum() / den if den > 0 else 0.0
                    out[m] = 1.0 - max(-1.0, min(1.0, cos))
                    var = inner_variance(sq[m], sq[big], dots, self.spec.widths).sum()
                    sd[str(m)] = float(np.sqrt(var) / den) if den > 0 else None
                self._sd[sample.id] = sd
        out[big] = 0.0
        return out

    def extra(self, sample: Any) -> dict[str, Any]:
        sd = self._sd.pop(sample.id, None)
        return {"score_sd": sd} if sd is not None else {}


#: the judge's prompt, after the paper's Figure C: the instruction alone, no frames
JUDGE_PROMPT = (
    "A video question will be answered from frames sampled uniformly from the video. Consider how long the "
    "events it asks about last, motion continuity, cause and effect, object interactions and fine detail. "
    "Question: {question} How many frames are needed? Answer with one number from: {grid}."
)


def parse_budget(reply: str, grid: Sequence[int]) -> int | None:
    """The first number in ``reply`` mapped onto the grid (the smallest budget ≥ it; the largest if it is
    larger than all); None when the reply holds no number."""
    import re

    found = re.search(r"\d+", reply)
    if found is None:
        return None
    n = int(found.group())
    return next((m for m in grid if m >= n), grid[-1])


@register
class Judge(BudgetMethod):
    """A generative VLM prompted with the instruction alone; its reply parsed into a budget of the grid (the
    largest when it names none). The model is ``--judge`` (default: the model itself); a small or untrained
    model cannot judge well: this is plumbing for a capable checkpoint."""

    name = "judge"
    statistic = "0 at the budget the judge named (parsed from its reply), 1 elsewhere"
    default_tolerance = 0.0
    max_new_tokens = 8

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.replies: dict[str, str] = {}
        if ctx.judge:
            from gradprobe.models.registry import family_for

            self.model, self.adapter = family_for(ctx.judge).adapter_class().load(ctx.judge, device=str(_device(ctx.model)))
            self.model.eval()
        else:
            self.model, self.adapter = ctx.model, ctx.adapter

    @torch.no_grad()
    def reply(self, question: str) -> str:
        grid = ", ".join(str(m) for m in self.ctx.grid)
        msgs = [{"role": "user", "content": [{"type": "text", "text": JUDGE_PROMPT.format(question=question, grid=grid)}]}]
        text = self.adapter.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = to_model(dict(self.adapter.processor(text=[text], return_tensors="pt")), self.model)
        tok = self.adapter.tokenizer
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def scores(self, sample: Any) -> dict[int, float]:
        question = next(t for r, t in sample.turns if r == "user")
        said = self.reply(question)
        self.replies[sample.id] = said
        m = parse_budget(said, self.ctx.grid)
        chosen = self.ctx.grid[-1] if m is None else m
        return {k: 0.0 if k >= chosen else 1.0 for k in self.ctx.grid}

    def extra(self, sample: Any) -> dict[str, Any]:
        said = self.replies.pop(sample.id, "")
        return {"reply": said, "parsed": parse_budget(said, self.ctx.grid) is not None}


def grid_target(m_min: int, grid: Sequence[int]) -> int | None:
    """The smallest budget of the grid that reaches ``m_min`` (None when none does)."""
    return next((m for m in grid if m >= m_min), None)
