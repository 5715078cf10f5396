"""Model families gradprobe can drive, found by the HF architecture string in a checkpoint's config.json.

Adapters register themselves with the :func:`register` class decorator (as lm-evaluation-harness
registers its models): the class states its family name, architecture strings, frame-budget rule
(:meth:`~gradprobe.models.base.Adapter.budget_rule`) and a note, and the registry restates none of it.
The built-in adapter modules are imported on the first lookup; an adapter defined elsewhere is
registered when its module is imported. An architecture that no family lists is refused with an error
that names the supported ones. The built-in toy is a tiny Qwen2.5-VL; its checkpoints carry a marker
file (``gradprobe_toy.json``) that selects the toy adapter (ShapesWorld's label rule) instead of the
Qwen2.5-VL one, whose architecture it shares.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gradprobe.errors import ModelError

#: the modules of the built-in adapters, imported on the first lookup
BUILTIN = ("gradprobe.models.qwen2_5_vl", "gradprobe.models.qwen3_vl", "gradprobe.models.llava_next_video",
           "gradprobe.models.llava", "gradprobe.models.toy")
TOY_MARKER = "gradprobe_toy.json"

_ADAPTERS: dict[str, type] = {}
A = TypeVar("A", bound=type)


def register(cls: A) -> A:
    """Class decorator: register an adapter under its ``family``.

    Raises:
        ModelError: no family name or architectures, or another class already holds the name.
    """
    name = getattr(cls, "family", "")
    if not name or not getattr(cls, "architectures", ()):
        raise ModelError(f"{cls.__name__}: an adapter needs a family name and its architecture strings")
    held = _ADAPTERS.get(name)
    if held is not None and held.__qualname__ != cls.__qualname__:
        raise ModelError(f"family {name!r} is registered twice ({held.__name__} and {cls.__name__})")
    _ADAPTERS[name] = cls
    return cls


@dataclass(frozen=True)
class Family:
    """A registered family, as the adapter class states it."""

    adapter: type

    @property
    def name(self) -> str:
        return str(self.adapter.family)

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.adapter.architectures)

    @property
    def frames(self) -> str:
        return str(self.adapter.budget_rule())

    @property
    def note(self) -> str:
        return str(getattr(self.adapter, "note", ""))

    def adapter_class(self) -> Any:
        return self.adapter


def families() -> tuple[Family, ...]:
    """Every registered family, the built-in ones first."""
    for module in BUILTIN:
        importlib.import_module(module)
    return tuple(Family(cls) for cls in _ADAPTERS.values())


def family_named(name: str) -> Family:
    """The family registered as ``name``.

    Raises:
        ModelError: no such family.
    """
    for f in families():
        if f.name == name:
            return f
    raise ModelError(f"no family {name!r}; known: {', '.join(f.name for f in families())}")


def _by_architecture() -> list[Family]:
    """The families found by architecture (the toy is found by its marker instead)."""
    return [f for f in families() if not getattr(f.adapter, "marker_only", False)]


def supported_architectures() -> list[str]:
    return list(dict.fromkeys(a for f in _by_architecture() for a in f.architectures))


def family_of(architecture: str) -> Family:
    """The family that lists ``architecture``.

    Raises:
        ModelError: no family lists it; the message names the supported architectures.
    """
    for f in _by_architecture():
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
        return family_named("toy")
    return family_of(arch)


def adapter_for(model_dir: str | os.PathLike[str]) -> type:
    """The adapter class for a checkpoint directory."""
    return family_for(model_dir).adapter_class()
