"""One rank of the sharded-probe test: the measurement core (``Measurement`` and its ``GradientProbe``) on a
TinyNet whose blocks and root are ``fully_shard``-ed (FSDP2), every rank feeding the same batches.

Run as ``python probe_dist_worker.py single SKETCH OUT`` or
``python -m torch.distributed.run --nproc_per_node 2 probe_dist_worker.py fsdp SKETCH OUT``; SKETCH is
``exact`` or a number of buckets. Rank 0 writes the batches' dots, squared norms, pair statistics and the
stores' Gram matrices.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TinyNet, make_batches, tiny_loss

from gradprobe.probe.measure import Measurement


def main(mode: str, sketch: str, out: str) -> None:
    torch.set_num_threads(1)
    rank = 0
    if mode == "fsdp":
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    model = TinyNet(dtype=torch.float64)
    if mode == "fsdp":
        for b in model.blocks:
            fully_shard(b)
        fully_shard(model)
    batches = make_batches(5, seed=3)
    meas = Measurement(model, tiny_loss, sketch="exact" if sketch == "exact" else int(sketch), exact_rows=3)
    rows = []
    with meas.session():
        refs = meas.store(2)
        for k in range(2):
            r, _ = meas.run(batches[k], accumulate=refs, accumulate_row=k)
            rows.append({"loss": r.loss, "sqnorm": r.sqnorm.tolist()})
        pair = meas.store(1)
        for k in range(2, 5):
            r, _ = meas.run(batches[k], refs=refs, pair_sum=pair)
            rows.append({"loss": r.loss, "sqnorm": r.sqnorm.tolist(), "dots": r.dots.tolist(),
                         "pair": r.pair.tolist(), "finite": r.finite})
        gram = meas.gram(refs).tolist()
    if mode == "fsdp":
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"mode": meas.mode, "modules": meas.module_names, "rows": rows, "gram": gram}))


if __name__ == "__main__":
    from dist_worker import exit_now  # gloo's threads sometimes abort at interpreter exit: leave without it

    main(*sys.argv[1:4])
    exit_now()
