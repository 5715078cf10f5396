"""`gradprobe align` and `gradprobe decompose` with a sketch on a ~1 B-parameter Qwen2.5-VL on the CPU.

Usage:
    python benchmarks/bench_scale.py --out benchmarks/results/scale_cpu.json
CPU check of the script itself (seconds):
    python benchmarks/bench_scale.py --shape tiny --out /tmp/scale_tiny.json

A random-weight Qwen2.5-VL of about 1 B parameters (:data:`gradprobe.models.tiny.QWEN2_5_VL_1B`, float32,
built from a config, saved with ``save_pretrained`` and loaded back with ``from_pretrained``) on small
ShapesWorld frames. Exact reference rows at ``gradprobe align``'s defaults (8 image groups and the running
sum: 9 copies of the gradient, about 36 GB) cannot fit in this machine's memory, so ``--sketch auto`` sketches.

Each measurement runs in its own child process, which samples its resident memory every millisecond from
the moment before the model is loaded:

* ``plain``: load the model, one video batch at the largest budget, forward+backward twice (the
  gradients stay in ``.grad`` as in training): peak = model + gradients + activations;
* ``align``: the code path of ``gradprobe align`` (``--sketch auto``) with a progress hook that times
  every batch; then, in the same process, plain forward+backward passes of the same video batch for the
  ratio (collation is timed on both sides); ``benchmarks/bench_sketch.py --shape 1b`` times the sketch
  alone;
* ``decompose``: the code path of ``gradprobe decompose`` (``--sketch auto``).

The extra memory of a probed run is its peak minus the plain child's peak. The JSON has both peaks, the
sketch settings from ``summary.json``, per-batch times and their ratio, and an environment record.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from resident import PeakMemory  # noqa: E402


class _Timer:
    """A gradprobe Progress that times each step of each phase."""

    def __init__(self) -> None:
        self.steps: dict[str, list[float]] = {}
        self._t = 0.0

    def start(self, phase: str, total: int | None) -> None:
        self.steps[phase] = []
        self._t = time.perf_counter()

    def advance(self, phase: str) -> None:
        now = time.perf_counter()
        self.steps.setdefault(phase, []).append(now - self._t)
        self._t = now

    def finish(self, phase: str) -> None:
        pass


def _opts(a: argparse.Namespace, cls: Any, **kw: Any) -> Any:
    images, videos = _data(a)
    return cls(model=str(Path(a.work) / f"qwen2_5_vl-{a.shape}"), image_data=str(images), video_data=str(videos),
               batch_size=1, video_batch_size=1, device="cpu", n_boot=500, **kw)


def _video_batch(a: argparse.Namespace, m: int) -> tuple[Any, Any, Any]:
    from gradprobe.run import AlignOptions, _prepare

    prep = _prepare(_opts(a, AlignOptions, frames=str(m), image_batches=1, video_batches=1), log=lambda s: None)
    model, adapter = prep.family.adapter_class().load(Path(prep.model_dirs[0]), dtype=torch.float32, device="cpu")

    def batch() -> Any:
        from gradprobe.models.base import strip_info

        return strip_info(adapter.collate(prep.vid_chunks[0], store=prep.store, m=m))

    return model, batch, adapter


def _plain_times(model: Any, batch: Any, repeats: int) -> list[float]:
    from gradprobe.models.base import loss_fn

    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss_fn(model, batch()).backward()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return times


def _imports() -> None:
    """Import what the children use before the memory baseline is taken."""
    import transformers  # noqa: F401
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401

    import gradprobe.models.qwen2_5_vl
    import gradprobe.run  # noqa: F401


def child_plain(a: argparse.Namespace) -> dict[str, Any]:
    peak = PeakMemory()
    m = max(int(x) for x in a.frames.split(","))
    model, batch, _ = _video_batch(a, m)
    times = _plain_times(model, batch, 2)
    params = sum(p.numel() for p in model.parameters())
    return {"peak_gib": peak.stop(), "plain_s": times, "parameters": params,
            "model_gib": params * 4 / 2**30, "frames": m}


def child_align(a: argparse.Namespace) -> dict[str, Any]:
    from gradprobe.run import AlignOptions, run_align

    peak = PeakMemory()
    timer = _Timer()
    rep = run_align(_opts(a, AlignOptions, frames=a.frames, image_batches=a.image_batches,
                          video_batches=a.video_batches, sketch=a.sketch), progress=timer)
    peak_gib = peak.stop()
    m = max(int(x) for x in a.frames.split(","))
    probed = timer.steps.get(f"frames={m}", [])
    model, batch, _ = _video_batch(a, m)
    plain = _plain_times(model, batch, 3)
    return {"peak_gib": peak_gib, "sketch": rep.summary["settings"]["sketch"], "frames": m,
            "probed_s": probed, "plain_s": plain,
            "ratio": statistics.median(probed[1:] or probed) / statistics.median(plain) if probed else None,
            "budgets": [{k: b.get(k) for k in ("frames", "n", "mean", "ci95_t", "sketch_sd", "sketch_share")}
                        for b in rep.summary["budgets"]]}


def child_decompose(a: argparse.Namespace) -> dict[str, Any]:
    from gradprobe.run import DecomposeOptions, run_decompose

    peak = PeakMemory()
    timer = _Timer()
    rep = run_decompose(_opts(a, DecomposeOptions, frames=a.frames, image_batches=a.image_batches,
                              video_batches=a.video_batches, sketch=a.sketch), progress=timer)
    return {"peak_gib": peak.stop(), "sketch": rep.summary["settings"]["sketch"],
            "video_batch_s": timer.steps.get("video", []),
            "rows": rep.summary["settings"]["reference_rows"],
            "alpha": [b.get("alpha") for b in rep.summary["budgets"]],
            "m_star": rep.summary["m_star"]["model"]["value"] if rep.summary.get("m_star") else None}


def _data(a: argparse.Namespace) -> tuple[Path, Path]:
    """ShapesWorld probe records at ``--side`` pixels (written once per work directory)."""
    import bench_families

    n = max(a.image_batches, a.video_batches, 16)
    return bench_families.make_data(Path(a.work), a.side, n_images=n, n_videos=n)


def _build(a: argparse.Namespace) -> None:
    from gradprobe.data import shapesworld as sw
    from gradprobe.models.tiny import create_tiny

    ckpt = Path(a.work) / f"qwen2_5_vl-{a.shape}"
    if not (ckpt / "config.json").is_file():
        create_tiny("qwen2_5_vl", ckpt, sw.vocabulary(), shape=a.shape, side=a.side)
    _data(a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=["1b", "tiny"])
    ap.add_argument("--side", type=int, default=56)
    ap.add_argument("--frames", default="4,8")
    ap.add_argument("--image-batches", type=int, default=8)
    ap.add_argument("--video-batches", type=int, default=8)
    ap.add_argument("--sketch", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/gradprobe-scale")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=["plain", "align", "decompose"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        _imports()
        out = {"plain": child_plain, "align": child_align, "decompose": child_decompose}[a.child](a)
        print(json.dumps(out))
        return
    t0 = time.perf_counter()
    _build(a)
    result: dict[str, Any] = {"command": " ".join(["python"] + sys.argv), "shape": a.shape, "side": a.side,
                              "frames": a.frames, "image_batches": a.image_batches,
                              "video_batches": a.video_batches, "build_s": time.perf_counter() - t0}
    for mode in ("plain", "align", "decompose"):
        args = [sys.executable, __file__, "--child", mode] + [x for x in sys.argv[1:] if x != "--out"
                                                              and not x.endswith(".json")]
        t = time.perf_counter()
        res = subprocess.run(args, capture_output=True, text=True)
        if res.returncode != 0:
            result[mode] = {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}
        else:
            result[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        result[mode]["wall_s"] = time.perf_counter() - t
        print(mode, json.dumps(result[mode])[:400], flush=True)
    for mode in ("align", "decompose"):
        if "peak_gib" in result[mode] and "peak_gib" in result["plain"]:
            result[mode]["extra_peak_gib"] = result[mode]["peak_gib"] - result["plain"]["peak_gib"]
    import transformers

    result["env"] = {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "machine": platform.machine(),
                     "threads": a.threads, "memory_gib": _mem_total_gib()}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


if __name__ == "__main__":
    main()
