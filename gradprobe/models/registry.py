"""Model families gradprobe can drive, found by the HF architecture string in a checkpoint's config.json.

Each family's adapter module is imported only when a checkpoint of that family is loaded. An
architecture that no family lists is refused with an error that names the supported ones. The
built-in toy is a tiny Qwen2.5-VL; its checkpoints carry a marker file (``gradprobe_toy.json``) that
selects the toy adapter (ShapesWorld's label rule) instead of the Qwen2.5-VL one.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gradprobe.errors import ModelError


@dataclass(frozen=True)
class Family:
    """A model family: its architecture strings, adapter module and frame-budget rule."""

    name: str
    architectures: tuple[str, ...]
    module: str
    adapter: str
    frames: str
    note: str = ""

    def adapter_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.adapter)


_EVEN = "even m ≥ 2 (temporal patch 2)"
FAMILIES: tuple[Family, ...] = (
    Family("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), "gradprobe.models.qwen2_5_vl",
           "Qwen2_5_VLAdapter", _EVEN, "pixel policy fixed or total; M-RoPE with mm_token_type_ids"),
    Family("qwen3_vl", ("Qwen3VLForConditionalGeneration",), "gradprobe.models.qwen3_vl", "Qwen3VLAdapter", _EVEN,
           "timestamps per frame pair; pixel policy fixed or total"),
    Family("llava_next_video", ("LlavaNextVideoForConditionalGeneration",), "gradprobe.models.llava_next_video",
           "LlavaNextVideoAdapter", "any m ≥ 1",
           "frames at the vision tower's resolution; last vision layer has no gradient"),
    Family("llava", ("LlavaForConditionalGeneration",), "gradprobe.models.llava", "LlavaAdapter", "any m ≥ 1",
           "LLaVA-1.5: a video is m frame images"),
    Family("toy", ("Qwen2_5_VLForConditionalGeneration",), "gradprobe.models.toy", "ToyAdapter", _EVEN,
           "the built-in tiny Qwen2.5-VL (checkpoints marked gradprobe_toy.json)"),
)
TOY_MARKER = "gradprobe_toy.json"


def supported_architectures() -> list[str]:
    return list(dict.fromkeys(a for f in FAMILIES for a in f.architectures))


def family_of(architecture: str) -> Family:
    """The family that lists ``architecture``.

    Raises:
        ModelError: no family lists it; the message names the supported architectures.
    """
    for f in FAMILIES:
        if architecture in f.architectures:
            return f
    raise ModelError(
        f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_architectures(model_id: str) -> list[str]:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{model_id}: no such local directory, and not loadable as a hub id ({str(e).splitlines()[0]})"
        ) from None
    return list(getattr(cfg, "architectures", None) or [])


def architecture_of(model_dir: str | os.PathLike[str]) -> str:
    """The first entry of ``architectures`` in a checkpoint's config.json (a local directory or a hub id).

    Raises:
        ModelError: missing directory, missing or invalid config.json, or an unsupported architecture.
    """
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if not model_dir.exists():
        if not _HUB_ID.fullmatch(str(model_dir)):
            raise ModelError(f"{model_dir}: model path not found")
        archs = _hub_architectures(str(model_dir))
    elif not cfg.is_file():
        raise ModelError(f"{model_dir}: no config.json; not a model checkpoint directory")
    else:
        try:
            archs = json.loads(cfg.read_text()).get("architectures") or []
        except json.JSONDecodeError:
            raise ModelError(f"{cfg}: not valid JSON") from None
    arch = archs[0] if archs else "unknown"
    try:
        family_of(arch)
    except ModelError as e:
        raise ModelError(f"{model_dir}: {e}") from None
    return arch


def family_for(model_dir: str | os.PathLike[str]) -> Family:
    """The family of a checkpoint directory: the toy when its marker is there, else by architecture."""
    arch = architecture_of(model_dir)
    if (Path(model_dir) / TOY_MARKER).is_file():
        return next(f for f in FAMILIES if f.name == "toy")
    return family_of(arch)


def adapter_for(model_dir: str | os.PathLike[str]) -> type:
    """The adapter class for a checkpoint directory (its module imported on first use)."""
    return family_for(model_dir).adapter_class()
