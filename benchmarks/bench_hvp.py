"""Hessian-vector products: cost per backend against a plain forward+backward, and how many products
Lanczos and power iteration need for β.

Usage:
    python benchmarks/bench_hvp.py --out benchmarks/results/hvp_cpu.json            # the CPU toy
    python benchmarks/bench_hvp.py --shape 7b --device cuda --include 'language_model.layers.(2[0-7])\\.' \
        --out benchmarks/results/hvp_qwen2_5_vl_7b_last8.json                       # GPU, 7B shape, last 8 layers
    python benchmarks/bench_hvp.py --shape 7b --device cuda --out benchmarks/results/hvp_qwen2_5_vl_7b.json
CPU check of the 7B code path at the tiny shape:
    python benchmarks/bench_hvp.py --shape tiny --side 64 --repeats 2

What it does, in one process:

1. ``cost``: for one image batch and one video batch (8 frames), times a plain
   ``zero_grad(); loss.backward()`` and one Hessian-vector product with each backend
   (:class:`gradprobe.estimators.hvp.HessianOperator` over that batch: ``double_backward`` under math
   attention, ``forward_over_reverse``, ``finite_difference`` with the model's attention kernel),
   interleaved, median of ``--repeats`` after a warm-up; on CUDA also the peak memory of each.
2. ``beta`` (CPU toy only): β of the image-loss Hessian (``--beta-batches`` batches). The reference β* is
   a Lanczos run to a residual bound of 1e-9 × β (or 300 products). Then, from ``--seeds`` random start
   vectors, Lanczos and PyHessian's power iteration (tol 1e-3, at most 100 iterations) record β after
   every product; reported: products until the relative error is ≤ 1e-3 for good, and where power
   iteration's own stopping rule stopped and how far from β* it was.

The JSON holds an environment record and every raw timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("double_backward", "forward_over_reverse", "finite_difference")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _env(device: torch.device) -> dict[str, Any]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _load(a: argparse.Namespace) -> tuple[Any, Any, list[Any], list[Any], torch.device]:
    """The model and batches: the cached toy default, or a 7B-shaped random-weight Qwen2.5-VL."""
    from gradprobe.probe.store import resolve_dtype
    from gradprobe.run import DEFAULT_TOY, AlignOptions, _load, _prepare
    from gradprobe.toybox import ensure_toy

    device = torch.device(a.device)
    dtype = resolve_dtype(a.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if a.shape == "toy":
        toy = ensure_toy(DEFAULT_TOY, log=print)
        paths = dict(model=str(toy.model_dir), image_data=str(toy.data("probe", "images")),
                     video_data=str(toy.data("probe", "videos")))
        sizes = dict(batch_size=16, video_batch_size=4)
    else:
        from bench_families import checkpoint, make_data

        work = Path(a.work)
        ckpt = checkpoint(work, "qwen2_5_vl", a.shape, a.side, device, dtype)
        imgs, vids = make_data(work, a.side, n_images=max(2, a.beta_batches), n_videos=2)
        paths = dict(model=str(ckpt), image_data=str(imgs), video_data=str(vids))
        sizes = dict(batch_size=1, video_batch_size=1)
    opts = AlignOptions(frames="8", image_batches=max(1, a.beta_batches), video_batches=1, device=a.device,
                        dtype=str(dtype).removeprefix("torch."), attn_implementation=a.attn_implementation,
                        **paths, **sizes)
    prep = _prepare(opts, log=print)
    model, adapter, images, videos = _load(opts, prep, prep.model_dirs[0], print)
    return model, adapter, images, list(videos[8]), device


def cost(model: Any, adapter: Any, batch: Any, device: torch.device, include: list[str] | None,
         repeats: int) -> dict[str, Any]:
    from gradprobe.estimators.hvp import HessianOperator
    from gradprobe.models.base import loss_fn
    from gradprobe.probe import select_parameters

    sel = select_parameters(model, include=include)
    out: dict[str, Any] = {"params": sel.numel, "tensors": len(sel), "seconds": {}, "peak_gib": {}}
    times: dict[str, list[float]] = {k: [] for k in ("plain", *BACKENDS)}
    gen = torch.Generator().manual_seed(0)
    # the operator's block: eval mode, gradients only for the selection, one exact parameter copy (shared)
    with HessianOperator(model, loss_fn, [batch], sel, backend="finite_difference") as fd:
        v = fd.random(gen)
        others = {b: fd.on([batch]) for b in BACKENDS}
        for b in BACKENDS:
            others[b].backend = b

        def plain() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            model.zero_grad(set_to_none=True)

        runs = {"plain": plain, **{b: (lambda b=b: others[b] @ v) for b in BACKENDS}}
        broken: dict[str, str] = {}
        for name, fn in runs.items():  # warm-up, and find what does not run here
            try:
                fn()
            except (RuntimeError, NotImplementedError) as e:
                broken[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for _ in range(repeats):
            for name, fn in runs.items():
                if name in broken:
                    continue
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                t = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t)
                if device.type == "cuda":
                    out["peak_gib"][name] = max(out["peak_gib"].get(name, 0.0),
                                                torch.cuda.max_memory_allocated(device) / 2**30)
        out["failed"] = broken
    med = {k: statistics.median(v) for k, v in times.items() if v}
    out["seconds"] = med
    out["ratio"] = {k: med[k] / med["plain"] for k in BACKENDS if k in med}
    out["raw"] = times
    return out


def profile(model: Any, batch: Any, include: list[str] | None) -> None:
    from torch.profiler import profile as torch_profile

    from gradprobe.estimators.hvp import HessianOperator
    from gradprobe.models.base import loss_fn
    from gradprobe.probe import select_parameters

    with HessianOperator(model, loss_fn, [batch], select_parameters(model, include=include),
                         backend="double_backward") as H:
        v = H.random(torch.Generator().manual_seed(0))
        H @ v  # warm-up
        with torch_profile() as p:
            H @ v
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def _products_to(history: list[dict[str, float]], ref: float, tol: float) -> int | None:
    """Products after which the relative error of β stays ≤ tol."""
    errs = [abs(h["beta"] - ref) / ref for h in history]
    for k in range(len(errs)):
        if all(e <= tol for e in errs[k:]):
            return int(history[k]["products"])
    return None


def beta_runs(model: Any, images: list[Any], seeds: int) -> dict[str, Any]:
    from gradprobe.estimators.hvp import HessianOperator
    from gradprobe.estimators.spectrum import lanczos, power_iteration
    from gradprobe.models.base import loss_fn
    from gradprobe.probe import select_parameters

    sel = select_parameters(model)
    with HessianOperator(model, loss_fn, images, sel, backend="double_backward") as H:
        t = time.perf_counter()
        ref = lanczos(H.matvec, H.zeros(), max_iter=300, tol=1e-9, seed=1000)
        ref_s = time.perf_counter() - t
        rows = []
        for s in range(seeds):
            lz = lanczos(H.matvec, H.zeros(), max_iter=100, tol=1e-12, seed=s)  # run to the cap: full history
            pw = power_iteration(H.matvec, H.zeros(), max_iter=100, tol=1e-3, seed=s)
            pw_full = power_iteration(H.matvec, H.zeros(), max_iter=100, tol=1e-12, seed=s)
            rows.append({
                "seed": s,
                "lanczos_products_to_1e-3": _products_to(lz.history, ref.beta, 1e-3),
                "power_products_to_1e-3": _products_to(pw_full.history, ref.beta, 1e-3),
                "power_stopped_at": pw.products, "power_rel_error_at_stop": abs(pw.beta - ref.beta) / ref.beta,
                "lanczos_history": lz.history, "power_history": pw_full.history,
            })
    return {"reference": {**ref.to_dict(history=False), "seconds": ref_s}, "batches": len(images),
            "params": sel.numel, "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="toy", choices=["toy", "tiny", "7b"],
                    help="toy: the cached toy default; tiny / 7b: a random-weight Qwen2.5-VL of that shape")
    ap.add_argument("--side", type=int, default=448, help="image and frame side for tiny / 7b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--attn-implementation", default="sdpa")
    ap.add_argument("--include", action="append", default=None, help="regex of parameters (repeatable)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--beta-batches", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--no-beta", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="print the torch.profiler table of one double_backward product on the image batch")
    ap.add_argument("--work", default="/tmp/gradprobe-bench")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    model, adapter, images, videos, device = _load(a)
    result: dict[str, Any] = {"env": _env(device), "args": vars(a),
                              "model_params": sum(p.numel() for p in model.parameters())}
    result["cost"] = {
        "image": cost(model, adapter, images[0], device, a.include, a.repeats),
        "video_m8": cost(model, adapter, videos[0], device, a.include, a.repeats),
    }
    for k, v in result["cost"].items():
        print(k, {n: round(x, 4) for n, x in v["seconds"].items()}, {n: round(x, 2) for n, x in v["ratio"].items()},
              v["peak_gib"], v["failed"])
    if a.profile:
        profile(model, images[0], a.include)
    if not a.no_beta and a.shape == "toy":
        result["beta"] = beta_runs(model, images[: a.beta_batches], a.seeds)
        for r in result["beta"]["runs"]:
            print({k: v for k, v in r.items() if not k.endswith("history")})
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
