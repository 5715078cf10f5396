"""The benchmark scripts run (at their tiny CPU shapes), so that the commands RESULTS.md quotes cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses and whole runs: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_bench_sketch_tiny(tmp_path):
    _run(["benchmarks/bench_sketch.py", "--shape", "tiny", "--device", "cpu", "--repeats", "2", "--out",
          str(tmp_path / "s.json")], tmp_path)
    r = json.loads((tmp_path / "s.json").read_text())
    assert r["sketch"]["median_s"] > 0 and r["parameters"] > 0 and r["k"] == 1 << 20


def test_bench_scale_tiny(tmp_path):
    _run(["benchmarks/bench_scale.py", "--shape", "tiny", "--sketch", "4096", "--image-batches", "4",
          "--video-batches", "4", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "scale.json")], tmp_path)
    r = json.loads((tmp_path / "scale.json").read_text())
    for mode in ("plain", "align", "decompose"):
        assert "error" not in r[mode], r[mode]
    assert r["align"]["sketch"]["mode"] == "sketch" and r["align"]["sketch"]["k"] == 4096
    assert r["decompose"]["sketch"]["k"] == 4096


def test_bench_toy_attention_tiny(tmp_path):
    _run(["benchmarks/bench_toy_attention.py", "--tiny", "--frames", "4", "--repeats", "1", "--warmup", "0",
          "--threads", "1", "--cache-dir", str(tmp_path / "toys"), "--out", str(tmp_path / "a.json")], tmp_path)
    r = json.loads((tmp_path / "a.json").read_text())
    (row,) = r["rows"]
    assert row["frames"] == 4 and row["chunked_ms"] > 0 and row["batched_ms"] > 0
    assert row["max_abs_difference"] < 1e-4


def test_learnability_script(tiny_toy, tmp_path):
    out = _run(["benchmarks/learnability.py", "--samplers", "uniform,static", "--seeds", "0", "--steps", "2",
                "--eval-every", "1", "--cache-dir", str(tiny_toy.root.parent), "--out", str(tmp_path / "l.json"),
                "--markdown"], tmp_path)
    r = json.loads((tmp_path / "l.json").read_text())
    assert [(x["sampler"], x["seed"]) for x in r["runs"]] == [("uniform", 0), ("static", 0)]
    assert all(list(x["curve"]) == ["0", "1", "2"] and x["curve"]["2"] == x["last"] for x in r["runs"])
    assert r["recipe"]["steps"] == 2 and set(r["learns"]) == {"uniform", "static"}
    assert r["environment"]["threads"] == 1 and len(out.stdout.strip().splitlines()) == 4  # header, rule, 2 runs


def test_bench_memory_child_and_fit(tmp_path, monkeypatch):
    """One child of bench_memory.py (a probed, checkpointed pass on a tiny Qwen2.5-VL), and its fit recovering a
    planted c + a·n + b·n²."""
    import importlib.util

    import numpy as np

    from gradprobe.data import shapesworld as sw
    from gradprobe.models.tiny import create_tiny

    model = create_tiny("qwen2_5_vl", tmp_path / "q", sw.vocabulary(), side=32)
    out = _run(["benchmarks/bench_memory.py", "--child", "--model", str(model), "--m", "4", "--mode", "probed",
                "--checkpointing", "on", "--attn", "sdpa", "--side", "32", "--threads", "1"], tmp_path)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["frames"] == 4 and r["tokens"] > 0 and r["blocks"] > 0 and r["peak_gib"] >= 0
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when the script runs: its folder on the path
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"tokens": n, "peak_gib": 1.5 + 0.8 * n / 1000 + 0.3 * (n / 1000) ** 2} for n in (128, 256, 512, 1024)]
    assert np.allclose(list(bench.fit(rows).values()), [1.5, 0.8, 0.3])
    assert list(bench.fit(rows, quadratic=False)) == ["c", "a"]
