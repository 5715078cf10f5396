"""The alignment callback inside transformers' Trainer, in one process or under torchrun with DDP (gloo).

Run as ``python dist_trainer_worker.py OUT HOW`` or ``python -m torch.distributed.run --nproc_per_node 2
dist_trainer_worker.py OUT HOW``. The global batch is 4 in both cases (4 per device alone, 2 per device
on two ranks). HOW is ``bound`` (``watch``: the callback gets the DDP wrapper, each rank passes its share
of the image probe batches), ``init`` (passed in ``callbacks=[...]``, as the training stacks do: it binds
itself to the Trainer, so the same as ``bound``) or ``unbound`` (``trainer.add_callback`` after
construction: the callback sees the unwrapped model and every rank passes all of the probe batches).
``fsdp2`` is ``bound`` with accelerate's FSDP2 and ``zero3`` with DeepSpeed ZeRO-3 (float32, no clipping);
``single32`` is one float32 process without clipping, the reference of ``zero3``.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TinyNet, make_batches
from dist_worker import exit_now

from gradprobe.train.callback import AlignmentCallback, watch


class Tiny(TinyNet):
    def forward(self, x, labels=None):
        logits = super().forward(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def collate(rows):
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}


def _whole(p):
    """A parameter's full values on every rank (FSDP2: gather the DTensor; ZeRO-3: DeepSpeed's fp32 copy)."""
    if hasattr(p, "full_tensor"):
        p = p.full_tensor()
    elif hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        p = safe_get_full_fp32_param(p)
    return p.detach().reshape(-1).tolist()


def main(out: str, how: str) -> None:
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # ZeRO-3 takes float32 modules only; its reference is the same float32 run in one process
    dtype = torch.float32 if how in ("zero3", "single32") else torch.float64
    (x, y), = make_batches(1, seed=1, size=24, dtype=dtype)
    data = [{"x": x[i], "labels": y[i]} for i in range(len(y))]
    probe = [(px, (py + 1) % 3) for px, py in make_batches(8, seed=2, shift=1.5, dtype=dtype)]
    mine = probe if world == 1 or how == "unbound" else [probe[2 * g + rank] for g in range(4)]
    mine = [{"x": a, "labels": b} for a, b in mine]
    extra = stack_options(how)
    if how == "fsdp2":  # a plain network has no _no_split_modules: wrap by size instead
        extra["fsdp_config"].update(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=100)
    # DeepSpeed clips inside its own step, after the callback, where the Trainer clips before it: the ZeRO-3
    # pair does not clip, so both see the same gradients in the same order
    clip = 0.0 if how in ("zero3", "single32") else 0.5
    args = TrainingArguments(
        output_dir=out, max_steps=4, per_device_train_batch_size=4 // world, learning_rate=0.2,
        lr_scheduler_type="constant", max_grad_norm=clip, report_to="none", save_strategy="no", seed=0,
        use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        logging_steps=1, ddp_find_unused_parameters=True, optim="sgd", **extra,
    )
    model = Tiny(dtype)
    options = {"every": 2, "guard": "project", "image_groups": 4, "loss_fn": lambda m, b: m(**b)["loss"]}
    if how in ("bound", "fsdp2", "zero3", "single32"):
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
        cb = watch(trainer, mine, **options)
    elif how == "init":
        cb = AlignmentCallback(mine, **options)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[cb])
        assert cb._trainer is trainer
    else:
        cb = AlignmentCallback(mine, **options)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
        trainer.add_callback(cb)
        assert cb._trainer is None
    train_and_report(trainer, cb, model, out, rank)


def stack_options(how: str) -> dict:
    """TrainingArguments for accelerate's FSDP2 (``fsdp2``) or DeepSpeed ZeRO-3 (``zero3``); none otherwise."""
    if how == "fsdp2":
        return {"fsdp": True, "fsdp_config": {"version": 2}}
    if how == "zero3":
        return {"deepspeed": {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "zero_optimization": {"stage": 3},
                              "zero_allow_untested_optimizer": True}}
    return {}


def train_and_report(trainer, cb, model, out: str, rank: int) -> None:
    """Train, then write the callback's rows, the guard's counts and the whole final weights from rank 0."""
    trainer.train()
    params = {n: _whole(p) for n, p in model.named_parameters()}  # collective under FSDP2 and ZeRO-3
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps({"rows": cb.monitor.rows, "fired": cb.monitor.fired,
                                                         "params": params,
                                                         "by_backward": cb.monitor.layout.by_backward}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_now()
