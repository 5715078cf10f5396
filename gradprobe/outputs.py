"""Output files, the bottom layer: every schema and file name, and the writers and readers.

Estimators, training code and experiments write these files; plots read them. Both import this
module and nothing of each other. It imports nothing of gradprobe but its errors.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from gradprobe.errors import DataError, InputError

SUMMARY = "summary.json"

# gradprobe align
ALIGN_SCHEMA = "gradprobe.align/1"
ALIGNMENT = "alignment.csv"
MODULES = "modules.csv"
MODULE_BATCHES = "module_batches.csv"
IMAGES = "images.csv"
SKETCHES = "sketches.npz"

# gradprobe decompose
DECOMPOSE_SCHEMA = "gradprobe.decompose/1"
DECOMPOSE_BUDGETS = "decompose.csv"
DECOMPOSE_BATCHES = "decompose_batches.csv"
DECOMPOSE_CHECKS = "decompose_checks.csv"

# gradprobe curvature
CURVATURE_SCHEMA = "gradprobe.curvature/1"
LOOKAHEAD = "lookahead.csv"
CURVATURE_MODULES = "curvature_modules.csv"
SPECTRA = "spectra.csv"

# training runs (callback, monitor, evaluation) and the trap experiment
TRAJECTORY = "gradprobe_trajectory.jsonl"
TRAINING_BUDGETS = "gradprobe_budgets.jsonl"
EVAL_FILE = "gradprobe_eval.jsonl"
TRAP_SUMMARY = "trap_summary.json"


#: several checkpoints of one run (``gradprobe align --model a,b``)
CHECKPOINTS_CSV = "checkpoints.csv"
CHECKPOINTS_JSON = "checkpoints.json"
#: figures ``gradprobe plot`` draws into a run directory
FIGURES = ("alignment_curve.png", "modules_heatmap.png", "lookahead.png", "spectra.png", "decompose.png",
           "checkpoints.png", "trajectory.png", "trap.png")
#: every file a measuring command writes into its output directory
RUN_FILES = (SUMMARY, ALIGNMENT, MODULES, MODULE_BATCHES, IMAGES, SKETCHES, DECOMPOSE_BUDGETS, DECOMPOSE_BATCHES,
             DECOMPOSE_CHECKS, LOOKAHEAD, CURVATURE_MODULES, SPECTRA, CHECKPOINTS_CSV, CHECKPOINTS_JSON, *FIGURES)


def clear_run_files(out: str | os.PathLike[str]) -> list[str]:
    """Remove the files an earlier run wrote into ``out`` (only gradprobe's own, by name), so that a reused
    output directory never mixes old tables or figures with new ones; return the names removed."""
    d = Path(out)
    gone = [n for n in RUN_FILES if (d / n).is_file()]
    for n in gone:
        (d / n).unlink()
    return gone


def check_out_dir(out: str | os.PathLike[str], option: str = "out") -> Path:
    """An output directory that can be written: an existing directory, or one that can be created.

    Raises:
        InputError: ``out`` is an existing file, or neither it nor its nearest existing parent is writable.
    """
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{option}: {p} exists and is not a directory")
    base = p
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{option}: {p} cannot be written ({base} is not a writable directory)")
    return p


def _clean(x: Any) -> Any:
    """Make a value JSON-safe: NaN/inf become None, numpy scalars plain Python."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        with contextlib.suppress(ValueError, AttributeError):
            x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]):
    """Yield a temporary file name next to ``path``, then rename it onto ``path`` (atomically) if the body succeeds.

    Each call gets its own temporary name, so processes writing the same file at once (two runs of one
    experiment folder finishing together) each replace it whole instead of taking each other's temp file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Mapping[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    text = json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n"
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_sketches(path: str | os.PathLike[str], spec: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """Save sketched rows with their map (``spec``: :meth:`SketchSpec.to_dict`) in one ``.npz``, atomically."""
    import numpy as np

    with replacing(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, spec=np.array(json.dumps(dict(spec))), **{k: np.asarray(v) for k, v in arrays.items()})


def read_sketches(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The map (a dict for :meth:`SketchSpec.from_dict`) and the arrays of a ``sketches.npz``.

    Two files' rows combine (their dots estimate inner products of the two runs' gradients) when their
    maps are equal: the same seed, k and module partition, that is the same model and parameter selection.

    Raises:
        DataError: a missing or unreadable file.
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read sketches ({e})") from None
    if "spec" not in arrays:
        raise DataError(f"{path}: no sketch map in the file")
    return json.loads(str(arrays.pop("spec"))), arrays


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSONL file (blank lines skipped); no file gives no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class RowSink:
    """Appends rows to a CSV file as they are computed, flushing each one.

    A run that is killed keeps every row already written. The columns are fixed
    by the first row; later rows must have the same keys.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh = None
        self._writer: csv.DictWriter[str] | None = None

    def write(self, row: Mapping[str, Any]) -> None:
        if self._writer is None:
            self._fh = open(self.path, "w", newline="")  # noqa: SIM115 - closed in close()
            self._writer = csv.DictWriter(self._fh, fieldnames=list(row))
            self._writer.writeheader()
        self._writer.writerow(dict(row))
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_align_dir(out_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Read ``summary.json``, ``alignment.csv`` and ``modules.csv`` of an align output dir.

    Raises:
        DataError: if the directory or a file is missing, or the schema is not ``gradprobe.align/1``.
    """
    d = Path(out_dir)
    if not d.is_dir():
        raise DataError(f"{d}: no such output directory")
    for name in (SUMMARY, ALIGNMENT, MODULES):
        if not (d / name).is_file():
            raise DataError(f"{d / name}: missing; is {d} the --out directory of `gradprobe align`?")
    try:
        summary = json.loads((d / SUMMARY).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{d / SUMMARY}: not valid JSON ({e})") from None
    if summary.get("schema") != ALIGN_SCHEMA:
        raise DataError(f"{d / SUMMARY}: schema is {summary.get('schema')!r}, expected {ALIGN_SCHEMA!r}")
    tables = []
    for name in (ALIGNMENT, MODULES):
        try:
            tables.append(pd.read_csv(d / name))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise DataError(f"{d / name}: not a readable table ({str(e).splitlines()[0]})") from None
    batches, modules = tables
    _check_rows(d / ALIGNMENT, batches, summary)
    return summary, batches, modules


def _check_rows(path: Path, batches: pd.DataFrame, summary: Mapping[str, Any]) -> None:
    """``alignment.csv`` holds one whole row per video batch the summary counts (a truncated file does not)."""
    need = ("frames", "batch", "finite", "value")
    missing = [c for c in need if c not in batches.columns]
    if missing:
        raise DataError(f"{path}: no {missing[0]!r} column; the file is truncated or not gradprobe's")
    text = path.read_text()
    rows = list(csv.reader(text.splitlines()))
    short = next((i for i, r in enumerate(rows[1:], 2) if len(r) != len(rows[0])), None)
    if short is not None or (text and not text.endswith("\n")):
        raise DataError(f"{path}:{short or len(rows)}: incomplete row; the file is truncated")
    for b in summary.get("budgets", []):
        want = int(b.get("n") or 0) + int(b.get("n_excluded") or 0)
        got = int((batches["frames"] == b["frames"]).sum()) if len(batches) else 0
        if got != want:
            raise DataError(f"{path}: {got} rows at m = {b['frames']}, but {SUMMARY} counts {want} video batches; "
                            "the file is truncated or from another run")


def budget_dir(out: str | os.PathLike[str], m: int, sampler: str = "uniform") -> Path:
    """The run directory of budget m (frame sampler ``sampler``) in a trap experiment's output directory:
    ``frames-<m>`` for the uniform sampler, ``<sampler>-frames-<m>`` for a control."""
    return Path(out) / (f"frames-{m}" if sampler == "uniform" else f"{sampler}-frames-{m}")


def run_order(run: tuple[str, int]) -> tuple[bool, str, int]:
    """Sort key of a trap run (sampler, budget): the uniform sampler first, then the controls; budgets ascending."""
    sampler, m = run
    return sampler != "uniform", sampler, m


def trap_runs(out: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """The (sampler, budget) runs present in a trap experiment's output directory, uniform first."""
    runs = []
    for p in Path(out).iterdir() if Path(out).is_dir() else []:
        head, _, m = p.name.rpartition("frames-")
        sampler = head[:-1] if head.endswith("-") else "uniform" if not head else None
        if p.is_dir() and m.isdigit() and sampler is not None:
            runs.append((sampler, int(m)))
    return sorted(runs, key=run_order)


def load_trap(out: str | os.PathLike[str], grid: list[int] | None = None,
              samplers: list[str] | None = None,
              runs: list[tuple[str, int]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluation rows and alignment rows of every run, each with ``frames`` and ``sampler`` columns
    (by default every run in ``out``; ``grid`` and ``samplers`` select, ``runs`` lists (sampler, m) exactly)."""
    out = Path(out)
    if runs is not None:
        runs = list(runs)
    elif grid is not None and samplers is not None:
        runs = [(s, m) for s in samplers for m in grid]
    else:
        runs = [(s, m) for s, m in trap_runs(out)
                if (grid is None or m in grid) and (samplers is None or s in samplers)]
    if not runs:
        raise DataError(f"{out}: no frames-<m> run directories")
    evals, traj = [], []
    for sampler, m in runs:
        d = budget_dir(out, m, sampler)
        evals += [{"frames": m, "sampler": sampler, **r} for r in read_jsonl(d / EVAL_FILE)]
        traj += [{"frames": m, "sampler": sampler, **r} for r in read_jsonl(d / TRAJECTORY)]
    return pd.DataFrame(evals), pd.DataFrame(traj)
