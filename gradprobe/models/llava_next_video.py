"""LLaVA-NeXT-Video: CLIP vision tower, MLP projector, Llama-style language model; frames pooled 2×2.

See :mod:`gradprobe.models.clip_vision` for what it shares with LLaVA-1.5.
"""

from __future__ import annotations

from typing import Any, ClassVar

from gradprobe.models.clip_vision import ClipVisionAdapter
from gradprobe.models.registry import register


@register
class LlavaNextVideoAdapter(ClipVisionAdapter):
    family: ClassVar[str] = "llava_next_video"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaNextVideoForConditionalGeneration",)
    model_class: ClassVar[str] = "LlavaNextVideoForConditionalGeneration"
    note: ClassVar[str] = "frames at the vision tower's resolution; last vision layer has no gradient"

    def _frame_processor(self) -> Any:
        return self.processor.video_processor

    def visual_tokens(self, h: int, w: int, m: int) -> tuple[int, int]:
        return m * self._grid(), m * self._grid() // 4  # frames pooled 2×2 (spatial_pool_stride 2)
