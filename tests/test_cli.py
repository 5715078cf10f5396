"""The command line end to end on a tiny toy, and its one-line errors for bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import gradprobe.run
from cli.main import app
from gradprobe.data.shapesworld import VIDEO_SIZE
from gradprobe.toybox import ToySpec

runner = CliRunner()


def _paths(toy):
    return [
        "--model", str(toy.model_dir),
        "--image-data", str(toy.data("probe", "images")),
        "--video-data", str(toy.data("probe", "videos")),
    ]


SMALL = ["--image-batches", "4", "--batch-size", "4", "--video-batches", "3", "--video-batch-size", "2",
         "--n-boot", "200"]


def test_align_end_to_end(tiny_toy, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["align", "--frames", "4,8", *_paths(tiny_toy), *SMALL, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "m*" in r.output and "95% CI" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == "gradprobe.align/1"
    assert [b["frames"] for b in summary["budgets"]] == [4, 8]
    for b in summary["budgets"]:
        for key in ("n", "mean", "stderr", "ci95_t", "ci95_boot", "frac_negative", "mean_cos", "norm_img", "norm_vid"):
            assert key in b
        assert b["n"] == 3
        # batch of 2 clips; m/2 temporal patches of (32 px / 8 px patches / 2 × 2 merge)² = 4 tokens each
        assert b["batch_info"]["video_visual_tokens"] == 2 * b["frames"] // 2 * (VIDEO_SIZE // 16) ** 2
    assert set(summary["m_star"]) >= {"empirical", "bootstrap", "zero_crossing"}
    rows = pd.read_csv(out / "alignment.csv")
    assert len(rows) == 2 * 3 and set(rows["frames"]) == {4, 8}
    mods = pd.read_csv(out / "modules.csv")
    assert "model.language_model.layers.0" in set(mods["module"])
    assert set(mods["role"].dropna()) == {"vision", "projector", "language", "head"}
    # module subtotals add up to the overall mean
    for m, grp in mods.groupby("frames"):
        total = next(b["mean"] for b in summary["budgets"] if b["frames"] == m)
        assert grp["mean"].sum() == pytest.approx(total, rel=1e-6)

    r = runner.invoke(app, ["plot", str(out)])
    assert r.exit_code == 0, r.output
    for png in ("alignment_curve.png", "modules_heatmap.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_align_json_to_stdout(tiny_toy, tmp_path):
    r = runner.invoke(app, ["align", "--frames", "2", *_paths(tiny_toy), *SMALL, "--json", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # stdout holds the summary and nothing else
    assert summary == json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.slow
def test_json_on_a_fresh_cache_is_only_json(tmp_path):
    """The first run builds the toy (a tiny one here) through the console script's own entry point: stdout is
    exactly summary.json; stderr has gradprobe's lines, no library progress bars, and warnings one line each."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    code = (f"import sys; sys.path.insert(0, {tests!r}); from conftest import TINY_TOY; import gradprobe.run as r; "
            "from gradprobe.toybox import ToySpec; r.DEFAULT_TOY = ToySpec(**{**TINY_TOY, 'steps': 2}); "
            "from cli.main import main; "
            f"sys.argv = ['gradprobe', 'align', '--frames', '2,4', *{SMALL!r}, '--json']; main()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                         env={**os.environ, "GRADPROBE_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["meta"]["source"] == "toy" and (tmp_path / "gradprobe-align" / "summary.json").is_file()
    assert "it/s]" not in res.stderr and "Loading weights" not in res.stderr, res.stderr[-3000:]
    assert "{'loss'" not in res.stderr  # the Trainer's loss dicts give way to the progress bar
    for line in res.stderr.splitlines():  # Python's two-line warning format never appears
        assert not re.search(r"\w+Warning: ", line) or line.startswith("warning:"), line


