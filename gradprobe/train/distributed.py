"""Data-parallel and sharded training: local gradient pieces, scalar all-reduces.

The monitor never gathers a gradient. It works with the layout the training run already has:

- **replicated** parameters (DDP, or a single process): every rank holds the whole gradient,
  so a rank's own dot products are already the full ones and nothing is reduced;
- an **unwrapped** model in a distributed run (a Trainer callback that is not bound, with DDP
  underneath): the update gradient is already averaged, and every rank computes the image
  probe gradient on the whole probe set itself; the probe losses are compared across ranks,
  and different probe sets on different ranks are an error;
- **sharded** parameters (FSDP2 ``fully_shard``: ``DTensor`` with a ``Shard`` placement): each
  rank holds one piece of the parameter, its gradient and the image-probe rows; the dots of the
  pieces are summed across ranks by one all-reduce of a small float64 array of scalars.

The image-probe gradient is produced by the run's own backward (through the wrapped model, so
DDP averages it and FSDP2 reduce-scatters it exactly as it does the training gradient), with
every ``.grad`` saved before and put back after; each rank feeds its own probe batches, as it
does its own training batches.

- **DeepSpeed ZeRO-3** engines: each rank's fp32 gradient partition, read and written through
  DeepSpeed's public accessors (``safe_get_local_grad`` / ``safe_set_local_grad``), summed across
  ranks like FSDP2 shards. ZeRO-1/2 are refused: their public accessor (``safe_get_full_grad``)
  assembles the whole gradient. DeepSpeed clips inside its own step, so the monitor sees the
  update before clipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gradprobe.errors import InputError
from gradprobe.probe.shard import Ranks, global_offset, is_sharded, local

__all__ = ["Layout", "is_sharded", "local", "unwrap"]


def unwrap(model: Any) -> torch.nn.Module:
    """The module whose parameter names the selection uses (DDP's and DeepSpeed's ``.module``; FSDP2 as is)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel) or _is_deepspeed(model):
        return model.module
    return model


def _is_deepspeed(model: Any) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


