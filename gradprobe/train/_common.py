"""Pieces shared by the toy's image stage and the Video-SFT runner."""

from __future__ import annotations

import os
from typing import Any

import torch


def training_args(out_dir: str | os.PathLike[str], *, steps: int, batch_size: int, lr: float, seed: int,
                  **extra: Any) -> Any:
    """AdamW with linear warmup and cosine decay, clipping at 1.0, deterministic CPU-friendly loading."""
    from transformers import TrainingArguments

    options: dict[str, Any] = dict(
        output_dir=str(out_dir),
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
    options.update(extra)
    return TrainingArguments(**options)


def truncate_jsonl(path: str | os.PathLike[str], last_step: int) -> int:
    """Keep only the rows with ``step <= last_step`` of a JSONL file (on resume); return how many remain."""
    import json
    from pathlib import Path

    from gradprobe.outputs import replacing

    p = Path(path)
    if not p.is_file():
        return 0
    keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    with replacing(p) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))
    return len(keep)
