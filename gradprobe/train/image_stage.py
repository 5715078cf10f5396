"""Image-stage training of the toy with transformers' ``Trainer``."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from gradprobe.data.records import Sample
from gradprobe.train._common import training_args
from gradprobe.train.collate import SampleCollator, SampleDataset


def train_image_stage(
    model: torch.nn.Module,
    adapter: Any,
    samples: Sequence[Sample],
    root: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Any = None,
) -> dict[str, Any]:
    """Train on image samples (collated by the family's adapter) with AdamW, linear warmup and cosine
    decay; deterministic on CPU.

    Returns:
        ``{"final_loss", "seconds"}``.
    """
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    args = training_args(out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=SampleDataset(samples),
        data_collator=SampleCollator(adapter, root),
        callbacks=[StepProgress(progress, "building the toy: image stage")] if progress is not None else None,
    )
    if progress is not None:  # the bar replaces the printed loss dicts
        trainer.remove_callback(PrinterCallback)
    t0 = time.time()
    out = trainer.train()
    return {"final_loss": float(out.training_loss), "seconds": time.time() - t0}


class StepProgress(TrainerCallback):
    """Advances a :class:`~gradprobe.probe.measure.Progress` phase at each optimizer step."""

    def __init__(self, progress: Any, phase: str) -> None:
        self.progress, self.phase = progress, phase

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.start(self.phase, state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.advance(self.phase)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.finish(self.phase)
