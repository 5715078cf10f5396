"""One rank of the distributed monitor test.

Run as ``python -m torch.distributed.run --nproc_per_node 2 dist_worker.py MODE OUT``.

MODE is ``single`` (one plain process), ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard``), or ``ddp_unbound``
(DDP training, the monitor given the unwrapped module and the whole probe set on every rank),
``ddp_mismatch`` (the same, but each rank with its own share: an error), ``zero3`` (a DeepSpeed ZeRO-3
engine, which clips inside its step, after the monitor), ``zero2`` (refused) and ``single_late_clip``
(one process clipping in that order). The same global
training batches and image-probe batches are used in every mode: with two ranks each takes half of each
training batch and one batch of each image group, so every mode computes the same quantities.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TinyNet, make_batches, tiny_loss

from gradprobe.errors import InputError
from gradprobe.train.monitor import AlignmentMonitor

STEPS, GROUPS = 5, 4


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not mode.startswith("single"):
        torch.distributed.init_process_group("gloo")
    # DeepSpeed ZeRO-3 takes float32 (or half) modules only; its reference runs in float32 too
    dtype = torch.float32 if mode in ("single_late_clip", "zero2", "zero3") else torch.float64
    model = TinyNet(dtype=dtype)
    train = make_batches(STEPS, seed=1, size=8, dtype=dtype)
    # planted conflict: shifted inputs with rotated labels pull against the training batches
    probe = [(x, (y + 1) % 3) for x, y in make_batches(2 * GROUPS, seed=2, shift=1.5, dtype=dtype)]
    if mode.startswith("single"):
        wrapped, mine, watched = model, probe, model
    else:
        # group g of the single process holds batches 2g, 2g+1; rank r takes batch 2g+r of each group
        mine = [probe[2 * g + rank] for g in range(GROUPS)]
        half = 8 // world
        train = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in train]
        if mode.startswith("ddp"):
            wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        elif mode in ("zero2", "zero3"):
            return _zero(int(mode[-1]), model, train, mine, out, rank)
        else:
            from torch.distributed.fsdp import fully_shard

            for b in model.blocks:
                fully_shard(b)
            wrapped = fully_shard(model)
        watched = model if mode in ("ddp_unbound", "ddp_mismatch") else wrapped
        if mode == "ddp_unbound":
            mine = probe
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.2)
    mon = AlignmentMonitor(watched, mine, tiny_loss, every=2, guard="project", image_groups=GROUPS,
                           sketch=64 if mode.endswith("_sketch") else "exact")
    try:
        for step, batch in enumerate(train):
            opt.zero_grad()
            tiny_loss(wrapped, batch).backward()
            if mode != "single_late_clip":
                torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 0.5)
            mon.before_step(step)
            if mode == "single_late_clip":
                torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 0.5)
            opt.step()
    except InputError as e:
        if rank == 0:
            Path(out).write_text(json.dumps({"error": str(e)}))
        torch.distributed.destroy_process_group()
        return
    params = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        params[name] = t.detach().reshape(-1).tolist()
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": mon.rows, "fired": mon.fired, "params": params}))
    if not mode.startswith("single"):
        torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
        torch.distributed.destroy_process_group()


def _zero(stage, model, train, mine, out, rank):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
                                      config=config)
    try:
        mon = AlignmentMonitor(engine, mine, tiny_loss, every=2, guard="project", image_groups=GROUPS)
    except InputError as e:
        if rank == 0:
            Path(out).write_text(json.dumps({"error": str(e)}))
        torch.distributed.barrier()
        return
    for step, batch in enumerate(train):
        engine.backward(tiny_loss(engine, batch))
        mon.before_step(step)
        engine.step()
    from deepspeed.utils import safe_get_full_fp32_param

    params = {n: safe_get_full_fp32_param(p).reshape(-1).tolist() for n, p in engine.module.named_parameters()}
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": mon.rows, "fired": mon.fired, "params": params}))
    torch.distributed.barrier()


def exit_now() -> None:
    """Leave without C++ static destructors: gloo's threads sometimes abort there at interpreter exit
    ("terminate called without an active exception") after all work is done and written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_now()
