"""Qwen2.5-VL: vision tower with a merger, M-RoPE language model; frames go in pairs (temporal patch 2).

Videos are sized by gradprobe (the pixel policy) and handed to the processor with ``do_resize=False``
and their metadata (frame rate, positions), so ``second_per_grid_ts`` reflects the sampled rate.
``mm_token_type_ids`` is requested explicitly: without it the model falls back to 1-D positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from gradprobe.models.base import Adapter, smart_resize
from gradprobe.models.registry import register

#: frame rate assumed for frame folders without an ``fps`` field (qwen-vl-utils' default sampling rate)
DEFAULT_FPS = 2.0
#: per-frame pixel cap of the fixed policy (448×448, 256 visual tokens per frame pair at patch 14)
FRAME_PIXELS = 448 * 448
#: qwen-vl-utils' default total video pixels, in units of factor² (24576 · 28²)
TOTAL_TOKENS = 24576


@register
class Qwen2_5_VLAdapter(Adapter):
    family: ClassVar[str] = "qwen2_5_vl"
    note: ClassVar[str] = "pixel policy fixed or total; M-RoPE with mm_token_type_ids"
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
    model_class: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    temporal_patch: ClassVar[int] = 2
    end_of_turn_token: ClassVar[str | None] = "<|im_end|>"
    role_rules: ClassVar[tuple[tuple[str, str], ...]] = (
        ("visual.merger.", "projector"),
        ("visual.", "vision"),
        ("lm_head", "head"),
        ("language_model", "language"),
        ("model.", "language"),
    )

    def _factor(self) -> int:
        vp = self.processor.video_processor
        return int(vp.patch_size) * int(getattr(vp, "merge_size", 2))

    def frame_size(self, h: int, w: int, m: int) -> tuple[int, int]:
        f = self._factor()
        cap = self.policy.frame_pixels or FRAME_PIXELS
        if self.policy.kind == "total":
            total = self.policy.total_pixels or TOTAL_TOKENS * f * f
            cap = min(cap, total * self.temporal_patch // m)
        return smart_resize(h, w, f, f * f, max(cap, f * f))

    def visual_tokens(self, h: int, w: int, m: int) -> tuple[int, int]:
        vp = self.processor.video_processor
        p, merge = int(vp.patch_size), int(getattr(vp, "merge_size", 2))
        size = self.frame_size(h, w, m)
        if size is None:  # the processor sizes the frames itself
            f = p * merge
            size = smart_resize(h, w, f, int(getattr(vp, "min_pixels", None) or f * f),
                                int(getattr(vp, "max_pixels", None) or h * w))
        patches = -(-m // self.temporal_patch) * (size[0] // p) * (size[1] // p)
        return patches, patches // (merge * merge)

    def media_kwargs(self, kind: str, media: list[Any], clips: list[Any]) -> dict[str, Any]:
        if kind == "image":
            return {"images": media, "return_mm_token_type_ids": True}
        from transformers.video_utils import VideoMetadata

        meta = [VideoMetadata(total_num_frames=c.total, fps=c.fps or DEFAULT_FPS,
                              frames_indices=[int(i) for i in c.positions]) for c in clips]
        return {"videos": [c.frames for c in clips], "video_metadata": meta, "do_resize": False,
                "return_mm_token_type_ids": True}

    def frame_pixels_seen(self, batch: Mapping[str, Any], kind: str, media: list[Any], clips: list[Any]) -> int:
        grid = batch["image_grid_thw" if kind == "image" else "video_grid_thw"]
        patch = int(self.processor.video_processor.patch_size)
        return int(grid[0, 1] * grid[0, 2]) * patch * patch
