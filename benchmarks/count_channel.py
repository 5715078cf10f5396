"""Compare the two runs of benchmarks/count_channel.sh: image accuracy per question type, first → last, in the
run on all training clips and in the run without one video question type (blink by default), and the two runs'
last evaluations against each other. Every interval is over held-out records, paired (both runs are scored on the same images
and clips), 95% t; restricted accuracy (the answer chosen among the question's valid answers).

    python benchmarks/count_channel.py OUT --out OUT/count_channel.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradprobe.estimators.stats import paired_difference
from gradprobe.outputs import EVAL_FILE, read_jsonl, write_json
from gradprobe.train.evaluate import type_changes


def arms(out: Path) -> tuple[str, str]:
    """The two runs in OUT: ``all-<m>`` and ``no-<type>-<m>``."""
    found = [sorted(p.name for p in out.glob(f"{k}-*") if p.is_dir()) for k in ("all", "no")]
    if [len(f) for f in found] != [1, 1]:
        raise SystemExit(f"{out}: expected one all-<m> and one no-<type>-<m> run, found {found[0] + found[1]}")
    return found[0][0], found[1][0]


def compare(out: Path) -> dict:
    every, without = arms(out)
    evals = {arm: read_jsonl(out / arm / EVAL_FILE) for arm in (every, without)}
    for arm, e in evals.items():
        if len(e) < 2:
            raise SystemExit(f"{out / arm / EVAL_FILE}: fewer than two evaluations (the run has not finished, or is not there)")
    lasts = [e[-1] for e in evals.values()]
    types = lasts[0]["image_qtypes"]
    if any(r["image_qtypes"] != types for r in lasts):
        raise SystemExit(f"{out}: the runs were not scored on the same images")
    per_type = {arm: type_changes(e[0], e[-1], "image", None) for arm, e in evals.items()}
    result: dict = {"n_image": len(types), "arms": [every, without], "without": without.split("-")[1], "types": {}}
    for q in sorted(set(types)) + ["all"]:
        idx = [i for i, t in enumerate(types) if q in (t, "all")]
        row: dict = {"n": len(idx)}
        for arm, e in evals.items():
            row[arm] = per_type[arm][q]["answerable"]["restricted"] if q != "all" else {
                "first": e[0]["image_restricted"], "last": e[-1]["image_restricted"],
                "change": paired_difference(e[-1]["image_restricted_items"], e[0]["image_restricted_items"])}
        after, before = ("".join(r["image_restricted_items"][i] for i in idx) for r in reversed(lasts))
        row["without_vs_all"] = paired_difference(after, before)
        result["types"][q] = row
    return result


def _ci(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def markdown(r: dict) -> str:
    w = r["without"]
    lines = [f"| image question | n | all clips: first → last, change | without {w}: first → last, change "
             f"| last: without {w} − all |", "|---|---|---|---|---|"]
    for q, row in r["types"].items():
        cells = [f"{row[a]['first']:.2f} → {row[a]['last']:.2f}, {_ci(row[a]['change'])}" for a in r["arms"]]
        lines.append(f"| {q} | {row['n']} | {cells[0]} | {cells[1]} | {_ci(row['without_vs_all'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the directory benchmarks/count_channel.sh wrote")
    p.add_argument("--out", dest="json_out", type=Path, help="write the comparison here as JSON")
    a = p.parse_args()
    r = compare(a.out)
    if a.json_out:
        write_json(a.json_out, r)
    print(markdown(r))


if __name__ == "__main__":
    main()
