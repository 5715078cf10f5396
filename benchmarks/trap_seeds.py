"""Combine `gradprobe trap` runs made with different seeds: per-run changes, per seed and across seeds.

    gradprobe trap --seed 0 --out trap-s0   # and --seed 1, --seed 2 ...
    python benchmarks/trap_seeds.py trap-s0 trap-s1 trap-s2 trap-s3 trap-s4 --out benchmarks/results/toy_v6/trap_seeds.json

A run is a (sampler, budget) pair: the uniform sampler, and the static/shuffled controls and the hybrid arms
where the experiment ran them. Within a seed, the interval of a change is over held-out records (paired). Across seeds, the mean
change gets a t interval over seeds, which is what carries run-to-run variation. Per question type, the video
change is over the records each budget can answer (m ≥ m_min) and, separately, those it cannot, with the
final accuracy against chance (a uniform guess among each record's choices).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from gradprobe.outputs import budget_dir, load_trap

KEYS = ("image_free", "image_restricted", "video_free", "video_restricted")


def _t_interval(x: list[float]) -> dict:
    a = np.asarray(x, dtype=float)
    mean = float(a.mean())
    if len(a) < 2:
        return {"mean": mean, "stderr": None, "ci95": None, "n_seeds": len(a)}
    se = float(a.std(ddof=1) / math.sqrt(len(a)))
    half = float(stats.t.ppf(0.975, len(a) - 1)) * se
    return {"mean": mean, "stderr": se, "ci95": [mean - half, mean + half], "n_seeds": len(a),
            "seeds_for_80pct_power": _seeds_needed(mean, float(a.std(ddof=1)))}


def _seeds_needed(effect: float, sd: float, most: int = 1000) -> int | None:
    """Seeds at which a two-sided 5% t test over seeds detects ``effect`` with 80% power, if the seed-to-seed
    standard deviation is ``sd`` (noncentral t); None when sd is 0 or more than ``most`` would be needed."""
    if sd == 0 or effect == 0:
        return None
    for n in range(2, most + 1):
        crit = stats.t.ppf(0.975, n - 1)
        nc = abs(effect) / (sd / math.sqrt(n))
        if stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) >= 0.8:
            return n
    return None


def _run_key(b: dict) -> str:
    return f"{b.get('sampler', 'uniform')}:{b['frames']}"


def _eval_records(d: str, r: dict) -> list[dict]:
    """The held-out video records the runs were scored on (the toy's eval split, first ``n_video``)."""
    first = r["budgets"][0]
    name = "frames-{}".format(first["frames"]) if first.get("sampler", "uniform") == "uniform" else \
        "{}-frames-{}".format(first["sampler"], first["frames"])
    model = Path(json.loads((Path(d) / name / "sft_summary.json").read_text())["model"])
    lines = (model.parent / "data" / "eval_videos.jsonl").read_text().splitlines()[: first["n_video"]]
    return [json.loads(x) for x in lines]


def _chance(records: list[dict], m: int) -> dict[str, float]:
    """Restricted accuracy of a uniform guess among each record's choices, per question type and reach at m."""
    out: dict[str, list[float]] = {}
    for x in records:
        reach = "answerable" if x.get("m_min") is None or x["m_min"] <= m else "unanswerable"
        out.setdefault(f"{x['qtype']}/{reach}", []).append(1 / len(x["choices"]))
    return {k: float(np.mean(v)) for k, v in out.items()}


def _per_seed(d: str, r: dict, grid: list[int]) -> dict:
    row = {"seed": r["options"]["seed"], "runs": {}}
    records = _eval_records(d, r)
    for b in r["budgets"]:
        chance = _chance(records, b["frames"])
        entry = {
            **{k: {"first": b[k]["first"], "last": b[k]["last"], "change": b[k]["change"]["diff"],
                   "ci95": b[k]["change"]["ci95"]} for k in KEYS},
            "image_free_vs_smallest": b.get("image_vs_smallest", {}).get("image_free", {}).get("diff"),
            "image_free_vs_uniform": b.get("image_vs_uniform", {}).get("image_free", {}).get("diff"),
            "image_free_vs_smallest_ci95": b.get("image_vs_smallest", {}).get("image_free", {}).get("ci95"),
            "image_free_vs_uniform_ci95": b.get("image_vs_uniform", {}).get("image_free", {}).get("ci95"),
            "mean_cos": b.get("alignment", {}).get("mean_cos"),
            "mean_frames": b.get("mean_frames", b["frames"]),
            "seconds": b.get("seconds") if b.get("seconds") is not None else json.loads(
                (budget_dir(d, b["frames"], b.get("sampler", "uniform")) / "sft_summary.json").read_text()).get("seconds"),
            "video_types": {
                f"{q}/{reach}": {"n": e["n"], "first": e["restricted"]["first"], "last": e["restricted"]["last"],
                                 "change": e["restricted"]["last"] - e["restricted"]["first"],
                                 "ci95": (e["restricted"].get("change") or {}).get("ci95"),
                                 "free_change": e["free"]["last"] - e["free"]["first"],
                                 "chance": chance[f"{q}/{reach}"]}
                for q, parts in b.get("video_types", {}).items() for reach, e in parts.items()
            },
            # image questions per type (free: an image answer has no restriction to lift), first → last
            "image_types": {q: {"n": e["n"], "first": e["free"]["first"], "last": e["free"]["last"],
                                "change": e["free"]["last"] - e["free"]["first"],
                                "ci95": (e["free"].get("change") or {}).get("ci95")}
                            for q, parts in b.get("image_types", {}).items() for e in parts.values()},
        }
        row["runs"][_run_key(b)] = entry
    # does the cosine along the run follow the batches (same clips, same order at every m) or m?
    _, traj = load_trap(d, grid, ["uniform"])
    piv = traj[traj["finite"].astype(bool)].pivot(index="step", columns="frames", values="cos").dropna()
    row["cos_range"] = [float(piv.min().min()), float(piv.max().max())]
    row["cos_corr_with_smallest"] = {int(m): float(np.corrcoef(piv[grid[0]], piv[m])[0, 1]) for m in grid[1:]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="output directories of gradprobe trap (one per seed)")
    ap.add_argument("--out", help="write the combined JSON here")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown (as in RESULTS.md)")
    a = ap.parse_args()
    runs = [json.loads((Path(d) / "trap_summary.json").read_text()) for d in a.dirs]
    layouts = {tuple(_run_key(b) for b in r["budgets"]) for r in runs}
    if len(layouts) != 1:
        raise SystemExit("error: the runs use different budget grids or samplers")
    keys = list(layouts.pop())
    grid = sorted({b["frames"] for b in runs[0]["budgets"] if b.get("sampler", "uniform") == "uniform"})
    per_seed = [_per_seed(d, r, grid) for d, r in zip(a.dirs, runs, strict=True)]
    combined = []
    for key in keys:
        sampler, m = key.split(":")
        entry: dict = {"frames": int(m), "sampler": sampler}
        for k in KEYS:
            entry[k] = _t_interval([s["runs"][key][k]["change"] for s in per_seed])
        for k in ("image_free_vs_smallest", "image_free_vs_uniform", "mean_cos", "mean_frames", "seconds"):
            vs = [s["runs"][key][k] for s in per_seed]
            entry[k] = _t_interval(vs) if all(v is not None for v in vs) else None
        types = sorted(set.intersection(*(set(s["runs"][key]["video_types"]) for s in per_seed)))
        entry["video_types_restricted"] = {
            t: {**_t_interval([s["runs"][key]["video_types"][t]["change"] for s in per_seed]),
                "first": float(np.mean([s["runs"][key]["video_types"][t]["first"] for s in per_seed])),
                "last": float(np.mean([s["runs"][key]["video_types"][t]["last"] for s in per_seed])),
                "chance": float(np.mean([s["runs"][key]["video_types"][t]["chance"] for s in per_seed])),
                "last_minus_chance": _t_interval([s["runs"][key]["video_types"][t]["last"]
                                                  - s["runs"][key]["video_types"][t]["chance"] for s in per_seed]),
                "n_records": [s["runs"][key]["video_types"][t]["n"] for s in per_seed]}
            for t in types
        }
        entry["video_types_free"] = {t: _t_interval([s["runs"][key]["video_types"][t]["free_change"] for s in per_seed])
                                     for t in types}
        image_types = sorted(set.intersection(*(set(s["runs"][key]["image_types"]) for s in per_seed)))
        entry["image_types_free"] = {
            q: {**_t_interval([s["runs"][key]["image_types"][q]["change"] for s in per_seed]),
                **{k: float(np.mean([s["runs"][key]["image_types"][q][k] for s in per_seed])) for k in ("first", "last")}}
            for q in image_types}
        combined.append(entry)
    result = {"options": {k: v for k, v in runs[0]["options"].items() if k not in ("seed", "out")},
              "seeds": per_seed, "across_seeds": combined,
              "env": {"python": platform.python_version(), "machine": platform.machine()}}

    def cell(t: dict | None) -> str:
        if t is None:
            return "—"
        ci = f" [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]" if t["ci95"] else ""
        return f"{t['mean']:+.3f}{ci}"

    if a.markdown:
        print(_markdown(combined))
        print()
        print(_per_seed_markdown(combined, per_seed))
        hybrid = _hybrid_markdown(combined, per_seed)
        if hybrid:
            print()
            print(hybrid)
    else:
        _plain(combined, per_seed, grid, cell)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)


