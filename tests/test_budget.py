"""`gradprobe budget`: the allocation rule, scoring against m_min by hand, the methods against direct
computation, resuming, a user-registered method, the manifest fed to `gradprobe sft`, and bad input."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from gradprobe.budget import BudgetMethod, BudgetOptions, register, run_budget, score_manifest
from gradprobe.budget.methods import METHODS, grid_target

runner = CliRunner()
ENV = {"COLUMNS": "200"}


def _toy_args(toy, out, *extra):
    return ["budget", "--model", str(toy.model_dir), "--video-data", str(toy.data("probe", "videos")),
            "--out", str(out), *extra]


def test_score_manifest_by_hand():
    grid = [8, 16, 32, 64]
    assert [grid_target(m, grid) for m in (1, 8, 9, 16, 33, 65)] == [8, 8, 16, 16, 64, None]
    rows = [{"id": "a", "frames": 8, "qtype": "blink", "m_min": 11},   # target 16: under
            {"id": "b", "frames": 16, "qtype": "blink", "m_min": 16},  # exact
            {"id": "c", "frames": 32, "qtype": "order", "m_min": 4},   # target 8: over
            {"id": "d", "frames": 8, "qtype": "order", "m_min": 1}]    # exact
    s = score_manifest(rows, grid)
    assert s["manifest"]["blink"] == {"n": 2, "exact": 0.5, "under": 0.5, "over": 0.0, "mean_frames": 12.0}
    assert s["manifest"]["order"] == {"n": 2, "exact": 0.5, "under": 0.0, "over": 0.5, "mean_frames": 20.0}
    assert s["manifest"]["all"]["exact"] == 0.5 and s["manifest"]["all"]["mean_frames"] == 16.0
    # uniform 8 loses both blink clips' evidence and is exact for both order clips
    assert s["uniform"]["8"]["blink"]["under"] == 1.0 and s["uniform"]["8"]["order"]["exact"] == 1.0
    assert s["uniform"]["64"]["all"]["over"] == 1.0


@register
class _Planted(BudgetMethod):
    """Scores read from the record id: clip i is within tolerance from budget PLANTED[i] on."""

    name = "planted-test"
    statistic = "planted"
    default_tolerance = 0.5
    calls = 0
    fail_at = -1

    def scores(self, sample):
        type(self).calls += 1
        if type(self).calls == type(self).fail_at:
            raise KeyboardInterrupt
        first = PLANTED[int(sample.id.rsplit("-", 1)[1]) % len(PLANTED)]
        return {m: (0.0 if m >= first else 1.0) for m in self.ctx.grid}


PLANTED = [2, 4, 8, 4, 2, 8]


def test_a_registered_method_allocates_and_resumes(tiny_toy, tmp_path):
    assert METHODS["planted-test"] is _Planted
    out = tmp_path / "b"
    opts = BudgetOptions(out=str(out), frames="2,4,8", method="planted-test", model=str(tiny_toy.model_dir),
                         video_data=str(tiny_toy.data("probe", "videos")), limit=6)
    _Planted.calls, _Planted.fail_at = 0, 4
    with pytest.raises(KeyboardInterrupt):
        run_budget(opts)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3  # finished clips are on disk
    _Planted.calls, _Planted.fail_at = 0, -1
    s = run_budget(opts)
    assert _Planted.calls == 3  # the three finished clips are not scored again
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in rows] == PLANTED
    assert len({r["id"] for r in rows}) == 6 and all(r["method"] == "planted-test" for r in rows)
    assert s["counts"] == {"2": 2, "4": 2, "8": 2} and s["mean_frames"] == pytest.approx(14 / 3)
    # the toy's clips are 32 × 32: (32/8/2)² = 4 tokens per pair of frames
    assert s["visual_tokens"] == sum(m // 2 * 4 for m in PLANTED) and s["visual_tokens_at_largest"] == 6 * 4 * 4
    # a manifest made with other settings is not extended
    with pytest.raises(Exception, match="other settings.*tolerance"):
        run_budget(BudgetOptions(**{**opts.__dict__, "tolerance": 0.1}))


def test_sufficiency_equals_the_loss_at_each_budget(tiny_toy, tmp_path):
    from gradprobe.data.clips import ClipStore
    from gradprobe.models.base import loss_fn
    from gradprobe.models.toy import ToyAdapter

    out = tmp_path / "s"
    r = runner.invoke(app, _toy_args(tiny_toy, out, "--method", "sufficiency", "--frames", "2,4,8", "--limit",
                                     "3", "--tolerance", "0.01", "--score"), env=ENV)
    assert r.exit_code == 0, r.output
    assert "Against m_min" in r.output and "uniform 8" in r.output
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    model, adapter = ToyAdapter.load(tiny_toy.model_dir)
    model.eval()
    samples = tiny_toy.samples("probe", "videos")[:3]
    store = ClipStore(tiny_toy.data("probe", "videos").parent, [2, 4, 8])
    for row, s in zip(rows, samples, strict=True):
        with torch.no_grad():
            loss = {m: float(loss_fn(model, adapter.collate([s], store=store, m=m))) for m in (2, 4, 8)}
        for m in (2, 4, 8):
            assert row["scores"][str(m)] == pytest.approx(loss[m] - loss[8], abs=1e-6)
        assert row["frames"] == next(m for m in (2, 4, 8) if loss[m] - loss[8] <= 0.01)
        assert row["qtype"] == s.extra["qtype"] and row["m_min"] == s.extra["m_min"]


def test_redundancy_covers_a_clip_and_reads_a_local_image_model(tiny_toy, tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from gradprobe.budget.methods import Context, FrameEmbedder

    dino = tmp_path / "dino"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(dino)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    for extra in ([], ["--embedder", str(dino)]):
        out = tmp_path / f"r{len(extra)}"
        r = runner.invoke(app, _toy_args(tiny_toy, out, "--frames", "2,4,8", "--limit", "4", *extra), env=ENV)
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        for row in rows:
            sc = row["scores"]
            assert sc["8"] == 0.0 and all(0.0 <= v <= 2.0 for v in sc.values())
            assert row["frames"] == next(m for m in (2, 4, 8) if sc[str(m)] <= 0.02)
    # the coverage by hand: identical frames are covered by any one of them; a distinct frame is not
    emb = FrameEmbedder(Context(model=None, adapter=None, store=None, grid=[2], tolerance=0.0, embedder=str(dino)))
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    frames[2, :, :16] = 255
    e = emb(frames)
    assert torch.allclose(e.norm(dim=1), torch.ones(3))
    assert (e[0] @ e[1]).item() == pytest.approx(1.0, abs=1e-6) and (e[0] @ e[2]).item() < 0.999


def test_manifest_feeds_sft(tiny_toy, tmp_path):
    out = tmp_path / "b"
    r = runner.invoke(app, _toy_args(tiny_toy, out, "--method", "sufficiency", "--frames", "2,4"), env=ENV)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sft", "--model", str(tiny_toy.model_dir), "--video-data", str(tiny_toy.data("probe", "videos")),
                            "--image-probe", str(tiny_toy.data("probe", "images")), "--manifest",
                            str(out / "manifest.jsonl"), "--steps", "1", "--batch-size", "2", "--probe-every", "1",
                            "--save-steps", "1", "--out", str(tmp_path / "sft")], env=ENV)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra, needle", [
    (["--method", "oracle"], "method: unknown 'oracle'"),
    (["--tolerance", "-1"], "tolerance: expected a number ≥ 0"),
    (["--frames", "3"], "even"),
    (["--limit", "0"], "limit"),
    (["--embedder", "/nonexistent"], "embedder: /nonexistent is not a directory"),
])
def test_bad_input_is_one_line(tiny_toy, tmp_path, extra, needle):
    r = runner.invoke(app, _toy_args(tiny_toy, tmp_path / "x", *extra), env=ENV)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_score_needs_m_min(tiny_toy, tmp_path):
    recs = [json.loads(x) for x in tiny_toy.data("probe", "videos").read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "m_min"}) + "\n" for r in recs))
    (tmp_path / "probe_videos").symlink_to(tiny_toy.data("probe", "videos").parent / "probe_videos")
    r = runner.invoke(app, ["budget", "--model", str(tiny_toy.model_dir), "--video-data", str(bare), "--score",
                            "--out", str(tmp_path / "x")], env=ENV)
    assert r.exit_code == 2 and "--score needs records with an m_min" in r.output, r.output


@pytest.mark.parametrize(("sketched", "checkpointing"), [(False, "off"), (True, "off"), (False, "on")])
def test_gradient_cosine_against_float64_autograd(tiny_toy, tmp_path, monkeypatch, sketched, checkpointing):
    from gradprobe.budget.methods import Gradient
    from gradprobe.data.clips import ClipStore
    from gradprobe.models.base import loss_fn
    from gradprobe.models.toy import ToyAdapter

    if sketched:
        monkeypatch.setattr(Gradient, "EXACT_BYTES", 0)
    out = tmp_path / "g"
    r = runner.invoke(app, _toy_args(tiny_toy, out, "--method", "gradient", "--frames", "2,4,8", "--limit", "3",
                                     "--checkpointing", checkpointing), env=ENV)
    assert r.exit_code == 0, r.output
    ran = json.loads((out / "budget_summary.json").read_text())["checkpointing"]
    assert ran["on"] == (checkpointing == "on") and ran["requested"] == checkpointing
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    model, adapter = ToyAdapter.load(tiny_toy.model_dir, dtype=torch.float64)
    model.eval()
    store = ClipStore(tiny_toy.data("probe", "videos").parent, [2, 4, 8])
    params = [p for p in model.parameters() if p.requires_grad]
    for row, s in zip(rows, tiny_toy.samples("probe", "videos")[:3], strict=True):
        g = {}
        for m in (2, 4, 8):
            batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                     for k, v in adapter.collate([s], store=store, m=m).items()}
            g[m] = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss_fn(model, batch), params)])
        for m in (2, 4):
            exact = 1 - float(torch.nn.functional.cosine_similarity(g[m], g[8], dim=0))
            if sketched:  # within five of its stated standard deviations
                sd = row["score_sd"][str(m)]
                assert 0 < sd < 0.1 and abs(row["scores"][str(m)] - exact) < 5 * sd, (m, row, exact)
            else:  # float32 gradients against float64 ones
                assert "score_sd" not in row
                assert row["scores"][str(m)] == pytest.approx(exact, abs=1e-5), (m, row["scores"], exact)


def test_parse_budget_by_hand():
    from gradprobe.budget.methods import parse_budget

    grid = [8, 16, 32, 64]
    assert parse_budget("16", grid) == 16
    assert parse_budget("I would use 12 frames.", grid) == 16  # the smallest budget that holds it
    assert parse_budget("about 100", grid) == 64
    assert parse_budget("1 or 2", grid) == 8
    assert parse_budget("it depends", grid) is None


def test_judge_plumbing_on_the_toy(tiny_toy, tmp_path):
    """The tiny toy cannot judge (its vocabulary is ShapesWorld's): the reply is recorded, unparsed, and the
    clip gets the largest budget."""
    out = tmp_path / "j"
    r = runner.invoke(app, _toy_args(tiny_toy, out, "--method", "judge", "--frames", "2,4", "--limit", "2",
                                     "--judge", str(tiny_toy.model_dir)), env=ENV)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(isinstance(x["reply"], str) and x["frames"] == (4 if not x["parsed"] else x["frames"]) for x in rows)
    assert "of the judge's replies and read as a budget" in r.output


def test_eq28_alignment_per_clip_against_autograd(tiny_toy, tmp_path):
    from gradprobe.data.clips import ClipStore
    from gradprobe.models.base import load_image, loss_fn
    from gradprobe.models.toy import ToyAdapter

    out = tmp_path / "al"
    args = _toy_args(tiny_toy, out, "--method", "sufficiency", "--frames", "2,4,8", "--limit", "6",
                     "--tolerance", "10", "--alignment", "3", "--image-data", str(tiny_toy.data("probe", "images")))
    r = runner.invoke(app, args, env=ENV)
    assert r.exit_code == 0, r.output
    assert "Eq. 28 over 3 clips" in r.output
    import pandas as pd

    rows = pd.read_csv(out / "alignment.csv")
    assert len(rows) == 3 and (rows["frames"] == 2).all()  # tolerance 10: every clip gets the smallest budget
    model, adapter = ToyAdapter.load(tiny_toy.model_dir, dtype=torch.float64)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(batch):
        batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        return torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss_fn(model, batch), params)])

    images = tiny_toy.samples("probe", "images")[:32]
    loaded = {s.media: load_image(tiny_toy.data("probe", "images").parent, s) for s in images}
    g_img = torch.stack([grad(adapter.collate(images[i:i + 8], images=loaded)) for i in range(0, 32, 8)]).mean(0)
    store = ClipStore(tiny_toy.data("probe", "videos").parent, [2, 8])
    by_id = {s.id: s for s in tiny_toy.samples("probe", "videos")}
    for _, row in rows.iterrows():
        s = by_id[row["id"]]
        for col, m in (("A_allocated", 2), ("A_largest", 8)):
            want = float(g_img @ grad(adapter.collate([s], store=store, m=m)))
            assert row[col] == pytest.approx(want, rel=1e-4, abs=1e-6), (col, row[col], want)
    s = json.loads((out / "budget_summary.json").read_text())["alignment"]
    assert s["n"] == 3 and s["difference"]["mean"] == pytest.approx(rows["difference"].mean())
    # finished clips are kept: a second run measures nothing new
    r = runner.invoke(app, args, env=ENV)
    assert r.exit_code == 0 and len(pd.read_csv(out / "alignment.csv")) == 3


def test_export_writes_each_clip_at_its_budget(tiny_toy, tmp_path):
    from PIL import Image

    from gradprobe.data.clips import ClipStore

    out = tmp_path / "b"
    r = runner.invoke(app, _toy_args(tiny_toy, out, "--method", "sufficiency", "--frames", "2,4,8", "--limit", "3",
                                     "--export", "swift", str(tmp_path / "sw")), env=ENV)
    assert r.exit_code == 0, r.output
    manifest = {json.loads(x)["id"]: json.loads(x)["frames"] for x in (out / "manifest.jsonl").open()}
    recs = [json.loads(x) for x in (tmp_path / "sw" / "budgeted_videos.jsonl").read_text().splitlines()]
    store = ClipStore(tiny_toy.data("probe", "videos").parent, [2, 4, 8])
    by_id = {s.id: s for s in tiny_toy.samples("probe", "videos")}
    for rec in recs:
        frames = rec["videos"][0]
        assert len(frames) == manifest[rec["id"]] == rec["frames"] and all(f.startswith("/") for f in frames)
        want = store.clip(by_id[rec["id"]], rec["frames"]).frames
        got = np.stack([np.asarray(Image.open(f)) for f in frames])
        assert (got == want).all()  # lossless PNG of the frames gradprobe itself would train on
        assert rec["messages"][0]["content"].startswith("<video>")
    r = runner.invoke(app, _toy_args(tiny_toy, tmp_path / "c", "--export", "parquet", str(tmp_path / "p")), env=ENV)
    assert r.exit_code == 2 and "--export: unknown format 'parquet'" in r.output


def test_budget_scores_script_reads_the_runs_side_by_side(tmp_path):
    """benchmarks/budget_scores.py: each method's scores per type, the uniform rows once, Eq. 28's row; runs on
    other clips are refused."""
    import subprocess
    import sys
    from pathlib import Path

    grid = [8, 16]
    rows = [{"id": "a", "frames": 8, "qtype": "blink", "m_min": 11}, {"id": "b", "frames": 16, "qtype": "blink",
            "m_min": 16}, {"id": "c", "frames": 16, "qtype": "order", "m_min": 4}]
    a = {"n": 2, "A_allocated": {"mean": 1.5}, "A_largest": {"mean": -0.25},
         "difference": {"mean": 1.75, "ci95": [0.5, 3.0]}}
    for method, frames, align in (("sufficiency", 8, a), ("gradient", 16, None)):
        d = tmp_path / method
        d.mkdir()
        got = [dict(r, frames=frames) for r in rows]
        d.joinpath("budget_summary.json").write_text(json.dumps(
            {"method": method, "tolerance": 0.1, "frames": grid, "mean_frames": frames, "tokens_saved_fraction": 0.25,
             "score": score_manifest(got, grid), **({"alignment": align} if align else {})}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "budget_scores.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "sufficiency"), str(tmp_path / "gradient"),
                          "--markdown", "--out", str(tmp_path / "all.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # blink: targets 16 and 16; all at 8 is under for both; all at 16 exact for both. order: target 8.
    assert "| `sufficiency` (tolerance 0.1) | 0.00 / 1.00 / 8.0 | 1.00 / 0.00 / 8.0 | 0.33 / 0.67 / 8.0 |" in lines
    assert "| `gradient` (tolerance 0.1) | 1.00 / 0.00 / 16.0 | 0.00 / 0.00 / 16.0 | 0.67 / 0.00 / 16.0 |" in lines
    assert sum(x.startswith("| uniform ") for x in lines) == 2
    assert "| `sufficiency` | 8.0 | 25% | 2 | +1.50 | -0.25 | +1.75 [+0.50, +3.00] |" in lines
    assert "| `gradient` | 16.0 | 25% | — | — | — | — |" in lines
    assert set(json.loads((tmp_path / "all.json").read_text())) == {"sufficiency", "gradient"}
    s = json.loads((tmp_path / "gradient" / "budget_summary.json").read_text())
    s["score"] = score_manifest([dict(r, frames=16) for r in rows[:2]], grid)
    (tmp_path / "gradient" / "budget_summary.json").write_text(json.dumps(s))
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "sufficiency"), str(tmp_path / "gradient")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "other clips or another grid" in res.stderr
