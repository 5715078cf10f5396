"""Model families gradprobe can drive, found by the HF architecture string in a checkpoint's config.json.

Each family's adapter module is imported only when a checkpoint of that family is loaded. An
architecture that no family lists is refused with an error that names the supported ones.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from gradprobe.errors import ModelError


@dataclass(frozen=True)
class Family:
    """A model family: its architecture strings, adapter module and frame-budget rule."""

    name: str
    architectures: tuple[str, ...]
    module: str
    frames: str
    note: str = ""


FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen2_5_vl",
        architectures=("Qwen2_5_VLForConditionalGeneration",),
        module="gradprobe.models.toy",
        frames="even m ≥ 2 (temporal patch 2)",
        note="the built-in toy is a tiny Qwen2.5-VL; its records are ShapesWorld's LLaVA-style JSONL",
    ),
)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


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


def architecture_of(model_dir: str | os.PathLike[str]) -> str:
    """The first entry of ``architectures`` in a checkpoint directory's config.json.

    Raises:
        ModelError: missing directory, missing or invalid config.json, or an unsupported architecture.
    """
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if not model_dir.exists():
        raise ModelError(f"{model_dir}: model path not found")
    if not cfg.is_file():
        raise ModelError(f"{model_dir}: no config.json; not a model checkpoint directory")
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


def adapter_for(model_dir: str | os.PathLike[str]) -> ModuleType:
    """The adapter module for a checkpoint directory (imported on first use)."""
    return importlib.import_module(family_of(architecture_of(model_dir)).module)
