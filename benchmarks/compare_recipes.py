"""Two recipes of the trap, run for run: each (sampler, budget, seed) that both summaries hold, side by side.

    python benchmarks/compare_recipes.py benchmarks/results/toy_v6/trap_seeds.json \
        benchmarks/results/toy_v6/pilot/9000steps/trap_seed{0,1,2,3,4}.json --labels "6000 steps,9000 steps"

BASE and each OTHER are outputs of ``benchmarks/trap_seeds.py`` (the second recipe's may be one per seed, when its
seeds ran different budgets). For every run of the OTHERs whose seed and key (sampler and budget) BASE also has,
one markdown row: each temporal type's restricted accuracy at the end on the clips the budget answers, with its
change over the run (``*``: the run's paired interval over records excludes 0), the image accuracy (restricted)
and the image ``colour`` questions' at the end. Nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TYPES = ("blink", "motion", "order")


def _runs(*paths: Path) -> dict[tuple[int, str], dict]:
    runs = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"compare_recipes.py: {path}: not a trap_seeds.py output ({e})")
        runs.update({(s["seed"], key): run for s in data["seeds"] for key, run in s["runs"].items()})
    return runs


def _cell(v: dict | None) -> str:
    if v is None:
        return "–"
    lo, hi = v["ci95"] or (0.0, 0.0)  # no interval (too few records): not starred
    return f"{v['last']:.2f} ({v['change']:+.2f}{'*' if lo > 0 or hi < 0 else ''})"


def rows(base: dict, other: dict) -> list[list[str]]:
    """One row per run in both: key, seed, then base and other for each type, the image and its colour."""
    out = []
    for (seed, key), new in other.items():
        old = base.get((seed, key))
        if old is None:
            continue
        sampler, m = key.split(":")
        row = [f"{sampler} {m}", str(seed)]
        for t in TYPES:
            row += [_cell(r["video_types"].get(f"{t}/answerable")) for r in (old, new)]
        row += [_cell(r["image_restricted"]) for r in (old, new)]
        row += [_cell(r.get("image_types", {}).get("colour")) for r in (old, new)]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="trap_seeds.py output of the first recipe")
    ap.add_argument("other", type=Path, nargs="+", help="trap_seeds.py output(s) of the second recipe")
    ap.add_argument("--labels", default="base,other", help="the two recipes' names, comma-separated")
    a = ap.parse_args()
    labels = a.labels.split(",")
    if len(labels) != 2:
        sys.exit(f"compare_recipes.py: --labels: expected two names separated by a comma, got {a.labels!r}")
    table = rows(_runs(a.base), _runs(*a.other))
    if not table:
        sys.exit(f"compare_recipes.py: {a.base} and {' '.join(map(str, a.other))} have no run (seed, sampler, "
                 "budget) in common")
    head = ["run", "seed"]
    for what in (*TYPES, "image", "image colour"):
        head += [f"{what}: {labels[0]}", f"{what}: {labels[1]}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
