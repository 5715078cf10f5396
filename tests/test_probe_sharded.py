"""The measurement core on an FSDP2-sharded model: two CPU ranks (gloo), each holding pieces of every
parameter and feeding the same batches, give the single process's dots, squared norms, pair statistics and
Gram matrices (float64, 1e-9), with exact rows and with a sketch (pieces sketched at their global offsets)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("probe_dist_worker.py")


def _run(mode, sketch, out):
    cmd = [sys.executable, str(WORKER), mode, sketch, str(out)]
    if mode == "fsdp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def _flat(x):
    if isinstance(x, list):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for k in sorted(x):
            yield from _flat(x[k])
    else:
        yield x


@pytest.mark.parametrize("sketch", ["exact", "64"])
def test_two_sharded_ranks_equal_one_process(sketch, tmp_path):
    one = _run("single", sketch, tmp_path / "one.json")
    two = _run("fsdp", sketch, tmp_path / "two.json")
    assert one["mode"] == two["mode"] == ("exact" if sketch == "exact" else "sketch")
    assert one["modules"] == two["modules"]
    a, b = list(_flat([one["rows"], one["gram"]])), list(_flat([two["rows"], two["gram"]]))
    assert len(a) == len(b) == 98
    for x, y in zip(a, b, strict=True):
        assert x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), (x, y)
    # the statistics are not trivially zero: the pair of the last batch is its dot with the one before
    assert any(abs(v) > 1e-3 for v in one["rows"][-1]["pair"])


def _one_and_two(root, args, tmp_path, one_only=()):
    """The command in one process (out ``one``, with ``one_only`` added) and under ``torchrun --nproc-per-node 2``
    (out ``two``)."""
    import os

    env = {**os.environ, "COLUMNS": "200"}
    one = subprocess.run([sys.executable, *args, *one_only, "--out", str(tmp_path / "one")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two")], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    return one, two


def _close_rows(a, b, columns):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        for c in columns:
            if x[c] in ("", "nan") and y[c] == x[c]:
                continue
            assert math.isclose(float(x[c]), float(y[c]), rel_tol=1e-9, abs_tol=1e-12), (c, x, y)


def _toy_args(toy, command, frames):
    return ["-m", "cli.main", command, "--frames", frames, "--model", str(toy.model_dir),
            "--image-data", str(toy.data("probe", "images")), "--video-data", str(toy.data("probe", "videos")),
            "--image-batches", "4", "--batch-size", "4", "--dtype", "float64", "--device", "cpu"]


def test_align_under_torchrun_equals_one_process(tiny_toy, tmp_path):
    """`torchrun --nproc-per-node 2 … gradprobe align`: the toy sharded with FSDP2 across two gloo ranks (its
    decoder and vision blocks, then the root), rank 0 writing; the same rows as one process (float64)."""
    import csv

    root = Path(__file__).resolve().parents[1]
    args = _toy_args(tiny_toy, "align", "2,4") + ["--video-batches", "3", "--video-batch-size", "2", "--n-boot", "200"]
    one, two = _one_and_two(root, args, tmp_path)
    assert two.stdout.count("m*") == one.stdout.count("m*") >= 1  # one table: rank 0 prints, the other is silent
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["meta"]["ranks"] == 2
    ra, rb = (list(csv.DictReader((tmp_path / n / "alignment.csv").open())) for n in ("one", "two"))
    assert len(ra) == 6
    _close_rows(ra, rb, ["value"])


def test_interrupted_torchrun_align_keeps_what_it_measured(tiny_toy, tmp_path):
    """Ctrl-C to `torchrun … gradprobe align` mid-run: torchrun passes SIGINT to both ranks, rank 0 writes the
    partial summary and every row measured so far, and those rows are one process's first rows (float64)."""
    import csv
    import os
    import signal
    import time

    root = Path(__file__).resolve().parents[1]
    args = _toy_args(tiny_toy, "align", "2,4,6,8") + ["--video-batches", "6", "--video-batch-size", "2",
                                                       "--n-boot", "100"]
    env = {**os.environ, "COLUMNS": "200"}
    out = tmp_path / "two"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(out)], cwd=root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    rows = out / "alignment.csv"
    t0 = time.time()
    while not (rows.is_file() and len(rows.read_text().splitlines()) > 8):  # header + m=2's 6 rows + some of m=4
        assert p.poll() is None and time.time() - t0 < 240, "the run ended before it could be interrupted"
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode != 0 and "interrupted: partial results written" in stderr, stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] is False and s["meta"]["ranks"] == 2
    part = list(csv.DictReader(rows.open()))
    assert 8 <= len(part) < 24
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    whole = list(csv.DictReader((tmp_path / "one" / "alignment.csv").open()))
    assert len(whole) == 24
    _close_rows(part, whole[: len(part)], ["value"])
    assert [r["frames"] for r in part] == [r["frames"] for r in whole[: len(part)]]


