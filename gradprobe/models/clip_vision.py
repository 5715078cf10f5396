"""What the LLaVA families share: a CLIP vision tower at a fixed resolution, an MLP projector and a
Llama-style language model.

Their processors resize every image and frame to the vision tower's resolution, so the pixel policy is
fixed by the architecture. gradprobe pre-scales frames to the processor's shortest edge (what the
processor would do) so the cached clips stay small. With ``vision_feature_layer = -2`` the last vision
layer receives no gradient; such parameters are measured as zero.
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


def crop_pixels(proc: Any) -> int:
    """Pixels of the square (or crop) every image or frame is cut to by an image or video processor."""
    crop = getattr(proc, "crop_size", None)
    if crop is None:
        e = _edge(proc.size)
        return e * e
    if isinstance(crop, Mapping):
        return int(crop["height"]) * int(crop["width"])
    return int(crop.height) * int(crop.width)


class ClipVisionAdapter(Adapter):
    """The base of the LLaVA families (not a family itself): roles, fixed resolution, frame sizes."""

    role_rules: ClassVar[tuple[tuple[str, str], ...]] = LLAVA_ROLES
    fixed_resolution: ClassVar[bool] = True

    def _frame_processor(self) -> Any:
        """The processor that sizes video frames."""
        raise NotImplementedError

    def _grid(self) -> int:
        """Vision patches per image or frame."""
        return crop_pixels(self._frame_processor()) // int(self.processor.patch_size) ** 2

    def frame_size(self, h: int, w: int, m: int) -> tuple[int, int]:
        e = _edge(self._frame_processor().size)
        s = e / min(h, w)
        return max(e, round(h * s)), max(e, round(w * s))

    def frame_pixels_seen(self, batch: Mapping[str, Any], kind: str, media: list[Any], clips: list[Any]) -> int:
        return crop_pixels(self.processor.image_processor if kind == "image" else self._frame_processor())
