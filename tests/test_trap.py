"""The temporal-trap experiment on the tiny toy: runs per budget, paired summaries, skip and resume, plot."""

import json
import math
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gradprobe.run
from cli.main import app
from gradprobe.experiments.trap import paired_difference
from gradprobe.toybox import ToySpec

runner = CliRunner()


def test_paired_difference_by_hand():
    r = paired_difference("1101", "1000")  # per-record differences 0, 1, 0, 1
    d = [0.0, 1.0, 0.0, 1.0]
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in d) / 3)
    assert r["diff"] == 0.5 and r["n"] == 4
    assert r["stderr"] == pytest.approx(sd / 2)
    assert r["ci95"] == pytest.approx([0.5 - 3.182446305 * sd / 2, 0.5 + 3.182446305 * sd / 2])
    assert not r["excludes_zero"]
    assert paired_difference("0000", "1111")["excludes_zero"]  # all records lost: stderr 0, change -1
    with pytest.raises(Exception, match="same records"):
        paired_difference("101", "10")


def test_type_changes_split_by_type_and_m_min():
    from gradprobe.train.evaluate import type_changes

    # records: two motion (m_min 2), three blink (m_min 4, 4, 16), one without m_min
    meta = {"video_qtypes": ["motion", "motion", "blink", "blink", "blink", "static"],
            "video_m_min": [2, 2, 4, 4, 16, None]}
    first = {**meta, "video_free_items": "000000", "video_restricted_items": "010001"}
    last = {**meta, "video_free_items": "110010", "video_restricted_items": "111011"}
    t = type_changes(first, last, "video", 8)
    assert set(t) == {"blink", "motion", "static"}
    assert set(t["blink"]) == {"answerable", "unanswerable"}
    blink = t["blink"]["answerable"]
    assert blink["n"] == 2 and blink["restricted"]["first"] == 0.0 and blink["restricted"]["last"] == 0.5
    assert blink["restricted"]["change"] == paired_difference("10", "00")
    assert t["blink"]["unanswerable"]["n"] == 1 and t["blink"]["unanswerable"]["free"]["change"] is None
    assert t["motion"]["answerable"]["restricted"]["change"]["diff"] == 0.5  # "11" after "01"
    assert t["static"]["answerable"]["restricted"]["last"] == 1.0
    # at a budget reaching every m_min, nothing is unanswerable
    assert all(set(v) == {"answerable"} for v in type_changes(first, last, "video", 16).values())
    assert type_changes({}, {}, "video", 8) == {}  # rows written before per-type fields existed


