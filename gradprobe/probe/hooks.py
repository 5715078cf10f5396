"""GradientProbe: streamed per-parameter gradient statistics from backward hooks.

Each selected parameter gets a ``Tensor.register_post_accumulate_grad_hook``. When
autograd has accumulated that parameter's gradient, the hook computes, in fp32
(fp64 for fp64 models):

* the dot products of the gradient with every row of a :class:`ReferenceStore`,
* its squared norm,
* optionally the dot with a running-sum row and then adds the gradient into it,
* optionally adds the gradient into one row of another store,

then may free the gradient (``p.grad = None``). With a :class:`~gradprobe.probe.sketch.SketchSpec` the
probe works in sketch space instead: each hook adds the parameter's squared norm and its
contribution to the batch's sketch (k numbers), and the dots, running sums and accumulations
above are done with sketches (:class:`~gradprobe.probe.store.SketchStore`) once backward ends. Results stay on the parameter's
device as small tensors until the batch ends; one transfer per device brings
them to the host. No flattened copy of the whole gradient is ever made.

Hooks exist only inside :meth:`GradientProbe.attached` and are removed in
``finally``, also when the run raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradprobe.errors import InputError
from gradprobe.probe.select import Selection
from gradprobe.probe.shard import ShardGroup, local
from gradprobe.probe.sketch import SketchSpec, sketch_add
from gradprobe.probe.store import ReferenceStore, SketchStore

Store = ReferenceStore | SketchStore

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


@dataclass
class BatchGrad:
    """What the hooks measured for one batch, per module (host, float64).

    In sketch mode ``dots`` and ``pair`` are sketched; ``sqnorm`` and ``loss`` are always exact.
    """

    loss: float
    dots: np.ndarray  # (Mods, R): dot with each reference row
    sqnorm: np.ndarray  # (Mods,)
    pair: np.ndarray | None  # (Mods,): dot with the running sum before adding, or None
    finite: bool  # every gradient entry finite (and the loss)
    sketch: torch.Tensor | None = None  # the batch's sketch, when asked for


@dataclass
class _Job:
    refs: Store | None
    accumulate: Store | None
    accumulate_row: int
    pair_sum: Store | None
    free_grads: bool
    results: dict[int, tuple[Any, torch.Tensor, Any]] = field(default_factory=dict)
    sketches: dict[torch.device, torch.Tensor] = field(default_factory=dict)


class GradientProbe:
    """Streams gradient statistics of a model's selected parameters during backward.

    Args:
        model: any ``torch.nn.Module``.
        selection: the parameters to watch (see :func:`gradprobe.probe.select.select_parameters`).
        sketch: work in sketch space with this map (its modules must be the selection's modules,
            in order); None: exact rows.
        sketch_backend: ``auto``, ``torch``, ``numba`` or ``triton`` (see :func:`gradprobe.probe.sketch.sketch_add`).

    Example:
        >>> import torch
        >>> from gradprobe.probe import GradientProbe, select_parameters
        >>> model = torch.nn.Linear(3, 1)
        >>> probe = GradientProbe(model, select_parameters(model))
        >>> with probe.attached():
        ...     r = probe.run_batch(lambda m, b: m(b).sum(), torch.ones(2, 3))
        >>> float(r.sqnorm.sum())  # |grad W|^2 + |grad b|^2 = 3*2^2 + 2^2
        16.0
    """

    def __init__(self, model: torch.nn.Module, selection: Selection, *, sketch: SketchSpec | None = None,
                 sketch_backend: str = "auto", group: ShardGroup | None = None) -> None:
        self.model = model
        self.selection = selection
        self.params = list(selection.params)
        self.module_names = selection.module_names
        pos = {m: i for i, m in enumerate(self.module_names)}
        self.module_index = np.array([pos[m] for m in selection.modules], dtype=np.int64)
        self.acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.sketch = sketch
        self.sketch_backend = sketch_backend
        #: the ranks holding pieces of sharded parameters (FSDP2): statistics are summed across them
        self.group = group if group is not None else ShardGroup(self.params)
        if sketch is not None:
            if list(sketch.modules) != self.module_names:
                raise InputError("sketch: the map's modules are not this selection's modules")
            # per parameter: key, global offset of this rank's piece, bucket range
            self._sk = sketch.plan(selection.names, selection.modules, self.group.offsets)
        self._job: _Job | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ hooks
    @property
    def active(self) -> bool:
        """True while hooks are registered."""
        return bool(self._handles)

    @contextlib.contextmanager
    def attached(self) -> Iterator[GradientProbe]:
        """Register the hooks for the duration of the block; always remove them."""
        if self._handles:
            raise InputError("this GradientProbe is already attached")
        try:
            for i, p in enumerate(self.params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._job = None

    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        if self.sketch is not None:
            return self._make_sketch_hook(i)

        def hook(p: torch.Tensor) -> None:
            job = self._job
            if job is None or p.grad is None:
                return
            g = local(p.grad).reshape(-1)
            acc = self.acc_dtype
            ga = g if g.dtype == acc else g.to(acc)
            dots = None
            if job.refs is not None:
                ref = job.refs.tensors[i]
                if ref.device != ga.device:
                    ref = ref.to(ga.device, non_blocking=True)
                if ref.dtype == acc:
                    dots = torch.mv(ref, ga)
                else:  # cast one row at a time: the transient is one row, not all G of a large tensor
                    dots = torch.stack([torch.dot(ref[r].to(acc), ga) for r in range(ref.shape[0])])
            pair = None
            if job.pair_sum is not None:
                s = job.pair_sum.tensors[i]
                s_dev = s if s.device == ga.device else s.to(ga.device, non_blocking=True)
                pair = torch.dot(s_dev[0] if s_dev.dtype == acc else s_dev[0].to(acc), ga)
                # a non-finite gradient poisons the running sum; callers then withhold the pair
                # statistic for the rest of its budget (the per-batch dots stay exact)
                s[0].add_(g if g.dtype == s.dtype and g.device == s.device else g.to(device=s.device, dtype=s.dtype))
            if job.accumulate is not None:
                t = job.accumulate.tensors[i]
                t[job.accumulate_row].add_(g.to(device=t.device, dtype=t.dtype))
            job.results[i] = (dots, torch.dot(ga, ga), pair)
            if job.free_grads:
                p.grad = None

        return hook

    def _make_sketch_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        key, offset, start, width = self._sk[i]
        k = self.sketch.k
        owned = bool(self.group.owned[i])

        def hook(p: torch.Tensor) -> None:
            job = self._job
            if job is None or p.grad is None:
                return
            g = local(p.grad).reshape(-1)
            ga = g if g.dtype == self.acc_dtype else g.to(self.acc_dtype)
            buf = job.sketches.get(ga.device)
            if buf is None:
                buf = job.sketches[ga.device] = torch.zeros(k, dtype=self.acc_dtype, device=ga.device)
            if owned:  # a whole parameter on every rank enters the sum over ranks once
                sketch_add(buf, ga, key, offset, start, width, self.sketch_backend)
            job.results[i] = (None, torch.dot(ga, ga), None)
            if job.free_grads:
                p.grad = None

        return hook

    # ------------------------------------------------------------------ batches
    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def run_batch(
        self,
        loss_fn: LossFn,
        batch: Any,
        *,
        refs: Store | None = None,
        accumulate: Store | None = None,
        accumulate_row: int = 0,
        pair_sum: Store | None = None,
        free_grads: bool = True,
        keep_sketch: bool = False,
    ) -> BatchGrad:
        """Forward and backward one batch with the hooks measuring.

        Args:
            loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
            batch: passed to ``loss_fn`` untouched.
            refs: dot every gradient with each row of this store.
            accumulate: add the gradient into row ``accumulate_row`` of this store.
            pair_sum: a one-row store; the hook dots the gradient with it, then adds the gradient in.
            free_grads: set ``p.grad = None`` in the hook once measured.
            keep_sketch: return the batch's sketch (sketch mode only).

        Stores are :class:`ReferenceStore` in exact mode and :class:`SketchStore` in sketch mode.

        Returns:
            A :class:`BatchGrad` (host arrays, float64).
        """
        if not self._handles:
            raise InputError("GradientProbe.run_batch needs the probe attached (use `with probe.attached():`)")
        want = SketchStore if self.sketch is not None else ReferenceStore
        for store in (refs, accumulate, pair_sum):
            if store is not None and not isinstance(store, want):
                raise InputError(f"this probe works {'in sketch space' if self.sketch else 'with exact rows'}; "
                                 f"give it {want.__name__} rows")
        self.zero_grad()
        self._job = _Job(refs, accumulate, accumulate_row, pair_sum, free_grads)
        try:
            loss = loss_fn(self.model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise InputError("loss_fn must return a scalar tensor")
            if not loss.requires_grad:
                raise InputError("loss_fn returned a tensor that does not require grad: no selected parameter is in its graph")
            loss.backward()
            job = self._job
        finally:
            self._job = None
        if free_grads:
            self.zero_grad()  # parameters whose hook did not fire hold no grad either
        loss_value = float(loss.detach())
        if self.sketch is not None:
            return self._collect_sketch(job, loss_value, keep_sketch)
        return self._collect(job, loss_value, refs.rows if refs is not None else 0, pair_sum is not None)

    def _by_module(self, values: np.ndarray) -> np.ndarray:
        out = np.zeros((len(self.module_names),) + values.shape[1:], dtype=np.float64)
        np.add.at(out, self.module_index, values)
        return out

    def _gather(self, job: _Job, slot: int, shape: tuple[int, ...] = ()) -> np.ndarray:
        """One of the hooks' results per parameter (slot 0: dots, 1: squared norm, 2: pair), zero where no
        gradient came; one transfer per device."""
        out = np.zeros((len(self.params), *shape), dtype=np.float64)
        by_device: dict[torch.device, list[int]] = {}
        for i, res in job.results.items():
            by_device.setdefault(res[1].device, []).append(i)
        for idx in by_device.values():
            out[idx] = torch.stack([job.results[i][slot] for i in idx]).to("cpu", torch.float64).numpy()
        return out

    def _reduce(self, *per_param: np.ndarray | None) -> list[np.ndarray | None]:
        """Per-parameter arrays summed across ranks (one collective): each rank's pieces of the sharded
        parameters, the whole ones once."""
        if not self.group.active:
            return list(per_param)
        mask = self.group.owned.astype(np.float64)
        parts = [a * mask.reshape(-1, *([1] * (a.ndim - 1))) for a in per_param if a is not None]
        flat = self.group.all_reduce(np.concatenate([a.reshape(-1) for a in parts]))
        out, pos = [], 0
        for a in per_param:
            if a is None:
                out.append(None)
                continue
            out.append(flat[pos:pos + a.size].reshape(a.shape))
            pos += a.size
        return out

    def _collect(self, job: _Job, loss: float, n_refs: int, has_pair: bool) -> BatchGrad:
        sq = self._gather(job, 1)
        dots = self._gather(job, 0, (n_refs,)) if n_refs else np.zeros((len(self.params), 0))
        pair = self._gather(job, 2) if has_pair else None
        sq, dots, pair = self._reduce(sq, dots, pair)
        # the pair column is not part of this batch's own finiteness (a poisoned running sum is the caller's)
        finite = bool(np.isfinite(dots).all() and np.isfinite(sq).all()) and math.isfinite(loss)
        return BatchGrad(loss=loss, dots=self._by_module(dots), sqnorm=self._by_module(sq),
                         pair=None if pair is None else self._by_module(pair), finite=finite)

    def _collect_sketch(self, job: _Job, loss: float, keep: bool) -> BatchGrad:
        """Sketch space: the batch's sketch is the sum of the per-device pieces; then dots, pair and accumulation."""
        sq = self._by_module(self._reduce(self._gather(job, 1))[0])
        home = next((s.device for s in (job.refs, job.pair_sum, job.accumulate) if s is not None), None)
        parts = list(job.sketches.values())
        if not parts:
            parts = [torch.zeros(self.sketch.k, dtype=self.acc_dtype)]
        home = home or parts[0].device
        sk = parts[0].to(home)
        for extra in parts[1:]:
            sk = sk + extra.to(home)
        sk = self.group.sum_tensor(sk)  # the sketch of the whole gradient: the sum of the pieces' sketches
        n_mod = len(self.module_names)
        dots = (job.refs.module_dots(sk).to("cpu", torch.float64).numpy() if job.refs is not None
                else np.zeros((n_mod, 0)))
        pair = None
        if job.pair_sum is not None:
            pair = job.pair_sum.module_dots(sk)[:, 0].to("cpu", torch.float64).numpy()
            job.pair_sum.add_(0, sk)
        if job.accumulate is not None:
            job.accumulate.add_(job.accumulate_row, sk)
        finite = bool(np.isfinite(dots).all() and np.isfinite(sq).all()) and math.isfinite(loss)
        return BatchGrad(loss=loss, dots=dots, sqnorm=sq, pair=pair, finite=finite, sketch=sk if keep else None)
