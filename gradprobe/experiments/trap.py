"""The temporal-trap experiment: Video-SFT of one model at several frame budgets, nothing else changed.

For each budget m of the grid, :func:`run_trap` runs :func:`gradprobe.sft.run_sft` from
the same checkpoint with the same clips, seed, steps and learning rate, into
``<out>/frames-<m>/``, recording held-out image and video accuracy (free and answer-restricted)
and the alignment of the run's update with the image probe along the run. Video accuracy is
scored at the run's own budget. Controls (``samplers``) repeat each budget with another frame sampler
(``static``: one frame copied m times; ``shuffled``: the uniform frames in a random order) into
``<out>/<sampler>-frames-<m>/``. A run that is already complete is skipped; an interrupted one
resumes from its last checkpoint, so an interrupted experiment loses at most the steps since a
checkpoint.

:func:`summarize` compares the last evaluation with the first (the same records, so the
difference is paired: mean of per-record differences with a t interval) and, for image accuracy,
each budget with the smallest one (again paired on records).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gradprobe._checks import check_positive_int, parse_frames
from gradprobe.errors import InputError
from gradprobe.estimators.stats import paired_difference
from gradprobe.outputs import TRAP_SUMMARY, budget_dir, load_trap, run_order, write_json
from gradprobe.train.evaluate import type_changes

SUMMARY = TRAP_SUMMARY
METRICS = ("image_free", "image_restricted", "video_free", "video_restricted")


@dataclass
class TrapOptions:
    """Options of :func:`run_trap` (the command line's ``gradprobe trap``)."""

    out: str
    frames: str = "8,16,32,64"
    steps: int = 6000
    batch_size: int = 8
    lr: float = 5e-4
    probe_every: int = 500
    eval_every: int | None = None
    eval_images: int = 300
    eval_videos: int = 400
    samplers: str = "uniform"
    control_frames: str | None = None
    hybrid: str | None = None
    seed: int = 0
    cache_dir: str | None = None


def parse_samplers(text: str) -> list[str]:
    """``uniform,static`` → ``["uniform", "static"]`` (uniform first: the controls are compared with it)."""
    from gradprobe.data.sampling import check_sampler

    names = [check_sampler(t.strip()) for t in text.split(",") if t.strip()]
    if not names:
        raise InputError("samplers: give at least one of uniform, static, shuffled")
    if len(set(names)) != len(names):
        raise InputError(f"samplers: {text!r} names a sampler twice")
    return sorted(names, key=lambda n: n != "uniform")


def trap_plan(grid: list[int], samplers: list[str], control_frames: str | None = None) -> list[tuple[str, int]]:
    """The runs of an experiment as (sampler, m), in the order they are trained: uniform at every budget,
    then each control sampler at ``control_frames`` (default: every budget; a subset of the grid, so each
    control has its uniform run at the same budget)."""
    cgrid = grid if control_frames is None else parse_frames(control_frames)
    if not set(cgrid) <= set(grid):
        extra = ",".join(str(m) for m in cgrid if m not in grid)
        raise InputError(f"control-frames: {extra} not among --frames {','.join(map(str, grid))}")
    return [(s, m) for s in samplers for m in (grid if s == "uniform" else cgrid)]


def parse_hybrid(text: str | None) -> list[str]:
    """``redundancy,sufficiency`` → the allocation methods of the hybrid arms (checked by name)."""
    from gradprobe.budget import method_named

    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    for n in names:
        method_named(n)
    if len(set(names)) != len(names):
        raise InputError(f"hybrid: {text!r} names a method twice")
    return names


def run_trap(opts: TrapOptions, log: Any = None, progress: Any = None) -> dict[str, Any]:
    """Run (or finish) the experiment and write ``<out>/trap_summary.json``; return the summary."""
    from transformers.trainer_utils import get_last_checkpoint

    from gradprobe.models.toy import ToyAdapter
    from gradprobe.sft import SFTOptions, run_sft

    log = log or (lambda s: None)
    grid = parse_frames(opts.frames)
    samplers = parse_samplers(opts.samplers)
    runs = trap_plan(grid, samplers, opts.control_frames)
    hybrids = parse_hybrid(opts.hybrid)
    runs += [(f"hybrid-{h}", grid[-1]) for h in hybrids]
    for m in grid:
        ToyAdapter.check_budget(m)
    for name in ("steps", "batch_size", "probe_every", "eval_images", "eval_videos"):
        check_positive_int(name.replace("_", "-"), getattr(opts, name))
    if opts.eval_every is not None:
        check_positive_int("eval-every", opts.eval_every)
    out = Path(opts.out)
    for sampler, m in runs:  # before any training: every finished run kept must be comparable
        if (done := budget_dir(out, m, sampler) / "sft_summary.json").is_file():
            _check_kept(done, opts)
    out.mkdir(parents=True, exist_ok=True)
    for sampler, m in runs:
        d = budget_dir(out, m, sampler)
        name = f"m={m}" + ("" if sampler == "uniform" else f" ({sampler})")
        if (d / "sft_summary.json").is_file():
            log(f"{name}: complete, kept")
            continue
        manifest = None
        if sampler.startswith("hybrid-"):  # per-clip budgets from the method's manifest; scored at the largest
            from gradprobe.budget import BudgetOptions, run_budget

            method = sampler.removeprefix("hybrid-")
            bdir = out / f"budget-{method}"
            log(f"{name}: budgets by {method} for the toy's training clips")
            run_budget(BudgetOptions(out=str(bdir), frames=opts.frames, method=method, cache_dir=opts.cache_dir),
                       log=log, progress=progress)
            manifest, name = str(bdir / "manifest.jsonl"), f"hybrid ({method}; scored at m={m})"
            sampler = "uniform"
        last = get_last_checkpoint(str(d)) if d.is_dir() else None
        if d.is_dir() and last is None:
            shutil.rmtree(d)  # interrupted before its first checkpoint: nothing to keep
        log(f"{name}: {'resuming from ' + Path(last).name if last else 'training'} ({opts.steps} steps)")
        run_sft(SFTOptions(
            out=str(d), frames=m, manifest=manifest, sampler=sampler, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
            probe_every=opts.probe_every, eval_every=opts.eval_every or opts.steps, eval_images=opts.eval_images, eval_videos=opts.eval_videos,
            save_steps=max(opts.probe_every, opts.steps // 4), seed=opts.seed, resume=last is not None,
            cache_dir=opts.cache_dir, keep_clips=True,
        ), log=log, progress=progress)
    summary = summarize(out, runs=runs)
    summary["options"] = asdict(opts)

    write_json(out / SUMMARY, summary)
    return summary


#: what must be the same for a finished run to be kept beside the ones this experiment trains
RECIPE = ("steps", "batch_size", "lr", "seed", "probe_every", "eval_images", "eval_videos")


def _check_kept(path: Path, opts: TrapOptions) -> None:
    """A finished run is kept only if it was trained with this experiment's recipe, from this toy.

    Raises:
        InputError: naming the first difference (the run would not be comparable with the others).
    """
    from gradprobe.run import DEFAULT_TOY

    s = json.loads(path.read_text())
    kept = s.get("options", {})
    for name in RECIPE:
        if kept.get(name) != getattr(opts, name):
            raise InputError(f"{path.parent}: a finished run with {name.replace('_', '-')} {kept.get(name)} "
                             f"(this experiment: {getattr(opts, name)}); give another --out or remove it")
    toy = Path(s.get("model", "")).parent.name
    if toy != DEFAULT_TOY.key:
        raise InputError(f"{path.parent}: a finished run trained from toy {toy or '?'} (this experiment: "
                         f"{DEFAULT_TOY.key}); give another --out or remove it")


def _run_facts(d: Path, m: int) -> dict[str, Any]:
    """Training frames per clip (the manifest's mean for a hybrid arm) and wall time of one run."""
    p = d / "sft_summary.json"
    if not p.is_file():
        return {"mean_frames": m, "seconds": None}
    s = json.loads(p.read_text())
    manifest = s.get("options", {}).get("manifest")
    if manifest and Path(manifest).is_file():
        from gradprobe.sft import read_manifest

        per = list(read_manifest(manifest).values())
        return {"mean_frames": sum(per) / len(per), "seconds": s.get("seconds")}
    return {"mean_frames": m, "seconds": s.get("seconds")}


def summarize(out: str | os.PathLike[str], grid: list[int] | None = None,
              samplers: list[str] | None = None, runs: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    """Per run (sampler, budget): first and last accuracies, their paired change, and the alignment along the run.

    Image accuracy is also compared, paired on records, with the smallest budget of the same sampler
    (``image_vs_smallest``) and, for a control sampler, with the uniform run at the same budget
    (``image_vs_uniform``)."""
    evals, traj = load_trap(out, grid, samplers, runs)
    budgets = []
    lasts: dict[tuple[str, int], Any] = {}
    for (sampler, m), ev in sorted(evals.groupby(["sampler", "frames"], sort=False), key=lambda kv: run_order(kv[0])):
        ev = ev.sort_values("step")
        first, last = ev.iloc[0], ev.iloc[-1]
        lasts[(sampler, int(m))] = last
        row: dict[str, Any] = {"frames": int(m), "sampler": sampler, "steps": int(last["step"]),
                               "n_image": int(last["n_image"]), "n_video": int(last["n_video"]),
                               **_run_facts(budget_dir(out, int(m), sampler), int(m))}
        for k in METRICS:
            row[k] = {"first": float(first[k]), "last": float(last[k])}
            if f"{k}_items" in ev:
                row[k]["change"] = paired_difference(last[f"{k}_items"], first[f"{k}_items"])
        for kind in ("image", "video"):
            if f"{kind}_qtypes" in ev:
                row[f"{kind}_types"] = type_changes(first.to_dict(), last.to_dict(), kind, int(m))
        tr = (traj[(traj["frames"] == m) & (traj["sampler"] == sampler) & traj["finite"].astype(bool)]
              if len(traj) else traj)
        if len(tr):
            cos = tr["cos"].to_numpy(float)
            row["alignment"] = {
                "probes": len(tr),
                "mean_cos": float(cos.mean()),
                "stderr_cos": float(cos.std(ddof=1) / math.sqrt(len(cos))) if len(cos) > 1 else None,
                "frac_negative": float((tr["alignment"] < 0).mean()),
            }
        if "image_free_items" in ev:
            smallest = min(mm for sp, mm in lasts if sp == sampler)
            if smallest != m:
                row["image_vs_smallest"] = {
                    k: paired_difference(last[f"{k}_items"], lasts[(sampler, smallest)][f"{k}_items"])
                    for k in METRICS[:2]
                }
            if sampler != "uniform" and ("uniform", int(m)) in lasts:
                row["image_vs_uniform"] = {
                    k: paired_difference(last[f"{k}_items"], lasts[("uniform", int(m))][f"{k}_items"])
                    for k in METRICS[:2]
                }
        budgets.append(row)
    return {"schema": "gradprobe.trap/2", "budgets": budgets,
            "note": "change: last minus first evaluation, paired on records (95% t interval); "
                    "image_vs_smallest: last image accuracy minus that of the smallest budget of the same sampler, "
                    "paired on records; image_vs_uniform (controls): minus that of the uniform run at the same "
                    "budget; video_types / image_types: changes per question type, video records split by "
                    "whether m reaches their m_min (answerable) or not; video accuracy is scored with the run's "
                    "own sampler and budget (a hybrid arm's at the largest budget); mean_frames: training frames "
                    "per clip; seconds: wall time of the invocation that finished the run; stderr_cos treats probes along one run as independent, which they are not"}
