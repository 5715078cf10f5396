"""The alignment callback inside transformers' Trainer on the toy (a tiny Qwen2.5-VL through its processor and
collator), in one process or under torchrun with accelerate's FSDP2 or DeepSpeed ZeRO-3 (gloo).

Run as ``python dist_toy_trainer_worker.py OUT HOW TOY_ROOT`` or under ``python -m torch.distributed.run
--nproc_per_node 2``. HOW: ``single`` (float64, clipping at 1.0) and its sharded twin ``fsdp2``; ``single32``
(float32, no clipping) and its twin ``zero3`` (DeepSpeed takes float32 modules only and clips inside its own
step, after the callback). The global batch is 4 clips at 2 frames (4 per device alone, 2 per device on two
ranks); the probe has 4 image groups of 2 batches of 2 images, rank r taking batch r of each group.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_trainer_worker import stack_options, train_and_report
from dist_worker import exit_now

from gradprobe.models.toy import ToyAdapter
from gradprobe.train.callback import watch
from gradprobe.train.collate import SampleCollator, SampleDataset


def main(out: str, how: str, toy_root: str) -> None:
    from transformers import Trainer, TrainingArguments

    from gradprobe.data.records import read_samples

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    root = Path(toy_root)
    dtype = torch.float32 if how in ("zero3", "single32") else torch.float64
    model, adapter = ToyAdapter.load(root / "model", dtype=dtype, device="cpu")
    videos = read_samples(root / "data" / "train_videos.jsonl").samples[:24]
    images = read_samples(root / "data" / "probe_images.jsonl").samples[:16]
    batches = [SampleCollator(adapter, root / "data")(images[i : i + 2]) for i in range(0, 16, 2)]
    batches = [{k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in b.items()}
               for b in batches]
    mine = batches if world == 1 else [batches[2 * g + rank] for g in range(4)]
    extra = stack_options(how)  # FSDP2 wraps each decoder and vision block (_no_split_modules), then the root
    args = TrainingArguments(
        output_dir=out, max_steps=4, per_device_train_batch_size=4 // world, learning_rate=0.05,
        lr_scheduler_type="constant", max_grad_norm=0.0 if how in ("zero3", "single32") else 1.0,
        report_to="none", save_strategy="no", seed=0, use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, logging_steps=1, optim="sgd", **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=SampleDataset(videos),
                      data_collator=SampleCollator(adapter, root / "data", frames=2))
    cb = watch(trainer, mine, every=2, guard="project", image_groups=4, role_of=ToyAdapter.role_of,
               module_of=ToyAdapter.module_of)
    train_and_report(trainer, cb, model, out, rank)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    exit_now()