def _cell(t: dict | None, digits: int = 3) -> str:
    if t is None:
        return "—"
    ci = f" [{t['ci95'][0]:+.{digits}f}, {t['ci95'][1]:+.{digits}f}]" if t["ci95"] else ""
    return f"{t['mean']:+.{digits}f}{ci}"


def _type_cell(v: dict, t: str, chance: bool) -> str:
    """A question type's restricted change (and last minus chance), with its records per seed."""
    if t not in v:
        return "—"
    n = f" (n {round(float(np.mean(v[t]['n_records'])))})"
    return _cell(v[t], 2) + (f"; {_cell(v[t]['last_minus_chance'], 2)}" if chance else "") + n


def _markdown(combined: list[dict]) -> str:
    """Four tables: accuracy changes per run, restricted video accuracy per temporal question type, free
    accuracy per type with the static questions' restricted accuracy, and image accuracy per question type."""
    name = [f"{e['sampler']} {e['frames']}" for e in combined]
    lines = ["| run | mean frames | image change | video change (free) | video change (restricted) | "
             "image vs smallest m (uniform) or vs uniform at the same m (controls, hybrid arms) | "
             "mean cos(update, ḡ_img) along the run |",
             "|---|---|---|---|---|---|---|"]
    for n, e in zip(name, combined, strict=True):
        vs = e["image_free_vs_uniform"] if e["sampler"] != "uniform" else e["image_free_vs_smallest"]
        power = ""  # an unresolved difference: how many seeds would resolve one of its size
        if vs is not None and vs["ci95"] is not None and vs["ci95"][0] < 0 < vs["ci95"][1]:
            need = vs["seeds_for_80pct_power"]
            power = f" (80% power at {need} seeds)" if need else " (over 1000 seeds for 80% power)"
        lines.append(f"| {n} | {e['mean_frames']['mean']:.1f} | {_cell(e['image_free'])} | {_cell(e['video_free'])} | "
                     f"{_cell(e['video_restricted'])} | {_cell(vs)}{power} | {_cell(e['mean_cos'])} |")
    types = _temporal_types(combined)
    lines += ["", "| run | " + " | ".join(f"{q}: change; last − chance" for q in types)
              + " | " + " | ".join(f"{q} (m < m_min): change" for q in types) + " |",
              "|---|" + "---|" * (2 * len(types))]
    for n, e in zip(name, combined, strict=True):
        v = e["video_types_restricted"]
        row = [_type_cell(v, f"{q}/answerable", True) for q in types]
        row += [_type_cell(v, f"{q}/unanswerable", False) for q in types]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    # free accuracy per type (which the answer vocabulary alone can move), and whether static stays answerable
    lines += ["", "| run | " + " | ".join(f"{q}: free change" for q in types)
              + " | static: restricted first → last |", "|---|" + "---|" * (len(types) + 1)]
    for n, e in zip(name, combined, strict=True):
        free = [_cell(e["video_types_free"].get(f"{q}/answerable"), 2) for q in types]
        st = e["video_types_restricted"].get("static/answerable")
        static = f"{st['first']:.2f} → {st['last']:.2f}" if st else "—"
        lines.append(f"| {n} | " + " | ".join(free) + f" | {static} |")
    # where the image accuracy goes: each image question type, first → last and the change
    image_types = sorted({q for e in combined for q in e["image_types_free"]})
    lines += ["", "| run | " + " | ".join(f"image {q}: first → last, change" for q in image_types) + " |",
              "|---|" + "---|" * len(image_types)]
    for n, e in zip(name, combined, strict=True):
        cells = [f"{t['first']:.2f} → {t['last']:.2f}, {_cell(t, 2)}" if (t := e["image_types_free"].get(q)) else "—"
                 for q in image_types]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _temporal_types(combined: list[dict]) -> list[str]:
    """The question types other than static, in name order."""
    return sorted({t.split("/")[0] for e in combined for t in e["video_types_restricted"]} - {"static"})


