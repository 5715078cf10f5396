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
from gradprobe.data.sampling import check_sampler
from gradprobe.errors import DataError, InputError
from gradprobe.outputs import EVAL_FILE, TRAJECTORY, check_out_dir, read_jsonl
from gradprobe.train.monitor import GUARDS


@dataclass
class SFTOptions:
    """Options of :func:`run_sft` (the command line's ``gradprobe sft``)."""

    out: str
    frames: int | None = 8
    manifest: str | None = None
    sampler: str = "uniform"
    keep_clips: bool | None = None
    model: str | None = None
    video_data: str | None = None
    image_probe: str | None = None
    data_root: str | None = None
    steps: int = 6000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    lora: bool = False
    lora_rank: int = 8
    probe_every: int = 500
    probe_frames: str | None = None
    video_probe: str | None = None
    video_probe_batches: int = 3
    eval_every: int | None = None
    eval_images: int = 300
    eval_videos: int = 400
    eval_image_data: str | None = None
    eval_video_data: str | None = None
    probe_batches: int = 4
    probe_batch_size: int = 8
    guard: str = "observe"
    save_steps: int = 500
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


def _type_summary(rows: list[dict[str, Any]], m: int) -> dict[str, Any]:
    """Per question type: first and last evaluation of the run and their paired change."""
    from gradprobe.train.evaluate import type_changes

    if not rows:
        return {}
    return {kind: type_changes(rows[0], rows[-1], kind, m if kind == "video" else None) for kind in ("image", "video")}


