"""LLaVA-NeXT-Video: CLIP vision tower, MLP projector, Llama-style language model; frames pooled.

The processors resize every image and frame to the vision tower's resolution, so the pixel policy
is fixed by the architecture. gradprobe pre-scales frames to the processor's shortest edge (what the
processor would do) so the cached clips stay small. With ``vision_feature_layer = -2`` the last
vision layer receives no gradient; such parameters are measured as zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from gradprobe.models.base import Adapter

LLAVA_ROLES: tuple[tuple[str, str], ...] = (
    ("vision_tower.", "vision"),
    ("multi_modal_projector.", "projector"),
    ("image_newline", "projector"),
    ("lm_head", "head"),
    ("language_model", "language"),
)


def _edge(size: Any) -> int:
    if isinstance(size, Mapping):
        return int(size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0)))
    return int(getattr(size, "shortest_edge", None) or min(size.height, size.width))


def _crop_pixels(proc: Any) -> int:
    crop = getattr(proc, "crop_size", None)
    if crop is None:
        e = _edge(proc.size)
        return e * e
    if isinstance(crop, Mapping):
        return int(crop["height"]) * int(crop["width"])
    return int(crop.height) * int(crop.width)


class LlavaNextVideoAdapter(Adapter):
    family: ClassVar[str] = "llava_next_video"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaNextVideoForConditionalGeneration",)
    model_class: ClassVar[str] = "LlavaNextVideoForConditionalGeneration"
    role_rules: ClassVar[tuple[tuple[str, str], ...]] = LLAVA_ROLES
    fixed_resolution: ClassVar[bool] = True

    def _frame_processor(self) -> Any:
        return self.processor.video_processor

    def frame_size(self, h: int, w: int, m: int) -> tuple[int, int]:
        e = _edge(self._frame_processor().size)
        s = e / min(h, w)
        return max(e, round(h * s)), max(e, round(w * s))

    def visual_tokens(self, h: int, w: int, m: int) -> tuple[int, int]:
        grid = _crop_pixels(self._frame_processor()) // int(self.processor.patch_size) ** 2
        return m * grid, m * grid // 4  # frames pooled 2×2 (spatial_pool_stride 2)

    def frame_pixels_seen(self, batch: Mapping[str, Any], kind: str, media: list[Any], clips: list[Any]) -> int:
        return _crop_pixels(self.processor.image_processor if kind == "image" else self._frame_processor())
