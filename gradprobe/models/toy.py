"""The toy MLLM: transformers' real Qwen2.5-VL classes at a tiny size, built offline.

The tokenizer is a word-level model trained locally with the ``tokenizers``
library on the ShapesWorld vocabulary; the processor (Qwen2.5-VL's, with
Qwen2-VL image and video processors) is saved with ``save_pretrained`` and loaded
back with ``AutoProcessor.from_pretrained``, the same path real checkpoints take.
Nothing is fetched from a hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from gradprobe.models.qwen2_5_vl import Qwen2_5_VLAdapter
from gradprobe.models.registry import register

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


def toy_config(vocab: Mapping[str, int], *, seed: int = 0, text_layers: int = 2, vision_depth: int = 2,
               rope_theta: float = 10.0) -> Any:
    """A Qwen2.5-VL config: text hidden 128, 2 layers; vision depth 2, hidden 64, patch 8.

    ``rope_theta`` 10 (the released models use 1e6): with head dimension 32, Qwen2.5-VL's multimodal RoPE gives
    the height and width sections the lowest frequencies; at 1e6, across the toy's 4 × 4 token grid, the width
    section turns by under a milliradian and the height section by under 0.1 rad, so the language model can
    hardly tell where a visual token is. At 10 they turn by 0.1–0.6 rad per token, and the direction a shape
    moves can be learned.

    ``tokens_per_second`` 1 (the config's default is 4; the released models use 2): Qwen2.5-VL gives a clip's
    temporal groups the temporal position ⌊seconds × tokens_per_second⌋, so a ShapesWorld clip (8 s at 8 fps)
    spans 8 positions at every budget (at m = 64 four groups share one; at m = 8 they are 2 apart). The toy's
    temporal RoPE section holds the four highest frequencies (1.0–0.65 rad per position at θ = 10): over 8
    positions the lowest turns by under one revolution, so a token's place in the clip can be read from it, as
    from the released models' lowest temporal frequencies (about 0.04 rad per position at θ = 10⁶). At 4 the
    clip spans 32 positions and every frequency turns three to five times. Images have one temporal group.
    """
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=128,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6], "rope_theta": rope_theta},
            max_position_embeddings=4096,
            bos_token_id=vocab["<|im_start|>"],
            eos_token_id=vocab["<|im_end|>"],
            pad_token_id=vocab["<|pad|>"],
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=8,
            window_size=64,
            fullatt_block_indexes=[vision_depth - 1],
            out_hidden_size=128,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=1,
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


# ---------------------------------------------------------------------- adapter


@register
class ToyAdapter(Qwen2_5_VLAdapter):
    """The toy through the adapter protocol: Qwen2.5-VL with frames kept at their own size and the
    toy's label rule (every token after the last ``assistant`` role token), as its training used."""

    family: ClassVar[str] = "toy"
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
    note: ClassVar[str] = "the built-in tiny Qwen2.5-VL (checkpoints marked gradprobe_toy.json)"
    #: found by its checkpoints' marker file, not by its (Qwen2.5-VL) architecture
    marker_only: ClassVar[bool] = True

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], **options: Any) -> tuple[torch.nn.Module, ToyAdapter]:
        """Load as :meth:`Adapter.load` does, then let the vision tower attend over all its equal-length chunks
        at once (:func:`batch_vision_attention`)."""
        model, adapter = super().load(model_dir, **options)
        batch_vision_attention(model)
        return model, adapter

    def frame_size(self, h: int, w: int, m: int) -> tuple[int, int] | None:
        return None

    def labels(self, batch: Mapping[str, Any], texts: list[str], spans: list[list[tuple[int, int]]],
               samples: Sequence[Any]) -> torch.Tensor:
        return _toy_labels(batch["input_ids"], self.tokenizer.convert_tokens_to_ids("assistant"),
                           self.tokenizer.pad_token_id)


def batch_vision_attention(model: torch.nn.Module) -> int:
    """Make the vision attention of ``model`` one batched SDPA call where its chunks have equal lengths.

    Without flash attention, transformers' ``Qwen2_5_VLVisionAttention`` attends once per ``cu_seqlens`` chunk
    (one per temporal patch in the full-attention block, one per window in the others): at 64 frames a batch of
    8 clips makes 256 calls per layer, and batching them saves about 30% of a Video-SFT step there
    (``benchmarks/bench_toy_attention.py``). Every chunk of the toy has the same length (a frame is one window),
    so the chunks stack into one batch: the same SDPA per chunk, computed in one call. Modules whose attention
    is not SDPA, or calls whose chunks differ in length, keep transformers' own forward.
    ``tests/test_toy_model.py`` checks outputs and gradients against it.

    Returns:
        how many attention modules were switched.
    """
    n = 0
    for module in model.modules():
        if type(module).__name__ == "Qwen2_5_VLVisionAttention" and not hasattr(module, "chunked_forward"):
            module.chunked_forward = module.forward
            module.forward = types.MethodType(_batched_vision_attention, module)
            n += 1
    return n


@contextlib.contextmanager
def chunked_vision_attention(model: torch.nn.Module) -> Any:
    """Inside the block, the vision attention switched by :func:`batch_vision_attention` runs transformers' own
    forward again (one call per chunk), for comparisons; yields how many modules that is."""
    switched = {m: m.forward for m in model.modules() if hasattr(m, "chunked_forward")}
    for m in switched:
        m.forward = m.chunked_forward
    try:
        yield len(switched)
    finally:
        for m, forward in switched.items():
            m.forward = forward


def _batched_vision_attention(self: Any, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                              *args: Any, position_embeddings: Any = None, **kwargs: Any) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    sdpa = getattr(getattr(self, "config", None), "_attn_implementation", None) == "sdpa"
    if (args or position_embeddings is None or not sdpa or len(set(lengths)) != 1
            or (self.training and getattr(self, "attention_dropout", 0.0))):
        return self.chunked_forward(hidden_states, cu_seqlens, *args, position_embeddings=position_embeddings,
                                    **kwargs)
    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    n, length, seq = len(lengths), lengths[0], hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotate(q, k, cos, sin)
    q, k, v = (t.reshape(n, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=getattr(self, "scaling", None))
    return self.proj(out.transpose(1, 2).reshape(seq, -1).contiguous())


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
