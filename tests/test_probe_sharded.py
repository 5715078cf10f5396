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


def test_align_under_torchrun_equals_one_process(tiny_toy, tmp_path):
    """`torchrun --nproc-per-node 2 … gradprobe align`: the toy sharded with FSDP2 across two gloo ranks (its
    decoder and vision blocks, then the root), rank 0 writing; the same rows as one process (float64)."""
    import csv
    import os

    root = Path(__file__).resolve().parents[1]
    args = ["-m", "cli.main", "align", "--frames", "2,4", "--model", str(tiny_toy.model_dir),
            "--image-data", str(tiny_toy.data("probe", "images")), "--video-data", str(tiny_toy.data("probe", "videos")),
            "--image-batches", "4", "--batch-size", "4", "--video-batches", "3", "--video-batch-size", "2",
            "--n-boot", "200", "--dtype", "float64", "--device", "cpu"]
    env = {**os.environ, "COLUMNS": "200"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two")], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("m*") == one.stdout.count("m*") >= 1  # one table: rank 0 prints, the other is silent
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["meta"]["ranks"] == 2
    ra, rb = (list(csv.DictReader((tmp_path / n / "alignment.csv").open())) for n in ("one", "two"))
    assert len(ra) == len(rb) == 6
    for x, y in zip(ra, rb, strict=True):
        assert math.isclose(float(x["value"]), float(y["value"]), rel_tol=1e-9, abs_tol=1e-12), (x, y)


@pytest.mark.parametrize("command", ["decompose", "curvature"])
def test_commands_without_a_sharded_path_refuse_torchrun(command, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, [command, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "runs in one process for now" in r.output, r.output
