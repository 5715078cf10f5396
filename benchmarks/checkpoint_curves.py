"""When each temporal question type is learned along the trap's runs: held-out accuracy at every saved checkpoint.

    python benchmarks/checkpoint_curves.py runs/trap-s0 runs/trap-s1 ... --frames 8,16,32,64 \
        --out benchmarks/results/toy_v6/checkpoint_curves.json --markdown

For each trap directory (a `gradprobe trap --out`) and each uniform run at ``--frames``, the run's checkpoints
(``checkpoint-<step>/``, written every 1500 steps by the trap's recipe, and ``final/``) answer the held-out clips
the trap scored, at the run's budget, each loaded with ``from_pretrained``. The score is the trap's restricted
accuracy on the clips the budget can answer (m ≥ ``m_min``), per question type; step 0 is the run's own first
evaluation (the starting toy). The ``final/`` row is scored here again and must equal the run's last evaluation
(the script stops if it does not). Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gradprobe.data.records import read_samples
from gradprobe.models.registry import family_named
from gradprobe.train.collate import SampleCollator
from gradprobe.train.evaluate import accuracy

TYPES = ("motion", "order", "blink", "static")


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, directory) of a run's saved checkpoints, ``final/`` last at the run's step count."""
    steps = json.loads((run / "sft_summary.json").read_text())["steps"]
    found = sorted((int(p.name.split("-")[1]), p) for p in run.glob("checkpoint-*") if (p / "config.json").is_file())
    found = [(s, p) for s, p in found if s < steps]
    if (run / "final" / "config.json").is_file():
        found.append((steps, run / "final"))
    return found


def per_type(items: str, records: list, m: int) -> dict[str, dict[str, float]]:
    """Restricted accuracy per question type on the records the budget can answer."""
    out = {}
    for t in TYPES:
        idx = [i for i, r in enumerate(records) if r.extra.get("qtype") == t and (r.extra.get("m_min") or 1) <= m]
        if idx:
            out[t] = {"n": len(idx), "restricted": sum(items[i] == "1" for i in idx) / len(idx)}
    return out


def curve(run: Path, m: int) -> dict:
    summary = json.loads((run / "sft_summary.json").read_text())
    data = Path(summary["model"]).parent / "data"
    n_eval = summary["options"]["eval_videos"]
    records = read_samples(data / "eval_videos.jsonl", kind="video").samples[:n_eval]
    rows = [json.loads(line) for line in (run / "gradprobe_eval.jsonl").read_text().splitlines() if line.strip()]
    points = {0: per_type(rows[0]["video_restricted_items"], records, m)}
    for step, ckpt in checkpoints(run):
        print(f"{run}: {ckpt.name}", file=sys.stderr)
        model, adapter = family_named("toy").adapter_class().load(ckpt)
        items = accuracy(model, SampleCollator(adapter, data, frames=m), records)["restricted_items"]
        if ckpt.name == "final" and items != rows[-1]["video_restricted_items"]:
            sys.exit(f"checkpoint_curves.py: {ckpt} does not answer as the run's last evaluation did")
        points[step] = per_type(items, records, m)
    return {"frames": m, "steps": sorted(points), "types": {
        t: {"n": points[0][t]["n"], "restricted": [points[s][t]["restricted"] for s in sorted(points)]}
        for t in points[0]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traps", nargs="+", type=Path, help="gradprobe trap output directories, one per seed")
    ap.add_argument("--frames", default="8,16,32,64", help="the uniform runs to read, by budget")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = ap.parse_args()
    try:
        budgets = [int(x) for x in a.frames.split(",")]
    except ValueError:
        sys.exit(f"checkpoint_curves.py: --frames: expected budgets like 8,16,32,64, got {a.frames!r}")
    for trap in a.traps:
        missing = [m for m in budgets if not (trap / f"frames-{m}" / "sft_summary.json").is_file()]
        if missing:
            sys.exit(f"checkpoint_curves.py: {trap}: no uniform run at m = {', '.join(map(str, missing))}")
    seeds = [{"trap": str(t), "runs": {str(m): curve(t / f"frames-{m}", m) for m in budgets}} for t in a.traps]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"seeds": seeds}, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)
    if a.markdown:
        steps = seeds[0]["runs"][str(budgets[0])]["steps"]
        print(f"| m | type (n) | restricted accuracy at steps {', '.join(map(str, steps))}, one seed a line |")
        print("|---|---|---|")
        for m in budgets:
            for t, v in seeds[0]["runs"][str(m)]["types"].items():
                lines = "<br>".join(" → ".join(f"{x:.2f}" for x in s["runs"][str(m)]["types"][t]["restricted"])
                                    for s in seeds)
                print(f"| {m} | {t} ({v['n']}) | {lines} |")


if __name__ == "__main__":
    main()
