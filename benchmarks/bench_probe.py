"""Cost of one probed gradient against a plain forward+backward of the same batch.

Usage:
    python benchmarks/bench_probe.py [--frames 8,16,32] [--repeats 30] [--sketch K] [--out benchmarks/results/probe_cpu.json]

On the cached toy default (built if needed), for an image batch and a video
batch at each budget, it times, interleaved in one process:

* ``plain``: ``model.zero_grad(); loss_fn(model, batch).backward()``;
* ``probed``: the same batch through :meth:`GradientProbe.run_batch` with the
  reference rows of ``gradprobe align`` (8 image groups) and the running-sum row,
  gradients freed in the hooks; exact rows, or with ``--sketch K`` sketched rows
  (each hook adds its parameter's gradient into the batch's k-bucket sketch).

It reports medians and their ratio. Extra peak memory is measured in two child
processes (plain and probed, same batch) as the difference of their peak RSS,
beside the bytes the reference store itself holds. The JSON it writes carries
an environment record; RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gradprobe.models.base import loss_fn
from gradprobe.probe import GradientProbe, ReferenceStore, select_parameters
from gradprobe.probe.measure import sketch_spec
from gradprobe.probe.store import SketchStore
from gradprobe.toybox import ToySpec, ensure_toy
from gradprobe.train.collate import SampleCollator

GROUPS = 8  # reference rows, as `gradprobe align` keeps by default


def _stores(sel, groups: int, dtype: torch.dtype, k: int | None):
    """Reference rows and the running-sum row, exact or sketched, and the probe that uses them."""
    if k is None:
        return ReferenceStore(sel.params, groups, dtype), ReferenceStore(sel.params, 1, dtype), None
    spec = sketch_spec(sel, k)
    return SketchStore(spec, groups, torch.float32, "cpu"), SketchStore(spec, 1, torch.float32, "cpu"), spec


def _setup(frames: int | None, groups: int, dtype: torch.dtype, store: bool = True, k: int | None = None):
    t = ensure_toy(ToySpec())
    model, toy_adapter = t.load()
    if frames is None:
        batch = SampleCollator(toy_adapter, t.data_dir)(t.samples("probe", "images")[:16])
    else:
        batch = SampleCollator(toy_adapter, t.data_dir, frames=frames)(t.samples("probe", "videos")[:4])
    sel = select_parameters(model)
    if not store:
        return model, batch, None, None, None
    refs, pair, spec = _stores(sel, groups, dtype, k)
    for tns in getattr(refs, "tensors", [getattr(refs, "data", None)]):
        tns.normal_()
    return model, batch, GradientProbe(model, sel, sketch=spec), refs, pair


def _plain(model, batch):
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()


def time_one(frames: int | None, repeats: int, groups: int, dtype: torch.dtype, k: int | None = None) -> dict:
    model, batch, probe, refs, pair = _setup(frames, groups, dtype, k=k)
    plain, probed = [], []
    with probe.attached():
        for _ in range(3):  # warm-up
            _plain(model, batch)
            probe.run_batch(loss_fn, batch, refs=refs, pair_sum=pair)
        for _ in range(repeats):
            t0 = time.perf_counter()
            _plain(model, batch)  # hooks are attached but idle (no job): the plain path
            t1 = time.perf_counter()
            probe.run_batch(loss_fn, batch, refs=refs, pair_sum=pair)
            t2 = time.perf_counter()
            plain.append(t1 - t0)
            probed.append(t2 - t1)
    p, q = statistics.median(plain), statistics.median(probed)
    return {
        "input": "image x16" if frames is None else f"video x4 @ {frames} frames",
        "groups": groups,
        "reference_dtype": str(dtype).removeprefix("torch."),
        "sketch_k": k,
        "plain_s": p,
        "probed_s": q,
        "ratio": q / p,
        "repeats": repeats,
        "store_bytes": refs.nbytes + pair.nbytes,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _child(mode: str, frames: int | None, groups: int, dtype: torch.dtype, k: int | None = None) -> None:
    """Peak resident memory during 3 passes, above the resident memory before the store and passes.

    The process-wide ``ru_maxrss`` is dominated by import-time peaks, so a thread samples the
    current RSS every millisecond instead.
    """
    import threading

    model, batch, _, _, _ = _setup(frames, groups, dtype, store=False)
    _plain(model, batch)  # warm-up: allocator pools, lazy init
    model.zero_grad(set_to_none=True)
    if k is not None:  # the compiled sketch kernel's one-time cost (JIT or loading its cache) is not per row
        from gradprobe.probe.sketch import sketch_add

        sketch_add(torch.zeros(8), torch.ones(4), 0, 0, 0, 8)  # the serial kernel
        sketch_add(torch.zeros(8), torch.ones(4096), 0, 0, 0, 8)  # the threaded one (and its thread pool)
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        if mode == "plain":
            for _ in range(3):
                _plain(model, batch)
        else:
            sel = select_parameters(model)
            refs, pair, spec = _stores(sel, groups, dtype, k)
            probe = GradientProbe(model, sel, sketch=spec)
            with probe.attached():
                for _ in range(3):
                    probe.run_batch(loss_fn, batch, refs=refs, pair_sum=pair)
    finally:
        stop.set()
        th.join()
    print(json.dumps({"peak_above_base_mib": (peak[0] - base) / 2**20}))


def memory_one(frames: int | None, groups: int, dtype: torch.dtype, k: int | None = None) -> dict:
    out = {}
    for mode in ("plain", "probed"):
        args = [sys.executable, __file__, "--child", mode, "--groups", str(groups),
                "--reference-dtype", str(dtype).removeprefix("torch.")]
        args += [] if k is None else ["--sketch", str(k)]
        args += [] if frames is None else ["--frames", str(frames)]
        res = subprocess.run(args, capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "plain_peak_mib": out["plain"]["peak_above_base_mib"],
        "probed_peak_mib": out["probed"]["peak_above_base_mib"],
        "extra_peak_mib": out["probed"]["peak_above_base_mib"] - out["plain"]["peak_above_base_mib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", default="8,16,32")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/probe_cpu.json")
    ap.add_argument("--groups", type=int, default=GROUPS)
    ap.add_argument("--reference-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sketch", type=int, default=None, help="sketched rows with this many buckets (default: exact)")
    ap.add_argument("--child", choices=["plain", "probed"])
    a = ap.parse_args()
    dtype = getattr(torch, a.reference_dtype)
    torch.set_num_threads(a.threads)
    if a.child:
        _child(a.child, int(a.frames) if a.frames.isdigit() else None, a.groups, dtype, a.sketch)
        return
    rows = []
    for f in [None] + [int(x) for x in a.frames.split(",")]:
        row = time_one(f, a.repeats, a.groups, dtype, a.sketch)
        row.update(memory_one(f, a.groups, dtype, a.sketch))
        rows.append(row)
        print(json.dumps(row))
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": a.threads,
        "cuda": torch.cuda.is_available(),
        "command": " ".join(["python"] + sys.argv),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
