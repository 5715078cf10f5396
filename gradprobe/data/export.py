"""Record files → the dataset layouts of the training stacks (LLaMA-Factory, ms-swift).

Each file is read with :func:`~gradprobe.data.records.read_samples` (so what is exported is what
gradprobe itself reads) and written back with the medium's tag (``<image>`` or ``<video>``) opening
the first user turn, which is where both stacks count it:

* ``llamafactory``: one ``<name>.json`` per file in LLaMA-Factory's ShareGPT layout
  (``conversations`` with ``from``/``value``, ``images`` or ``videos`` lists) and a
  ``dataset_info.json`` naming each of them, so ``dataset_dir=DIR, dataset=<name>`` reads them as
  they are;
* ``swift``: one ``<name>.jsonl`` per file in the ``messages`` layout ms-swift reads
  (``role``/``content``, ``images`` or ``videos`` lists).

Media files given by relative paths are copied under the output directory at the same relative
paths; LLaMA-Factory's records name them relative to the dataset directory (which it resolves them
against), ms-swift's by their absolute paths (it resolves relative ones against the working
directory). Absolute paths in the input are kept. The
records' other fields (``id``, ``qtype``, ``choices``, ``m_min``, …) are kept, and gradprobe reads the
exported files too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradprobe.data.clips import resolve
from gradprobe.data.records import Sample, read_samples
from gradprobe.errors import DataError, InputError

FORMATS = ("llamafactory", "swift")
_LF_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def _turns(s: Sample) -> list[tuple[str, str]]:
    out, placed = [], False
    for role, text in s.turns:
        if role == "user" and not placed:
            text, placed = f"<{s.kind}>\n{text}", True
        out.append((role, text))
    return out


def _record(s: Sample, media: str, fmt: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": s.id}
    if fmt == "llamafactory":
        rec["conversations"] = [{"from": _LF_ROLE[r], "value": t} for r, t in _turns(s)]
    else:
        rec["messages"] = [{"role": r, "content": t} for r, t in _turns(s)]
    rec[s.kind + "s"] = [media]
    rec.update({k: v for k, v in s.extra.items() if k != "id"})
    return rec


def _place(src_root: Path, s: Sample, out: Path) -> str:
    """Copy a relative medium under ``out`` (same relative path); keep an absolute one."""
    src = resolve(src_root, s.media)
    if not src.is_file():
        raise DataError(f"{s.where}: {s.kind} file not found: {src}")
    rel = Path(s.media)
    if rel.is_absolute() or ".." in rel.parts:
        return str(src.resolve())
    dst = out / rel
    if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return rel.as_posix()


def export_records(files: Mapping[str, str | os.PathLike[str]], out: str | os.PathLike[str], fmt: str, *,
                   data_root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write each record file (name → path) in a stack's layout under ``out``; return name → written file.

    Args:
        files: dataset name → a LLaVA or ShareGPT record file gradprobe reads.
        out: the output directory (created; existing files of the same names are replaced).
        fmt: ``llamafactory`` or ``swift``.
        data_root: directory media paths are relative to (default: each file's own).

    Raises:
        InputError: unknown format, or ``out`` is an existing file.
        DataError: a bad record or a missing medium.
    """
    if fmt not in FORMATS:
        raise InputError(f"--export: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    info: dict[str, Any] = {}
    for name, path in files.items():
        rs = read_samples(path)
        root = Path(data_root) if data_root else Path(path).parent
        placed = [_place(root, s, out) for s in rs.samples]
        if fmt == "swift":  # ms-swift resolves relative paths against the working directory: write them whole
            placed = [str((out / p).resolve()) if not Path(p).is_absolute() else p for p in placed]
        recs = [_record(s, p, fmt) for s, p in zip(rs.samples, placed, strict=True)]
        kinds = {s.kind for s in rs.samples}
        if fmt == "llamafactory":
            dst = out / f"{name}.json"
            dst.write_text(json.dumps(recs, indent=1) + "\n")
            columns = {"messages": "conversations"} | {k + "s": k + "s" for k in sorted(kinds)}
            info[name] = {"file_name": dst.name, "formatting": "sharegpt", "columns": columns}
        else:
            dst = out / f"{name}.jsonl"
            dst.write_text("".join(json.dumps(r) + "\n" for r in recs))
        written[name] = dst
    if fmt == "llamafactory":
        (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return written


def export_budgeted(samples: list[Sample], frames_of: Mapping[str, int], out: str | os.PathLike[str], fmt: str, *,
                    root: str | os.PathLike[str], name: str = "budgeted_videos") -> Path:
    """Video records with a frame budget each (a ``gradprobe budget`` manifest) in a stack's layout: each clip's
    frames at its budget (the uniform sampler) written as PNG files under ``out/frames/<id>/``, and the record's
    video given as that list of frames, which LLaMA-Factory and ms-swift both take as a video as it is (so each
    clip is trained on exactly its budget). Returns the written record file.

    The stacks give a frame list a fixed frame rate (LLaMA-Factory's ``video_fps``, ms-swift's default), so the
    temporal spacing a model's position encoding sees is the same at every budget, unlike the clips' own.

    Raises:
        InputError: unknown format, or ``out`` is an existing file.
        DataError: a clip without a budget, or a bad clip.
    """
    from PIL import Image

    from gradprobe.data.clips import ClipStore

    if fmt not in FORMATS:
        raise InputError(f"--export: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    missing = [s.id for s in samples if s.id not in frames_of]
    if missing:
        raise DataError(f"no budget for record {missing[0]!r} in the manifest")
    store = ClipStore(Path(root), sorted(set(frames_of.values())), keep=False)
    recs = []
    for s in samples:
        clip = store.clip(s, frames_of[s.id])
        folder = out / "frames" / s.id
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, frame in enumerate(clip.frames):
            Image.fromarray(frame).save(folder / f"{k:03d}.png")
            rel = f"frames/{s.id}/{k:03d}.png"
            paths.append(rel if fmt == "llamafactory" else str((out / rel).resolve()))
        rec = _record(s, "", fmt)
        rec["videos"] = [paths]
        rec["frames"] = frames_of[s.id]
        recs.append(rec)
    if fmt == "llamafactory":
        dst = out / f"{name}.json"
        dst.write_text(json.dumps(recs, indent=1) + "\n")
        info_path = out / "dataset_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info[name] = {"file_name": dst.name, "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "videos": "videos"}}
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    else:
        dst = out / f"{name}.jsonl"
        dst.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return dst
