"""Image-stage training of the toy with transformers' ``Trainer``."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

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
) -> dict[str, Any]:
    """Train on image samples (collated by the family's adapter) with AdamW, linear warmup and cosine
    decay; deterministic on CPU.

    Returns:
        ``{"final_loss", "seconds"}``.
    """
    from transformers import Trainer

    args = training_args(out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=SampleDataset(samples),
        data_collator=SampleCollator(adapter, root),
    )
    t0 = time.time()
    out = trainer.train()
    return {"final_loss": float(out.training_loss), "seconds": time.time() - t0}
