"""The adapter protocol: what gradprobe needs to know about a model family.

An :class:`Adapter` loads a checkpoint (``from_pretrained`` plus ``AutoProcessor``), turns
:class:`~gradprobe.data.records.Sample` lists into model inputs with answer-only labels, states the
family's frame-budget rule and pixel policy, and names parameter roles (``vision``, ``projector``,
``language``, ``head``) and module keys. Families subclass it and fill in the class attributes and
the few methods that differ (how a video is handed to the processor, how frames are sized).

Labels come from the chat template itself: each assistant turn is found by rendering the conversation
up to that turn with and without it, and its answer verbatim inside it; the label span is the answer
plus the end-of-turn token the family trains on (``<|im_end|>``, ``</s>``), inserted after the answer
when the template renders none. The text is tokenized without expanding the visual placeholders to
find the tokens of those characters (a token may reach outside the answer only by a merged leading
space), and those tokens are located in the processor's expanded sequence through the common suffix
(everything after the last visual token is the same in both). A template that does not render
conversations prefix-stably, a token straddling an answer's edge, or an answer placed before a visual
token, is an error rather than a silent mislabel.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from gradprobe.data.clips import ClipStore
from gradprobe.data.records import Sample
from gradprobe.errors import BudgetError, DataError, InputError, ModelError

IGNORE = -100
INFO_KEY = "_gradprobe"

_BLOCK = re.compile(r"^(.*?\.(?:blocks|layers|deepstack_merger_list)\.\d+)\.")
#: components kept whole as one module key (everything up to and including the key)
MODULE_KEYS = ("visual.patch_embed", "visual.pos_embed", "visual.merger", "embed_tokens", "language_model.norm",
               "multi_modal_projector", "vision_tower.embeddings", "vision_tower.vision_model.embeddings")


@dataclass(frozen=True)
class PixelPolicy:
    """How large each video frame is at budget m.

    ``fixed`` (default): every frame gets the same size at every m (the clip's own size, capped at
    ``frame_pixels``), so m is the only thing that changes. ``total``: a total-pixel budget over the
    clip as qwen-vl-utils applies it, per-frame cap ``min(frame_pixels, total_pixels · t / m)`` with t
    the temporal patch, so per-frame resolution falls as m grows.
    """

    kind: str = "fixed"
    frame_pixels: int | None = None
    total_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "total"):
            raise InputError(f"pixel-policy: unknown policy {self.kind!r}; use fixed or total")
        for name in ("frame_pixels", "total_pixels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InputError(f"{name.replace('_', '-')}: expected a positive integer, got {v!r}")

    def describe(self) -> str:
        if self.kind == "fixed":
            return "fixed per-frame resolution"
        return "total-pixel budget (per-frame resolution falls with m)"


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's rule: both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    hb = max(factor, round(h / factor) * factor)
    wb = max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


def strip_info(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's inputs: everything but gradprobe's own bookkeeping."""
    return {k: v for k, v in batch.items() if k != INFO_KEY}


def load_errors() -> tuple[type[BaseException], ...]:
    """What ``from_pretrained`` raises for a checkpoint it cannot read: missing or unreadable files, bad
    configs, and corrupt or truncated weights (safetensors' own error)."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, ImportError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


def loss_fn(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Answer-token cross-entropy (the model's own shifted loss over ``labels``)."""
    return model(**strip_info(batch)).loss