def test_trap_runs_each_budget_and_resumes(tiny_toy, tmp_path, monkeypatch):
    monkeypatch.setattr(gradprobe.run, "DEFAULT_TOY", ToySpec(**tiny_toy.spec.__dict__))
    out = tmp_path / "trap"
    args = ["trap", "--frames", "2,4", "--steps", "2", "--probe-every", "1", "--batch-size", "2",
            "--eval-images", "24", "--eval-videos", "4", "--cache-dir", str(tiny_toy.root.parent), "--out", str(out)]
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    s = json.loads((out / "trap_summary.json").read_text())
    assert [b["frames"] for b in s["budgets"]] == [2, 4]
    for b in s["budgets"]:
        assert b["steps"] == 2 and b["alignment"]["probes"] == 2
        for k in ("image_free", "image_restricted", "video_free", "video_restricted"):
            # the paired mean difference is the difference of the two accuracies
            assert b[k]["change"]["diff"] == pytest.approx(b[k]["last"] - b[k]["first"])
        # per question type: the record-weighted mean of the parts is the whole
        parts = [e for q in b["video_types"].values() for e in q.values()]
        assert sum(e["n"] for e in parts) == b["n_video"]
        for how in ("free", "restricted"):
            whole = sum(e["n"] * e[how]["last"] for e in parts) / b["n_video"]
            assert whole == pytest.approx(b[f"video_{how}"]["last"])
    assert "Video accuracy per question type" in r.output
    # the image set and the starting model are shared, so the first image accuracy is the same at every budget
    assert s["budgets"][0]["image_free"]["first"] == s["budgets"][1]["image_free"]["first"]
    vs = s["budgets"][1]["image_vs_smallest"]["image_free"]["diff"]
    assert vs == pytest.approx(s["budgets"][1]["image_free"]["last"] - s["budgets"][0]["image_free"]["last"])
    # complete runs are kept; a run whose summary is missing resumes from its checkpoint without duplicating rows
    (out / "frames-4" / "sft_summary.json").unlink()
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "m=2: complete" in r.output and "resuming from checkpoint-2" in r.output
    steps = [json.loads(x)["step"] for x in (out / "frames-4" / "gradprobe_eval.jsonl").read_text().splitlines()]
    assert steps == [0, 2]  # scored at the start and the end (the default --eval-every)
    def timeless(budgets):  # a resumed run's wall time is the resumed part's
        return [{k: v for k, v in b.items() if k != "seconds"} for b in budgets]

    assert timeless(json.loads((out / "trap_summary.json").read_text())["budgets"]) == timeless(s["budgets"])
    r = runner.invoke(app, ["plot", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "trap.png").read_bytes()[:4] == b"\x89PNG"
    # a finished run of another recipe or from another toy is not kept beside the others: refused before training
    r = runner.invoke(app, [*args[:4], "3", *args[5:]], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "a finished run with steps 2 (this experiment: 3)" in r.output, r.output
    p = out / "frames-2" / "sft_summary.json"
    kept = json.loads(p.read_text())
    p.write_text(json.dumps({**kept, "model": str(Path(kept["model"]).parent.parent / "toy-v1-other" / "model")}))
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "a finished run trained from toy toy-v1-other" in r.output, r.output
    assert not (out / "frames-2" / "checkpoint-3").exists()


def test_trap_controls_run_beside_uniform(tiny_toy, tmp_path, monkeypatch):
    monkeypatch.setattr(gradprobe.run, "DEFAULT_TOY", ToySpec(**tiny_toy.spec.__dict__))
    out = tmp_path / "trap"
    r = runner.invoke(app, ["trap", "--frames", "2,4", "--control-frames", "2", "--samplers", "static,uniform", "--steps", "1",
                            "--probe-every", "1", "--batch-size", "2", "--eval-images", "24", "--eval-videos", "4",
                            "--cache-dir", str(tiny_toy.root.parent), "--out", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert (out / "frames-2" / "sft_summary.json").is_file() and (out / "static-frames-2" / "sft_summary.json").is_file()
    assert json.loads((out / "static-frames-2" / "sft_summary.json").read_text())["options"]["sampler"] == "static"
    s = json.loads((out / "trap_summary.json").read_text())
    # controls only where --control-frames puts them
    assert [(b["sampler"], b["frames"]) for b in s["budgets"]] == [("uniform", 2), ("uniform", 4), ("static", 2)]
    assert not (out / "static-frames-4").exists()
    uni, _, static = s["budgets"]
    assert "image_vs_uniform" not in uni
    vs = static["image_vs_uniform"]["image_free"]["diff"]
    assert vs == pytest.approx(static["image_free"]["last"] - uni["image_free"]["last"])
    # the same model and records before training: the first evaluation agrees on images
    assert static["image_free"]["first"] == uni["image_free"]["first"]


@pytest.mark.parametrize("samplers, message", [("uniform,blurred", "unknown sampler"), ("static,static", "twice"),
                                               (",", "at least one")])
def test_trap_bad_samplers(tmp_path, samplers, message):
    r = runner.invoke(app, ["trap", "--samplers", samplers, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and message in r.output, r.output


def test_trap_bad_budget(tmp_path):
    r = runner.invoke(app, ["trap", "--frames", "3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "even" in r.output
    r = runner.invoke(app, ["trap", "--frames", "2,4", "--samplers", "uniform,static", "--control-frames", "8",
                            "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "control-frames: 8 not among --frames 2,4" in r.output, r.output
    assert not (tmp_path / "y").exists()  # refused before any work


def test_trap_hybrid_arm_beside_the_fixed_budgets(tiny_toy, tmp_path, monkeypatch):
    monkeypatch.setattr(gradprobe.run, "DEFAULT_TOY", ToySpec(**tiny_toy.spec.__dict__))
    out = tmp_path / "trap"
    r = runner.invoke(app, ["trap", "--frames", "2,4", "--hybrid", "sufficiency", "--steps", "1", "--probe-every", "1",
                            "--batch-size", "2", "--eval-images", "24", "--eval-videos", "4",
                            "--cache-dir", str(tiny_toy.root.parent), "--out", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    s = json.loads((out / "trap_summary.json").read_text())
    assert [(b["sampler"], b["frames"]) for b in s["budgets"]] == [("uniform", 2), ("uniform", 4),
                                                                   ("hybrid-sufficiency", 4)]
    manifest = [json.loads(x) for x in (out / "budget-sufficiency" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == len(tiny_toy.samples("train", "videos"))
    hyb = s["budgets"][2]
    assert hyb["mean_frames"] == pytest.approx(sum(x["frames"] for x in manifest) / len(manifest))
    assert s["budgets"][0]["mean_frames"] == 2 and hyb["seconds"] > 0
    opts = json.loads((out / "hybrid-sufficiency-frames-4" / "sft_summary.json").read_text())["options"]
    assert opts["manifest"].endswith("manifest.jsonl") and opts["frames"] == 4  # scored at the largest budget
    vs = hyb["image_vs_uniform"]["image_free"]["diff"]
    assert vs == pytest.approx(hyb["image_free"]["last"] - s["budgets"][1]["image_free"]["last"])
    # benchmarks/trap_seeds.py compares the hybrid arm with the uniform run at its budget, as the summary does
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "trap_seeds.py"
    p = subprocess.run([sys.executable, str(script), str(out), "--markdown"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    row = next(x for x in p.stdout.splitlines() if x.startswith("| hybrid-sufficiency 4 |"))
    assert row.split(" | ")[5].startswith(f"{vs:+.3f}"), row
    r = runner.invoke(app, ["plot", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["trap", "--frames", "2", "--hybrid", "oracle", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "method: unknown 'oracle'" in r.output and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_trap_seeds_probes_and_notebook(tiny_toy, tmp_path, monkeypatch):
    """benchmarks/trap_seeds.py: per-run changes across seeds are the mean of the seeds' own, with frames per clip;
    benchmarks/trap_probes.py: align and decompose on the runs' checkpoints; the trap notebook reads all three, the
    decomposition notebook one seed's decompositions."""
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setattr(gradprobe.run, "DEFAULT_TOY", ToySpec(**tiny_toy.spec.__dict__))
    dirs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        r = runner.invoke(app, ["trap", "--frames", "2,4", "--samplers", "uniform,static", "--control-frames", "4",
                                "--steps", "2", "--probe-every", "1", "--batch-size", "2", "--eval-images", "24",
                                "--eval-videos", "4", "--seed", str(seed), "--cache-dir", str(tiny_toy.root.parent),
                                "--out", str(out)])
        assert r.exit_code == 0, r.output
        dirs.append(out)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "trap_seeds.py"
    res = subprocess.run([sys.executable, str(script), *map(str, dirs), "--out", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    c = json.loads((tmp_path / "c.json").read_text())
    assert [(e["sampler"], e["frames"]) for e in c["across_seeds"]] == [("uniform", 2), ("uniform", 4), ("static", 4)]
    for e in c["across_seeds"]:
        key = f"{e['sampler']}:{e['frames']}"
        per = [s["runs"][key]["image_free"]["change"] for s in c["seeds"]]
        assert e["image_free"]["mean"] == pytest.approx(sum(per) / 2) and e["image_free"]["n_seeds"] == 2
        assert e["mean_frames"]["mean"] == e["frames"]
    # chance: a uniform guess among the record's choices (motion questions have two: left or right)
    motion = [v for e in c["across_seeds"] for t, v in e["video_types_restricted"].items() if t.startswith("motion/")]
    assert motion and all(v["chance"] == 0.5 for v in motion)
    v = motion[0]
    assert v["last_minus_chance"]["mean"] == pytest.approx(v["last"] - 0.5)
    # free accuracy per type: across seeds, the mean of the seeds' own changes
    for e in c["across_seeds"]:
        key = f"{e['sampler']}:{e['frames']}"
        for t, v in e["video_types_free"].items():
            per = [s["runs"][key]["video_types"][t]["free_change"] for s in c["seeds"]]
            assert v["mean"] == pytest.approx(sum(per) / 2)
    # image accuracy per question type: each seed's is the trap summary's, and their mean across seeds
    summaries = [json.loads((d / "trap_summary.json").read_text()) for d in dirs]
    for e in c["across_seeds"]:
        key = f"{e['sampler']}:{e['frames']}"
        assert e["image_types_free"]
        for q, v in e["image_types_free"].items():
            per = []
            for summary in summaries:
                b = next(b for b in summary["budgets"]
                         if (b.get("sampler", "uniform"), b["frames"]) == (e["sampler"], e["frames"]))
                free = b["image_types"][q]["answerable"]["free"]
                per.append(free["last"] - free["first"])
            assert [s["runs"][key]["image_types"][q]["change"] for s in c["seeds"]] == pytest.approx(per)
            assert v["mean"] == pytest.approx(sum(per) / 2)
    # benchmarks/trap_probes.py on the same runs: align on every checkpoint, decompose on the start and the
    # uniform run that has a control; across seeds, each statistic is the mean of the seeds'
    script = script.parent / "trap_probes.py"
    batches = "--image-batches 4 --batch-size 4 --video-batches 4 --video-batch-size 2"
    res = subprocess.run([sys.executable, str(script), *map(str, dirs), "--work", str(tmp_path / "probes"),
                          "--batches", batches, "--out", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    p = json.loads((tmp_path / "p.json").read_text())
    seeds = list(p["seeds"].values())
    assert list(seeds[0]["align"]) == ["start", "uniform:2", "uniform:4", "static:4"]
    assert sorted(seeds[0]["decompose"]) == ["start/smallest", "start/static", "uniform:4/smallest",
                                             "uniform:4/static"]
    for s, d in zip(seeds, dirs, strict=True):  # each seed's A(m) is what align wrote for that checkpoint
        rows = json.loads((tmp_path / "probes" / d.name / "align" / "checkpoints.json").read_text())["checkpoints"]
        final = json.loads((tmp_path / "probes" / d.name / "align" / rows[2]["label"] / "summary.json").read_text())
        assert rows[2]["model"] == str(d / "frames-4" / "final")
        assert {str(b["frames"]): b["mean"] for b in final["budgets"]} == pytest.approx(
            {m: v["A"] for m, v in s["align"]["uniform:4"].items()})
    a = p["across_seeds"]["align"]["static:4"]["4"]["A"]
    assert a["mean"] == pytest.approx(sum(s["align"]["static:4"]["4"]["A"] for s in seeds) / 2) and a["n_seeds"] == 2
    rho = p["across_seeds"]["decompose"]["uniform:4/static"]["rho_tmp"]
    per_seed = [s["decompose"]["uniform:4/static"]["rho_tmp"] for s in seeds]  # None: no temporal direction
    defined = [v for v in per_seed if v is not None]
    assert rho["n_undefined"] == len(per_seed) - len(defined) and rho["n_seeds"] == len(defined)
    assert rho["mean"] == (pytest.approx(sum(defined) / len(defined)) if defined else None)
    # the tables of RESULTS.md, from the same outputs (nothing is recomputed)
    for name, extra, rows in (("trap_seeds.py", [], ["| uniform 2 | 2.0 |", "| static 4 | 4.0 |",
                                                       "static: restricted first → last |", ": first → last, change |"]),
                              ("trap_probes.py", ["--work", str(tmp_path / "probes"), "--batches", batches],
                               ["| start |", "| uniform:4/static |"])):
        res = subprocess.run([sys.executable, str(script.parent / name), *map(str, dirs), *extra, "--markdown"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and all(r in res.stdout for r in rows), res.stdout + res.stderr
        assert "gradprobe " not in res.stderr  # no command ran again
        if name == "trap_seeds.py":  # the last column: the runs' mean cosine along the run, across seeds
            cos = next(e for e in c["across_seeds"] if e["sampler"] == "static")["mean_cos"]
            row = next(x for x in res.stdout.splitlines() if x.startswith("| static 4 |"))
            assert row.endswith(f"| {cos['mean']:+.3f} [{cos['ci95'][0]:+.3f}, {cos['ci95'][1]:+.3f}] |"), row
            # the per-seed table: each seed's own figure, starred where its interval over records excludes 0
            assert "| run | image vs smallest m or vs uniform (seeds 0, 1) |" in res.stdout
            row = [x for x in res.stdout.splitlines() if x.startswith("| static 4 |")][-1]
            want = []
            for s in c["seeds"]:
                r = s["runs"]["static:4"]
                lo, hi = r["image_free_vs_uniform_ci95"]
                want.append(f"{r['image_free_vs_uniform']:+.2f}" + ("*" if lo > 0 or hi < 0 else ""))
            assert row.startswith(f"| static 4 | {' / '.join(want)} |"), row
    # benchmarks/compare_recipes.py: a second recipe's runs beside the first's, run for run; only the runs both hold
    other = json.loads((tmp_path / "c.json").read_text())
    other["seeds"] = other["seeds"][1:]
    moved = other["seeds"][0]["runs"]["uniform:4"]["video_types"]["motion/answerable"]
    moved.update(last=0.25, change=0.25 - moved["first"], ci95=[-0.9, -0.1])
    (tmp_path / "other.json").write_text(json.dumps(other))
    res = subprocess.run([sys.executable, str(script.parent / "compare_recipes.py"), str(tmp_path / "c.json"),
                          str(tmp_path / "other.json"), "--labels", "a,b"], capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and lines[0].startswith("| run | seed | blink: a | blink: b |"), res.stdout + res.stderr
    seed = other["seeds"][0]["seed"]
    assert len(lines) == 2 + len(other["seeds"][0]["runs"])  # seed 0's runs are not in both
    row = next(x for x in lines if x.startswith(f"| uniform 4 | {seed} |")).split(" | ")
    was = c["seeds"][1]["runs"]["uniform:4"]["video_types"]["motion/answerable"]
    assert row[4].startswith(f"{was['last']:.2f} ({was['change']:+.2f}") and row[5] == f"0.25 ({0.25 - was['first']:+.2f}*)"
    # benchmarks/colour_answers.py: each checkpoint's answers to the image colour questions, scored as the trap
    # scored them (its restricted colour accuracy at the end), and whether each names a colour drawn in the image
    res = subprocess.run([sys.executable, str(script.parent / "colour_answers.py"), *map(str, dirs),
                          "--out", str(tmp_path / "colour.json"), "--markdown"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "| start |" in res.stdout, res.stdout + res.stderr
    colour = json.loads((tmp_path / "colour.json").read_text())["seeds"]
    for s, summary in zip(colour, summaries, strict=True):
        assert sorted(s["runs"]) == sorted(["start", "uniform 2", "uniform 4", "static 4"])
        for b in summary["budgets"]:
            got = s["runs"][f"{b.get('sampler', 'uniform')} {b['frames']}"]
            want = b["image_types"]["colour"]["answerable"]
            assert got["n"] == want["n"] > 0 and got["correct"] / got["n"] == pytest.approx(want["restricted"]["last"])
            assert got["correct"] <= got["in_image"] <= got["n"] and sum(got["answers"].values()) == got["n"]
    # benchmarks/checkpoint_curves.py: the uniform runs' checkpoints scored again per video type on the clips the
    # budget answers; step 0 is the run's first evaluation and final/ must answer as its last evaluation did
    res = subprocess.run([sys.executable, str(script.parent / "checkpoint_curves.py"), *map(str, dirs), "--frames",
                          "2,4", "--out", str(tmp_path / "curves.json"), "--markdown"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "| 4 | " in res.stdout, res.stdout + res.stderr
    curves = json.loads((tmp_path / "curves.json").read_text())["seeds"]
    for s, summary, d in zip(curves, summaries, dirs, strict=True):
        for b in summary["budgets"]:
            if b.get("sampler", "uniform") != "uniform":
                continue
            run = s["runs"][str(b["frames"])]
            saved = sorted(int(c.name.split("-")[1]) for c in (d / f"frames-{b['frames']}").glob("checkpoint-*"))
            assert run["steps"] == [0, *[x for x in saved if x < 2], 2] and len(run["steps"]) > 2
            want = {t: v["answerable"] for t, v in b["video_types"].items() if "answerable" in v}
            assert sorted(run["types"]) == sorted(want)
            for t, v in run["types"].items():
                r = want[t]["restricted"]
                assert v["n"] == want[t]["n"] and [v["restricted"][0], v["restricted"][-1]] == pytest.approx([r["first"], r["last"]])
    res = subprocess.run([sys.executable, str(script.parent / "checkpoint_curves.py"), str(dirs[0]), "--frames",
                          "8", "--out", str(tmp_path / "none.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "no uniform run at m = 8" in res.stderr, res.stderr
    # --read: the same tables from copies of the runs without their checkpoints (as benchmarks/results keeps them)
    import shutil

    copies = tmp_path / "kept"
    for d in dirs:
        shutil.copytree(d, copies / d.name, ignore=shutil.ignore_patterns("final", "checkpoint-*"))
    assert not list(copies.rglob("final"))
    res = subprocess.run([sys.executable, str(script), *[str(copies / d.name) for d in dirs], "--work",
                          str(tmp_path / "probes"), "--read", "--out", str(tmp_path / "p_read.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "gradprobe " not in res.stderr, res.stderr
    again = json.loads((tmp_path / "p_read.json").read_text())
    assert list(again["seeds"].values()) == seeds and again["across_seeds"] == p["across_seeds"]
    # a copy whose runs are not those align measured is refused, not mislabelled
    shutil.rmtree(copies / dirs[0].name / "static-frames-4")
    s = json.loads((copies / dirs[0].name / "trap_summary.json").read_text())
    s["budgets"] = [b for b in s["budgets"] if b.get("sampler", "uniform") != "static"]
    (copies / dirs[0].name / "trap_summary.json").write_text(json.dumps(s))
    res = subprocess.run([sys.executable, str(script), str(copies / dirs[0].name), "--work", str(tmp_path / "probes"),
                          "--read"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "holds checkpoints of" in res.stderr, res.stderr
    # the notebook on the same runs and both scripts' outputs
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("GRADPROBE_TRAP_DIR", str(dirs[0]))
    monkeypatch.setenv("GRADPROBE_TRAP_SEEDS", str(tmp_path / "c.json"))
    monkeypatch.setenv("GRADPROBE_TRAP_PROBES", str(tmp_path / "p.json"))
    nb = nbformat.read(script.parents[1] / "notebooks" / "temporal_trap_toy.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
    text = "".join(o.get("text", "") for o in outputs) + "".join(o.get("data", {}).get("text/plain", "")
                                                                 for o in outputs)
    for needle in ("uniform m=2: image", "static m=4: image", "2 seeds: [0, 1]", "last − chance",
                   "across seeds, uniform m=4: temporal types learned", "uniform:4/static: rho_sh"):
        assert needle in text, needle
    monkeypatch.setenv("GRADPROBE_DECOMPOSE_DIR", str(tmp_path / "probes" / dirs[0].name))
    nb = nbformat.read(script.parents[1] / "notebooks" / "decomposition_toy.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
    text = "".join(o.get("text", "") for o in outputs)
    for needle in ("--- smallest-start", "--- static-uniform-4", "rho_sh = ", "m* model:", "m* empirical:",
                   "--- smallest-start vs smallest-uniform-4", "--- static-start vs static-uniform-4"):
        assert needle in text, needle


def _bench(name: str):
    """A script of benchmarks/ loaded as a module (trap_probes.py puts its own folder on sys.path itself)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seeds_for_power_match_the_one_sample_t_tables():
    """benchmarks/trap_seeds.py's seed count for 80% power (two-sided 5%): standard one-sample t values."""
    mod = _bench("trap_seeds")
    assert [mod._seeds_needed(d, 1.0) for d in (2.0, 1.0, 0.5)] == [5, 10, 34]  # Cohen's d = 2, 1, 0.5
    assert mod._seeds_needed(-1.0, 1.0) == 10 and mod._seeds_needed(0.0, 1.0) is None
    assert mod._seeds_needed(0.01, 1.0) is None  # more than 1000 seeds
    t = mod._t_interval([0.1, 0.3, 0.2])
    assert t["seeds_for_80pct_power"] == mod._seeds_needed(0.2, 0.1)


def test_probes_across_seeds_skip_undefined_values():
    """benchmarks/trap_probes.py: ρ_tmp is undefined for a seed whose decomposition resolves no temporal
    direction; the interval is over the seeds that have it, and the others are counted, not averaged in as NaN."""
    mod = _bench("trap_probes")
    t = mod._over_defined([1.0, None, 3.0])
    assert t["mean"] == 2.0 and t["n_seeds"] == 2 and t["n_undefined"] == 1 and t["ci95"] is not None
    assert mod._cell(t).endswith("(2 of 3 seeds)")
    none = mod._over_defined([None, None])
    assert none["mean"] is None and none["n_undefined"] == 2 and mod._cell(none) == "none resolved (2 seeds)"
    assert mod._over_defined([0.5, 1.5])["n_undefined"] == 0 and "seeds)" not in mod._cell(mod._over_defined([0.5, 1.5]))


def test_probes_across_seeds_mark_the_start_measured_alike_in_every_seed():
    """benchmarks/trap_probes.py: every seed probes the same starting model on the same batches, so its statistics
    are equal across seeds; they are shown with their interval over probe batches and marked, not with a
    zero-width 'interval over seeds'. A trained checkpoint's differ by seed and get the interval over seeds."""
    mod = _bench("trap_probes")

    def seed(a_trained: float, rho: float) -> dict:
        align = {"start": {8: {"A": -2.0, "ci95": [-3.0, -1.0], "cos": -0.1, "frac_negative": 0.7}},
                 "uniform:8": {8: {"A": a_trained, "ci95": [a_trained - 1, a_trained + 1], "cos": 0.0,
                                   "frac_negative": 0.5}}}
        dec = {f"{k}/smallest": {"rho_sh": r, "rho_sh_ci95": [r - 1, r + 1], "rho_tmp": 0.5, "rho_tmp_ci95": [0.1, 0.9],
                                 "budgets": {8: {"alpha": 1.0, "A": -2.0}}, "checks": {"assumption_3": "held"},
                                 "m_star": {"model": 8, "empirical": 8}} for k, r in (("start", 1.5), ("uniform:8", rho))}
        return {"align": align, "decompose": dec}

    across = mod._across([seed(0.5, 2.0), seed(1.5, 3.0)])
    start, trained = across["align"]["start"][8]["A"], across["align"]["uniform:8"][8]["A"]
    assert start["same_in_every_seed"] and start["ci95_within"] == [-3.0, -1.0]
    assert mod._cell(start) == "-2.00 [-3.00, -1.00]†"
    assert "same_in_every_seed" not in trained and trained["mean"] == 1.0 and trained["n_seeds"] == 2
    assert mod._cell(trained).startswith("+1.00 [") and not mod._cell(trained).endswith("†")
    rho = across["decompose"]["start/smallest"]
    assert rho["rho_sh"]["same_in_every_seed"] and rho["rho_sh"]["ci95_within"] == [0.5, 2.5]
    assert "same_in_every_seed" not in across["decompose"]["uniform:8/smallest"]["rho_sh"]
    md = mod._markdown(across)
    assert "| start | -2.00 [-3.00, -1.00]† |" in md and md.endswith(mod.SAME)
    assert "same_in_every_seed" not in mod._across([seed(0.5, 2.0)])["align"]["start"][8]["A"]  # one seed: nothing to mark


def test_seeds_table_of_the_hybrid_arms_shows_each_seed_beside_the_uniform_run():
    """benchmarks/trap_seeds.py --markdown: the Hybrid-Frame arms beside uniform at their scoring budget, each
    seed's own figures (starred where its interval over records excludes 0) and the interval over seeds."""
    mod = _bench("trap_seeds")

    def run(seconds: float, change: float, vs: float | None, motion: float) -> dict:
        return {"seconds": seconds, "image_free": {"change": change, "ci95": [change - 0.05, change + 0.05]},
                "image_free_vs_uniform": vs, "image_free_vs_uniform_ci95": None if vs is None else [vs - 0.1, vs + 0.1],
                "video_types": {"motion/answerable": {"change": motion, "ci95": [motion - 0.1, motion + 0.1]}}}

    per_seed = [{"seed": 0, "runs": {"uniform:64": run(900, -0.3, None, 0.5), "hybrid-gradient:64": run(800, -0.35, -0.05, 0.3)}},
                {"seed": 1, "runs": {"uniform:64": run(1500, -0.3, None, 0.6), "hybrid-gradient:64": run(810, -0.45, -0.15, 0.5)}}]
    types = {"motion/answerable": {}}
    combined = [{"frames": 64, "sampler": "uniform", "mean_frames": {"mean": 64.0}, "image_free_vs_uniform": None,
                 "video_types_restricted": types},
                {"frames": 64, "sampler": "hybrid-gradient", "mean_frames": {"mean": 29.8},
                 "image_free_vs_uniform": {"mean": -0.1, "ci95": [-0.7, 0.5]}, "video_types_restricted": types}]
    md = mod._hybrid_markdown(combined, per_seed).splitlines()
    assert md[2] == "| uniform 64 | 64.0 | 900 / 1500 | -0.30* / -0.30* | — | — | +0.50* / +0.60* |"
    assert md[3] == "| gradient 64 | 29.8 | 800 / 810 | -0.35* / -0.45* | -0.05 / -0.15* | -0.100 [-0.700, +0.500] | +0.30* / +0.50* |"
    assert mod._hybrid_markdown(combined[:1], per_seed) == ""  # no arm, no table


def test_two_runs_writing_one_summary_at_once_both_succeed(tmp_path, monkeypatch):
    """Two `gradprobe trap` calls on one --out (benchmarks/trap_seed.sh runs two queues) can write the
    experiment's summary at the same moment: each must replace the file whole, neither lose its temp file."""
    import gradprobe.outputs as outputs

    path = tmp_path / "trap_summary.json"
    real_replace = os.replace
    calls = []

    def interleaved(src, dst):  # the other writer writes and renames between this one's write and rename
        calls.append(src)
        if len(calls) == 1:
            outputs.write_json(path, {"writer": "second"})
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", interleaved)
    outputs.write_json(path, {"writer": "first"})
    assert json.loads(path.read_text()) == {"writer": "first"}
    assert len(set(calls)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["trap_summary.json"]  # no temp file left behind


def test_count_channel_compares_the_two_runs_per_image_type(tmp_path):
    """benchmarks/count_channel.py on planted evaluations: per-type first → last, and the runs' last evaluations
    against each other, each a paired difference over the same images."""
    mod = _bench("count_channel")
    types = ["count"] * 4 + ["colour"] * 2

    def row(step: int, items: str) -> dict:  # an evaluation row as gradprobe sft writes it (free = restricted here)
        return {"step": step, "image_qtypes": types, "image_m_min": [None] * 6, "image_free_items": items,
                "image_restricted_items": items, "image_restricted": items.count("1") / 6}

    first = "111111"
    last = {"all-2": "000011", "no-blink-2": "110010"}  # count: 0/4 and 2/4 right at the end; colour 2/2 and 1/2
    for arm, items in last.items():
        (tmp_path / arm).mkdir()
        rows = [row(0, first), row(6000, items)]
        (tmp_path / arm / "gradprobe_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = mod.compare(tmp_path)
    count, colour, every = r["types"]["count"], r["types"]["colour"], r["types"]["all"]
    assert (count["n"], colour["n"], every["n"]) == (4, 2, 6)
    assert count["all-2"]["first"] == 1.0 and count["all-2"]["last"] == 0.0
    assert count["all-2"]["change"]["diff"] == -1.0 and count["no-blink-2"]["change"]["diff"] == -0.5
    assert count["without_vs_all"]["diff"] == 0.5 and colour["without_vs_all"]["diff"] == -0.5
    assert every["without_vs_all"]["diff"] == pytest.approx(1 / 6) and every["no-blink-2"]["last"] == 0.5
    assert r["without"] == "blink" and r["arms"] == ["all-2", "no-blink-2"]
    table = mod.markdown(r)
    assert "| count | 4 | 1.00 → 0.00, -1.00 [-1.00, -1.00] | 1.00 → 0.50, -0.50 [-1.42, +0.42] |" in table
    assert "| without blink: first → last, change | last: without blink − all |" in table
    unfinished = tmp_path / "all-2" / "gradprobe_eval.jsonl"
    other = tmp_path / "no-blink-2" / "gradprobe_eval.jsonl"
    other.write_text("".join(json.dumps({**row(s, first), "image_qtypes": types[::-1]}) + "\n" for s in (0, 6000)))
    with pytest.raises(SystemExit, match="same images"):
        mod.compare(tmp_path)
    unfinished.write_text(json.dumps(row(0, first)) + "\n")
    with pytest.raises(SystemExit, match="all-2/gradprobe_eval.jsonl: fewer than two evaluations"):
        mod.compare(tmp_path)
    (tmp_path / "no-order-16").mkdir()  # a second run without some type: which one to compare is not clear
    with pytest.raises(SystemExit, match="expected one all-<m> and one no-<type>-<m> run"):
        mod.compare(tmp_path)
