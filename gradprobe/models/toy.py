"""The toy MLLM: transformers' real Qwen2.5-VL classes at a tiny size, built offline.

The tokenizer is a word-level model trained locally with the ``tokenizers``
library on the ShapesWorld vocabulary; the processor (Qwen2.5-VL's, with
Qwen2-VL image and video processors) is saved with ``save_pretrained`` and loaded
back with ``AutoProcessor.from_pretrained``, the same path real checkpoints take.
Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from gradprobe.data.sampling import uniform_indices
from gradprobe.errors import BudgetError, DataError, ModelError
from gradprobe.models.base import load_errors
from gradprobe.models.qwen2_5_vl import Qwen2_5_VLAdapter

SPECIALS = [
    "<|pad|>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TEMPLATE_WORDS = ["user", "assistant", "system", "\n"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Image / frame side in pixels; fixed per frame at every budget (pixel policy: fixed).
PIXELS = 64


def toy_config(vocab: Mapping[str, int], *, seed: int = 0) -> Any:
    """A Qwen2.5-VL config: text hidden 128, 2 layers; vision depth 2, hidden 64, patch 8."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
            max_position_embeddings=4096,
            bos_token_id=vocab["<|im_start|>"],
            eos_token_id=vocab["<|im_end|>"],
            pad_token_id=vocab["<|pad|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=8,
            window_size=64,
            fullatt_block_indexes=[1],
            out_hidden_size=128,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(words: Sequence[str]) -> Any:
    """Train a word-level tokenizer on ``words`` and assemble a Qwen2.5-VL processor around it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator([" ".join(words), " ".join(w for w in TEMPLATE_WORDS if w != "\n"), "a\nb"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    fast.padding_side = "right"
    px = PIXELS * PIXELS
    image_processor = Qwen2VLImageProcessor(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=px, max_pixels=px
    )
    policy = {}
    if hasattr(Qwen2VLVideoProcessor, "cap_pixels_per_frame"):
        # fixed per-frame resolution at every budget (newer transformers ask for the choice explicitly)
        policy["cap_pixels_per_frame"] = False
    video_processor = Qwen2VLVideoProcessor(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=px, max_pixels=px * 256,
        do_sample_frames=False, **policy,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=fast, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )


def create(directory: str | os.PathLike[str], words: Sequence[str], *, seed: int = 0) -> Path:
    """Build a randomly initialised toy and its processor; save both with ``save_pretrained``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    processor = build_processor(words)
    processor.save_pretrained(d)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(toy_config(processor.tokenizer.get_vocab()))
    model.save_pretrained(d)
    mark(d)
    return d


def mark(directory: str | os.PathLike[str]) -> None:
    """Write the marker that makes the registry pick the toy adapter for this checkpoint."""
    from gradprobe.models.registry import TOY_MARKER

    p = Path(directory) / TOY_MARKER
    if not p.is_file():
        p.write_text(json.dumps({"family": "toy", "label_rule": "tokens after the last 'assistant' token"}) + "\n")


def load(directory: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """Load model and processor with ``from_pretrained`` (the real-checkpoint path).

    Raises:
        ModelError: if the directory holds no loadable checkpoint.
    """
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise ModelError(f"{d}: no model checkpoint (config.json) there")
    try:
        processor = AutoProcessor.from_pretrained(d)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=dtype)
    except load_errors() as e:
        raise ModelError(f"{d}: cannot load checkpoint ({str(e).splitlines()[0]})") from None
    model.to(device)
    return model, processor


# ---------------------------------------------------------------------- adapter


def _question(record: Mapping[str, Any]) -> tuple[str, str]:
    conv = record.get("conversations")
    if not conv or len(conv) < 2:
        raise DataError(f"record {record.get('id')!r}: needs a human turn and a gpt answer")
    q = str(conv[0]["value"]).replace("<image>", "").replace("<video>", "").strip()
    a = str(conv[1]["value"]).strip()
    if not a:
        raise DataError(f"record {record.get('id')!r}: empty answer")
    return q, a


class ToyCollator:
    """Turns ShapesWorld records into Qwen2.5-VL inputs with answer-only labels.

    Args:
        processor: the loaded processor.
        root: directory that image/video paths are relative to.
        frames: the frame budget m for video records (even; Qwen's temporal patch is 2).
        cache: keep decoded videos in memory (the same clips are read at every budget).
    """

    def __init__(self, processor: Any, root: str | os.PathLike[str], frames: int | None = None,
                 cache: dict[str, np.ndarray] | None = None, frames_of: Mapping[str, int] | None = None) -> None:
        self.processor = processor
        self.root = Path(root)
        self.frames = frames
        self.cache = cache if cache is not None else {}
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id
        self.assistant_id = tok.convert_tokens_to_ids("assistant")
        self.frames_of = dict(frames_of or {})
        for m in ([frames] if frames is not None else []) + list(self.frames_of.values()):
            check_budget(m)

    def _image(self, rel: str) -> np.ndarray:
        from PIL import Image

        p = self.root / rel
        if not p.is_file():
            raise DataError(f"{p}: image file not found")
        with Image.open(p) as im:
            return np.array(im.convert("RGB"))  # a writable copy

    def _video(self, rel: str, m: int | None) -> np.ndarray:
        from gradprobe.data.video import read_frames

        if rel not in self.cache:
            self.cache[rel] = read_frames(self.root / rel)
        frames = self.cache[rel]
        if m is None:
            raise BudgetError(f"{rel}: a video record needs a frame budget (--frames or a manifest entry)")
        return frames[uniform_indices(len(frames), m)]

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        texts, images, videos = [], [], []
        for r in records:
            q, a = _question(r)
            if "image" in r:
                kind = "image"
                images.append(self._image(r["image"]))
            elif "video" in r:
                kind = "video"
                videos.append(self._video(r["video"], self.frames_of.get(str(r.get("id")), self.frames)))
            else:
                raise DataError(f"record {r.get('id')!r}: has neither 'image' nor 'video'")
            msgs = [
                {"role": "user", "content": [{"type": kind}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": [{"type": "text", "text": a}]},
            ]
            texts.append(self.processor.apply_chat_template(msgs, tokenize=False))
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        batch = dict(self.processor(**kwargs))
        batch["labels"] = _toy_labels(batch["input_ids"], self.assistant_id, self.pad_id)
        return batch


class ToyAdapter(Qwen2_5_VLAdapter):
    """The toy through the adapter protocol: Qwen2.5-VL with frames kept at their own size and the
    toy's label rule (every token after the last ``assistant`` role token), as its training used."""

    family: ClassVar[str] = "toy"
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)

    def frame_size(self, h: int, w: int, m: int) -> tuple[int, int] | None:
        return None

    def media_kwargs(self, kind: str, media: list[Any], clips: list[Any]) -> dict[str, Any]:
        # the toy was trained without video metadata (the processor's default frame rate): keep it so
        kw = super().media_kwargs(kind, media, clips)
        kw.pop("video_metadata", None)
        return kw

    def labels(self, batch: Mapping[str, Any], texts: list[str], spans: list[list[tuple[int, int]]],
               samples: Sequence[Any]) -> torch.Tensor:
        return _toy_labels(batch["input_ids"], self.tokenizer.convert_tokens_to_ids("assistant"),
                           self.tokenizer.pad_token_id)


def _toy_labels(ids: torch.Tensor, assistant_id: int, pad_id: int) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    for i in range(ids.shape[0]):
        marks = (ids[i] == assistant_id).nonzero().flatten()
        first = int(marks[-1]) + 1  # answer tokens follow the last "assistant" role token
        keep = ids[i, first:] != pad_id
        labels[i, first:][keep] = ids[i, first:][keep]
    return labels


#: parameter roles and module keys of the toy (those of Qwen2.5-VL)
role_of = ToyAdapter.role_of
module_of = ToyAdapter.module_of


def check_budget(m: int) -> int:
    """Qwen2.5-VL groups frames in pairs (temporal patch 2): m must be even (m = 1 would repeat the frame)."""
    if m < 2 or m % 2:
        raise BudgetError(f"frames mismatch: expected an even count for Qwen2.5-VL (temporal patch 2), got {m}")
    return m


def loss_fn(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Answer-token cross-entropy (the model's own shifted loss over ``labels``)."""
    return model(**batch).loss


def batch_info(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Per-batch confounds to record: samples, sequence length, visual tokens, pixels per frame."""
    info: dict[str, Any] = {"samples": int(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1])}
    for key, grid in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        if grid in batch:
            g = batch[grid]
            info[f"{key}_visual_tokens"] = int((g.prod(dim=1) // 4).sum())
            info["pixels_per_frame"] = int(g[0, 1] * g[0, 2] * 64)
    return info


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file of LLaVA-style records.

    Raises:
        DataError: if the file is missing, empty or holds a line that is not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    out = []
    with open(p) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{p}:{n}: expected a JSON object per line")
            out.append(rec)
    if not out:
        raise DataError(f"{p}: data file is empty")
    return out
