"""Image-stage training of the toy with transformers' ``Trainer``."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradprobe.train._common import Records, training_args


def train_image_stage(
    model: torch.nn.Module,
    processor: Any,
    records: Sequence[Mapping[str, Any]],
    root: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """Train on image records with AdamW, linear warmup and cosine decay; deterministic on CPU.

    Returns:
        ``{"final_loss", "seconds"}``.
    """
    from transformers import Trainer

    from gradprobe.models.toy import ToyCollator

    args = training_args(out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Records(records),
        data_collator=ToyCollator(processor, root),
    )
    t0 = time.time()
    out = trainer.train()
    return {"final_loss": float(out.training_loss), "seconds": time.time() - t0}