def _type_values(runs: list[dict], q: str) -> str:
    """Each seed's restricted change of type ``q`` on the records the run's budget answers."""
    t = f"{q}/answerable"
    return _seed_values([(r["video_types"][t]["change"], r["video_types"][t].get("ci95"))
                         if t in r["video_types"] else (None, None) for r in runs])


def _seed_values(values: list[tuple[float | None, list[float] | None]]) -> str:
    """One value per seed, in seed order, starred where that seed's interval over records excludes 0."""
    def one(v: float | None, ci: list[float] | None) -> str:
        if v is None:
            return "—"
        return f"{v:+.2f}" + ("*" if ci and (ci[0] > 0 or ci[1] < 0) else "")

    return " / ".join(one(v, ci) for v, ci in values)


def _per_seed_markdown(combined: list[dict], per_seed: list[dict]) -> str:
    """Each seed's own figures side by side (whether the seeds agree, beside the interval over them): the final
    image accuracy against the smallest budget (uniform) or the uniform run at the same m (controls, hybrid arms),
    and each temporal type's restricted change on the records the budget answers."""
    types = _temporal_types(combined)
    seeds = ("seeds " if len(per_seed) > 1 else "seed ") + ", ".join(str(s["seed"]) for s in per_seed)
    lines = [f"| run | image vs smallest m or vs uniform ({seeds}) | "
             + " | ".join(f"{q}: restricted change ({seeds})" for q in types) + " |",
             "|---|---|" + "---|" * len(types)]
    for e in combined:
        key = f"{e['sampler']}:{e['frames']}"
        runs = [s["runs"][key] for s in per_seed]
        vs = "image_free_vs_uniform" if e["sampler"] != "uniform" else "image_free_vs_smallest"
        row = [_seed_values([(r[vs], r.get(f"{vs}_ci95")) for r in runs])
               if any(r[vs] is not None for r in runs) else "—"]
        row += [_type_values(runs, q) for q in types]
        lines.append(f"| {e['sampler']} {e['frames']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _hybrid_markdown(combined: list[dict], per_seed: list[dict]) -> str:
    """The Hybrid-Frame arms beside the uniform run at their scoring budget, each seed's figures side by side
    (wall time, image change, image against that uniform run, each temporal type's restricted change) and the
    interval over seeds of the image difference. Empty when no seed has an arm."""
    arms = [e for e in combined if e["sampler"].startswith("hybrid-")]
    if not arms:
        return ""
    top = {e["frames"] for e in arms}
    rows = [e for e in combined if e["sampler"] == "uniform" and e["frames"] in top] + arms
    types = _temporal_types(combined)
    lines = ["| run | mean frames | wall time (s) | image change (free) | image vs uniform | across seeds | "
             + " | ".join(f"{q}: restricted change" for q in types) + " |", "|---|---|---|---|---|---|" + "---|" * len(types)]
    for e in rows:
        runs = [s["runs"][f"{e['sampler']}:{e['frames']}"] for s in per_seed]
        hybrid = e["sampler"] != "uniform"
        row = [f"{e['mean_frames']['mean']:.1f}", " / ".join(f"{r['seconds']:.0f}" for r in runs),
               _seed_values([(r["image_free"]["change"], r["image_free"]["ci95"]) for r in runs]),
               _seed_values([(r["image_free_vs_uniform"], r.get("image_free_vs_uniform_ci95")) for r in runs])
               if hybrid else "—", _cell(e["image_free_vs_uniform"]) if hybrid else "—"]
        row += [_type_values(runs, q) for q in types]
        lines.append(f"| {e['sampler'].removeprefix('hybrid-')} {e['frames']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plain(combined: list[dict], per_seed: list[dict], grid: list[int], cell) -> None:
    shown = KEYS[:1] + KEYS[2:]
    print(f"{'run':>14} | " + " | ".join(f"{k} change (mean over {len(per_seed)} seeds, 95% CI)" for k in shown))
    for e in combined:
        print(f"{e['sampler'] + ' m=' + str(e['frames']):>14} | " + " | ".join(cell(e[k]) for k in shown))
    print("restricted video change per question type (answerable: m >= m_min), mean over seeds [95% CI]; "
          "last minus chance [95% CI]:")
    for e in combined:
        parts = [f"{t.split('/')[0] + ('' if t.endswith('/answerable') else ' (m<m_min)')}: "
                 f"{v['first']:.2f}→{v['last']:.2f} {cell(v)}, vs chance {v['chance']:.2f}: {cell(v['last_minus_chance'])}"
                 for t, v in e["video_types_restricted"].items()]
        print(f"{e['sampler'] + ' m=' + str(e['frames']):>14} | " + "; ".join(parts))
    for s in per_seed:
        corr = ", ".join(f"m={m}: {c:.2f}" for m, c in s["cos_corr_with_smallest"].items())
        print(f"seed {s['seed']}: cos along the run in [{s['cos_range'][0]:+.3f}, {s['cos_range'][1]:+.3f}]; "
              f"Pearson correlation with m={grid[0]}'s: {corr}")


if __name__ == "__main__":
    main()
