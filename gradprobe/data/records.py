"""Data records → samples: LLaVA-style and ShareGPT-style JSON / JSONL files.

Two formats are read, one per file:

* **LLaVA** — ``{"id", "image" | "video", "conversations": [{"from": "human", "value": "<image>\\n…"},
  {"from": "gpt", "value": "…"}, …]}``. LLaVA-Video-178K writes ``<image>`` in video records too; the
  record's ``video`` field decides. LLaMA-Factory's ShareGPT variant (``conversations`` with
  ``images`` / ``videos`` lists) is read the same way.
* **ShareGPT messages** (LLaMA-Factory, ms-swift) — ``{"messages": [{"role": "user", "content":
  "<video>…"}, {"role": "assistant", "content": "…"}], "videos": ["…"]}`` (or ``images``).

A sample holds exactly one image or one video (the thing the frame budget acts on), at least one
user turn and an answer from the assistant. ``<image>`` / ``<video>`` tags are removed from the text;
the adapter puts the medium at the start of the first user turn, as LLaVA training does.

A file may be a JSON array or JSON lines; mixing the two record formats in one file is refused.
With ``skip_bad`` a record that fails these checks is counted and skipped instead of stopping the run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradprobe.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TAG = re.compile(r"\s*<(?:image|video)>\s*")


@dataclass(frozen=True)
class Sample:
    """One probe sample: a single image or video and a conversation about it."""

    id: str
    kind: str  # "image" or "video"
    media: str  # path as written in the record
    turns: tuple[tuple[str, str], ...]  # (role, text), tags removed; roles user / assistant / system
    where: str  # "file:line" (or "file[index]") for error messages
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def answer(self) -> str:
        return next(t for r, t in reversed(self.turns) if r == "assistant")


@dataclass
class RecordSet:
    """The samples read from one file, with what was skipped and why."""

    path: Path
    format: str
    samples: list[Sample]
    skipped: list[str]  # one line per skipped record


def _fmt_of(rec: Mapping[str, Any]) -> str | None:
    if "messages" in rec:
        return "sharegpt"
    if "conversations" in rec:
        return "llava"
    return None


def _media(rec: Mapping[str, Any], where: str) -> tuple[str, str]:
    found: list[tuple[str, str]] = []
    for kind in ("image", "video"):
        one = rec.get(kind)
        many = rec.get(kind + "s")
        if one is not None:
            found += [(kind, x) for x in (one if isinstance(one, list) else [one])]
        if many is not None:
            if not isinstance(many, list):
                raise DataError(f"{where}: '{kind}s' must be a list of paths")
            found += [(kind, x) for x in many]
    if not found:
        raise DataError(f"{where}: record has no image or video")
    if len(found) > 1:
        raise DataError(f"{where}: record has {len(found)} images/videos; a probe sample takes exactly one")
    kind, path = found[0]
    if not isinstance(path, str) or not path:
        raise DataError(f"{where}: {kind} path must be a non-empty string")
    return kind, path


def _turns(rec: Mapping[str, Any], fmt: str, where: str) -> tuple[tuple[str, str], ...]:
    key, rk, tk = ("messages", "role", "content") if fmt == "sharegpt" else ("conversations", "from", "value")
    raw = rec.get(key)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: '{key}' must be a non-empty list of turns")
    turns = []
    for i, t in enumerate(raw):
        if not isinstance(t, Mapping) or rk not in t or tk not in t:
            raise DataError(f"{where}: turn {i} needs '{rk}' and '{tk}'")
        role = ROLES.get(str(t[rk]))
        if role is None:
            raise DataError(f"{where}: turn {i} has unknown role {t[rk]!r}")
        text = t[tk]
        if not isinstance(text, str):
            raise DataError(f"{where}: turn {i} content must be a string")
        turns.append((role, _TAG.sub(" ", text).strip()))
    if not any(r == "user" for r, _ in turns):
        raise DataError(f"{where}: no user turn")
    answers = [t for r, t in turns if r == "assistant"]
    if not answers:
        raise DataError(f"{where}: record without an answer (no assistant turn)")
    if any(not a for a in answers):
        raise DataError(f"{where}: empty answer")
    if turns[-1][0] != "assistant":
        turns = turns[: max(i for i, (r, _) in enumerate(turns) if r == "assistant") + 1]
    return tuple(turns)


def parse_record(rec: Any, where: str, fmt: str | None = None) -> Sample:
    """One record → :class:`Sample`.

    Raises:
        DataError: the record does not fit the format (the message names ``where``).
    """
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a JSON object")
    f = _fmt_of(rec)
    if f is None:
        raise DataError(f"{where}: neither LLaVA ('conversations') nor ShareGPT ('messages') record")
    if fmt is not None and f != fmt:
        raise DataError(f"{where}: file mixes formats ({f} record after {fmt} records)")
    kind, path = _media(rec, where)
    extra = {k: v for k, v in rec.items() if k not in ("conversations", "messages", "image", "video", "images",
                                                        "videos")}
    return Sample(id=str(rec.get("id", where)), kind=kind, media=path, turns=_turns(rec, f, where), where=where,
                  extra=extra)


def _raw(path: Path) -> list[tuple[str, Any]]:
    text = path.read_text()
    if not text.strip():
        raise DataError(f"{path}: data file is empty")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"{path}:{n}", DataError(f"{path}:{n}: not valid JSON ({e.msg})")))
    return out


def read_samples(path: str | os.PathLike[str], *, kind: str | None = None, skip_bad: bool = False,
                 limit: int | None = None) -> RecordSet:
    """Read a data file into samples.

    Args:
        path: a JSON array or JSONL file of LLaVA or ShareGPT records.
        kind: ``"image"`` or ``"video"``: every sample must be of this kind.
        skip_bad: skip (and count) records that fail the checks instead of raising.
        limit: stop once this many good samples are read.

    Raises:
        DataError: missing or empty file, a bad record (without ``skip_bad``), a file mixing the
            formats, or no good record at all.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    fmt: str | None = None
    samples: list[Sample] = []
    skipped: list[str] = []
    for where, rec in _raw(p):
        if limit is not None and len(samples) >= limit:
            break
        try:
            if isinstance(rec, DataError):
                raise rec
            if fmt is None and isinstance(rec, Mapping):
                fmt = _fmt_of(rec)
            s = parse_record(rec, where, fmt)
            if kind is not None and s.kind != kind:
                raise DataError(f"{where}: {s.kind} record in the {kind} data")
        except DataError as e:
            if not skip_bad or "mixes formats" in str(e):
                raise
            skipped.append(str(e))
            continue
        samples.append(s)
    if not samples:
        raise DataError(f"{p}: no usable {kind or ''} records".replace("  ", " ") +
                        (f" ({len(skipped)} skipped; first: {skipped[0]})" if skipped else ""))
    return RecordSet(path=p, format=fmt or "llava", samples=samples, skipped=skipped)
