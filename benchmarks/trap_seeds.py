"""Combine `gradprobe trap` runs made with different seeds: per-budget changes, per seed and across seeds.

    gradprobe trap --seed 0 --out trap-s0   # and --seed 1, --seed 2 ...
    python benchmarks/trap_seeds.py trap-s0 trap-s1 trap-s2 --out benchmarks/results/trap_cpu.json

Within a seed, the interval of a change is over held-out records (paired). Across seeds, the mean change
gets a t interval over seeds, which is what carries run-to-run variation.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import numpy as np
from scipy import stats

from gradprobe.experiments.trap import load_trap

KEYS = ("image_free", "image_restricted", "video_free", "video_restricted")


def _t_interval(x: list[float]) -> dict:
    a = np.asarray(x, dtype=float)
    mean = float(a.mean())
    if len(a) < 2:
        return {"mean": mean, "stderr": None, "ci95": None, "n_seeds": len(a)}
    se = float(a.std(ddof=1) / math.sqrt(len(a)))
    half = float(stats.t.ppf(0.975, len(a) - 1)) * se
    return {"mean": mean, "stderr": se, "ci95": [mean - half, mean + half], "n_seeds": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="output directories of gradprobe trap (one per seed)")
    ap.add_argument("--out", help="write the combined JSON here")
    a = ap.parse_args()
    runs = [json.loads((Path(d) / "trap_summary.json").read_text()) for d in a.dirs]
    grids = {tuple(b["frames"] for b in r["budgets"]) for r in runs}
    if len(grids) != 1:
        raise SystemExit("error: the runs use different budget grids")
    grid = grids.pop()
    per_seed, combined = [], []
    for d, r in zip(a.dirs, runs, strict=True):
        row = {"seed": r["options"]["seed"], "budgets": {}}
        for b in r["budgets"]:
            row["budgets"][b["frames"]] = {
                **{k: {"first": b[k]["first"], "last": b[k]["last"], "change": b[k]["change"]["diff"],
                       "ci95": b[k]["change"]["ci95"]} for k in KEYS},
                "image_free_vs_smallest": b.get("image_vs_smallest", {}).get("image_free", {}).get("diff"),
                "mean_cos": b.get("alignment", {}).get("mean_cos"),
            }
        # does the cosine along the run follow the batches (same clips, same order at every m) or m?
        _, traj = load_trap(d)
        piv = traj[traj["finite"].astype(bool)].pivot(index="step", columns="frames", values="cos").dropna()
        row["cos_range"] = [float(piv.min().min()), float(piv.max().max())]
        row["cos_corr_with_smallest"] = {int(m): float(np.corrcoef(piv[grid[0]], piv[m])[0, 1]) for m in grid[1:]}
        per_seed.append(row)
    for m in grid:
        entry = {"frames": m}
        for k in KEYS:
            entry[k] = _t_interval([s["budgets"][m][k]["change"] for s in per_seed])
        vs = [s["budgets"][m]["image_free_vs_smallest"] for s in per_seed]
        entry["image_free_vs_smallest"] = _t_interval(vs) if all(v is not None for v in vs) else None
        entry["mean_cos"] = _t_interval([s["budgets"][m]["mean_cos"] for s in per_seed])
        combined.append(entry)
    result = {"options": {k: v for k, v in runs[0]["options"].items() if k not in ("seed", "out")},
              "seeds": per_seed, "across_seeds": combined,
              "env": {"python": platform.python_version(), "machine": platform.machine()}}
    print(f"{'m':>4} | " + " | ".join(f"{k} change (mean over {len(runs)} seeds, 95% CI)" for k in KEYS[:1] + KEYS[2:]))
    for e in combined:
        cells = []
        for k in KEYS[:1] + KEYS[2:]:
            t = e[k]
            ci = f" [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]" if t["ci95"] else ""
            cells.append(f"{t['mean']:+.3f}{ci}")
        print(f"{e['frames']:>4} | " + " | ".join(cells))
    for s in per_seed:
        corr = ", ".join(f"m={m}: {c:.2f}" for m, c in s["cos_corr_with_smallest"].items())
        print(f"seed {s['seed']}: cos along the run in [{s['cos_range'][0]:+.3f}, {s['cos_range'][1]:+.3f}]; "
              f"Pearson correlation with m={grid[0]}'s: {corr}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