class Adapter:
    """A model family (subclass per family; see the module docstring).

    Args:
        processor: the loaded processor.
        pixel_policy: the frame-size rule for videos.
    """

    family: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""
    #: frames the vision tower groups into one temporal patch (2 for Qwen: m must be even).
    temporal_patch: ClassVar[int] = 1
    #: (substring of the parameter name, role), first match wins.
    role_rules: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: True when the family's processor sizes frames itself (pixel policy ``total`` is then refused).
    fixed_resolution: ClassVar[bool] = False
    #: the token that ends an assistant turn in training (None: the tokenizer's eos token)
    end_of_turn_token: ClassVar[str | None] = None
    #: one line for ``gradprobe models``
    note: ClassVar[str] = ""

    def __init__(self, processor: Any, *, pixel_policy: PixelPolicy | None = None) -> None:
        self.processor = processor
        self.policy = self.check_policy(pixel_policy or PixelPolicy())
        self.tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             device_map: str | None = None, attn_implementation: str | None = None,
             pixel_policy: PixelPolicy | None = None) -> tuple[torch.nn.Module, Adapter]:
        """Load model and processor with ``from_pretrained`` (a local directory or a hub id).

        Raises:
            ModelError: nothing loadable there.
        """
        import transformers
        from transformers import AutoProcessor

        kwargs: dict[str, Any] = {"dtype": dtype}
        if device_map:
            kwargs["device_map"] = device_map
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            processor = AutoProcessor.from_pretrained(model_dir)
            model = getattr(transformers, cls.model_class).from_pretrained(model_dir, **kwargs)
        except load_errors() as e:
            raise ModelError(f"{model_dir}: cannot load checkpoint ({str(e).splitlines()[0]})") from None
        if not device_map:
            model.to(device)
        return model, cls(processor, pixel_policy=pixel_policy)

    # ------------------------------------------------------------------ rules
    @classmethod
    def budget_rule(cls) -> str:
        return f"even m ≥ 2 (temporal patch {cls.temporal_patch})" if cls.temporal_patch == 2 else "any m ≥ 1"

    @classmethod
    def check_policy(cls, policy: PixelPolicy) -> PixelPolicy:
        """Refuse a pixel policy the family cannot follow (LLaVA's processors fix the resolution)."""
        if cls.fixed_resolution and policy.kind != "fixed":
            raise InputError(
                f"pixel-policy: {cls.family} sizes every frame to its vision tower's resolution; "
                "only the fixed policy applies"
            )
        return policy

    @classmethod
    def min_budget(cls) -> int:
        """The smallest frame budget the family takes (its temporal patch, at least 1)."""
        return max(1, cls.temporal_patch)

    @classmethod
    def check_budget(cls, m: int) -> int:
        """Refuse budgets the family cannot take (Qwen: odd m would repeat the last frame)."""
        t = cls.temporal_patch
        if m < max(1, t) or m % t:
            raise BudgetError(f"frames mismatch: {cls.family} takes {cls.budget_rule()}; got {m}")
        return m

    @classmethod
    def role_of(cls, name: str) -> str | None:
        """The parameter's role: ``vision``, ``projector``, ``language`` or ``head`` (None if none applies)."""
        for key, role in cls.role_rules:
            if key in name:
                return role
        return None

    @staticmethod
    def module_of(name: str) -> str:
        """Module keys: each vision block and language layer, and whole components (patch embedding,
        merger / projector, token embeddings, final norm); anything else by its parent module."""
        m = _BLOCK.match(name)
        if m:
            return m.group(1)
        for key in MODULE_KEYS:
            if key in name:
                return name[: name.index(key) + len(key)]
        return name.rsplit(".", 1)[0]

    def frame_size(self, h: int, w: int, m: int) -> tuple[int, int] | None:
        """The (height, width) every frame of an h×w clip gets at budget m; None keeps it."""
        return None

    def visual_tokens(self, h: int, w: int, m: int) -> tuple[int, int]:
        """(patches the vision tower encodes, visual tokens the language model reads) for one h×w clip at
        budget m, from the processor's settings, without running it."""
        raise NotImplementedError

    def min_batch_bytes(self, config: Any, h: int, w: int, m: int, batch: int, dtype: torch.dtype,
                        quadratic_attention: bool = True, checkpointing: bool = False) -> int:
        """A lower bound on the memory one video batch needs for its forward and backward: the inputs every
        linear layer keeps for the backward (4·d + 3·d_ff values per token and layer, in the vision tower
        for its patches and in the language model for the visual tokens alone), the language model's
        attention probabilities (heads · s² per layer, with s the visual tokens alone) when the attention
        kernel keeps them (eager, and SDPA on the CPU; not flash or memory-efficient kernels), plus the
        float32 pixels. With ``checkpointing`` (:mod:`gradprobe.probe.checkpoint`) each layer keeps only its
        input (d values per token) and one layer at a time holds the rest while it is recomputed."""
        patches, tokens = self.visual_tokens(h, w, m)
        elem = torch.tensor([], dtype=dtype).element_size()

        def dims(cfg: Any) -> tuple[int, int, int]:
            d = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "embed_dim", 0) or 0)
            ff = int(getattr(cfg, "intermediate_size", 0) or 4 * d)
            return d, ff, int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "depth", 0) or 0)

        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vision = getattr(config, "vision_config", None)
        (d, ff, layers), (dv, ffv, depth) = dims(text), dims(vision) if vision is not None else (0, 0, 0)
        attention = int(getattr(text, "num_attention_heads", 1)) * tokens * tokens if quadratic_attention else 0
        text_layer, vision_layer = tokens * (4 * d + 3 * ff) + attention, patches * (4 * dv + 3 * ffv)
        if checkpointing:
            act = tokens * d * layers + patches * dv * depth + max(text_layer, vision_layer)
        else:
            act = text_layer * layers + vision_layer * depth
        fh, fw = self.frame_size(h, w, m) or (h, w)
        return batch * (act * elem + m * fh * fw * 3 * 4)

    # ------------------------------------------------------------------ collation
    def content(self, kind: str, m: int | None) -> list[dict[str, Any]]:
        """The chat-template content items standing for one image or one video of m frames."""
        return [{"type": kind}]

    def messages(self, sample: Sample, m: int | None) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = []
        placed = False
        for role, text in sample.turns:
            items: list[dict[str, Any]] = []
            if role == "user" and not placed:
                items += self.content(sample.kind, m)
                placed = True
            items.append({"type": "text", "text": text})
            msgs.append({"role": role, "content": items})
        return msgs

    def media_kwargs(self, kind: str, media: list[Any], clips: list[Any]) -> dict[str, Any]:
        """Processor keyword arguments for a batch of images (arrays) or clips (:class:`Clip`)."""
        if kind == "image":
            return {"images": media}
        return {"videos": [c.frames for c in clips]}

    def _render(self, msgs: list[dict[str, Any]], gen: bool) -> str:
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _check_placeholders(self, text: str, sample: Sample, m: int | None) -> None:
        """The rendered text holds one placeholder per image or video the sample hands the processor."""
        items = [c["type"] for c in self.content(sample.kind, m)]
        for kind in set(items):
            tok = getattr(self.processor, f"{kind}_token", None)
            if tok and text.count(tok) < items.count(kind):
                raise ModelError(f"{sample.where}: the chat template renders no {tok} placeholder for the {kind} "
                                 f"(found {text.count(tok)}, need {items.count(kind)}); use a template that "
                                 f"renders {kind} content items")

    def end_of_turn(self) -> str:
        """The token that ends an assistant turn in training: :attr:`end_of_turn_token`, else the eos token."""
        return self.end_of_turn_token or str(self.tokenizer.eos_token)

    def answer_spans(self, msgs: list[dict[str, Any]], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The text to tokenize and, per assistant turn, the character span of its answer plus end-of-turn token.

        The answer is found verbatim in its turn (after the template's assistant header, e.g. a think block);
        the end-of-turn token is the one the template renders right after it, or is inserted there when the
        template renders none (Vicuna-style templates end a turn with a space, LLaVA trains on ``</s>``).

        Raises:
            ModelError: the template does not render the conversation prefix-stably, or not the answer verbatim.
        """
        full = self._render(msgs, False)
        eot = self.end_of_turn()
        text, shift, spans = full, 0, []
        for k, msg in enumerate(msgs):
            if msg["role"] != "assistant":
                continue
            before = self._render(msgs[:k], False) if k else ""
            upto = self._render(msgs[: k + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ModelError(
                    f"{where}: the chat template does not render the conversation prefix-stably; "
                    "answer tokens cannot be located"
                )
            answer = "".join(c["text"] for c in msg["content"] if c.get("type") == "text")
            start = full.find(answer, len(before), len(upto))
            if not answer or start < 0:
                raise ModelError(f"{where}: the chat template does not render the answer verbatim; "
                                 "answer tokens cannot be located")
            end = start + len(answer)
            spans.append((start + shift, end + shift + len(eot)))
            if not full.startswith(eot, end):  # the template renders none: insert it after the answer
                text = text[: end + shift] + eot + text[end + shift :]
                shift += len(eot)
        return text, spans

    def _unexpanded_labels(self, text: str, spans: list[tuple[int, int]], where: str) -> tuple[list[int], list[bool]]:
        """Token ids of ``text`` and which are labelled: every token inside an answer span. A token may reach
        outside its span only by the leading space the tokenizer merges into a word (``▁blue``, ``Ġblue``);
        any other overlap would train a prompt token as answer, and is an error."""
        enc = self.tokenizer(text, return_offsets_mapping=True)
        keep = []
        for a, b in enc["offset_mapping"]:
            hit = next(((s, e) for s, e in spans if a < e and b > s), None) if b > a else None
            if hit is not None and (b > hit[1] or (a < hit[0] and text[a : hit[0]].strip())):
                raise DataError(f"{where}: a token {text[a:b]!r} reaches outside the answer {text[hit[0]:hit[1]]!r}; "
                                "labelling it would train a prompt token as answer")
            keep.append(hit is not None)
        return list(enc["input_ids"]), keep

    def labels(self, batch: Mapping[str, Any], texts: list[str], spans: list[list[tuple[int, int]]],
               samples: Sequence[Sample]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, IGNORE)
        for i, s in enumerate(samples):
            u_ids, keep = self._unexpanded_labels(texts[i], spans[i], s.where)
            pos = mask[i].nonzero().flatten().tolist()
            e_ids = ids[i, pos].tolist()
            n = 0
            while n < min(len(u_ids), len(e_ids)) and u_ids[-1 - n] == e_ids[-1 - n]:
                n += 1
            first = len(u_ids) - n
            wanted = [u for u, k in enumerate(keep) if k]
            if not wanted:
                raise DataError(f"{s.where}: the answer has no tokens")
            if wanted[0] < first:
                raise DataError(f"{s.where}: an answer precedes a visual token; answers must follow the medium")
            for u in wanted:
                p = pos[len(pos) - (len(u_ids) - u)]
                labels[i, p] = ids[i, p]
        return labels

    def collate(self, samples: Sequence[Sample], *, store: ClipStore | None = None,
                m: int | Sequence[int] | None = None, images: Mapping[str, np.ndarray] | None = None,
                with_info: bool = True) -> dict[str, Any]:
        """Samples (all images, or all videos at budget m) → model inputs with answer-only labels.

        Args:
            store: where video clips come from (videos only).
            m: the frame budget (videos only): one for the batch, or one per sample (a manifest's).
            images: decoded images by media path (images only; see :func:`load_image`).
            with_info: add the batch's confounds under ``"_gradprobe"`` (read by :func:`batch_info`;
                :func:`loss_fn` and :func:`strip_info` drop it). Use False for a Trainer's collator.
        """
        kinds = {s.kind for s in samples}
        if len(kinds) != 1:
            raise DataError("a batch mixes images and videos")
        kind = kinds.pop()
        per = list(m) if isinstance(m, Sequence) else [m] * len(samples)
        if len(per) != len(samples):
            raise BudgetError(f"{len(per)} frame budgets for {len(samples)} samples")
        texts, spans, media, clips = [], [], [], []
        for s, ms in zip(samples, per, strict=True):
            msgs = self.messages(s, ms)
            text, sp = self.answer_spans(msgs, s.where)
            self._check_placeholders(text, s, ms)
            texts.append(text)
            spans.append(sp)
            if kind == "image":
                media.append(images[s.media] if images is not None else None)
            else:
                if store is None or ms is None:
                    raise BudgetError(f"{s.where}: a video record needs a frame budget and a clip store")
                clips.append(store.clip(s, ms))
        kwargs = self.media_kwargs(kind, media, clips)
        batch = dict(self.processor(text=texts, return_tensors="pt", padding=True, **kwargs))
        batch["labels"] = self.labels(batch, texts, spans, samples)
        if with_info:
            batch[INFO_KEY] = self.info(batch, kind, media, clips)
        return batch

    # ------------------------------------------------------------------ recording
    def visual_token_ids(self) -> dict[str, int]:
        out = {}
        for kind in ("image", "video"):
            tok = getattr(self.processor, f"{kind}_token", None)
            if tok is not None:
                tid = self.tokenizer.convert_tokens_to_ids(tok)
                if tid is not None and tid != self.tokenizer.unk_token_id:
                    out[kind] = tid
        return out

    def frame_pixels_seen(self, batch: Mapping[str, Any], kind: str, media: list[Any], clips: list[Any]) -> int:
        """Pixels per image or frame as the vision tower sees them."""
        arr = media[0] if kind == "image" else clips[0].frames[0]
        return int(arr.shape[0] * arr.shape[1])

    def info(self, batch: Mapping[str, Any], kind: str, media: list[Any], clips: list[Any]) -> dict[str, Any]:
        ids = batch["input_ids"]
        out: dict[str, Any] = {
            "samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
            "tokens": int(batch["attention_mask"].sum()),
            "answer_tokens": int((batch["labels"] != IGNORE).sum()),
        }
        for k, tid in self.visual_token_ids().items():
            n = int((ids == tid).sum())
            if n:
                out[f"{k}_visual_tokens"] = n
        out["pixels_per_frame"] = self.frame_pixels_seen(batch, kind, media, clips)
        if clips:
            out["short_clips"] = int(sum(c.short for c in clips))
        return out


def batch_info(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The per-batch confounds the adapter recorded when collating."""
    return dict(batch.get(INFO_KEY, {}))


def load_image(root: Path, sample: Sample) -> np.ndarray:
    """Decode one image record's file as (H, W, 3) uint8.

    Raises:
        DataError: missing or unreadable file.
    """
    from PIL import Image

    from gradprobe.data.clips import resolve

    p = resolve(root, sample.media)
    if not p.is_file():
        raise DataError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{p}: cannot read image ({e})") from None
