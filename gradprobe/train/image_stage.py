"""Image-stage training of the toy with transformers' ``Trainer``."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class _Records(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.records[i]


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
    from transformers import Trainer, TrainingArguments

    from gradprobe.models.toy import ToyCollator

    args = TrainingArguments(
        output_dir=str(Path(out_dir)),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Records(records),
        data_collator=ToyCollator(processor, root),
    )
    t0 = time.time()
    out = trainer.train()
    return {"final_loss": float(out.training_loss), "seconds": time.time() - t0}
