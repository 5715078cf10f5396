"""Docs that run: the README's Python example and the notebooks."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # subprocesses and whole runs: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.fixture(scope="module")
def align_dir(tiny_toy, tmp_path_factory):
    from gradprobe.run import AlignOptions, run_align

    out = tmp_path_factory.mktemp("align")
    run_align(AlignOptions(
        frames="2,4", model=str(tiny_toy.model_dir), image_data=str(tiny_toy.data("probe", "images")),
        video_data=str(tiny_toy.data("probe", "videos")), image_batches=4, batch_size=4, video_batches=3,
        video_batch_size=2, n_boot=100, out=str(out),
    ))
    return out


def test_alignment_notebook_executes(align_dir, monkeypatch):
    monkeypatch.setenv("GRADPROBE_ALIGN_DIR", str(align_dir))
    nb = nbformat.read(ROOT / "notebooks" / "alignment_curves.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(align_dir)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # the curve and the heatmap


def test_hybrid_frame_notebook_executes(tiny_toy, tmp_path, monkeypatch):
    """The notebook on reduced runs: three methods on the tiny toy's training clips, and a trap with hybrid
    arms (budgets 2 and 4, 1 step)."""
    import gradprobe.run
    from gradprobe.budget import BudgetOptions, run_budget
    from gradprobe.experiments.trap import TrapOptions, run_trap
    from gradprobe.toybox import ToySpec

    monkeypatch.setattr(gradprobe.run, "DEFAULT_TOY", ToySpec(**tiny_toy.spec.__dict__))
    cache = str(tiny_toy.root.parent)
    for m in ("redundancy", "sufficiency", "gradient"):
        run_budget(BudgetOptions(out=str(tmp_path / "budget" / m), method=m, frames="2,4", score=True,
                                 alignment=2, cache_dir=cache))
    run_trap(TrapOptions(out=str(tmp_path / "trap"), frames="2,4", steps=1, batch_size=2, probe_every=1,
                         eval_images=24, eval_videos=4, hybrid="sufficiency", cache_dir=cache))
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trap_seeds.py"), str(tmp_path / "trap"), "--out",
                          str(tmp_path / "seeds.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    monkeypatch.setenv("GRADPROBE_BUDGET_DIR", str(tmp_path / "budget"))
    monkeypatch.setenv("GRADPROBE_HYBRID_TRAP_DIR", str(tmp_path / "trap"))
    monkeypatch.setenv("GRADPROBE_TRAP_SEEDS", str(tmp_path / "seeds.json"))
    nb = nbformat.read(ROOT / "notebooks" / "hybrid_frame.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
    text = "".join(o.get("text", "") for o in outputs) + "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    for needle in ("redundancy: ", "mean frames", "hybrid-sufficiency", "difference", "1 seeds: [0]", "image vs uniform",
                   "uniform 4"):
        assert needle in text, needle
