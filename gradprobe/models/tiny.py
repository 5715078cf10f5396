"""Tiny random-weight checkpoints of every supported family, built offline.

Each checkpoint is the family's real transformers classes at a tiny size: a config,
random weights, a subword tokenizer trained locally with ``tokenizers`` (byte-level BPE
for Qwen, SentencePiece-style ``▁`` BPE with a leading ``<s>`` for the LLaVA families,
both merging a word's leading space into it as the released ones do), the family's own
image/video processors and a chat template shaped like the released one (Qwen's default
system turn and newline after ``<|im_end|>``, Qwen3's think tags, Vicuna's ``USER: …
ASSISTANT:`` with spaces, or a Mistral ``[INST]`` variant). Everything is written with ``save_pretrained`` so that loading it goes through
``from_pretrained`` and ``AutoProcessor``, the path real checkpoints take. Use them
to try gradprobe on a family without a download, and in tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gradprobe.errors import ModelError

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]

#: Qwen2.5-VL's template: a default system turn when the conversation has none, a newline after each
#: ``<|im_end|>`` (the released template's shape, placeholders for images and videos).
_QWEN_TURNS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + _QWEN_TURNS
)
#: Qwen3-VL's template shape with thinking tags: every assistant turn opens with an empty think block,
#: as Qwen3's templates render finished turns (the generation prompt does not have it: not prefix-stable).
QWEN3_TEMPLATE = _QWEN_TURNS.replace(
    "{% if m['content'] is string %}",
    "{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}{% if m['content'] is string %}",
)
#: LLaVA-1.5 / LLaVA-NeXT-Video (Vicuna): ``USER: <image>\nq ASSISTANT: a USER: …``, spaces as the released
#: templates put them (and no ``</s>``: the end-of-turn token is added by the adapter, as LLaVA trains).
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] + ' ' }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'video' %}{{ '<video>\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
#: The Mistral variant (LLaVA-NeXT on Mistral): ``[INST] <image>\nq [/INST] a<\s> [INST] …``, with the
#: released template's literal ``<\s>`` (not the ``</s>`` token) after each answer.
LLAVA_MISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'video' %}{{ '<video>\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ ' ' + c['text'] + '<\\s> ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}"
)
TEMPLATES = {"qwen": QWEN_TEMPLATE, "qwen3": QWEN3_TEMPLATE, "vicuna": LLAVA_TEMPLATE, "mistral": LLAVA_MISTRAL_TEMPLATE}
#: text the tiny tokenizers are trained on besides the vocabulary: the templates' words and punctuation
_TEMPLATE_TEXT = ["You are a helpful assistant.", "system user assistant", "USER: ASSISTANT:", "[INST] [/INST]",
                  "<think> </think>", "<\\s>", "It is blue, clearly.", "seconds>"]

FAMILY_NAMES = ("qwen2_5_vl", "qwen3_vl", "llava_next_video", "llava")


def subword_tokenizer(words: Sequence[str], specials: Sequence[str], *, style: str, pad: str, unk: str | None,
                      bos: str | None, eos: str, extra: dict[str, str] | None = None, vocab_size: int = 600,
                      add_bos: bool = False) -> Any:
    """A subword fast tokenizer trained locally, shaped like the released ones.

    ``style="bytelevel"``: byte-level BPE, spaces merged into the following word (``Ġblue``), as Qwen's;
    ``style="metaspace"``: SentencePiece-style BPE with ``▁`` marking a leading space (``▁blue``), as
    Llama / Vicuna / Mistral's, with ``add_bos`` putting ``<s>`` first.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(words), *(f" {w}" for w in words), *_TEMPLATE_TEXT, "a\nb", "?", "1 2 3 4"]
    if style == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "metaspace":
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=alphabet,
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, eos_token=eos,
                                   bos_token=bos, extra_special_tokens=dict(extra or {}))
    fast.padding_side = "right"
    return fast


