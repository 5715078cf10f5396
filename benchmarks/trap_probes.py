"""Alignment and α(m) decomposition on the checkpoints of `gradprobe trap` runs, per seed and across seeds.

    python benchmarks/trap_probes.py trap-s0 trap-s1 ... --work probes --out benchmarks/results/toy_v6/trap_probes.json

For each seed's trap directory, on the toy's probe sets (the same image and video batches for every checkpoint):

* ``gradprobe align`` on the starting model and on every run's final checkpoint (uniform, controls, hybrid arms),
  at the trap's uniform budgets;
* ``gradprobe decompose --shared smallest`` and ``--shared static`` on the starting model and on the uniform
  runs' finals at ``--decompose-at`` (default: the budgets that have controls, else the largest).

Commands that already finished are kept (their ``summary.json`` is there), so an interrupted run resumes. Across
seeds, each statistic gets a t interval over seeds. ``--read`` runs nothing and reads the outputs already in
``--work``: the tables from copies of the runs that keep only their summaries (as benchmarks/results does).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from gradprobe.outputs import budget_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trap_seeds import _t_interval

REPO = Path(__file__).resolve().parents[1]


def _done(out: Path, models: list[str]) -> bool:
    """Whether ``out`` holds a finished command over exactly these checkpoints."""
    if (out / "checkpoints.json").exists():
        c = json.loads((out / "checkpoints.json").read_text())
        return not c["pending"] and [x["model"] for x in c["checkpoints"]] == models
    return (out / "summary.json").exists()


def _cli(args: list[str], out: Path, log: Path) -> None:
    """Run one gradprobe command unless its output is complete."""
    if _done(out, [args[i + 1] for i, a in enumerate(args) if a == "--model"]):
        return
    print(f"gradprobe {args[0]} → {out}", file=sys.stderr)
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-m", "cli.main", *args, "--out", str(out)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=err)


def _runs(trap: Path) -> tuple[Path, list[tuple[str, Path]], list[int]]:
    summary = json.loads((trap / "trap_summary.json").read_text())
    finals = [(f"{b.get('sampler', 'uniform')}:{b['frames']}",
               budget_dir(trap, b["frames"], b.get("sampler", "uniform")) / "final") for b in summary["budgets"]]
    start = Path(json.loads((finals[0][1].parent / "sft_summary.json").read_text())["model"])
    grid = sorted({b["frames"] for b in summary["budgets"] if b.get("sampler", "uniform") == "uniform"})
    return start, finals, grid


def probe_seed(trap: Path, work: Path, decompose_at: list[int] | None, batches: list[str], read: bool = False) -> dict:
    """Align and decompose one seed's checkpoints (unless ``read``: then only read what ``work`` holds)."""
    start, finals, grid = _runs(trap)
    data = start.parent / "data"
    common = ["--image-data", str(data / "probe_images.jsonl"), "--video-data", str(data / "probe_videos.jsonl"),
              "--frames", ",".join(map(str, grid)), *batches]
    models = [start] + [p for _, p in finals]
    controls = sorted({int(k.split(":")[1]) for k, _ in finals if k.split(":")[0] in ("static", "shuffled")})
    by_label = dict(finals)
    dec_models = [("start", start)] + [(f"uniform:{m}", by_label[f"uniform:{m}"])
                                       for m in decompose_at or controls or [max(grid)] if f"uniform:{m}" in by_label]
    if not read:
        work.mkdir(parents=True, exist_ok=True)
        _cli(["align", *[a for m in models for a in ("--model", str(m))], *common], work / "align", work / "align.err")
        for label, model in dec_models:
            for shared in ("smallest", "static"):
                name = f"decompose-{shared}-{label.replace(':', '-')}"
                _cli(["decompose", "--model", str(model), "--shared", shared, *common], work / name,
                     work / f"{name}.err")
    return read_seed(work, [("start", None)] + [(k, p.parent.name) for k, p in finals], [lab for lab, _ in dec_models])


