"""LLaVA-1.5: an image model; a video of m frames is given as m images, one ``<image>`` each.

Every frame costs a full image's visual tokens (576 for LLaVA-1.5-7B), so sequence length grows
fast with m. Pixels are fixed by the vision tower (see :mod:`gradprobe.models.clip_vision`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from gradprobe.models.clip_vision import ClipVisionAdapter
from gradprobe.models.registry import register


@register
class LlavaAdapter(ClipVisionAdapter):
    family: ClassVar[str] = "llava"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    model_class: ClassVar[str] = "LlavaForConditionalGeneration"
    note: ClassVar[str] = "LLaVA-1.5: a video is m frame images"

    def _frame_processor(self) -> Any:
        return self.processor.image_processor

    def content(self, kind: str, m: int | None) -> list[dict[str, Any]]:
        return [{"type": "image"}] * (m if kind == "video" and m else 1)

    def media_kwargs(self, kind: str, media: list[Any], clips: list[Any]) -> dict[str, Any]:
        if kind == "image":
            return {"images": media}
        return {"images": [f for c in clips for f in c.frames]}

    def visual_tokens(self, h: int, w: int, m: int) -> tuple[int, int]:
        return m * (self._grid() + 1), m * self._grid()  # every frame a whole image (its CLS token dropped)