def run_sft(opts: SFTOptions, log: Any = None, progress: Any = None) -> dict[str, Any]:
    """Run Video-SFT with the alignment callback; return the run summary (also in ``<out>/sft_summary.json``).

    Raises:
        GradprobeError: bad options, paths or records.
    """
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    from gradprobe.data.records import read_samples
    from gradprobe.models.registry import family_for, family_named
    from gradprobe.run import DEFAULT_TOY, _chunks
    from gradprobe.toybox import ensure_toy
    from gradprobe.train._common import training_args
    from gradprobe.train.callback import watch
    from gradprobe.train.collate import SampleCollator, SampleDataset

    log = log or (lambda s: None)
    for name in ("steps", "batch_size", "grad_accum", "probe_every", "probe_batches", "probe_batch_size",
                 "save_steps", "lora_rank"):
        check_positive_int(name.replace("_", "-"), getattr(opts, name))
    check_sampler(opts.sampler)
    if opts.guard not in GUARDS:
        raise InputError(f"guard: unknown action {opts.guard!r}; use one of {', '.join(GUARDS)}")
    frames_of = read_manifest(opts.manifest) if opts.manifest else {}
    if opts.frames is None and not frames_of:
        raise InputError("give --frames or --manifest")
    if bool(opts.eval_image_data) != bool(opts.eval_video_data):
        raise InputError("give both --eval-image-data and --eval-video-data")
    given = [opts.model, opts.video_data, opts.image_probe]
    if any(given) and not all(given):
        raise InputError("give all of --model, --video-data and --image-probe, or none of them for the toy default")
    grid: list[int] = []
    if opts.probe_frames:
        from gradprobe._checks import parse_frames

        grid = parse_frames(opts.probe_frames)
        if opts.model and not opts.video_probe:
            raise InputError("--probe-frames needs --video-probe (a JSONL of held-out video records)")
    out = check_out_dir(opts.out)
    last = get_last_checkpoint(str(out)) if opts.resume and out.is_dir() else None
    if opts.resume and last is None:
        raise InputError(f"--resume: no checkpoint-* directory in {out}")
    if not opts.resume and (out / TRAJECTORY).exists():
        raise InputError(f"{out} already holds a run; use --resume to continue it or another --out")
    # the family decides the budget rule: check every budget before any work
    family = family_for(opts.model) if opts.model else family_named("toy")
    cls = family.adapter_class()
    for m in [*([opts.frames] if opts.frames is not None else []), *frames_of.values(), *grid]:
        cls.check_budget(m)
    if not opts.model:
        toy = ensure_toy(DEFAULT_TOY, opts.cache_dir, log=log, progress=progress)
        model_dir, video_path, image_path = toy.model_dir, toy.data("train", "videos"), toy.data("probe", "images")
        eval_paths: tuple[Path, Path] | None = (toy.data("eval", "images"), toy.data("eval", "videos"))
        video_probe_path = toy.data("probe", "videos")
    else:
        model_dir, video_path, image_path = Path(opts.model), Path(opts.video_data), Path(opts.image_probe)
        eval_paths = None
        video_probe_path = Path(opts.video_probe) if opts.video_probe else None
    if opts.eval_image_data:
        eval_paths = (Path(opts.eval_image_data), Path(opts.eval_video_data))
    videos = read_samples(video_path, kind="video").samples
    if frames_of:
        missing = [s.id for s in videos if s.id not in frames_of]
        if missing and opts.frames is None:
            raise DataError(f"{opts.manifest}: no budget for record {missing[0]!r} and no --frames fallback")
    image_chunks = _chunks(read_samples(image_path, kind="image").samples, opts.probe_batch_size,
                           opts.probe_batches, "image", Path(image_path), "--probe-batches")
    eval_sets = None
    if eval_paths is not None:
        eval_sets = (read_samples(eval_paths[0], kind="image").samples[: opts.eval_images],
                     read_samples(eval_paths[1], kind="video").samples[: opts.eval_videos])
    clips = None
    if grid:
        clips = _chunks(read_samples(video_probe_path, kind="video").samples, opts.batch_size,
                        opts.video_probe_batches, "video", video_probe_path, "--batch-size")
    # weights through from_pretrained (the Trainer's own resume does not map Qwen2.5-VL's saved key names)
    if opts.lora:  # a LoRA checkpoint holds the adapters only: base weights from the model, adapters from it
        model, adapter = cls.load(model_dir)
        if last is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, last, is_trainable=True)
        else:
            torch.manual_seed(opts.seed)  # the adapters' initialisation follows the run's seed, not earlier draws
            model = _lora(model, opts.lora_rank)
    else:
        model, adapter = cls.load(last or model_dir)

    def root_of(path: Path) -> Path:
        return Path(opts.data_root) if opts.data_root else Path(path).parent

    collator = SampleCollator(adapter, root_of(video_path), frames=opts.frames, frames_of=frames_of,
                              sampler=opts.sampler,
                              keep_clips=not opts.model if opts.keep_clips is None else opts.keep_clips)
    probe_collate = SampleCollator(adapter, root_of(image_path))
    probe = [probe_collate(chunk) for chunk in image_chunks]
    args = training_args(
        out, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed,
        gradient_accumulation_steps=opts.grad_accum, save_strategy="steps", save_steps=opts.save_steps,
        logging_steps=max(1, min(opts.probe_every, opts.steps // 10 or 1)),
    )
    callbacks: list[Any] = []
    if eval_sets is not None:
        from gradprobe.train.eval_callback import AccuracyCallback

        eval_budget = opts.frames if opts.frames is not None else max(frames_of.values())
        callbacks.append(AccuracyCallback(
            eval_sets[0], eval_sets[1], SampleCollator(adapter, root_of(eval_paths[0])),
            SampleCollator(adapter, root_of(eval_paths[1]), frames=eval_budget, sampler=opts.sampler,
                           keep_clips=True),
            every=opts.eval_every or opts.steps,
        ))
    if family.name == "toy":
        callbacks.append(_MarkToyCheckpoints())
    trainer = Trainer(model=model, args=args, train_dataset=SampleDataset(videos), data_collator=collator,
                      processing_class=adapter.processor, callbacks=callbacks)
    video_probe = None
    if clips is not None:
        video_probe = {
            m: [SampleCollator(adapter, root_of(video_probe_path), frames=m, sampler=opts.sampler)(c) for c in clips]
            for m in grid
        }
    cb = watch(trainer, probe, every=opts.probe_every, guard=opts.guard, role_of=cls.role_of,
               module_of=cls.module_of, video_probe=video_probe)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out / "final"))
    if family.name == "toy":
        from gradprobe.models.toy import mark

        mark(out / "final")
    # the whole run from its files: a resumed run's callbacks hold only the rows since the checkpoint
    evaluations = read_jsonl(out / EVAL_FILE) if eval_sets is not None else []
    summary = {
        "schema": "gradprobe.sft/1",
        "options": asdict(opts),
        "model": str(model_dir),
        "family": family.name,
        "resumed_from": last,
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "seconds": time.time() - t0,
        "guard": {"action": opts.guard, "fired": cb.monitor.fired, "stop_reason": cb.monitor.stop_reason},
        "probes": len(read_jsonl(out / TRAJECTORY)),
        "evaluations": evaluations,
        "types": _type_summary(evaluations, eval_budget) if eval_sets is not None else {},
        "trajectory": str(out / TRAJECTORY),
    }
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
