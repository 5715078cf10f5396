"""The learnability guard's recipe (tests/test_toy_learns.py) over seeds, samplers and hosts: restricted accuracy
of the tiny toy on held-out ``order`` clips after short Video-SFT runs from ordered frames and from static ones.

    python benchmarks/learnability.py --samplers uniform --seeds 0,1,2,3,4,5 --eval-every 100 \
        --out benchmarks/results/learnability/uniform.json --markdown
    python benchmarks/learnability.py --samplers static --seeds 0,1,2 --eval-every 100 \
        --out benchmarks/results/learnability/static.json --markdown
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/learnability.py --samplers uniform --seeds 2 --eval-every 100 \
        --out benchmarks/results/learnability/uniform-avx2.json          # another kernel set; --threads 2 too

Each run is :func:`gradprobe.experiments.learnability.run` with the guard's :class:`Recipe` (``--steps`` and
``--lr`` change it), from the tiny toy the tests build (:data:`gradprobe.toybox.TINY`, cached in
``--cache-dir``), one thread unless ``--threads``. The JSON holds every run (start, end, paired change, the
accuracy at every ``--eval-every`` steps), whether each learned, the verdict over the seeds per sampler, and an
environment record (CPU, kernel set, threads, versions).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from gradprobe.experiments.learnability import Recipe, learned, learns, make_data, run
from gradprobe.toybox import TINY, default_cache_dir, ensure_toy


def environment(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": cpu, "kernels": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"), "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def markdown(results: list[dict], recipe: Recipe) -> str:
    lines = ["| sampler | seed | start | end | change [95% CI] | learned |", "|---|---|---|---|---|---|"]
    for r in results:
        lo, hi = r["change"]["ci95"]
        lines.append(f"| {r['sampler']} | {r['seed']} | {r['first']:.2f} | {r['last']:.2f} | "
                     f"{r['change']['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {'yes' if learned(r, recipe) else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samplers", default="uniform,static")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=Recipe.steps)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="where the tiny toy is built (default: gradprobe's cache)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--markdown", action="store_true", help="print the runs as a markdown table on stdout")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    recipe = dataclasses.replace(Recipe(), steps=a.steps, lr=a.lr)
    cache = Path(a.cache_dir) if a.cache_dir else default_cache_dir()
    toy = ensure_toy(TINY, cache)
    data = make_data(recipe, cache / f"learnability-{recipe.qtype}-{recipe.data_seed}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for sampler in a.samplers.split(","):
            for seed in (int(s) for s in a.seeds.split(",")):
                print(f"{sampler} seed {seed}", file=sys.stderr)
                with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs: stdout is the table
                    r = run(toy, recipe, data, Path(tmp) / f"{sampler}-{seed}", sampler=sampler, seed=seed,
                            eval_every=a.eval_every)
                results.append({**r, "learned": learned(r, recipe)})
    samplers = dict.fromkeys(r["sampler"] for r in results)
    out = {"recipe": dataclasses.asdict(recipe), "environment": environment(a.threads), "runs": results,
           "learns": {s: learns([r for r in results if r["sampler"] == s], recipe) for s in samplers}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    if a.markdown:
        print(markdown(results, recipe))


if __name__ == "__main__":
    main()
