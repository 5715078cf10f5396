"""One rank of the distributed monitor test.

Run as ``python -m torch.distributed.run --nproc_per_node 2 dist_worker.py MODE OUT``.

MODE is ``single`` (one plain process), ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard``), or ``ddp_unbound``
(DDP training, the monitor given the unwrapped module and the whole probe set on every rank) and
``ddp_mismatch`` (the same, but each rank with its own share: an error). The same global
training batches and image-probe batches are used in every mode: with two ranks each takes half of each
training batch and one batch of each image group, so every mode computes the same quantities.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TinyNet, make_batches, tiny_loss  # noqa: E402

from gradprobe.errors import InputError
from gradprobe.train.monitor import AlignmentMonitor  # noqa: E402

STEPS, GROUPS = 5, 4


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if mode != "single":
        torch.distributed.init_process_group("gloo")
    model = TinyNet()
    train = make_batches(STEPS, seed=1, size=8)
    # planted conflict: shifted inputs with rotated labels pull against the training batches
    probe = [(x, (y + 1) % 3) for x, y in make_batches(2 * GROUPS, seed=2, shift=1.5)]
    if mode == "single":
        wrapped, mine, watched = model, probe, model
    else:
        # group g of the single process holds batches 2g, 2g+1; rank r takes batch 2g+r of each group
        mine = [probe[2 * g + rank] for g in range(GROUPS)]
        half = 8 // world
        train = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in train]
        if mode.startswith("ddp"):
            wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        else:
            from torch.distributed.fsdp import fully_shard

            for b in model.blocks:
                fully_shard(b)
            wrapped = fully_shard(model)
        watched = model if mode in ("ddp_unbound", "ddp_mismatch") else wrapped
        if mode == "ddp_unbound":
            mine = probe
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.2)
    mon = AlignmentMonitor(watched, mine, tiny_loss, every=2, guard="project", image_groups=GROUPS)
    try:
        for step, batch in enumerate(train):
            opt.zero_grad()
            tiny_loss(wrapped, batch).backward()
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 0.5)
            mon.before_step(step)
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
    if mode != "single":
        torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # gloo's threads sometimes abort in C++ static destructors at interpreter exit ("terminate called
    # without an active exception") after all work is done and written; skip those destructors
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
