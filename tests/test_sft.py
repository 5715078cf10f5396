"""`gradprobe sft` end to end on the tiny toy: trajectory, checkpoints, resume, manifest, LoRA, bad input."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def _args(toy, out, *extra):
    return ["sft", "--model", str(toy.model_dir), "--video-data", str(toy.data("probe", "videos")),
            "--image-probe", str(toy.data("probe", "images")), "--out", str(out), "--batch-size", "2",
            "--frames", "2", "--probe-every", "2", "--save-steps", "2", *extra]


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "gradprobe_trajectory.jsonl").read_text().splitlines()]


def test_sft_writes_trajectory_and_resumes(tiny_toy, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, _args(tiny_toy, out, "--steps", "4"))
    assert r.exit_code == 0, r.output
    assert _steps(out) == [0, 2]
    assert (out / "final" / "config.json").is_file() and (out / "checkpoint-4").is_dir()
    from gradprobe.models.registry import family_for

    assert family_for(out / "checkpoint-4").name == family_for(out / "final").name == "toy"
    s = json.loads((out / "sft_summary.json").read_text())
    assert s["steps"] == 4 and s["probes"] == 2
    said = " ".join(r.output.split())  # the console wraps long lines
    assert "2 alignment probes in" in said and "guard observe (fired: warn 0, stop 0, project 0)" in said
    # the same run dir again without --resume is refused; with --resume and more steps it continues
    r = runner.invoke(app, _args(tiny_toy, out, "--steps", "4"))
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, _args(tiny_toy, out, "--steps", "6", "--resume"))
    assert r.exit_code == 0, r.output
    assert _steps(out) == [0, 2, 4]
    assert json.loads((out / "sft_summary.json").read_text())["resumed_from"].endswith("checkpoint-4")


def test_sft_tracks_budgets(tiny_toy, tmp_path):
    out = tmp_path / "bud"
    r = runner.invoke(app, _args(tiny_toy, out, "--steps", "2", "--probe-frames", "2,4",
                                 "--video-probe", str(tiny_toy.data("probe", "videos"))))
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "gradprobe_budgets.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 2] and [b["frames"] for b in rows[0]["budgets"]] == [2, 4]
    r = runner.invoke(app, ["plot", str(out)])  # A(m) along the run is the third panel
    assert r.exit_code == 0, r.output
    assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, _args(tiny_toy, tmp_path / "odd", "--probe-frames", "3",
                                 "--video-probe", str(tiny_toy.data("probe", "videos"))))
    assert r.exit_code == 2 and "even m ≥ 2" in r.output


def test_sft_manifest_and_lora(tiny_toy, tmp_path):
    recs = tiny_toy.samples("probe", "videos")
    man = tmp_path / "manifest.jsonl"
    man.write_text("".join(json.dumps({"id": r.id, "frames": 2 if i % 2 else 4}) + "\n" for i, r in enumerate(recs)))
    out = tmp_path / "lora"
    r = runner.invoke(app, _args(tiny_toy, out, "--steps", "2", "--manifest", str(man), "--lora"))
    assert r.exit_code == 0, r.output
    assert _steps(out) == [0]
    rows = [json.loads(x) for x in (out / "gradprobe_trajectory.jsonl").read_text().splitlines()]
    # with LoRA only the adapters train, so only language-model modules carry an update
    assert rows[0]["finite"] and rows[0]["update_norm"] > 0
    assert all("lora" in m or "language_model" in m for m in rows[0]["modules"])


def test_sft_bad_input(tiny_toy, tmp_path):
    r = runner.invoke(app, _args(tiny_toy, tmp_path / "a", "--guard", "explode"))
    assert r.exit_code == 2 and "unknown action 'explode'" in r.output
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": "x", "frames": 0}\n')
    r = runner.invoke(app, _args(tiny_toy, tmp_path / "b", "--manifest", str(bad)))
    assert r.exit_code == 2 and "frames must be a positive integer" in r.output
    r = runner.invoke(app, _args(tiny_toy, tmp_path / "c", "--resume"))
    assert r.exit_code == 2 and "no checkpoint" in r.output


def test_sft_evaluates_and_plots(tiny_toy, tmp_path):
    out = tmp_path / "ev"
    r = runner.invoke(app, _args(tiny_toy, out, "--steps", "4", "--eval-every", "2",
                                 "--eval-image-data", str(tiny_toy.data("eval", "images")),
                                 "--eval-video-data", str(tiny_toy.data("eval", "videos"))))
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "gradprobe_eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 2, 4]
    for x in rows:
        assert 0 <= x["image_free"] <= x["image_restricted"] <= 1  # restricting to valid answers can only help
        assert x["n_image"] == 24 and x["n_video"] == 4
        for k in ("image_free", "image_restricted", "video_free", "video_restricted"):
            assert x[k] == x[f"{k}_items"].count("1") / len(x[f"{k}_items"])
        # each record's question type and m_min travel with the row (per-type changes are computed from them)
        assert len(x["video_qtypes"]) == len(x["video_m_min"]) == 4 and len(x["image_qtypes"]) == 24
    types = json.loads((out / "sft_summary.json").read_text())["types"]
    assert sum(e["n"] for q in types["video"].values() for e in q.values()) == 4
    assert set(types["image"]) <= {"colour", "exist", "count", "position"}
    assert "Held-out video accuracy per question type" in r.output
    r = runner.invoke(app, ["plot", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    # resumed, the summary covers the whole run (first evaluation to last), not only the part since the checkpoint
    r = runner.invoke(app, _args(tiny_toy, out, "--steps", "6", "--eval-every", "2", "--resume",
                                 "--eval-image-data", str(tiny_toy.data("eval", "images")),
                                 "--eval-video-data", str(tiny_toy.data("eval", "videos"))))
    assert r.exit_code == 0, r.output
    from gradprobe.train.evaluate import type_changes

    s = json.loads((out / "sft_summary.json").read_text())
    rows = [json.loads(x) for x in (out / "gradprobe_eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in s["evaluations"]] == [x["step"] for x in rows] == [0, 2, 4, 6]
    assert s["probes"] == len(_steps(out)) == 3
    assert s["types"]["image"] == json.loads(json.dumps(type_changes(rows[0], rows[-1], "image", None)))


def test_evaluation_does_not_change_the_run(tiny_toy, tmp_path):
    """Weights after a run with evaluation equal those after the same run without it."""
    import torch

    from gradprobe.models.toy import ToyAdapter

    base = _args(tiny_toy, tmp_path / "x", "--steps", "2")
    assert runner.invoke(app, base).exit_code == 0
    ev = _args(tiny_toy, tmp_path / "y", "--steps", "2", "--eval-every", "1",
               "--eval-image-data", str(tiny_toy.data("eval", "images")),
               "--eval-video-data", str(tiny_toy.data("eval", "videos")))
    assert runner.invoke(app, ev).exit_code == 0
    a, _ = ToyAdapter.load(tmp_path / "x" / "final")
    b, _ = ToyAdapter.load(tmp_path / "y" / "final")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=False):
        assert ka == kb and torch.equal(va, vb), ka


def test_kept_clips_train_the_same_weights(tiny_toy, tmp_path):
    """Clips decoded once and kept (--keep-clips) give the run that decoding each time gives, into a second epoch."""
    import torch

    from gradprobe.models.toy import ToyAdapter

    n = len(tiny_toy.samples("probe", "videos"))
    steps = n // 2 + 2  # batch 2: past the first epoch, so kept clips are read again
    for name, extra in (("x", []), ("y", ["--keep-clips"])):
        r = runner.invoke(app, _args(tiny_toy, tmp_path / name, "--steps", str(steps), "--probe-every", str(steps),
                                     "--save-steps", str(steps), *extra))
        assert r.exit_code == 0, r.output
    a, _ = ToyAdapter.load(tmp_path / "x" / "final")
    b, _ = ToyAdapter.load(tmp_path / "y" / "final")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.slow
def test_sft_lora_resumes(tiny_toy, tmp_path):
    """A LoRA run resumes from its adapter checkpoint: the same rows as an uninterrupted run, whatever the
    global random state before the run (the adapters' initialisation follows --seed)."""
    import torch

    whole = tmp_path / "whole"
    torch.manual_seed(1234)
    assert runner.invoke(app, _args(tiny_toy, whole, "--steps", "4", "--lora")).exit_code == 0
    part = tmp_path / "part"
    torch.manual_seed(99)
    assert runner.invoke(app, _args(tiny_toy, part, "--steps", "2", "--lora")).exit_code == 0
    r = runner.invoke(app, _args(tiny_toy, part, "--steps", "4", "--lora", "--resume"))
    assert r.exit_code == 0, r.output
    a = [json.loads(x) for x in (whole / "gradprobe_trajectory.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "gradprobe_trajectory.jsonl").read_text().splitlines()]
    assert [x["step"] for x in b] == [0, 2]
    for x, y in zip(a, b, strict=False):
        assert y["alignment"] == pytest.approx(x["alignment"], rel=1e-5, abs=1e-9)