def _qwen_tokenizer(words: Sequence[str]) -> Any:
    return subword_tokenizer(words, QWEN_SPECIALS, style="bytelevel", pad="<|endoftext|>", unk=None, bos=None,
                             eos="<|im_end|>",
                             extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                    "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def _qwen_video_processor(cls: Any, patch: int, px: int) -> Any:
    policy = {"cap_pixels_per_frame": False} if hasattr(cls, "cap_pixels_per_frame") else {}
    return cls(patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=(2 * patch) ** 2,
               max_pixels=px, do_sample_frames=False, **policy)


#: Qwen2.5-VL-7B's shape (text and vision) and its processors' pixel limits, for benchmarks
QWEN2_5_VL_7B = dict(
    text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
              intermediate_size=18944, mrope_section=[16, 24, 24], vocab_size=152064),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584),
    patch=14, min_pixels=3136, max_pixels=12845056,
)
#: A Qwen2.5-VL of about 1 B parameters (Qwen2.5-VL-3B's vision width at 8 blocks; a 16-layer language
#: model of width 2048 and 18 layers), for CPU measurements at a scale where exact reference rows no longer fit
QWEN2_5_VL_1B = dict(
    text=dict(hidden_size=2048, num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=2,
              intermediate_size=5632, mrope_section=[16, 24, 24]),
    vision=dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, window_size=112,
                fullatt_block_indexes=[3, 7], out_hidden_size=2048),
    patch=14, min_pixels=3136, max_pixels=None,
)
_QWEN2_5_VL_TINY = dict(
    text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, mrope_section=[2, 3, 3]),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, window_size=32,
                fullatt_block_indexes=[1], out_hidden_size=64),
    patch=8, min_pixels=256, max_pixels=None,
)


def _qwen2_5_vl(words: Sequence[str], side: int, shape: str = "tiny") -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    dims = {"7b": QWEN2_5_VL_7B, "1b": QWEN2_5_VL_1B}.get(shape, _QWEN2_5_VL_TINY)
    tok = _qwen_tokenizer(words)
    px = dims["max_pixels"] or side * side
    patch = dims["patch"]
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                              min_pixels=dims["min_pixels"], max_pixels=px),
        video_processor=_qwen_video_processor(Qwen2VLVideoProcessor, patch, px),
        tokenizer=tok, chat_template=QWEN_TEMPLATE)
    v = tok.get_vocab()
    text = dict(dims["text"])
    section = text.pop("mrope_section")
    text.setdefault("vocab_size", len(v))
    cfg = Qwen2_5_VLConfig(
        text_config=dict(**text, rope_scaling={"type": "mrope", "mrope_section": section},
                         max_position_embeddings=32768, bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"],
                         pad_token_id=v["<|endoftext|>"]),
        vision_config=dict(**dims["vision"], spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg), proc


def _qwen3_vl(words: Sequence[str], side: int, shape: str = "tiny") -> tuple[Any, Any]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tok = _qwen_tokenizer(words)
    px = side * side
    proc = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=256,
                                              max_pixels=px),
        video_processor=_qwen_video_processor(Qwen3VLVideoProcessor, 8, px),
        tokenizer=tok, chat_template=QWEN3_TEMPLATE)
    v = tok.get_vocab()
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(v), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                         max_position_embeddings=4096, bos_token_id=v["<|endoftext|>"],
                         eos_token_id=v["<|im_end|>"], pad_token_id=v["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                           out_hidden_size=64, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(cfg), proc


def _llava_tokenizer(words: Sequence[str]) -> Any:
    return subword_tokenizer(words, LLAVA_SPECIALS, style="metaspace", pad="<pad>", unk="<unk>", bos="<s>",
                             eos="</s>", extra={"image_token": "<image>", "video_token": "<video>"}, add_bos=True)


#: LLaVA-NeXT-Video-7B's shape: CLIP ViT-L/14-336 and a Vicuna-7B language model
LLAVA_NEXT_VIDEO_7B = dict(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768),
    text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32064),
    side=336, patch=14,
)


