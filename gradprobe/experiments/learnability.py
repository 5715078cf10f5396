"""Does a toy learn a temporal question type from ordered frames, and not from static ones?

Short Video-SFT runs (:func:`gradprobe.sft.run_sft`) on the clips of one ShapesWorld question type at one
budget, one run per (sampler, seed), each scored by restricted accuracy on held-out clips the budget can
answer, at the start and at the end. The recipe of the learnability guard (``tests/test_toy_learns.py``)
and of ``benchmarks/learnability.py``, which measures it over seeds and hosts.

Where one run of a long optimisation ends moves with the host (the CPU kind, the BLAS build and the thread
count change the rounding, and training amplifies it), so the verdict is over seeds: :func:`learns` asks a
majority of the runs to end above :attr:`Recipe.learned` with their paired interval above zero.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradprobe.train.evaluate import type_changes


@dataclass(frozen=True)
class Recipe:
    """One learnability check. The defaults are the guard's: ``order`` ("which colour appears first ?", four
    colours, chance 1/4) at m = 8, 700 steps at lr 3e-4 (at 1e-3 the runs spike and fall back)."""

    qtype: str = "order"
    frames: int = 8
    steps: int = 700
    lr: float = 3e-4
    batch_size: int = 8
    n_train: int = 400
    n_eval: int = 64
    data_seed: int = 1
    #: restricted accuracy at the end that counts as learned
    learned: float = 0.6


def make_data(recipe: Recipe, root: str | Path) -> Path:
    """Write the recipe's training and held-out clips (``train_videos.jsonl``, ``eval_videos.jsonl``) into the
    new folder ``root``, or find them there; return ``root``. The clips are written beside it and the folder
    renamed into place, so a process that finds ``root`` finds it whole, whatever else writes it at once."""
    from gradprobe.data import shapesworld as sw

    root = Path(root)
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    for split, n in (("train", recipe.n_train), ("eval", recipe.n_eval)):
        sw.generate(part, n_images=0, n_videos=n, seed=recipe.data_seed, split=split, video_mix=(recipe.qtype,))
    try:
        part.rename(root)
    except OSError:  # another process renamed its copy first: the same clips
        shutil.rmtree(part)
    return root


def run(toy: Any, recipe: Recipe, data: str | Path, out: str | Path, sampler: str = "uniform", seed: int = 0,
        eval_every: int | None = None) -> dict[str, Any]:
    """One run from ``toy`` (a built :class:`gradprobe.toybox.Toy`) on ``data`` (:func:`make_data`).

    Returns:
        ``{"sampler", "seed", "n", "first", "last", "change", "curve"}``: restricted accuracy on the held-out
        clips the budget answers, at the start and the end, their paired change (``diff``, ``ci95``), and the
        accuracy at each evaluation (every ``eval_every`` steps; the start and the end only by default).
    """
    from gradprobe.sft import SFTOptions, run_sft

    data = Path(data)
    s = run_sft(SFTOptions(
        out=str(out), frames=recipe.frames, sampler=sampler, seed=seed, model=str(toy.model_dir),
        video_data=str(data / "train_videos.jsonl"), image_probe=str(toy.data("probe", "images")),
        eval_image_data=str(toy.data("eval", "images")), eval_video_data=str(data / "eval_videos.jsonl"),
        eval_images=8, eval_videos=recipe.n_eval, eval_every=eval_every, steps=recipe.steps,
        batch_size=recipe.batch_size, lr=recipe.lr, probe_every=recipe.steps, probe_batches=1,
        save_steps=recipe.steps, keep_clips=True,
    ))
    entry = s["types"]["video"][recipe.qtype]["answerable"]
    rows = s["evaluations"]
    curve = [type_changes(rows[0], r, "video", recipe.frames)[recipe.qtype]["answerable"]["restricted"]["last"]
             for r in rows]
    r = entry["restricted"]
    return {"sampler": sampler, "seed": seed, "n": entry["n"], "first": r["first"], "last": r["last"],
            "change": {"diff": r["change"]["diff"], "ci95": r["change"]["ci95"]},
            "curve": {str(row["step"]): a for row, a in zip(rows, curve, strict=True)}}


def learned(result: dict[str, Any], recipe: Recipe) -> bool:
    """One run learned: it ends at or above ``recipe.learned`` and its paired interval excludes no change."""
    return result["last"] >= recipe.learned and result["change"]["ci95"][0] > 0


def learns(results: list[dict[str, Any]], recipe: Recipe) -> bool:
    """The verdict over seeds: a majority of the runs learned."""
    return 2 * sum(learned(r, recipe) for r in results) > len(results)
