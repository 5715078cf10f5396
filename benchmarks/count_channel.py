"""Compare the two runs of benchmarks/count_channel.sh: image accuracy per question type, first → last, in the
run on all training clips and in the run without the blink questions, and the two runs' last evaluations
against each other. Every interval is over held-out records, paired (both runs are scored on the same images
and clips), 95% t; restricted accuracy (the answer chosen among the question's valid answers).

    python benchmarks/count_channel.py OUT --images TOY_DATA/eval_images.jsonl --out OUT/count_channel.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradprobe.estimators.stats import paired_difference
from gradprobe.outputs import read_jsonl, write_json

ARMS = ("all-2", "no-blink-2")


def _types(path: Path, n: int) -> list[str]:
    return [r["qtype"] for r in read_jsonl(path)][:n]


def _subset(items: str, idx: list[int]) -> str:
    return "".join(items[i] for i in idx)


def compare(out: Path, images: Path) -> dict:
    evals = {arm: read_jsonl(out / arm / "gradprobe_eval.jsonl") for arm in ARMS}
    n = evals[ARMS[0]][0]["n_image"]
    if any(e[0]["n_image"] != n or len(e) < 2 for e in evals.values()):
        raise SystemExit(f"{out}: the runs were not scored on the same images, or have not finished")
    types = _types(images, n)
    result: dict = {"n_image": n, "types": {}}
    for q in sorted(set(types)) + ["all"]:
        idx = [i for i, t in enumerate(types) if q in (t, "all")]
        row: dict = {"n": len(idx)}
        for arm, e in evals.items():
            first, last = (_subset(e[k]["image_restricted_items"], idx) for k in (0, -1))
            row[arm] = {"first": first.count("1") / len(idx), "last": last.count("1") / len(idx),
                        "change": paired_difference(last, first)}
        row["no_blink_vs_all"] = paired_difference(*(_subset(evals[a][-1]["image_restricted_items"], idx)
                                                     for a in reversed(ARMS)))
        result["types"][q] = row
    return result


def _ci(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def markdown(r: dict) -> str:
    lines = ["| image question | n | all clips: first → last, change | without blink: first → last, change "
             "| last: without blink − all |", "|---|---|---|---|---|"]
    for q, row in r["types"].items():
        cells = [f"{row[a]['first']:.2f} → {row[a]['last']:.2f}, {_ci(row[a]['change'])}" for a in ARMS]
        lines.append(f"| {q} | {row['n']} | {cells[0]} | {cells[1]} | {_ci(row['no_blink_vs_all'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the directory benchmarks/count_channel.sh wrote")
    p.add_argument("--images", type=Path, required=True, help="the held-out image records the runs scored")
    p.add_argument("--out", dest="json_out", type=Path, help="write the comparison here as JSON")
    a = p.parse_args()
    r = compare(a.out, a.images)
    if a.json_out:
        write_json(a.json_out, r)
    print(markdown(r))


if __name__ == "__main__":
    main()
