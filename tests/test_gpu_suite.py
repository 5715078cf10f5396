"""`benchmarks/gpu_suite.sh --shape tiny`: the GPU suite's scripts at a tiny shape on the CPU, so they cannot
rot while no GPU runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _suite(out, *args, work):
    env = {**os.environ, "PYTHON": sys.executable, "GRADPROBE_BENCH_WORK": str(work)}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def test_gpu_suite_runs_at_the_tiny_shape(tmp_path):
    out = tmp_path / "suite"
    r = _suite(out, "--shape", "tiny", work=tmp_path / "work")
    assert r.returncode == 0, r.stderr + "".join((out / f).read_text()[-2000:] for f in os.listdir(out) if f.endswith(".log"))
    suite = json.loads((out / "suite.json").read_text())
    assert [s["step"] for s in suite["steps"]] == ["build", "sketch", "families_sketch", "families_ckpt",
                                                   "families_exact", "trainstep", "hvp"]
    assert all(s["rc"] == 0 for s in suite["steps"])
    exact = json.loads((out / "families_exact.json").read_text())
    assert [b["frames"] for b in exact["budgets"]] == [8, 16]
    assert all(b["plain_s"] > 0 and b["probed_s"] > 0 for b in exact["budgets"])
    assert exact["decompose"]["frames"] == 16 and exact["decompose"]["seconds"] > 0
    ckpt = json.loads((out / "families_ckpt.json").read_text())
    assert ckpt["checkpointing"]["on"] and all(b["plain_s"] > 0 and b["probed_s"] > 0 for b in ckpt["budgets"])
    sketch = json.loads((out / "families_sketch.json").read_text())
    assert sketch["sketch"]["mode"] == "sketch" and sketch["sketch"]["k"] == 4194304
    assert exact["stage"] == "done" and exact["include"] == ["language_model.layers.1\\."]
    assert json.loads((out / "build.json").read_text())["checkpoint_bytes"] > 0
    assert json.loads((out / "sketch.json").read_text())["k"] == 4194304
    train = json.loads((out / "trainstep.json").read_text())
    assert train["runs"]["observe"]["probe_steps"] == [0, 3]  # every 3 of 6 steps
    assert len(train["runs"]["plain"]["step_s"]) == 6 and train["share_of_training"] is not None
    cost = json.loads((out / "hvp.json").read_text())["cost"]
    for batch in ("image", "video_m8"):  # every backend timed against a plain gradient of the same batch
        assert set(cost[batch]["ratio"]) == {"double_backward", "forward_over_reverse", "finite_difference"}
        assert not cost[batch]["failed"]


def test_gpu_suite_refuses_an_unknown_shape(tmp_path):
    r = _suite(tmp_path / "x", "--shape", "72b", work=tmp_path / "work")
    assert r.returncode == 2 and "--shape must be 7b or tiny" in r.stderr
