"""The scores of `gradprobe budget --score` runs against m_min, side by side, as RESULTS.md prints them.

    gradprobe budget --method redundancy --frames 2,4,8,16,32,64 --score --limit 400 --alignment 100 --out b/red
    ... (likewise sufficiency and gradient, on the same clips)
    python benchmarks/budget_scores.py b/red b/suf b/grad --out benchmarks/results/budget_toy.json --markdown

Every run must have scored the same clips (the uniform baselines then agree); the uniform rows are printed once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(dirs: list[Path]) -> dict[str, dict]:
    """Each run's summary by method; the runs must share their clips and grid (checked on the uniform scores)."""
    runs: dict[str, dict] = {}
    for d in dirs:
        s = json.loads((d / "budget_summary.json").read_text())
        if "score" not in s:
            raise SystemExit(f"{d}: no scores (run gradprobe budget with --score)")
        if s["method"] in runs:
            raise SystemExit(f"{d}: a second run of {s['method']}")
        first = next(iter(runs.values()), None)
        if first is not None and (first["frames"] != s["frames"] or first["score"]["uniform"] != s["score"]["uniform"]):
            raise SystemExit(f"{d}: other clips or another grid than {next(iter(runs))}'s run")
        runs[s["method"]] = s
    return runs


def _types(runs: dict[str, dict]) -> list[str]:
    return list(next(iter(runs.values()))["score"]["manifest"])


def markdown(runs: dict[str, dict]) -> str:
    types = _types(runs)
    first = next(iter(runs.values()))
    n = {q: first["score"]["manifest"][q]["n"] for q in types}
    head = ("| budgets | " + " | ".join(f"{q} (n = {n[q]})" for q in types) + " |\n"
            + "|---" * (len(types) + 1) + "|\n")

    def row(label: str, score: dict) -> str:
        return (f"| {label} | " + " | ".join(f"{score[q]['exact']:.2f} / {score[q]['under']:.2f} / "
                                           f"{score[q]['mean_frames']:.1f}" for q in types) + " |")

    rows = [row(f"`{m}` (tolerance {s['tolerance']:g})", s["score"]["manifest"]) for m, s in runs.items()]
    rows += [row(f"uniform {m}", sc) for m, sc in first["score"]["uniform"].items()]
    out = ["Each cell: exact / under (evidence lost) / mean frames.", "", head + "\n".join(rows), ""]
    out += ["| method | mean frames | visual tokens saved | clips below the largest budget | A at the allocated "
            "budget | A at the largest | difference |", "|---|---|---|---|---|---|---|"]
    for m, s in runs.items():
        a = s.get("alignment")
        cells = ["—"] * 4 if a is None else [
            str(a["n"]), f"{a['A_allocated']['mean']:+.2f}", f"{a['A_largest']['mean']:+.2f}",
            f"{a['difference']['mean']:+.2f} [{a['difference']['ci95'][0]:+.2f}, {a['difference']['ci95'][1]:+.2f}]"]
        saved = s.get("tokens_saved_fraction")
        out.append(f"| `{m}` | {s['mean_frames']:.1f} | {'—' if saved is None else f'{saved:.0%}'} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="output directories of gradprobe budget --score")
    ap.add_argument("--out", type=Path, help="write the runs' summaries, by method, to this JSON file")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown (as in RESULTS.md)")
    a = ap.parse_args()
    runs = read(a.dirs)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(runs, indent=1) + "\n")
    print(markdown(runs) if a.markdown else json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