def read_seed(work: Path, labels: list[tuple[str, str | None]], dec_labels: list[str]) -> dict:
    """The align and decompose statistics of one seed. ``labels`` names align's checkpoints in the order they were
    given, each with the name of its run's directory (None for the start), so that outputs whose checkpoints have
    moved since (a copy of the runs) are still read as the runs they came from."""
    given = json.loads((work / "align" / "checkpoints.json").read_text())["checkpoints"]
    found = [Path(c["model"]).parent.name for c in given]
    want = [d for _, d in labels]
    if len(given) != len(labels) or any(d is not None and d != f for d, f in zip(want, found, strict=True)):
        raise SystemExit(f"{work / 'align'} holds checkpoints of {found[1:]}, the trap directory has runs {want[1:]}")
    rows = pd.read_csv(work / "align" / "checkpoints.csv")
    rows["run"] = rows["model"].map({c["model"]: lab for c, (lab, _) in zip(given, labels, strict=True)})
    align = {run: {int(r.frames): {"A": r["mean"], "ci95": [r.ci95_t_lo, r.ci95_t_hi], "cos": r.mean_cos,
                                   "frac_negative": r.frac_negative}
                   for _, r in g.iterrows()} for run, g in rows.groupby("run", sort=False)}
    dec = {}
    for label in dec_labels:
        for shared in ("smallest", "static"):
            s = json.loads((work / f"decompose-{shared}-{label.replace(':', '-')}" / "summary.json").read_text())
            dec[f"{label}/{shared}"] = {
                "rho_sh": s["rho_sh"]["value"], "rho_sh_ci95": s["rho_sh"]["ci95"],
                "rho_tmp": s["rho_tmp"]["value"], "rho_tmp_ci95": s["rho_tmp"]["ci95"],
                "explained": s["tmp_direction"]["explained"],
                "budgets": {b["frames"]: {k: b.get(k) for k in ("A", "A_ci95_t", "rho_sh", "alpha", "alpha_ci95",
                                                               "contrib_tmp", "A_pred")} for b in s["budgets"]},
                "checks": {c["check"]: c["verdict"] for c in s["checks"]},
                "m_star": {k: s["m_star"][k]["value"] for k in ("model", "empirical")},
            }
    return {"align": align, "decompose": dec}


def _over_defined(values: list[float | None]) -> dict:
    """A t interval over the seeds where the statistic is defined (ρ_tmp is not where the decomposition resolves
    no temporal direction); ``n_undefined`` counts the others."""
    vals = [v for v in values if v is not None]
    out = _t_interval(vals) if vals else {"mean": None, "stderr": None, "ci95": None, "n_seeds": 0}
    return {**out, "n_undefined": len(values) - len(vals)}


def _same(t: dict, values: list[float | None], within: list[float] | None) -> dict:
    """Mark a statistic that every seed measured on the same checkpoint with the same batches (the starting model),
    so equal in every seed: an interval over seeds says nothing there, ``ci95_within`` (over probe batches, of
    the first seed) does."""
    if len(values) > 1 and None not in values and np.allclose(values, values[0], rtol=1e-9, atol=0):
        return {**t, "same_in_every_seed": True, "ci95_within": within}
    return t


def _across(seeds: list[dict]) -> dict:
    """t intervals over seeds, for the checkpoints every seed has (hybrid arms may be missing from some)."""
    first = seeds[0]
    align = {run: {m: {k: _t_interval([s["align"][run][m][k] for s in seeds]) for k in ("A", "cos", "frac_negative")}
                   for m in per_m} for run, per_m in first["align"].items() if all(run in s["align"] for s in seeds)}
    for run, per_m in align.items():
        for m, v in per_m.items():
            v["A"] = _same(v["A"], [s["align"][run][m]["A"] for s in seeds], first["align"][run][m]["ci95"])
    dec = {}
    for key, d in first["decompose"].items():
        if not all(key in s["decompose"] for s in seeds):
            continue
        dec[key] = {
            "rho_sh": _same(_t_interval([s["decompose"][key]["rho_sh"] for s in seeds]),
                            [s["decompose"][key]["rho_sh"] for s in seeds], d["rho_sh_ci95"]),
            "rho_tmp": _same(_over_defined([s["decompose"][key]["rho_tmp"] for s in seeds]),
                             [s["decompose"][key]["rho_tmp"] for s in seeds], d["rho_tmp_ci95"]),
            "alpha": {m: _t_interval([s["decompose"][key]["budgets"][m]["alpha"] for s in seeds]) for m in d["budgets"]},
            "A": {m: _t_interval([s["decompose"][key]["budgets"][m]["A"] for s in seeds]) for m in d["budgets"]},
            "checks": {c: [s["decompose"][key]["checks"][c] for s in seeds] for c in d["checks"]},
            "m_star": {k: [s["decompose"][key]["m_star"][k] for s in seeds] for k in ("model", "empirical")},
        }
    return {"align": align, "decompose": dec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="output directories of gradprobe trap (one per seed)")
    ap.add_argument("--work", required=True, help="where the align and decompose outputs go (one folder per seed)")
    ap.add_argument("--decompose-at", help="uniform budgets whose final checkpoints are decomposed, e.g. 8,64")
    ap.add_argument("--batches", default="--image-batches 16 --video-batches 24",
                    help="batch options given to both align and decompose")
    ap.add_argument("--out", help="write the combined JSON here")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown (as in RESULTS.md)")
    ap.add_argument("--read", action="store_true",
                    help="run nothing: read the outputs already in --work (the checkpoints need not exist)")
    a = ap.parse_args()
    at = [int(x) for x in a.decompose_at.split(",")] if a.decompose_at else None
    seeds = [probe_seed(Path(d), Path(a.work) / Path(d).name, at, shlex.split(a.batches), a.read) for d in a.dirs]
    across = _across(seeds)
    if a.markdown:
        print(_markdown(across))
    else:
        _plain(across)
    if a.out:
        Path(a.out).write_text(json.dumps({"seeds": dict(zip(a.dirs, seeds, strict=True)), "across_seeds": across},
                                          indent=2) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)


