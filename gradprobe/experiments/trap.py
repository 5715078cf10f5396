"""The temporal-trap experiment: Video-SFT of one model at several frame budgets, nothing else changed.

For each budget m of the grid, :func:`run_trap` runs :func:`gradprobe.sft.run_sft` from
the same checkpoint with the same clips, seed, steps and learning rate, into
``<out>/frames-<m>/``, recording held-out image and video accuracy (free and answer-restricted)
and the alignment of the run's update with the image probe along the run. Video accuracy is
scored at the run's own budget. A run that is already complete is skipped; an interrupted one
resumes from its last checkpoint, so an interrupted experiment loses at most the steps since a
checkpoint.

:func:`summarize` compares the last evaluation with the first (the same records, so the
difference is paired: mean of per-record differences with a t interval) and, for image accuracy,
each budget with the smallest one (again paired on records).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradprobe._checks import check_positive_int, parse_frames
from gradprobe.errors import DataError
from gradprobe.outputs import TRAP_SUMMARY, budget_dir, load_trap, write_json

SUMMARY = TRAP_SUMMARY
METRICS = ("image_free", "image_restricted", "video_free", "video_restricted")


@dataclass
class TrapOptions:
    """Options of :func:`run_trap` (the command line's ``gradprobe trap``)."""

    out: str
    frames: str = "8,16,32,64"
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    probe_every: int = 10
    eval_images: int = 300
    eval_videos: int = 100
    seed: int = 0
    cache_dir: str | None = None


def run_trap(opts: TrapOptions, log: Any = None, progress: Any = None) -> dict[str, Any]:
    """Run (or finish) the experiment and write ``<out>/trap_summary.json``; return the summary."""
    from transformers.trainer_utils import get_last_checkpoint

    from gradprobe.models.toy import ToyAdapter
    from gradprobe.sft import SFTOptions, run_sft

    log = log or (lambda s: None)
    grid = parse_frames(opts.frames)
    for m in grid:
        ToyAdapter.check_budget(m)
    for name in ("steps", "batch_size", "probe_every", "eval_images", "eval_videos"):
        check_positive_int(name.replace("_", "-"), getattr(opts, name))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for m in grid:
        d = budget_dir(out, m)
        if (d / "sft_summary.json").is_file():
            log(f"m={m}: complete, kept")
            continue
        last = get_last_checkpoint(str(d)) if d.is_dir() else None
        if d.is_dir() and last is None:
            shutil.rmtree(d)  # interrupted before its first checkpoint: nothing to keep
        log(f"m={m}: {'resuming from ' + Path(last).name if last else 'training'} ({opts.steps} steps)")
        run_sft(SFTOptions(
            out=str(d), frames=m, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
            probe_every=opts.probe_every, eval_images=opts.eval_images, eval_videos=opts.eval_videos,
            save_steps=max(opts.probe_every, opts.steps // 4), seed=opts.seed, resume=last is not None,
            cache_dir=opts.cache_dir,
        ), log=log, progress=progress)
    summary = summarize(out, grid)
    summary["options"] = asdict(opts)

    write_json(out / SUMMARY, summary)
    return summary


def paired_difference(after: str, before: str) -> dict[str, Any]:
    """Mean of per-record differences of two 0/1 strings over the same records, with a 95% t interval."""
    from scipy import stats as st

    a = np.frombuffer(after.encode(), dtype=np.uint8) - ord("0")
    b = np.frombuffer(before.encode(), dtype=np.uint8) - ord("0")
    if len(a) != len(b) or len(a) < 2:
        raise DataError("paired difference needs the same records (at least 2) in both evaluations")
    d = a.astype(float) - b.astype(float)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    half = float(st.t.ppf(0.975, len(d) - 1)) * se
    lo, hi = mean - half, mean + half
    return {"diff": mean, "stderr": se, "ci95": [lo, hi], "n": len(d), "excludes_zero": bool(lo > 0 or hi < 0)}


def summarize(out: str | os.PathLike[str], grid: list[int] | None = None) -> dict[str, Any]:
    """Per budget: first and last accuracies, their paired change, and the alignment along the run."""
    evals, traj = load_trap(out, grid)
    budgets = []
    smallest = None
    for m, ev in evals.groupby("frames", sort=True):
        ev = ev.sort_values("step")
        first, last = ev.iloc[0], ev.iloc[-1]
        row: dict[str, Any] = {"frames": int(m), "steps": int(last["step"]), "n_image": int(last["n_image"]),
                               "n_video": int(last["n_video"])}
        for k in METRICS:
            row[k] = {"first": float(first[k]), "last": float(last[k])}
            if f"{k}_items" in ev:
                row[k]["change"] = paired_difference(last[f"{k}_items"], first[f"{k}_items"])
        tr = traj[(traj["frames"] == m) & traj["finite"].astype(bool)] if len(traj) else traj
        if len(tr):
            cos = tr["cos"].to_numpy(float)
            row["alignment"] = {
                "probes": len(tr),
                "mean_cos": float(cos.mean()),
                "stderr_cos": float(cos.std(ddof=1) / math.sqrt(len(cos))) if len(cos) > 1 else None,
                "frac_negative": float((tr["alignment"] < 0).mean()),
            }
        if smallest is None:
            smallest = last
        elif "image_free_items" in ev:
            row["image_vs_smallest"] = {
                k: paired_difference(last[f"{k}_items"], smallest[f"{k}_items"]) for k in METRICS[:2]
            }
        budgets.append(row)
    return {"schema": "gradprobe.trap/1", "budgets": budgets,
            "note": "change: last minus first evaluation, paired on records (95% t interval); "
                    "image_vs_smallest: last image accuracy minus that of the smallest budget, paired on records; "
                    "stderr_cos treats probes along one run as independent, which they are not"}
