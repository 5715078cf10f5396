"""The sketch's own work per backward: hashing every element of a model's gradient into k buckets.

Usage (GPU, Qwen2.5-VL-7B's parameter shapes, bf16 gradients):
    python benchmarks/bench_sketch.py --shape 7b --device cuda --out benchmarks/results/sketch_h100.json
CPU (the 1 B shape of benchmarks/bench_scale.py, float32):
    python benchmarks/bench_sketch.py --shape 1b --device cpu --out benchmarks/results/sketch_cpu.json
CPU check of the script itself:
    python benchmarks/bench_sketch.py --shape tiny --device cpu

The parameter shapes come from the model's config on the meta device (no weights are built); every
parameter gets a random gradient of its shape in ``--dtype``. One pass is what the hooks do over a
whole backward: for each parameter, cast the gradient to fp32 and add its sketch into its module's
bucket range (:func:`gradprobe.probe.sketch.sketch_add`, the backend the device gets: Triton on CUDA,
numba on the CPU; ``--backend torch`` for the pure-torch reference). Alongside, as the floor, the time
of reading every gradient once (a sum of squares, which the hooks also compute). Medians of
``--repeats`` passes after one warm-up; the JSON has both, per-element rates and the memory-bandwidth
figure they imply.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the Qwen2.5-VL of that shape, built on the meta device."""
    from gradprobe.data import shapesworld as sw
    from gradprobe.models import tiny

    with torch.device("meta"):
        model, _ = tiny._qwen2_5_vl(sw.vocabulary(), 448, shape)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=["7b", "1b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="gradient dtype (default bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--k", type=int, default=1 << 20)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "numba", "triton"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from gradprobe.probe.select import default_module_of
    from gradprobe.probe.sketch import SketchSpec, sketch_add

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = _shapes(a.shape)
    modules = [default_module_of(n) for n, _ in shapes]
    numel: dict[str, int] = {}
    for m, (_, s) in zip(modules, shapes, strict=True):
        numel[m] = numel.get(m, 0) + int(torch.Size(s).numel())
    spec = SketchSpec.build(list(numel.items()), a.k)
    g = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype) for _, s in shapes]
    plan = spec.plan([n for n, _ in shapes], modules)
    P = sum(x.numel() for x in grads)
    buf = torch.zeros(spec.k, device=device, dtype=torch.float32)

    def sketch_pass() -> None:
        for x, (key, offset, start, width) in zip(grads, plan, strict=True):
            sketch_add(buf, x.reshape(-1).float(), key, offset, start, width, a.backend)

    def read_pass() -> None:
        for x in grads:
            xf = x.reshape(-1).float()
            torch.dot(xf, xf)

    out = {}
    for name, fn in (("read", read_pass), ("sketch", sketch_pass)):
        fn()
        times = []
        for _ in range(a.repeats):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        out[name] = {"median_s": med, "times_s": times, "ns_per_element": med / P * 1e9,
                     "gb_per_s_read": P * grads[0].element_size() / med / 1e9}
        print(name, json.dumps(out[name]))
    result = {
        "command": " ".join(["python"] + sys.argv), "shape": a.shape, "parameters": P, "tensors": len(grads),
        "modules": len(spec.modules), "k": spec.k, "dtype": str(dtype).removeprefix("torch."),
        "backend": a.backend, **out,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": a.threads,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()},
    }
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