SAME = ("† the same checkpoint and probe batches in every seed (the starting model), so the same value: its "
        "interval is over probe batches (t for A, bootstrap for ρ), not over seeds.")


def _cell(t: dict, digits: int = 2) -> str:
    if t["mean"] is None:
        return f"none resolved ({t['n_undefined']} seeds)"
    if t.get("same_in_every_seed"):
        ci = t["ci95_within"]
        return f"{t['mean']:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "") + "†"
    ci = f" [{t['ci95'][0]:+.{digits}f}, {t['ci95'][1]:+.{digits}f}]" if t["ci95"] else ""
    missing = f" ({t['n_seeds']} of {t['n_seeds'] + t['n_undefined']} seeds)" if t.get("n_undefined") else ""
    return f"{t['mean']:+.{digits}f}{ci}{missing}"


def _markdown(across: dict) -> str:
    """A(m) per checkpoint and budget; the decomposition per checkpoint and shared variant."""
    grid = list(next(iter(across["align"].values())))
    lines = ["| checkpoint | " + " | ".join(f"A({m})" for m in grid) + " |", "|---|" + "---|" * len(grid)]
    for run, per_m in across["align"].items():
        lines.append(f"| {run} | " + " | ".join(_cell(per_m[m]["A"]) for m in grid) + " |")
    lines += ["", "| checkpoint / g_sh | ρ_sh | ρ_tmp | α(m) | m* model (per seed) | m* empirical (per seed) | "
              "checks held / violated / inconclusive (3, 4, 5 residual, 5 variance, α monotone) |", "|---|---|---|---|---|---|---|"]
    for key, d in across["decompose"].items():
        alpha = ", ".join(f"{m}: {v['mean']:.1f}" for m, v in d["alpha"].items())
        checks = "; ".join("/".join(str(v.count(w)) for w in ("held", "violated", "inconclusive"))
                           for v in d["checks"].values())
        lines.append(f"| {key} | {_cell(d['rho_sh'])} | {_cell(d['rho_tmp'])} | {alpha} | "
                     f"{', '.join(str(x or 'none') for x in d['m_star']['model'])} | "
                     f"{', '.join(str(x or 'none') for x in d['m_star']['empirical'])} | {checks} |")
    if "†" in "\n".join(lines):
        lines += ["", SAME]
    return "\n".join(lines)


def _plain(across: dict) -> None:
    def fmt(x: float | None) -> str:
        return "none" if x is None else f"{x:+.2f}"

    print("A(m) = <g_img, g_vid^(m)> on each checkpoint, mean over seeds [95% CI over seeds]")
    for run, per_m in across["align"].items():
        print(f"{run:>14} | " + "; ".join(f"m={m}: {_cell(v['A'])}" for m, v in per_m.items()))
    if any(v["A"].get("same_in_every_seed") for per_m in across["align"].values() for v in per_m.values()):
        print(SAME)
    print("decomposition: rho_sh, rho_tmp, alpha(m), m* (model, empirical) per seed")
    for key, d in across["decompose"].items():
        alpha = ", ".join(f"{m}: {v['mean']:.2f}" for m, v in d["alpha"].items())
        print(f"{key:>22} | rho_sh {fmt(d['rho_sh']['mean'])} rho_tmp {fmt(d['rho_tmp']['mean'])} | alpha {alpha} | "
              f"m* model {d['m_star']['model']} empirical {d['m_star']['empirical']}")


if __name__ == "__main__":
    main()
