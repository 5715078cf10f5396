"""The alignment callback's share of a Video-SFT training step on a family checkpoint (the 7B shape on a GPU).

Usage (GPU; builds the same random-weight checkpoint as ``bench_families.py``):
    python benchmarks/bench_trainstep.py --family qwen2_5_vl --shape 7b --device cuda --frames 8 --steps 12 \
        --every 4 --sketch 4194304 --out benchmarks/results/trainstep_qwen2_5_vl_7b.json
CPU check of the script itself:
    python benchmarks/bench_trainstep.py --shape tiny --device cpu --side 64 --steps 6 --every 3

In one process, with one loaded model, two ``transformers.Trainer`` runs of the same Video-SFT (AdamW, batch 1
clip at ``--frames``, ShapesWorld data upscaled to ``--side`` pixels):

* ``plain``: no callback;
* ``observe``: :func:`gradprobe.train.callback.watch` probing every ``--every`` steps against K image batches
  (the sketch as given, ``--sketch``).

Every optimizer step is timed from ``on_step_begin`` to ``on_step_end`` with the device synchronised (the
callback's probe runs inside the step, in ``on_pre_optimizer_step``). The first ``--warmup`` steps of each run
are left out. The JSON has the median plain step, the median probe step and non-probe step of ``observe``,
the peak device memory of each run, and the callback's share of training time at ``--every``:
(probe extra + (every − 1) · non-probe extra) / (every · plain step).
"""

from __future__ import annotations

import argparse
import gc
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

from bench_families import _peak_gib, _reset_peak, _sync, checkpoint, make_data  # noqa: E402


def _step_timer(device: torch.device) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            self._t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            self.seconds.append(time.perf_counter() - self._t)

    return StepTimer()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl", "llava_next_video", "llava"])
    ap.add_argument("--shape", default="7b", choices=["7b", "tiny"])
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each run")
    ap.add_argument("--image-batches", type=int, default=4, help="K, the probe's image batches (one image each)")
    ap.add_argument("--sketch", default="4194304", help="the callback's sketch: exact, auto or k buckets")
    ap.add_argument("--work", default="/tmp/gradprobe-bench")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.every < 2 or a.steps < a.warmup + a.every:
        ap.error("need --every >= 2 and --steps >= --warmup + --every (a probe step and non-probe steps to time)")

    import transformers
    from transformers import Trainer

    from gradprobe.data.records import read_samples
    from gradprobe.models.registry import family_named
    from gradprobe.probe.store import resolve_dtype
    from gradprobe.train._common import training_args
    from gradprobe.train.callback import watch
    from gradprobe.train.collate import SampleCollator, SampleDataset

    device = torch.device(a.device)
    dtype = resolve_dtype(a.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    work = Path(a.work)
    ckpt = checkpoint(work, a.family, a.shape, a.side, device, dtype)
    imgs, vids = make_data(work, a.side, n_images=a.image_batches, n_videos=4)
    cls = family_named(a.family).adapter_class()
    model, adapter = cls.load(ckpt, dtype=dtype, device=str(device), attn_implementation="sdpa")
    model.train()
    images = read_samples(imgs, kind="image").samples[: a.image_batches]
    videos = read_samples(vids, kind="video").samples
    probe = [SampleCollator(adapter, imgs.parent)([s]) for s in images]
    result: dict[str, Any] = {
        "command": " ".join(["python"] + sys.argv), "family": a.family, "shape": a.shape,
        "parameters": sum(p.numel() for p in model.parameters()), "side": a.side, "frames": a.frames,
        "dtype": str(dtype).removeprefix("torch."), "steps": a.steps, "every": a.every, "warmup": a.warmup,
        "image_batches": a.image_batches, "sketch": a.sketch, "runs": {},
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()},
    }

    def save() -> None:
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    for mode in ("plain", "observe"):
        args = training_args(work / f"trainstep-{mode}", steps=a.steps, batch_size=1, lr=1e-5, seed=0,
                             logging_steps=a.steps)
        trainer = Trainer(model=model, args=args, train_dataset=SampleDataset(videos),
                          data_collator=SampleCollator(adapter, vids.parent, frames=a.frames))
        timer = _step_timer(device)
        trainer.add_callback(timer)
        cb = None
        if mode == "observe":
            cb = watch(trainer, probe, every=a.every, guard="observe", role_of=cls.role_of,
                       module_of=cls.module_of, sketch=a.sketch)
        _reset_peak(device)
        trainer.train()
        steps = timer.seconds
        probed = {r["step"] for r in cb.monitor.rows} if cb is not None else set()
        # step i (0-based) of the timer is the optimizer step at global_step i, which the monitor names i
        kept = [(i, s) for i, s in enumerate(steps) if i >= a.warmup]
        row: dict[str, Any] = {"step_s": steps, "peak_gib": _peak_gib(device)}
        if cb is None:
            row["median_step_s"] = statistics.median(s for _, s in kept)
        else:
            row["probe_steps"] = sorted(probed)
            row["median_probe_step_s"] = statistics.median([s for i, s in kept if i in probed] or [float("nan")])
            row["median_other_step_s"] = statistics.median([s for i, s in kept if i not in probed] or [float("nan")])
            row["sketch"] = cb.monitor.sketch_reason
        result["runs"][mode] = row
        save()
        print(json.dumps({mode: {k: v for k, v in row.items() if k != "step_s"}}))
        trainer.accelerator.free_memory()  # the optimizer's state goes before the next run builds its own
        trainer.optimizer = trainer.lr_scheduler = None
        del trainer, timer, cb
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model.zero_grad(set_to_none=True)

    plain = result["runs"]["plain"]["median_step_s"]
    obs = result["runs"]["observe"]
    extra_probe = obs["median_probe_step_s"] - plain
    extra_other = obs["median_other_step_s"] - plain
    result["probe_step_ratio"] = obs["median_probe_step_s"] / plain
    result["other_step_ratio"] = obs["median_other_step_s"] / plain
    result["share_of_training"] = (extra_probe + (a.every - 1) * extra_other) / (a.every * plain)
    save()
    print(json.dumps({k: result[k] for k in ("probe_step_ratio", "other_step_ratio", "share_of_training")}))


if __name__ == "__main__":
    main()