class Layout(Ranks):
    """How the run is distributed: the process group, whether it is active, which parameters are sharded.

    Args:
        model: what the training loop calls (a DDP wrapper, an FSDP2 module, or a plain module).
        params: the selected parameters (of ``unwrap(model)``).
        process_group: the group to reduce over (default: the default group when one is initialized).
    """

    def __init__(self, model: Any, params: Sequence[torch.nn.Parameter], process_group: Any = None) -> None:
        self.deepspeed = _is_deepspeed(model)
        if self.deepspeed:
            stage = model.zero_optimization_stage()
            if stage != 3:
                raise InputError(
                    f"DeepSpeed ZeRO stage {stage}: the monitor needs each rank's own gradient partition, which "
                    "DeepSpeed's public accessors give for ZeRO-3 only (safe_get_local_grad); use stage 3, DDP or FSDP2"
                )
            if model.fp16_enabled():
                raise InputError("DeepSpeed fp16 (loss-scaled gradients) is not supported; use bf16 or fp32")
        self.sharded = np.array([self.deepspeed or is_sharded(p) for p in params], dtype=bool)
        super().__init__(process_group)
        wrapped = model is not unwrap(model)
        # the image probe: through the run's own backward (each rank its share of the batches) when the
        # model is wrapped or sharded; otherwise every rank computes it whole with autograd.grad
        self.by_backward = self.deepspeed or (self.active and (wrapped or bool(self.sharded.any())))
        self.replicated = self.active and not self.by_backward
        if self.active and isinstance(model, torch.nn.DataParallel):
            raise InputError("torch.nn.DataParallel is not supported in a distributed run; use DDP")
        self.clone_stash = bool(getattr(model, "gradient_as_bucket_view", False))

    # ------------------------------------------------------------------ gradient pieces
    def piece(self, p: torch.nn.Parameter) -> torch.Tensor:
        """A tensor shaped and placed like this rank's piece of ``p`` (what its gradient piece will be)."""
        return p.ds_tensor if self.deepspeed else local(p)

    def offset(self, p: torch.nn.Parameter) -> int:
        """Global flat offset of this rank's piece of ``p``: where it starts in the whole parameter, row-major.

        ZeRO-3: partitions are equal slices of the flattened (padded) parameter, rank r's starting at
        r × partition size. FSDP2: a dim-0 shard is the rows from its global row offset on.

        Raises:
            InputError: a sharding whose piece is not one contiguous slice of the flattened parameter.
        """
        if self.deepspeed:
            part = getattr(p.ds_tensor, "ds_numel", None) or p.ds_tensor.numel()
            return self.rank * int(part)
        return global_offset(p)

    def grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """This rank's piece of ``p``'s gradient (ZeRO-3: its fp32 gradient partition), or None."""
        if self.deepspeed:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)
        return None if p.grad is None else local(p.grad)

    def subtract(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Subtract ``value`` (shaped like the piece) from ``p``'s gradient piece."""
        g = self.grad(p)
        if g is None:
            return
        with torch.no_grad():
            if self.deepspeed:
                from deepspeed.utils import safe_set_local_grad

                safe_set_local_grad(p, g - value.reshape(g.shape).to(g))
            else:
                g.sub_(value.reshape(g.shape).to(g))

    def take_grads(self, params: Sequence[torch.nn.Parameter]) -> list[Any]:
        """Save the gradients of ``params`` and clear them; :meth:`put_grads` restores them."""
        if self.deepspeed:
            saved = [None if (g := self.grad(p)) is None else g.detach().clone() for p in params]
        else:
            saved = [p.grad for p in params]
            if self.clone_stash:  # DDP bucket views: the next backward would write into them
                saved = [g.detach().clone() if g is not None else None for g in saved]
        self.clear_grads(params)
        return saved

    def clear_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        if self.deepspeed:
            from deepspeed.utils import safe_set_local_grad

            for p in params:
                if (g := self.grad(p)) is not None:
                    safe_set_local_grad(p, torch.zeros_like(g))
        else:
            for p in params:
                p.grad = None

    def put_grads(self, params: Sequence[torch.nn.Parameter], saved: list[Any]) -> None:
        if self.deepspeed:
            from deepspeed.utils import safe_set_local_grad

            for p, g in zip(params, saved, strict=True):
                if g is not None:
                    safe_set_local_grad(p, g)
        else:
            for p, g in zip(params, saved, strict=True):
                p.grad = g

    # ------------------------------------------------------------------ reductions
    def check_same_count(self, k: int) -> None:
        """Every rank must run the same number of probe backward passes (they are collectives)."""
        if self.active and not self.same_on_all_ranks(np.array([k], dtype=np.float64)):
            raise InputError(f"image probe set: rank {self.rank} has {k} batches; every rank needs the same number")

    def same_on_all_ranks(self, x: np.ndarray, rtol: float = 1e-6) -> bool:
        """Whether every rank holds the same ``x`` (all ranks get the same answer)."""
        if not self.active:
            return True
        x = np.asarray(x, dtype=np.float64)
        mean = self.all_reduce(x) / self.world
        off = float(not np.allclose(x, mean, rtol=rtol, atol=0.0, equal_nan=True))
        return self.all_reduce(np.array([off]))[0] == 0

    def sum_sharded(self, per_param: np.ndarray) -> np.ndarray:
        """Sum over parameters of ``per_param`` (P, ...), the sharded parameters' part summed across ranks."""
        total = per_param[~self.sharded].sum(axis=0)
        if self.sharded.any():
            total = total + self.all_reduce(per_param[self.sharded].sum(axis=0))
        return total

    def reduce_rows(self, per_param: np.ndarray) -> np.ndarray:
        """``per_param`` (P, ...) with the sharded parameters' rows summed across ranks."""
        out = np.array(per_param, dtype=np.float64, copy=True)
        if self.sharded.any():
            out[self.sharded] = self.all_reduce(out[self.sharded])
        return out

    def mean_over_ranks(self, x: np.ndarray) -> np.ndarray:
        return self.all_reduce(x) / self.world if self.active else np.asarray(x, dtype=np.float64)