def test_roles_select_parameters(tiny_toy, tmp_path):
    r = runner.invoke(app, ["align", "--frames", "4", *_paths(tiny_toy), *SMALL, "--roles", "projector",
                            "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    mods = pd.read_csv(tmp_path / "modules.csv")
    assert list(mods["module"]) == ["model.visual.merger"]


def test_default_toy_path(tiny_toy, tmp_path, monkeypatch):
    """No --model/--data: the cached toy default is used (here the tiny one)."""
    monkeypatch.setattr(gradprobe.run, "DEFAULT_TOY", ToySpec(**tiny_toy.spec.__dict__))
    r = runner.invoke(app, ["align", "--frames", "2,4", *SMALL, "--cache-dir", str(tiny_toy.root.parent),
                            "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"]["source"] == "toy"


def test_toy_command_prints_accuracy_and_exports(tiny_toy, tmp_path, monkeypatch):
    """`gradprobe toy` finds the cached toy (the tiny one here: the command's other sizes are the tiny spec's)
    and prints its accuracy; `--export llamafactory DIR` writes the stack's layout."""
    import gradprobe.toybox

    spec = tiny_toy.spec
    monkeypatch.setattr(gradprobe.toybox, "ToySpec", lambda **kw: ToySpec(**{**spec.__dict__, **kw}))
    out = tmp_path / "lf"
    r = runner.invoke(app, ["toy", "--cache-dir", str(tiny_toy.root.parent), "--steps", str(spec.steps),
                            "--train-images", str(spec.n_train_images), "--export", "llamafactory", str(out)],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "held-out image accuracy" in r.stdout and f"llamafactory data:  {out}" in r.stdout
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {f"shapesworld_{s}_{k}" for s in ("train", "eval", "probe") for k in ("images", "videos")}
    r = runner.invoke(app, ["toy", "--export", "axolotl", str(out), "--cache-dir", str(tmp_path / "none")],
                      env={"COLUMNS": "200"})
    assert_one_line_error(r, "--export: unknown format 'axolotl'")
    assert not (tmp_path / "none").exists()  # refused before building anything


def assert_one_line_error(r, needle):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error:")]
    assert len(err) == 1, r.output
    assert needle in err[0], err[0]


@pytest.mark.parametrize(
    "args, needle",
    [(["--out", "{file}"], "--out: {file} exists and is not a directory"),
     (["--out", "{file}/sub"], "--out: {file}/sub cannot be written"),
     (["--n-boot", "-5"], "--n-boot: expected an integer >= 0, got -5"),
     (["--image-groups", "3"], "--image-groups: 8 image batches cannot be split into 3 equal groups"),
     (["--include", "("], "--include: invalid regular expression '('"),
     (["--roles", "foo"], "--roles: unknown role 'foo'"),
     (["--reference-device", "foo"], "--reference-device: expected 'model' or 'cpu'"),
     (["--reference-dtype", "int8"], "--reference-dtype: unknown dtype 'int8'"),
     (["--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
     (["--sketch", "lots"], "--sketch: expected auto, exact or a number of buckets"),
     (["--frames", "7"], "toy takes even m ≥ 2")],
)
@pytest.mark.parametrize("command", ["align", "decompose", "curvature"])
def test_bad_options_are_refused_before_any_work(command, args, needle, tmp_path):
    """On the toy default with an empty cache: one line naming the option typed, exit 2, and nothing built."""
    import typer

    if args[0] not in {o for p in typer.main.get_command(app).commands[command].params for o in p.opts}:
        pytest.skip(f"{command} has no {args[0]}")
    f = tmp_path / "a-file"
    f.write_text("")
    cache = tmp_path / "cache"
    args = [a.replace("{file}", str(f)) for a in args]
    extra = ["--image-batches", "8"] if command != "align" and args[0] == "--image-groups" else []
    r = runner.invoke(app, [command, *args, *extra, "--cache-dir", str(cache)], env={"COLUMNS": "300"})
    assert_one_line_error(r, needle.replace("{file}", str(f)))
    assert not cache.exists()  # the toy was not built


@pytest.mark.parametrize(
    "frames, needle",
    [("8,x", "'x' is not a positive integer"), ("0", "0 is not a positive integer"), ("-4", "-4 is not"),
     ("", "empty frame grid"), ("8,8", "given twice"), ("7", "takes even m")],
)
def test_bad_frames(tiny_toy, frames, needle):
    r = runner.invoke(app, ["align", "--frames", frames, *_paths(tiny_toy)], env={"COLUMNS": "300"})
    assert_one_line_error(r, needle)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "slot, make, needle",
    [
        (3, lambda d: d / "nope.jsonl", "data file not found"),
        (5, lambda d: _write(d, "empty.jsonl", "\n"), "data file is empty"),
        (3, lambda d: _write(d, "bad.jsonl", json.dumps(
            {"id": 1, "image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
            + '\n{not json\n'), "bad.jsonl:2: not valid JSON"),
        (1, lambda d: d / "no-model", "model path not found"),
        (1, lambda d: _write(d, "config.json", '{"architectures": ["GPT2LMHeadModel"]}').parent,
         "not supported; supported:"),
    ],
    ids=["missing-data", "empty-data", "bad-json-line", "unknown-model-path", "unsupported-architecture"],
)
def test_bad_paths(tiny_toy, tmp_path, slot, make, needle):
    args = _paths(tiny_toy)
    args[slot] = str(make(tmp_path))
    assert_one_line_error(runner.invoke(app, ["align", *args], env={"COLUMNS": "300"}), needle)


def test_partial_paths(tiny_toy):
    assert_one_line_error(runner.invoke(app, ["align", "--model", str(tiny_toy.model_dir)], env={"COLUMNS": "300"}),
                    "give all of --model")


def test_too_few_records(tiny_toy):
    r = runner.invoke(app, ["align", *_paths(tiny_toy), *SMALL, "--video-batches", "100"], env={"COLUMNS": "300"})
    assert_one_line_error(r, "12 usable video records, need 200")


def test_plot_of_missing_dir(tmp_path):
    assert_one_line_error(runner.invoke(app, ["plot", str(tmp_path / "nothing")], env={"COLUMNS": "300"}),
                    "no such output directory")



def test_models_lists_families_and_unknown_architecture_names_them(tmp_path):
    from gradprobe.models.registry import adapter_for, supported_architectures

    r = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for arch in supported_architectures():
        assert arch in r.output
    d = tmp_path / "gpt"
    d.mkdir()
    _write(d, "config.json", '{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(gradprobe.errors.ModelError, match="'GPT2LMHeadModel' is not supported; supported: Qwen2_5_VL"):
        adapter_for(d)


CURV = ["--image-batches", "2", "--batch-size", "4", "--video-batches", "2", "--video-batch-size", "2",
        "--max-iter", "15"]


@pytest.mark.slow
def test_curvature_end_to_end(tiny_toy, tmp_path, monkeypatch):
    """`gradprobe curvature` on the toy default: β, q, η0 and predicted vs actual ΔL per budget."""
    monkeypatch.setattr(gradprobe.run, "DEFAULT_TOY", ToySpec(**tiny_toy.spec.__dict__))
    out = tmp_path / "curv"
    r = runner.invoke(app, ["curvature", "--frames", "2,4", "--lr", "1e-4,1e-3", *CURV, "--trace-samples", "3",
                            "--cache-dir", str(tiny_toy.root.parent), "--out", str(out)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for needle in ("β_img", "η0 (Eq. 11)", "Eq. 8", "Eq. 14 bound", "tr H_img"):
        assert needle in r.output, needle
    s = json.loads((out / "summary.json").read_text())
    assert s["schema"] == "gradprobe.curvature/1" and s["complete"] and s["meta"]["source"] == "toy"
    assert s["settings"]["backend"] == "double_backward"  # auto's first choice works on the toy
    assert s["image"]["beta"]["beta"] > 0 and s["image"]["beta"]["top"] >= s["image"]["beta"]["bottom"]
    assert [b["frames"] for b in s["budgets"]] == [2, 4]
    for b in s["budgets"]:
        assert b["beta_vid"]["beta"] > 0 and b["q"] is not None and len(b["steps"]) == 2
        assert (b["eta0"] is None) == (b["A"] >= 0)
    steps = pd.read_csv(out / "lookahead.csv")
    assert len(steps) == 4 and steps["d_img"].notna().all()
    assert (out / "curvature_modules.csv").is_file()
    r = runner.invoke(app, ["plot", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "lookahead.png").read_bytes()[:4] == b"\x89PNG" and (out / "spectra.png").is_file()

    r = runner.invoke(app, ["curvature", "--frames", "2", "--lr", "1e-4", *CURV, "--no-beta-vid",
                            "--backend", "finite_difference", "--method", "power", "--json",
                            "--cache-dir", str(tiny_toy.root.parent), "--out", str(tmp_path / "c2")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["settings"]["backend"] == "finite_difference" and doc["image"]["beta"]["method"] == "power"
    assert doc["budgets"][0]["beta_vid"] is None


@pytest.mark.parametrize("args, needle", [
    (["--lr", "fast"], "lr: 'fast' is not a number"),
    (["--lr", "0"], "must be positive"),
    (["--backend", "magic"], "unknown HVP backend 'magic'"),
    (["--method", "qr"], "unknown eigenvalue method 'qr'"),
    (["--tol", "5"], "tol"),
    (["--max-iter", "0"], "max-iter"),
    (["--fd-step", "2"], "fd-step"),
    (["--frames", "3"], "takes even m"),
    (["--model", "a,b"], "one --model"),
])
def test_curvature_bad_input(tiny_toy, args, needle):
    base = _paths(tiny_toy) if "--model" not in args else []
    assert_one_line_error(runner.invoke(app, ["curvature", *base, *args], env={"COLUMNS": "300"}), needle)


DEC = ["--image-batches", "4", "--batch-size", "4", "--video-batches", "4", "--video-batch-size", "2",
       "--n-boot", "200"]


def test_decompose_end_to_end(tiny_toy, tmp_path, monkeypatch):
    """`gradprobe decompose` on the toy default: α(m), ρ_sh, ρ_tmp, the checks and both m*; then its plot."""
    monkeypatch.setattr(gradprobe.run, "DEFAULT_TOY", ToySpec(**tiny_toy.spec.__dict__))
    out = tmp_path / "dec"
    r = runner.invoke(app, ["decompose", "--frames", "2,4,8", *DEC, "--cache-dir", str(tiny_toy.root.parent),
                            "--out", str(out)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for needle in ("α(m)", "ρ_sh =", "ρ_tmp", "assumption_3", "assumption_4", "assumption_5_residual",
                   "assumption_5_variance", "alpha_monotone", "m* (model-based, Eq. 22)", "m* (empirical"):
        assert needle in r.output, needle
    s = json.loads((out / "summary.json").read_text())
    assert s["schema"] == "gradprobe.decompose/1" and s["complete"] and s["meta"]["source"] == "toy"
    assert s["shared"]["label"] == "smallest budget the model accepts (m=2), also in the grid"
    assert [b["frames"] for b in s["budgets"]] == [2, 4, 8] and s["budgets"][0]["alpha"] == 0.0
    assert {c["verdict"] for c in s["checks"]} <= {"held", "violated", "inconclusive"}
    assert set(s["m_star"]) == {"model", "empirical"}
    assert len(pd.read_csv(out / "decompose_batches.csv")) == 4 * 3
    assert len(pd.read_csv(out / "decompose.csv")) == 3 and len(pd.read_csv(out / "decompose_checks.csv")) == 5
    r = runner.invoke(app, ["plot", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "decompose.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("shared, frames, label, variants", [
    ("smallest", "4,6", "smallest budget the model accepts (m=2)", ["m=4", "m=6", "shared"]),
    ("static", "4,6", "static: the clip's middle frame copied m times, at every budget",
     ["m=4", "m=6", "shared m=4", "shared m=6"]),
    ("shuffled", "8", "shuffled: the uniform frames in random order, at every budget", ["m=8", "shared m=8"]),
])
def test_decompose_shared_variants(tiny_toy, tmp_path, shared, frames, label, variants):
    r = runner.invoke(app, ["decompose", "--frames", frames, "--shared", shared, *_paths(tiny_toy), *DEC, "--json",
                            "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["shared"]["label"] == label and doc["settings"]["variants"] == variants
    assert all(b["alpha"] != 0.0 for b in doc["budgets"])  # every budget differs from its shared variant
    assert doc["rho_sh"]["varies_with_m"] == (shared != "smallest")


@pytest.mark.parametrize("args, needle", [
    (["--shared", "frozen"], "unknown shared variant 'frozen'"),
    (["--sampler", "static", "--shared", "static"], "the shared variant must differ"),
    (["--tolerance", "0"], "tolerance: expected a number > 0"),
    (["--video-groups", "3"], "4 video batches cannot be split into 3 equal groups"),
    (["--video-groups", "1"], "video-groups"),
    (["--redundant-from", "99"], "no budget is >= 99"),
    (["--frames", "3"], "takes even m"),
    (["--model", "a,b"], "one --model"),
])
def test_decompose_bad_input(tiny_toy, args, needle):
    base = _paths(tiny_toy) if "--model" not in args else []
    assert_one_line_error(runner.invoke(app, ["decompose", *base, *DEC, *args], env={"COLUMNS": "300"}), needle)


def test_align_with_a_sketch(tiny_toy, tmp_path):
    r = runner.invoke(app, ["align", "--frames", "2,4", *_paths(tiny_toy), *SMALL, "--sketch", "2^12",
                            "--sketch-seed", "5", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "sketched inner products, k=4,096, seed 5" in r.output
    s = json.loads((tmp_path / "summary.json").read_text())
    sk = s["settings"]["sketch"]
    assert sk["mode"] == "sketch" and sk["k"] == 4096 and sk["seed"] == 5 and len(sk["fingerprint"]) == 16
    assert s["image"]["groups"] == 4  # every image batch its own row
    for b in s["budgets"]:
        assert b["sketch_sd"] > 0 and 0 <= b["sketch_share"] < 1 and b["ci95_t"][0] < b["mean"] < b["ci95_t"][1]
    mods = pd.read_csv(tmp_path / "modules.csv")
    assert "sketch_sd" in mods.columns


def test_decompose_with_a_sketch(tiny_toy, tmp_path):
    r = runner.invoke(app, ["decompose", "--frames", "2,4", *_paths(tiny_toy), "--image-batches", "4",
                            "--batch-size", "4", "--video-batches", "4", "--video-batch-size", "1", "--n-boot", "200",
                            "--shared", "static", "--sketch", "4096", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["settings"]["sketch"]["mode"] == "sketch" and s["settings"]["reference_rows"] == 4 + 4 * 4  # K image rows, 4 video groups × 4 variants
    assert all(b["A_sketch_share"] is not None for b in s["budgets"])


@pytest.mark.parametrize("value,needle", [("fast", "sketch: expected auto, exact or a number of buckets"),
                                          ("0", "sketch: k=0 buckets is out of range"),
                                          ("2^40", "out of range")])
def test_bad_sketch_is_one_line(tiny_toy, tmp_path, value, needle):
    r = runner.invoke(app, ["align", "--frames", "2", *_paths(tiny_toy), *SMALL, "--sketch", value,
                            "--out", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "summary.json").exists()


def test_exact_rows_that_cannot_fit_are_refused(tiny_toy, tmp_path, monkeypatch):
    import gradprobe.probe.measure as measure

    # room for a batch's activations (about 1.4 MB at m = 2), not for the exact rows (about 14 MB)
    monkeypatch.setattr(measure, "free_bytes", lambda device: 5_000_000)
    r = runner.invoke(app, ["align", "--frames", "2", *_paths(tiny_toy), *SMALL, "--sketch", "exact",
                            "--out", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert "sketch exact: 5 exact rows" in r.output and "use --sketch auto" in r.output
    # auto sketches instead
    r = runner.invoke(app, ["align", "--frames", "2", *_paths(tiny_toy), *SMALL, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["sketch"]["mode"] == "sketch"


@pytest.mark.parametrize("command", ["align", "curvature", "decompose", "sft", "trap"])
def test_every_option_is_a_field_of_the_options_dataclass(command):
    """The command's parameters and its options dataclass have the same names (nothing dropped or defaulted
    silently), and a command whose options disagree with its dataclass is refused."""
    import dataclasses
    import inspect

    import cli.main as cm
    from gradprobe.experiments.trap import TrapOptions
    from gradprobe.run import AlignOptions, CurvatureOptions, DecomposeOptions
    from gradprobe.sft import SFTOptions

    cls = {"align": AlignOptions, "curvature": CurvatureOptions, "decompose": DecomposeOptions, "sft": SFTOptions,
           "trap": TrapOptions}[command]
    params = set(inspect.signature(getattr(cm, command)).parameters) - cm.CLI_ONLY
    assert params == {f.name for f in dataclasses.fields(cls)}

    def mismatched(frames="2", extra=1):
        return cm._options(cls, locals())

    with pytest.raises(TypeError, match="disagree"):
        mismatched()


def test_help_shows_no_type_after_flags():
    r = runner.invoke(app, ["align", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--json" in r.output and "--skip-bad" in r.output
    assert "<bool>" not in r.output and "<int>" in r.output


def test_a_budget_too_large_to_fit_is_refused_with_numbers(tiny_toy, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["align", "--frames", "8,100000", *_paths(tiny_toy), *SMALL, "--out", str(out)],
                      env={"COLUMNS": "400"})
    assert_one_line_error(r, "frames 100000: a video batch of 2 clips is 400,000 visual tokens (200,000 per clip")
    assert "GiB for its forward and backward" in r.output and "Lower --frames or --video-batch-size" in r.output
    assert not out.exists() or not any(out.iterdir())  # refused before anything was measured


@pytest.fixture(scope="module")
def align_out(tiny_toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "out"
    r = runner.invoke(app, ["align", "--frames", "2,4", *_paths(tiny_toy), *SMALL, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["plot", str(out)]).exit_code == 0
    return out


def test_a_reused_out_holds_only_the_new_run(tiny_toy, align_out, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(align_out, out)
    (out / "notes.txt").write_text("mine")
    assert (out / "alignment_curve.png").is_file()
    r = runner.invoke(app, ["align", "--frames", "2", *_paths(tiny_toy), *SMALL, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert not (out / "alignment_curve.png").exists() and not (out / "modules_heatmap.png").exists()
    assert set(pd.read_csv(out / "alignment.csv")["frames"]) == {2}
    assert (out / "notes.txt").read_text() == "mine"  # not gradprobe's: kept


@pytest.mark.parametrize("cut", ["last_row", "mid_row"])
def test_plot_of_a_truncated_table_is_an_error(align_out, tmp_path, cut):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(align_out, out)
    text = (out / "alignment.csv").read_text()
    lines = text.splitlines(keepends=True)
    (out / "alignment.csv").write_text("".join(lines[:-1]) if cut == "last_row" else text[: len(text) - len(lines[-1]) // 2 - 40])
    r = runner.invoke(app, ["plot", str(out)], env={"COLUMNS": "300"})
    assert_one_line_error(r, "truncated")


def test_plot_title_of_an_interrupted_run_counts_what_was_measured():
    from gradprobe.report.plots import alignment_curve

    budgets = [{"frames": 2, "n": 6, "mean": 1.0, "ci95_t": [0.5, 1.5]}, {"frames": 4, "n": 2, "mean": 0.5, "ci95_t": None}]
    batches = pd.DataFrame({"frames": [2] * 6 + [4] * 2, "value": [1.0] * 8, "finite": [True] * 8})
    ax = alignment_curve({"budgets": budgets, "m_star": {}, "complete": False}, batches)
    assert ax.get_title() == ("image–video gradient alignment (video batches per budget: 6 at m = 2, 2 at m = 4; "
                              "interrupted, partial)")


def _summary(means, cis, shares, norm=1.0):
    from gradprobe.estimators import stats

    budgets = [{"frames": m, "n": 12, "mean": a, "stderr": 1.0, "ci95_t": c, "ci95_boot": c, "frac_negative": 0.95,
                "mean_cos": -0.0, "norm_img": norm, "norm_vid": None, "var_share_image": s}
               for m, a, c, s in zip((8, 16, 32), means, cis, shares, strict=False)]
    emp = stats.empirical_m_star([8, 16, 32], means)
    resolved, why = stats.m_star_resolved(budgets, emp)
    return {"budgets": budgets, "m_star": {"empirical": emp, "bootstrap": {"8": 0.4, "none": 0.6},
                                          "zero_crossing": None, "resolved": resolved, "resolution": why},
            "settings": {"n_params": 10, "n_modules": 2}, "image": {"n_batches": 8, "groups": 8}, "warnings": []}


def test_the_table_says_what_is_known():
    """Every interval spans 0 while most batches are negative: m* is not resolved, the dominant uncertainty and
    what narrows it are named, "—" is explained, and no "-0" is printed."""
    from rich.console import Console

    from cli.main import render_align

    c = Console(record=True, width=200)
    render_align(_summary([-0.5, -0.6, -0.7], [[-2, 1], [-2, 1], [-2, 1]], [0.9, 0.85, 0.8]), c)
    text = c.export_text()
    assert "m*: not resolved (from the means alone: 8; A(8) ≤ 0 but its interval reaches 0 or above)" in text
    assert "the image reference ḡ_img makes up 80%–90% of the variance of A(m): more image batches " \
           "(--image-batches, now 8) narrow the intervals most" in text
    assert "‖Eg‖ —: the unbiased estimate of ‖E g‖² came out negative" in text
    assert "-0 " not in text and "-0." not in text.replace("-0.5", "").replace("-0.6", "").replace("-0.7", "")
    c = Console(record=True, width=200)
    render_align(_summary([0.5, -0.6, -0.7], [[0.2, 0.8], [-1, -0.2], [-1, -0.3]], [0.2, 0.3, 0.1]), c)
    text = c.export_text()
    assert "m* (smallest m with mean A(m) ≤ 0): 16" in text and "not resolved" not in text
    assert "the video batches make up 70%–90% of the variance of A(m): more video batches (--video-batches)" in text


def test_heatmap_colour_bar_and_rows_are_labelled(align_out):
    from gradprobe.outputs import read_align_dir
    from gradprobe.report.plots import module_heatmap

    _, _, modules = read_align_dir(align_out)
    ax = module_heatmap(modules)
    assert ax.collections[0].colorbar.ax.get_ylabel() == "cosine with ḡ_img; < 0 = conflict"
    assert ax.get_ylabel().startswith("module")


def test_device_map_auto_gives_the_same_numbers(tiny_toy, tmp_path):
    """`--device-map auto` (accelerate places the model; here every part lands on the CPU) goes through the same
    measurement as `--device cpu`: the same per-batch rows."""
    for name, extra in (("plain", ["--device", "cpu"]), ("mapped", ["--device-map", "auto"])):
        r = runner.invoke(app, ["align", "--frames", "2,4", *_paths(tiny_toy), *SMALL, *extra,
                                "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    a, b = (pd.read_csv(tmp_path / n / "alignment.csv") for n in ("plain", "mapped"))
    assert len(a) == len(b) == 6
    assert np.allclose(a["value"], b["value"], rtol=1e-6, atol=1e-9)
