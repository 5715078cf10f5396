"""`gradprobe align` on a random-weight model of a family, with the family's processors: speed and memory.

Usage (GPU; a 7B shape needs about 16 GB of disk for the checkpoint):
    python benchmarks/bench_families.py --family qwen2_5_vl --shape 7b --frames 8,16,32,64 \
        --out benchmarks/results/families_qwen2_5_vl_7b.json
    python benchmarks/bench_families.py --family qwen2_5_vl --shape 7b --frames 8,16,32,64 --sketch 4194304 \
        --out benchmarks/results/families_qwen2_5_vl_7b_sketch.json
    python benchmarks/bench_families.py --family llava_next_video --shape 7b --frames 8,16,32,64 \
        --out benchmarks/results/families_llava_next_video_7b.json
CPU check of the script itself:
    python benchmarks/bench_families.py --family qwen2_5_vl --shape tiny --device cpu --side 64 --frames 8,16

What it does, in one process:

1. builds the checkpoint with :func:`gradprobe.models.tiny.create_tiny` (random weights initialised on the
   device in the run's dtype; ``7b``: the released 7B shapes and processor pixel settings, tokenizer
   word-level) and saves it with ``save_pretrained``, once per work directory;
2. writes ShapesWorld probe data, with images and 64-frame videos upscaled to ``--side`` pixels;
3. ``plain``: loads the checkpoint with ``from_pretrained`` and times collating the first video batch
   plus a plain forward+backward at each budget (median of ``--repeats``, peak device memory), then
   frees it;
4. ``align``: runs the code path of ``gradprobe align`` (fixed pixel policy, uniform sampler) with a
   progress hook that times every video batch (collation, forward, backward, streamed dots) and reads
   the peak device memory per budget; the first batch of each budget is left out of the median.

The JSON has, per budget: visual tokens, sequence length, pixels per frame, plain seconds and peak GiB,
probed seconds per video batch (median) and peak GiB, and their ratio. A budget that runs out of
memory is recorded as such.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def make_data(work: Path, side: int, n_images: int, n_videos: int, video_format: str = "auto") -> tuple[Path, Path]:
    """ShapesWorld probe data with every image and frame upscaled to side × side; videos as MP4 files or, with
    ``video_format="frames"`` (the default where PyAV is missing), as folders of PNG frames."""
    from PIL import Image

    from gradprobe.data import shapesworld as sw

    if video_format == "auto":
        try:
            import av  # noqa: F401
            video_format = "mp4"
        except ImportError:
            video_format = "frames"
    d = work / f"data-{side}-{n_images}-{n_videos}-{video_format}"
    if (d / "done").is_file():
        return d / "probe_images.jsonl", d / "probe_videos.jsonl"
    imgs, vids = sw.generate(d, n_images=n_images, n_videos=n_videos, seed=0, split="probe", video_format=video_format)

    def up(frame: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(frame).resize((side, side), Image.BICUBIC))

    for line in imgs.read_text().splitlines():
        p = d / json.loads(line)["image"]
        Image.fromarray(up(np.asarray(Image.open(p).convert("RGB")))).save(p)
    for line in vids.read_text().splitlines():
        p = d / json.loads(line)["video"]
        if video_format == "frames":
            for f in sorted(p.iterdir()):
                Image.fromarray(up(np.asarray(Image.open(f).convert("RGB")))).save(f)
        else:
            from gradprobe.data.video import read_frames, write_mp4

            write_mp4(p, np.stack([up(f) for f in read_frames(p)]))
    (d / "done").write_text("")
    return imgs, vids


def checkpoint(work: Path, family: str, shape: str, side: int, device: torch.device, dtype: torch.dtype) -> Path:
    """The random-weight checkpoint of a family at a shape, built with ``create_tiny`` once per work directory."""
    from gradprobe.data import shapesworld as sw
    from gradprobe.models.tiny import create_tiny

    ckpt = work / f"{family}-{shape}-{str(dtype).removeprefix('torch.')}"
    if not (ckpt / "config.json").is_file():
        create_tiny(family, ckpt, sw.vocabulary(), shape=shape, side=side, device=str(device), dtype=dtype)
    return ckpt


class _Timer:
    """A gradprobe Progress that times each step of each phase and reads peak memory per phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: dict[str, list[float]] = {}
        self.peak: dict[str, float | None] = {}
        self._t = 0.0

    def start(self, phase: str, total: int | None) -> None:
        _sync(self.device)
        _reset_peak(self.device)
        self.steps[phase] = []
        self._t = time.perf_counter()

    def advance(self, phase: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.steps[phase].append(now - self._t)
        self._t = now

    def finish(self, phase: str) -> None:
        self.peak[phase] = _peak_gib(self.device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl", "llava_next_video", "llava"])
    ap.add_argument("--shape", default="7b", choices=["7b", "tiny"])
    ap.add_argument("--frames", default="8,16,32,64")
    ap.add_argument("--side", type=int, default=448, help="image and frame side in pixels")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--attn-implementation", default="sdpa")
    ap.add_argument("--image-batches", type=int, default=4)
    ap.add_argument("--video-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sketch", default="auto", help="auto, exact or k buckets (gradprobe align --sketch)")
    ap.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="activation checkpointing (gradprobe align --checkpointing); the plain passes follow "
                         "align's decision, so the ratio compares like with like")
    ap.add_argument("--work", default="/tmp/gradprobe-bench")
    ap.add_argument("--video-format", default="auto", choices=["auto", "mp4", "frames"],
                    help="videos as MP4 files or PNG frame folders (auto: frames where PyAV is missing)")
    ap.add_argument("--include", action="append", default=[], help="regex of parameters to probe (repeatable)")
    ap.add_argument("--decompose", action="store_true",
                    help="also run the code path of gradprobe decompose at the largest budget (time, peak memory)")
    ap.add_argument("--build-only", action="store_true",
                    help="only build the checkpoint and the data (and write the seconds each took)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from gradprobe.models.base import loss_fn, strip_info
    from gradprobe.probe.checkpoint import checkpointed
    from gradprobe.probe.store import resolve_dtype
    from gradprobe.run import AlignOptions, _align_one, _prepare

    device = torch.device(a.device)
    dtype = resolve_dtype(a.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    work = Path(a.work)
    t0 = time.perf_counter()
    ckpt = checkpoint(work, a.family, a.shape, a.side, device, dtype)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    imgs, vids = make_data(work, a.side, n_images=a.image_batches, n_videos=a.video_batches,
                           video_format=a.video_format)
    if a.build_only:
        done = {"command": " ".join(sys.argv), "checkpoint": str(ckpt), "build_seconds": build_s,
                "data_seconds": time.perf_counter() - t0, "checkpoint_bytes": sum(
                    f.stat().st_size for f in ckpt.iterdir() if f.is_file())}
        print(json.dumps(done))
        if a.out:
            Path(a.out).write_text(json.dumps(done, indent=2) + "\n")
        return
    opts = AlignOptions(frames=a.frames, model=str(ckpt), image_data=str(imgs), video_data=str(vids),
                        image_batches=a.image_batches, video_batches=a.video_batches, batch_size=1,
                        video_batch_size=1, device=a.device, dtype=str(dtype).removeprefix("torch."),
                        attn_implementation=a.attn_implementation, n_boot=200, sketch=a.sketch,
                        include=a.include, checkpointing=a.checkpointing)
    prep = _prepare(opts, log=print)

    # plain forward+backward of the first video batch at each budget
    adapter_cls = prep.family.adapter_class()
    model, adapter = adapter_cls.load(ckpt, dtype=dtype, device=str(device), attn_implementation=a.attn_implementation)
    params = sum(p.numel() for p in model.parameters())
    import transformers

    result: dict[str, Any] = {
        "command": " ".join(sys.argv), "stage": "plain",
        "family": a.family, "shape": a.shape, "parameters": params, "side": a.side,
        "dtype": str(dtype).removeprefix("torch."), "attn_implementation": a.attn_implementation,
        "image_batches": a.image_batches, "video_batches": a.video_batches, "batch_size": 1,
        "include": a.include, "build_seconds": build_s, "checkpointing": prep.checkpointing,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()},
    }

    def save(result: dict[str, Any]) -> None:  # after each phase: a run cut short keeps what it measured
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    plain: dict[int, dict[str, Any]] = {}

    def collated(m: int) -> tuple[dict[str, Any], dict[str, Any]]:
        b = adapter.collate(prep.vid_chunks[0], store=prep.store, m=m)
        moved = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
                 for k, v in strip_info(b).items()}
        return moved, dict(b["_gradprobe"])

    with checkpointed(model, prep.checkpointing["on"]):  # the plain passes as align's will run
        for m in prep.frames:
            batch, info = collated(m)
            times = []
            _reset_peak(device)
            try:
                for _ in range(a.repeats):
                    model.zero_grad(set_to_none=True)
                    _sync(device)
                    t = time.perf_counter()
                    batch, _ = collated(m)  # collation is timed on both sides (align collates each batch it reads)
                    loss_fn(model, batch).backward()
                    _sync(device)
                    times.append(time.perf_counter() - t)
                plain[m] = dict(info, plain_s=statistics.median(times), plain_peak_gib=_peak_gib(device))
            except torch.OutOfMemoryError:
                plain[m] = dict(info, plain_s=None, plain_peak_gib=None, plain_error="out of memory")
            model.zero_grad(set_to_none=True)
    result.update(plain=[dict(frames=m, **plain[m]) for m in prep.frames])
    save(result)
    del model, batch
    _reset_peak(device)

    timer = _Timer(device)
    error = None
    try:
        report = _align_one(opts, prep, ckpt, None, timer, print)
        summary = report.summary
    except torch.OutOfMemoryError:
        summary, error = None, "out of memory"
    rows = []
    for m in prep.frames:
        steps = timer.steps.get(f"frames={m}", [])
        probed = statistics.median(steps[1:] or steps) if steps else None  # the first batch also warms up
        row = dict(frames=m, **plain[m], probed_s=probed, probed_peak_gib=timer.peak.get(f"frames={m}"))
        row["ratio"] = probed / row["plain_s"] if probed and row.get("plain_s") else None
        if summary is not None:
            b = next(x for x in summary["budgets"] if x["frames"] == m)
            row.update(mean=b["mean"], ci95_t=b["ci95_t"])
        rows.append(row)
        print(json.dumps(row))
    result.update(stage="align", align_error=error, budgets=rows,
                  sketch=summary["settings"]["sketch"] if summary is not None else None,
                  image_phase_s=sum(timer.steps.get("image", [])), image_peak_gib=timer.peak.get("image"))
    result.pop("plain")
    save(result)
    decompose = None
    if a.decompose:
        from gradprobe.run import DecomposeOptions, run_decompose

        big = max(prep.frames)
        dopts = DecomposeOptions(**{**opts.__dict__, "frames": str(big), "out": str(work / "decompose-out")})
        _reset_peak(device)
        t = time.perf_counter()
        try:
            rep = run_decompose(dopts, log=print)
            _sync(device)
            decompose = {"frames": big, "seconds": time.perf_counter() - t, "peak_gib": _peak_gib(device),
                         "sketch": rep.summary["settings"]["sketch"]}
        except torch.OutOfMemoryError:
            decompose = {"frames": big, "error": "out of memory"}
        print(json.dumps({"decompose": decompose}))
    result.update(stage="done", decompose=decompose)
    save(result)
    if a.out:
        print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
