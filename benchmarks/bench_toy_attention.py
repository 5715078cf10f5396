"""The toy's Video-SFT step with transformers' chunk-by-chunk vision attention and with the toy's batched one.

Usage (on quiet cores; the cached toy default is built if missing):
    python benchmarks/bench_toy_attention.py --frames 8,64 --threads 2 \
        --out benchmarks/results/toy_attention_cpu.json
CPU check of the script itself (a toy of a few steps and clips):
    python benchmarks/bench_toy_attention.py --tiny --frames 4 --repeats 1 --warmup 0 --cache-dir /tmp/toys

On the toy as :meth:`gradprobe.models.toy.ToyAdapter.load` returns it, one forward, backward and AdamW step on
a batch of 8 training clips at each budget (the trap's recipe), alternating the two forwards of the vision
attention (``chunked``: transformers' ``Qwen2_5_VLVisionAttention.forward``, one SDPA call per ``cu_seqlens``
chunk; ``batched``: :func:`gradprobe.models.toy.batch_vision_attention`, one call) ``--repeats`` times after
``--warmup`` steps each. The JSON has the median step of each and their ratio; the largest difference of the
logits and gradients between the two on the first batch is recorded as well.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _step(model: torch.nn.Module, batch: dict[str, Any], how: str,
          opt: torch.optim.Optimizer | None = None) -> tuple[list[torch.Tensor], float]:
    """One forward and backward with the ``how`` vision attention, and the seconds it took; with ``opt`` an
    optimizer step as well (timed, nothing returned), without it the logits and gradients."""
    from gradprobe.models.toy import chunked_vision_attention

    with chunked_vision_attention(model) if how == "chunked" else contextlib.nullcontext():
        t0 = time.perf_counter()
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        if opt is not None:
            opt.step()
        seconds = time.perf_counter() - t0
    if opt is not None:
        return [], seconds
    return [out.logits.detach()] + [q.grad.clone() for q in model.parameters()], seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default="8,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cache-dir")
    p.add_argument("--tiny", action="store_true", help="a toy of a few steps and clips (checks the script)")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from gradprobe.toybox import ToySpec, ensure_toy
    from gradprobe.train.collate import SampleCollator

    spec = ToySpec(steps=2, n_train_images=16, n_eval_images=8, n_probe_images=8, n_train_videos=a.batch_size,
                   n_eval_videos=4, n_probe_videos=4) if a.tiny else ToySpec()
    toy = ensure_toy(spec, cache_dir=a.cache_dir, log=lambda s: print(s, file=sys.stderr))
    model, adapter = toy.load()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    clips = toy.samples("train", "videos")[: a.batch_size]
    rows = []
    for m in (int(x) for x in a.frames.split(",")):
        batch = SampleCollator(adapter, toy.data_dir, frames=m, keep_clips=True)(clips)
        got = {how: _step(model, batch, how)[0] for how in ("batched", "chunked")}
        diff = max(float((x - y).abs().max()) for x, y in zip(got["batched"], got["chunked"], strict=True))
        times: dict[str, list[float]] = {"batched": [], "chunked": []}
        for i in range(a.warmup + a.repeats):
            for how in ("batched", "chunked"):
                seconds = _step(model, batch, how, opt)[1]
                if i >= a.warmup:
                    times[how].append(seconds)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"frames": m, "chunked_ms": 1e3 * med["chunked"], "batched_ms": 1e3 * med["batched"],
                     "ratio": med["batched"] / med["chunked"], "max_abs_difference": diff})
        print(f"m = {m}: chunked {rows[-1]['chunked_ms']:.1f} ms, batched {rows[-1]['batched_ms']:.1f} ms, "
              f"ratio {rows[-1]['ratio']:.3f}, largest difference {diff:.3g}")
    result = {"rows": rows, "toy": toy.spec.key, "threads": a.threads, "batch_size": a.batch_size, "repeats": a.repeats,
              "torch": torch.__version__, "platform": platform.platform(), "python": platform.python_version()}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
