"""Training slowdown from the alignment callback on the toy Video-SFT run.

Usage:
    python benchmarks/bench_callback.py [--steps 100] [--every 50] [--frames 8] [--out benchmarks/results/callback_cpu.json]

Trainer runs of the same Video-SFT (toy default, train videos at ``--frames``, batch 4,
same seed), timed by the Trainer's own ``train_runtime``:

* ``plain``: no callback;
* ``observe``: the callback probing every ``--every`` steps (K = 4 image batches of 8);
* ``project``: the same with the ``project`` guard, which also dots and projects on every
  step against the latest image probe gradient.

Besides the slowdowns it times the per-step work of the guard itself (the dot of the update
with the reference rows and the projection, measured inside ``before_step`` on non-probe
steps) as a share of the mean plain step. One plain run is discarded as warm-up; then
``--rounds`` interleaved rounds of the three modes run and the fastest run of each is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from transformers import Trainer

from gradprobe.models import toy as adapter
from gradprobe.toybox import ToySpec, ensure_toy
from gradprobe.train._common import training_args
from gradprobe.train.callback import watch
from gradprobe.train.collate import SampleCollator, SampleDataset


def run(mode: str, steps: int, every: int, frames: int, out: Path) -> dict:
    t = ensure_toy(ToySpec())
    model, toy_adapter = t.load()
    videos = t.samples("train", "videos")
    images = t.samples("probe", "images")[:32]
    coll = SampleCollator(toy_adapter, t.data_dir)
    probe = [coll(images[i : i + 8]) for i in range(0, 32, 8)]
    args = training_args(out, steps=steps, batch_size=4, lr=1e-4, seed=0, logging_steps=steps)
    trainer = Trainer(model=model, args=args, train_dataset=SampleDataset(videos),
                      data_collator=SampleCollator(toy_adapter, t.data_dir, frames=frames))
    guard_times: list[float] = []
    if mode != "plain":
        cb = watch(trainer, probe, every=every, guard="observe" if mode == "observe" else "project",
                   role_of=adapter.role_of, module_of=adapter.module_of)
        original = cb.on_pre_optimizer_step

        def timed(args_, state, control, **kw):
            t0 = time.perf_counter()
            original(args_, state, control, **kw)
            if state.global_step % every:  # non-probe step: only the guard's dot (and projection)
                guard_times.append(time.perf_counter() - t0)

        cb.on_pre_optimizer_step = timed
    out_ = trainer.train()
    return {"mode": mode, "train_runtime_s": out_.metrics["train_runtime"], "steps": steps,
            "guard_step_s": (sum(guard_times) / len(guard_times)) if guard_times else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/callback_cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ap_rounds = a.rounds
    best: dict[str, dict] = {}
    with TemporaryDirectory() as tmp:
        run("plain", a.steps, a.every, a.frames, Path(tmp) / "warmup")  # discarded: lazy init, caches
        for r in range(ap_rounds):  # interleaved rounds; the fastest run of each mode is kept
            for mode in ("plain", "observe", "project"):
                res = run(mode, a.steps, a.every, a.frames, Path(tmp) / f"{mode}{r}")
                print(json.dumps(res))
                if mode not in best or res["train_runtime_s"] < best[mode]["train_runtime_s"]:
                    best[mode] = res
    rows = [best[m] for m in ("plain", "observe", "project")]
    plain = rows[0]["train_runtime_s"]
    step = plain / a.steps
    for r in rows:
        r["slowdown"] = r["train_runtime_s"] / plain - 1
        if r["guard_step_s"] is not None:
            r["guard_share_of_step"] = r["guard_step_s"] / step
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": a.threads,
           "cuda": torch.cuda.is_available(), "command": " ".join(["python"] + sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