def _clip_vision(side: int, dims: dict[str, Any] | None = None) -> dict[str, Any]:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=side,
                patch_size=8, projection_dim=32)
    return dict(model_type="clip_vision_model", **(dims or base))


def _llama_text(v: dict[str, int], dims: dict[str, Any] | None = None) -> dict[str, Any]:
    base = dict(vocab_size=len(v), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    return dict(model_type="llama", **(dims or base), max_position_embeddings=32768,
                bos_token_id=v["<s>"], eos_token_id=v["</s>"], pad_token_id=v["<pad>"])


def _llava(words: Sequence[str], side: int, shape: str = "tiny") -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _llava_tokenizer(words)
    v = tok.get_vocab()
    ip = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    cfg = LlavaConfig(vision_config=_clip_vision(side), text_config=_llama_text(v), image_token_index=v["<image>"],
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(side // 8) ** 2, tie_word_embeddings=False)
    return LlavaForConditionalGeneration(cfg), proc


def _llava_next_video(words: Sequence[str], side: int, shape: str = "tiny") -> tuple[Any, Any]:
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
    )
    from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

    big = LLAVA_NEXT_VIDEO_7B if shape == "7b" else None
    side, patch = (big["side"], big["patch"]) if big else (side, 8)
    tok = _llava_tokenizer(words)
    v = tok.get_vocab()
    size = {"shortest_edge": side}
    crop = {"height": side, "width": side}
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]] if big else [[side, side], [side, 2 * side]]
    ip = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
    vp = LlavaNextVideoVideoProcessor(size=size, crop_size=crop, do_sample_frames=False)
    proc = LlavaNextVideoProcessor(image_processor=ip, video_processor=vp, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_TEMPLATE)
    cfg = LlavaNextVideoConfig(vision_config=_clip_vision(side, big["vision"] if big else None),
                               text_config=_llama_text(v, big["text"] if big else None),
                               image_token_index=v["<image>"], video_token_index=v["<video>"],
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               image_grid_pinpoints=pinpoints, spatial_pool_stride=2,
                               image_seq_length=(side // patch) ** 2, video_seq_length=(side // patch // 2) ** 2,
                               tie_word_embeddings=False)
    return LlavaNextVideoForConditionalGeneration(cfg), proc


_BUILDERS = {"qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "llava": _llava, "llava_next_video": _llava_next_video}


SHAPES = {"tiny": FAMILY_NAMES, "1b": ("qwen2_5_vl",), "7b": ("qwen2_5_vl", "llava_next_video")}


def create_tiny(family: str, directory: str | os.PathLike[str], words: Sequence[str], *, side: int = 32,
                seed: int = 0, shape: str = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32,
                template: str | None = None) -> Path:
    """Build a random-weight checkpoint of ``family`` in ``directory`` (model and processor).

    Args:
        family: one of :data:`FAMILY_NAMES`.
        words: the vocabulary the tokenizer is trained on.
        side: image/frame side in pixels the tiny processors are set up for.
        seed: seed of the random weights.
        shape: ``tiny`` (default), ``1b`` (a Qwen2.5-VL of about 1 B parameters), or ``7b`` for the
            released 7B shapes and processor settings of Qwen2.5-VL and LLaVA-NeXT-Video (benchmarks; the
            tokenizer stays the tiny one).
        device, dtype: where and in which dtype the weights are initialised (a 7B shape wants a GPU).
        template: another chat template from :data:`TEMPLATES` (e.g. ``mistral`` for LLaVA-NeXT on Mistral).

    Raises:
        ModelError: an unknown family or shape.
    """
    if family not in SHAPES.get(shape, ()):
        raise ModelError(f"no {shape} builder for family {family!r}; known: {', '.join(SHAPES.get(shape, ()))}")
    if template is not None and template not in TEMPLATES:
        raise ModelError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model, proc = _BUILDERS[family](words, side, shape)
    finally:
        torch.set_default_dtype(old)
    if template is not None:
        proc.chat_template = TEMPLATES[template]
    proc.save_pretrained(d)
    model.save_pretrained(d)
    return d
