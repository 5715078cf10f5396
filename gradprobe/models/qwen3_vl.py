"""Qwen3-VL: like Qwen2.5-VL, plus DeepStack mergers and per-frame-pair timestamps in the text.

The processor writes ``<t seconds><|vision_start|>…<|vision_end|>`` for each temporal group from
the video metadata; gradprobe passes the nominal (uniform) positions of the sampled frames and the
clip's frame rate, so timestamps are the same for every sampler at a given m.
"""

from __future__ import annotations

from typing import ClassVar

from gradprobe.models.qwen2_5_vl import Qwen2_5_VLAdapter
from gradprobe.models.registry import register


@register
class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family: ClassVar[str] = "qwen3_vl"
    note: ClassVar[str] = "timestamps per frame pair; pixel policy fixed or total"
    architectures: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)
    model_class: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    role_rules: ClassVar[tuple[tuple[str, str], ...]] = (
        ("visual.merger.", "projector"),
        ("visual.deepstack_merger_list.", "projector"),
        ("visual.", "vision"),
        ("lm_head", "head"),
        ("language_model", "language"),
        ("model.", "language"),
    )
