"""``gradprobe sft``: Video-SFT with transformers' ``Trainer``, watched by the alignment callback.

Trains on LLaVA-style video records with a fixed frame budget (``frames``) or per-sample
budgets from a manifest (JSONL lines ``{"id", "frames"}``), full fine-tuning or LoRA
(peft). Every ``probe_every`` optimizer steps an :class:`AlignmentCallback` measures the
alignment of the run's update with a held-out image probe gradient; rows go to
``<out>/gradprobe_trajectory.jsonl``. Checkpoints are the Trainer's own; ``resume``
continues from the last one in ``out``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gradprobe._checks import check_positive_int
from gradprobe.errors import DataError, InputError
from gradprobe.outputs import TRAJECTORY
from gradprobe.train.monitor import GUARDS


@dataclass
class SFTOptions:
    """Options of :func:`run_sft` (the command line's ``gradprobe sft``)."""

    out: str
    frames: int | None = 8
    manifest: str | None = None
    model: str | None = None
    video_data: str | None = None
    image_probe: str | None = None
    data_root: str | None = None
    steps: int = 60
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    lora: bool = False
    lora_rank: int = 8
    probe_every: int = 10
    probe_frames: str | None = None
    video_probe: str | None = None
    video_probe_batches: int = 3
    eval_every: int | None = None
    eval_images: int = 200
    eval_videos: int = 64
    eval_image_data: str | None = None
    eval_video_data: str | None = None
    probe_batches: int = 4
    probe_batch_size: int = 8
    guard: str = "observe"
    save_steps: int = 20
    seed: int = 0
    resume: bool = False
    cache_dir: str | None = None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, int]:
    """Per-sample frame budgets: JSONL lines ``{"id": ..., "frames": m}``.

    Raises:
        DataError: missing file, bad line, or a non-positive budget.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: manifest not found")
    out: dict[str, int] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rid, m = str(rec["id"]), rec["frames"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{p}:{n}: expected a JSON object with 'id' and 'frames'") from None
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise DataError(f"{p}:{n}: frames must be a positive integer, got {m!r}")
        out[rid] = m
    if not out:
        raise DataError(f"{p}: manifest is empty")
    return out


def _lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    return get_peft_model(model, cfg)


def _MarkToyCheckpoints() -> Any:
    """A callback that marks each saved checkpoint as the toy's, so `gradprobe align --model` on the
    checkpoints of a run picks the toy adapter."""
    from transformers import TrainerCallback

    from gradprobe.models.toy import mark

    class MarkToyCheckpoints(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            d = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if d.is_dir():
                mark(d)

    return MarkToyCheckpoints()


def run_sft(opts: SFTOptions, log: Any = None) -> dict[str, Any]:
    """Run Video-SFT with the alignment callback; return the run summary (also in ``<out>/sft_summary.json``).

    Raises:
        GradprobeError: bad options, paths or records.
    """
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    from gradprobe.models import toy as adapter
    from gradprobe.run import DEFAULT_TOY, _chunks
    from gradprobe.toybox import ensure_toy
    from gradprobe.train._common import Records, training_args
    from gradprobe.train.callback import watch

    log = log or (lambda s: None)
    for name in ("steps", "batch_size", "grad_accum", "probe_every", "probe_batches", "probe_batch_size",
                 "save_steps", "lora_rank"):
        check_positive_int(name.replace("_", "-"), getattr(opts, name))
    if opts.guard not in GUARDS:
        raise InputError(f"guard: unknown action {opts.guard!r}; use one of {', '.join(GUARDS)}")
    frames_of = read_manifest(opts.manifest) if opts.manifest else {}
    if opts.frames is None and not frames_of:
        raise InputError("give --frames or --manifest")
    given = [opts.model, opts.video_data, opts.image_probe]
    if not any(given):
        toy = ensure_toy(DEFAULT_TOY, opts.cache_dir, log=log)
        model_dir, video_path, image_path = toy.model_dir, toy.data("train", "videos"), toy.data("probe", "images")
        eval_paths = (toy.data("eval", "images"), toy.data("eval", "videos"))
        video_probe_path = toy.data("probe", "videos")
    elif all(given):
        model_dir, video_path, image_path = Path(opts.model), Path(opts.video_data), Path(opts.image_probe)
        eval_paths = None
        video_probe_path = Path(opts.video_probe) if opts.video_probe else None
    else:
        raise InputError("give all of --model, --video-data and --image-probe, or none of them for the toy default")
    from gradprobe.models.registry import family_for

    family = family_for(Path(model_dir)).name
    if family != "toy":
        raise InputError(
            f"{model_dir}: gradprobe sft drives the toy's ShapesWorld collator; for a {family} checkpoint attach "
            "the alignment callback (gradprobe.watch) to your own Trainer"
        )
    videos = adapter.read_records(video_path)
    if not all("video" in r for r in videos):
        raise DataError(f"{video_path}: every record must have a 'video' field")
    if frames_of:
        missing = [r.get("id") for r in videos if str(r.get("id")) not in frames_of]
        if missing and opts.frames is None:
            raise DataError(f"{opts.manifest}: no budget for record {missing[0]!r} and no --frames fallback")
    image_chunks = _chunks(adapter.read_records(image_path), opts.probe_batch_size, opts.probe_batches, "image",
                           Path(image_path), "--probe-batches")
    out = Path(opts.out)
    last = get_last_checkpoint(str(out)) if opts.resume and out.is_dir() else None
    if opts.resume and last is None:
        raise InputError(f"--resume: no checkpoint-* directory in {out}")
    if not opts.resume and (out / TRAJECTORY).exists():
        raise InputError(f"{out} already holds a run; use --resume to continue it or another --out")
    # weights through from_pretrained (the Trainer's own resume does not map Qwen2.5-VL's saved key names)
    if opts.lora:  # a LoRA checkpoint holds the adapters only: base weights from the model, adapters from it
        model, processor = adapter.load(model_dir)
        if last is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, last, is_trainable=True)
        else:
            model = _lora(model, opts.lora_rank)
    else:
        model, processor = adapter.load(last or model_dir)
    video_root = Path(opts.data_root) if opts.data_root else Path(video_path).parent
    image_root = Path(opts.data_root) if opts.data_root else Path(image_path).parent
    collator = adapter.ToyCollator(processor, video_root, frames=opts.frames, frames_of=frames_of)
    probe_collate = adapter.ToyCollator(processor, image_root)
    probe = [probe_collate(chunk) for chunk in image_chunks]
    args = training_args(
        out, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed,
        gradient_accumulation_steps=opts.grad_accum, save_strategy="steps", save_steps=opts.save_steps,
        logging_steps=max(1, min(opts.probe_every, opts.steps // 10 or 1)),
    )
    if opts.eval_image_data or opts.eval_video_data:
        if not (opts.eval_image_data and opts.eval_video_data):
            raise InputError("give both --eval-image-data and --eval-video-data")
        eval_paths = (Path(opts.eval_image_data), Path(opts.eval_video_data))
    callbacks = []
    if eval_paths is not None:
        from gradprobe.train.eval_callback import AccuracyCallback

        eval_budget = opts.frames if opts.frames is not None else max(frames_of.values())
        callbacks.append(AccuracyCallback(
            adapter.read_records(eval_paths[0])[: opts.eval_images],
            adapter.read_records(eval_paths[1])[: opts.eval_videos],
            adapter.ToyCollator(processor, Path(opts.data_root) if opts.data_root else eval_paths[0].parent),
            adapter.ToyCollator(processor, Path(opts.data_root) if opts.data_root else eval_paths[1].parent,
                                frames=eval_budget),
            every=opts.eval_every or opts.probe_every,
        ))
    callbacks.append(_MarkToyCheckpoints())
    trainer = Trainer(model=model, args=args, train_dataset=Records(videos), data_collator=collator,
                      processing_class=processor, callbacks=callbacks)
    video_probe = None
    if opts.probe_frames:
        from gradprobe._checks import parse_frames

        grid = parse_frames(opts.probe_frames)
        for m in grid:
            adapter.check_budget(m)
        if video_probe_path is None:
            raise InputError("--probe-frames needs --video-probe (a JSONL of held-out video records)")
        clips = _chunks(adapter.read_records(video_probe_path), opts.batch_size, opts.video_probe_batches, "video",
                        video_probe_path, "--batch-size")
        vroot = Path(opts.data_root) if opts.data_root else video_probe_path.parent
        cache: dict[str, Any] = {}
        video_probe = {
            m: [adapter.ToyCollator(processor, vroot, frames=m, cache=cache)(c) for c in clips] for m in grid
        }
    cb = watch(trainer, probe, every=opts.probe_every, guard=opts.guard, role_of=adapter.role_of,
               module_of=adapter.module_of, video_probe=video_probe)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out / "final"))
    adapter.mark(out / "final")
    summary = {
        "schema": "gradprobe.sft/1",
        "options": asdict(opts),
        "model": str(model_dir),
        "resumed_from": last,
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "seconds": time.time() - t0,
        "guard": {"action": opts.guard, "fired": cb.monitor.fired, "stop_reason": cb.monitor.stop_reason},
        "probes": len(cb.monitor.rows),
        "evaluations": callbacks[0].rows if eval_paths is not None else [],
        "trajectory": str(out / TRAJECTORY),
    }
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