@pytest.mark.parametrize("shared, sketch", [("smallest", "exact"), ("static", "exact"), ("static", "512")])
def test_decompose_under_torchrun_equals_one_process(tiny_toy, tmp_path, shared, sketch):
    """`torchrun --nproc-per-node 2 … gradprobe decompose`: α(m), ρ and the per-batch rows of the sharded toy
    equal one process's (float64), with the shared variant at the smallest budget and with static copies,
    exact and sketched."""
    import csv

    root = Path(__file__).resolve().parents[1]
    args = _toy_args(tiny_toy, "decompose", "4,6") + ["--video-batches", "4", "--video-batch-size", "2", "--n-boot", "200",
                                                       "--shared", shared, "--sketch", sketch]
    one, two = _one_and_two(root, args, tmp_path)
    assert two.stdout.count("α(m)") == one.stdout.count("α(m)") >= 1
    sa, sb = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert sb["meta"]["ranks"] == 2 and "ranks" not in sa["meta"]
    assert sa["settings"]["sketch"]["mode"] == sb["settings"]["sketch"]["mode"] == ("exact" if sketch == "exact"
                                                                                   else "sketch")
    for name in ("decompose.csv", "decompose_batches.csv"):
        ra, rb = (list(csv.DictReader((tmp_path / n / name).open())) for n in ("one", "two"))
        numeric = [c for c in ra[0] if all(_number(r[c]) for r in ra)]
        assert len(numeric) >= 3, numeric
        _close_rows(ra, rb, numeric)
    assert [b["alpha"] for b in sa["budgets"]] != [0.0, 0.0]


def _number(text):
    try:
        float(text)
        return text not in ("True", "False")
    except ValueError:
        return text in ("", "nan")


def test_curvature_under_torchrun_equals_one_process(tiny_toy, tmp_path):
    """`torchrun --nproc-per-node 2 … gradprobe curvature`: on the sharded toy auto falls to finite differences
    (two sharded gradients per product) and β, gᵀHg, η0 and the one-step lookahead equal one process's
    finite-difference run (float64, 1e-9), with random start vectors drawn whole and cut into pieces."""
    import csv

    root = Path(__file__).resolve().parents[1]
    args = _toy_args(tiny_toy, "curvature", "2,4") + ["--video-batches", "2", "--video-batch-size", "2",
                                                       "--lr", "1e-4,1e-3", "--trace-samples", "1",
                                                       "--max-iter", "6"]
    one, two = _one_and_two(root, args, tmp_path, one_only=["--backend", "finite_difference"])
    assert two.stdout.count("β_img") == one.stdout.count("β_img") >= 1
    sa, sb = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert sb["meta"]["ranks"] == 2 and sa["settings"]["backend"] == sb["settings"]["backend"] == "finite_difference"
    a, b = list(_flat([sa["image"], sa["budgets"]])), list(_flat([sb["image"], sb["budgets"]]))
    assert len(a) == len(b) > 40
    for x, y in zip(a, b, strict=True):
        if isinstance(x, float) and isinstance(y, float):
            assert x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), (x, y)
        else:
            assert x == y
    assert sa["image"]["beta"]["beta"] > 0 and abs(sa["budgets"][0]["q"]) > 0
    ra, rb = (list(csv.DictReader((tmp_path / n / "lookahead.csv").open())) for n in ("one", "two"))
    numeric = [c for c in ra[0] if all(_number(r[c]) for r in ra)]
    assert "d_img" in numeric
    _close_rows(ra, rb, numeric)


def test_curvature_refuses_double_backward_under_torchrun(tiny_toy, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, ["curvature", "--backend", "double_backward", "--model", str(tiny_toy.model_dir)])
    assert r.exit_code == 2 and "no path on a sharded model" in r.output, r.output


def test_checkpointed_align_under_torchrun_equals_one_process(tiny_toy, tmp_path):
    """Activation checkpointing on a model sharded with FSDP2 across two gloo ranks (each block's forward
    checkpointed inside FSDP2's unshard and reshard): the rows of one process without it (float64)."""
    import csv

    root = Path(__file__).resolve().parents[1]
    args = _toy_args(tiny_toy, "align", "2,4") + ["--video-batches", "3", "--video-batch-size", "2", "--n-boot",
                                                   "200", "--checkpointing", "on"]
    _one_and_two(root, args, tmp_path, one_only=["--checkpointing", "off"])
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["meta"]["ranks"] == 2 and s["meta"]["checkpointing"]["on"] and s["meta"]["checkpointing"]["blocks"] > 0
    assert not json.loads((tmp_path / "one" / "summary.json").read_text())["meta"]["checkpointing"]["on"]
    ra, rb = (list(csv.DictReader((tmp_path / n / "alignment.csv").open())) for n in ("one", "two"))
    _close_rows(ra, rb, ["value"])
