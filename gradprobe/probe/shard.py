"""Parameters sharded across processes (FSDP2 ``fully_shard``): each rank's piece and the sums across ranks.

Under FSDP2 a selected parameter is a ``DTensor`` with a ``Shard(0)`` placement: each rank holds some rows
of it and, after backward, the same rows of its gradient (the ranks' gradients averaged). A probe on every
rank then computes its statistics on the pieces it holds and :class:`ShardGroup` sums them across ranks:
dots and squared norms of sharded parameters add up over the pieces, and a sketch of the whole gradient is
the sum of the pieces' sketches placed at their global offsets. A parameter every rank holds whole
(not sharded) is counted on rank 0 only. Every rank must feed the same batches: the result is then the
single-process one, whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gradprobe.errors import InputError


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor with a ``Shard`` placement (its local piece is part of the whole)."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(type(pl).__name__ in ("Shard", "_StridedShard") for pl in placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own piece of a (possibly DTensor) tensor; it shares storage with ``t``."""
    if hasattr(t, "to_local"):
        with torch.no_grad():
            return t.to_local()
    return t


def global_offset(p: torch.Tensor) -> int:
    """Global flat offset of this rank's piece of ``p`` (0 for a whole parameter): a dim-0 shard is the rows
    from its global row offset on.

    Raises:
        InputError: a sharding whose piece is not one contiguous slice of the flattened parameter.
    """
    if not is_sharded(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = [type(pl).__name__ for pl in p.placements]
    dims = [pl.dim for pl in p.placements if hasattr(pl, "dim")]
    if placements.count("Shard") + placements.count("_StridedShard") != 1 or dims != [0]:
        raise InputError(f"a parameter sharded as {p.placements} is not one contiguous piece per rank; "
                         "gradprobe supports dim-0 sharding (FSDP2's default)")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = int(np.prod(p.shape[1:])) if len(p.shape) > 1 else 1
    return int(offset[0]) * row


class Ranks:
    """A process group: its size, this rank, and sums across it (identity in a single process).

    Args:
        group: the process group (default: the default group when one is initialized; otherwise inactive).
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        self.group = group if group is not None else (dist.group.WORLD if ready else None)
        self.world = dist.get_world_size(self.group) if ready else 1
        self.rank = dist.get_rank(self.group) if ready else 0
        self.active = self.world > 1
        self._device = torch.device("cpu")
        if self.active and dist.get_backend(self.group) == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        """Sum a float64 array across ranks (one collective; ``x`` itself is left alone)."""
        x = np.asarray(x, dtype=np.float64)
        if not self.active:
            return x
        import torch.distributed as dist

        t = torch.tensor(x, dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor, a new one on ``t``'s device (``t`` itself in a single process)."""
        if not self.active:
            return t
        import torch.distributed as dist

        out = t.detach().to(self._device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(t.device)


class ShardGroup(Ranks):
    """The ranks a probe sums over, and which parameters this rank counts.

    Args:
        params: the selected parameters.
        group: the process group (default: the default group when one is initialized; otherwise inactive).
    """

    def __init__(self, params: Sequence[torch.Tensor], group: Any = None) -> None:
        super().__init__(group)
        self.sharded = np.array([is_sharded(p) for p in params], dtype=bool)
        #: what this rank adds to a sum over ranks: its piece of a sharded parameter; a whole one on rank 0 only
        self.owned = self.sharded | (self.rank == 0) if self.active else np.ones(len(params), dtype=bool)
        self.offsets = [global_offset(p) for p in params]
