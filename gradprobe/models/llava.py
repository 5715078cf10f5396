"""LLaVA-1.5: an image model; a video of m frames is given as m images, one ``<image>`` each.

Every frame costs a full image's visual tokens (576 for LLaVA-1.5-7B), so sequence length grows
fast with m. Pixels are fixed by the vision tower, as for LLaVA-NeXT-Video.
"""

from __future__ import annotations

from typing import Any, ClassVar

from gradprobe.models.llava_next_video import LLAVA_ROLES, LlavaNextVideoAdapter, _crop_pixels


class LlavaAdapter(LlavaNextVideoAdapter):
    family: ClassVar[str] = "llava"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    model_class: ClassVar[str] = "LlavaForConditionalGeneration"
    role_rules: ClassVar[tuple[tuple[str, str], ...]] = LLAVA_ROLES

    def _frame_processor(self) -> Any:
        return self.processor.image_processor

    def content(self, kind: str, m: int | None) -> list[dict[str, Any]]:
        return [{"type": "image"}] * (m if kind == "video" and m else 1)

    def visual_tokens(self, h: int, w: int, m: int) -> tuple[int, int]:
        grid = _crop_pixels(self._frame_processor()) // int(self.processor.patch_size) ** 2
        return m * (grid + 1), m * grid  # every frame a whole image (its CLS token dropped)

    def media_kwargs(self, kind: str, media: list[Any], clips: list[Any]) -> dict[str, Any]:
        if kind == "image":
            return {"images": media}
        return {"images": [f for c in clips for f in c.frames]}
