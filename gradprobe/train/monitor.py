"""Alignment along a training run: the run's own update gradient against a held-out image probe.

:class:`AlignmentMonitor` is the plain-loop API: call :meth:`AlignmentMonitor.before_step`
after ``backward()`` (and after clipping), right before ``optimizer.step()``. Every
``every`` optimizer steps it

1. recomputes the image probe gradient ḡ_img at the current parameters from K held-out
   image batches, with ``torch.autograd.grad`` so the ``.grad`` the optimizer will use is
   never touched, in eval mode and with the RNG state saved and restored;
2. reads the update gradient (``p.grad`` of the selected parameters: accumulated over
   micro-batches and clipped, as the optimizer will see it) and computes
   ``<g_update, ḡ_img>``, its cosine, both norms, per module, and an interval over the
   image groups;
3. applies the guard: ``observe`` (record only), ``warn``, ``stop`` (ask the loop to end
   cleanly), or ``project`` (A-GEM: when ``<g_update, ḡ_img> < 0`` remove the conflicting
   component, ``g ← g − (<g, ḡ>/‖ḡ‖²) ḡ``, in place, before the optimizer step).

Between probe steps, ``project`` keeps using the latest ḡ_img (refreshed every
``every`` steps); the other guards act on probe steps only. Each probe appends a row to
the trajectory file.

In a distributed run (DDP, FSDP2 or a DeepSpeed ZeRO-3 engine; see
:mod:`gradprobe.train.distributed`) pass the wrapped model and, on each rank, that rank's own
probe batches. ḡ_img is then produced by
the run's own backward, with every ``.grad`` saved and put back, and the dots of sharded
parameters are summed across ranks as scalars; rank 0 writes the trajectory. Under DDP the
unwrapped module also works: every rank then computes ḡ_img on the whole probe set.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradprobe.errors import DataError, InputError
from gradprobe.estimators import stats
from gradprobe.probe.checkpoint import check_checkpointing, checkpointed
from gradprobe.probe.hooks import LossFn
from gradprobe.probe.measure import image_group_count, resolve_mode, sketch_spec
from gradprobe.probe.select import ModuleOf, RoleOf, select_parameters
from gradprobe.probe.sketch import sketch_add
from gradprobe.probe.store import ReferenceStore, SketchStore, resolve_dtype
from gradprobe.train.distributed import Layout, unwrap

GUARDS = ("observe", "warn", "stop", "project")


@contextlib.contextmanager
def _isolated(model: torch.nn.Module, checkpointing: bool = False) -> Iterator[None]:
    """Eval mode and saved RNG state inside, and activation checkpointing of every block if asked
    (:func:`gradprobe.probe.checkpoint.checkpointed`); all restored, so the run continues bit for bit."""
    was_training = model.training
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        model.eval()
        with checkpointed(unwrap(model), checkpointing):
            yield
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class AlignmentMonitor:
    """Watches ``<g_update, ḡ_img>`` along a training run.

    Args:
        model: the model being trained, as the loop calls it (in a distributed run: the DDP
            wrapper, the FSDP2 module or the DeepSpeed engine).
        image_batches: K held-out image batches (the probe set), reused at every probe; in a
            distributed run, this rank's share (the same K on every rank).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        every: probe every this many optimizer steps (the first step is probed).
        guard: ``observe``, ``warn``, ``stop`` or ``project``.
        image_groups: G image-group means (default: the largest divisor of K ≤ 8).
        include, exclude, roles, role_of, module_of: parameter selection.
        reference_dtype: dtype of the image-group rows (default float32; float64 for float64 models).
        sketch: ``exact`` (default): G exact image-group rows. ``auto`` or a number of buckets k: when the
            G exact rows need more than a quarter of the free memory (``auto``) or always (k), one exact row
            (the mean ḡ_img: the alignment, the cosine, the modules and the projection stay exact) and G
            sketched group rows for the interval over image groups.
        sketch_seed: seed of the sketch map.
        checkpointing: activation checkpointing of the probe passes: ``on``, ``off``, or ``auto`` (the
            default): on when the run itself trains with transformers' gradient checkpointing, since a probe
            batch then holds more activations than a training batch would.
        trajectory: JSONL file that probe rows are appended to (None: keep in memory only);
            written by rank 0.
        process_group: the group to sum sharded dots over (default: the default group, if any).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> probe_set = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(4)]
        >>> mon = AlignmentMonitor(model, probe_set, loss_fn, every=2)
        >>> for step in range(4):
        ...     opt.zero_grad()
        ...     loss_fn(model, (torch.randn(4, 2), torch.randn(4, 1))).backward()
        ...     row = mon.before_step(step)
        ...     opt.step()
        >>> [r["step"] for r in mon.rows]
        [0, 2]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_batches: Sequence[Any],
        loss_fn: LossFn,
        *,
        every: int = 50,
        guard: str = "observe",
        image_groups: int | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        roles: str | Sequence[str] | None = None,
        role_of: RoleOf | None = None,
        module_of: ModuleOf | None = None,
        reference_dtype: str | torch.dtype | None = None,
        sketch: str | int | None = "exact",
        sketch_seed: int = 0,
        checkpointing: str = "auto",
        trajectory: str | os.PathLike[str] | None = None,
        process_group: Any = None,
    ) -> None:
        mode = check_checkpointing(checkpointing)
        if guard not in GUARDS:
            raise InputError(f"guard: unknown action {guard!r}; use one of {', '.join(GUARDS)}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every: expected a positive integer, got {every!r}")
        self.images = list(image_batches)
        K = len(self.images)
        if K == 0:
            raise DataError("the image probe set is empty")
        self.groups = image_group_count(K, image_groups)
        self.model = model
        self.loss_fn = loss_fn
        #: whether the probe passes checkpoint activations
        self.checkpointing = mode == "on" or (
            mode == "auto" and bool(getattr(unwrap(model), "is_gradient_checkpointing", False)))
        self.every = every
        self.guard = guard
        self.selection = select_parameters(
            unwrap(model), include=include, exclude=exclude, roles=roles, role_of=role_of, module_of=module_of
        )
        self.params = list(self.selection.params)
        self.acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.layout = Layout(model, self.params, process_group)
        self.layout.check_same_count(K)
        # rows hold each parameter's local piece (the whole parameter unless it is sharded)
        pieces = [self.layout.piece(p) for p in self.params]
        ref_dtype = resolve_dtype(reference_dtype, self.acc_dtype, "reference_dtype")
        row_bytes = sum(t.numel() for t in pieces) * torch.empty((), dtype=ref_dtype).element_size()
        mode, self.sketch_reason = resolve_mode(sketch, self.groups * row_bytes, pieces[0].device)
        self.spec = None if mode == "exact" else sketch_spec(self.selection, int(mode), sketch_seed)
        # exact: one row per image group; sketched: one exact row (the mean, for the alignment itself and the
        # projection) and one sketched row per image group (for the interval over groups)
        self.store = ReferenceStore(pieces, self.groups if self.spec is None else 1, ref_dtype)
        self.sketches: SketchStore | None = None
        if self.spec is not None:
            self.sketches = SketchStore(self.spec, self.groups, self.acc_dtype, pieces[0].device)
            self._sk = self.spec.plan(self.selection.names, self.selection.modules,
                                      [self.layout.offset(p) for p in self.params])
        # sharded pieces are sketched where they live and the sketches summed over ranks (replicated parameters
        # then by rank 0 alone), so the sketch is the whole gradient's whatever the number of ranks
        self._reduce_sketch = self.layout.active and bool(self.layout.sharded.any())
        self.modules = self.selection.module_names
        pos = {m: i for i, m in enumerate(self.modules)}
        self.module_index = np.array([pos[m] for m in self.selection.modules])
        self.trajectory = Path(trajectory) if trajectory is not None and self.layout.rank == 0 else None
        self.rows: list[dict[str, Any]] = []
        self.fired = {"warn": 0, "stop": 0, "project": 0}
        self.should_stop = False
        self.stop_reason: str | None = None
        self._have_reference = False
        self._rows = 0  # finite group rows, compacted to the front of each store tensor
        self._ref_sqnorm = 0.0

    # ------------------------------------------------------------------ reference
    def refresh_reference(self) -> dict[str, Any]:
        """Recompute the image-group mean gradients at the current parameters."""
        losses = self._measure_reference(range(len(self.images)))
        if self.layout.replicated and not self.layout.same_on_all_ranks(np.asarray(losses)):
            raise InputError(
                "image probe set differs between ranks; with an unwrapped model every rank needs the whole "
                "probe set (or pass the DDP/FSDP-wrapped model and give each rank its share)"
            )
        per = len(self.images) // self.groups
        if self.sketches is None:
            self.store.scale_(torch.full((self.groups,), 1.0 / per, dtype=torch.float64))
            grams = np.stack([gm.to(torch.float64).numpy() for gm in self.store.gram(self.acc_dtype)])
            gram = self.layout.sum_sharded(grams)
        else:
            self.sketches.scale_(torch.full((self.groups,), 1.0 / per, dtype=torch.float64))
            gram = self.sketches.module_gram().sum(axis=0)
        if self.layout.by_backward:
            losses = self.layout.mean_over_ranks(np.asarray(losses, dtype=np.float64))
        # a non-finite gradient or loss anywhere in a group leaves a non-finite diagonal entry
        loss_ok = np.isfinite(np.reshape(losses, (self.groups, per))).all(axis=1)
        keep = [g for g in range(self.groups) if loss_ok[g] and np.isfinite(gram[g, g])]
        self._rows = len(keep)
        self._have_reference = bool(keep)
        if not keep:
            return {"image_loss": float(np.mean(losses)), "image_groups_used": 0}
        if len(keep) < self.groups:  # move the finite rows to the front; per-step reads are then views
            if self.sketches is None:
                for t in self.store.tensors:
                    t[: len(keep)] = t[keep].clone()
            else:
                self.sketches.data[: len(keep)] = self.sketches.data[keep].clone()
                # the exact mean row holds the dropped groups' non-finite values: measure it again without them
                self._measure_reference([k for k in range(len(self.images)) if k // per in keep], sketch=False)
        gram = gram[np.ix_(keep, keep)]
        if self.sketches is None:
            self._ref_sqnorm = float(gram.mean())  # ‖ḡ_img‖² of the estimate used for projection and cos
        else:
            self.store.scale_(torch.full((1,), 1.0 / (per * len(keep)), dtype=torch.float64))
            sq = np.array([float(torch.dot(t[0].to(self.acc_dtype), t[0].to(self.acc_dtype))) for t in self.store.tensors])
            self._ref_sqnorm = float(self.layout.sum_sharded(sq))
        return {
            "image_loss": float(np.nanmean(losses)),
            "image_groups_used": len(keep),
            "image_norm": stats.sqrt_or_none(stats.unbiased_sqnorm_from_gram(gram)),
        }

    def _measure_reference(self, batches: Sequence[int], sketch: bool = True) -> list[float]:
        """Accumulate the gradients of the image batches ``batches`` into the rows (zeroed first); their losses."""
        self.store.zero_()
        if self.sketches is not None and sketch:
            self.sketches.zero_()
        by_backward = self._reference_by_backward if self.layout.by_backward else self._reference_by_grad
        losses = by_backward(batches, sketch)
        if self.sketches is not None and sketch and self._reduce_sketch:
            self.sketches.data.copy_(self.layout.sum_tensor(self.sketches.data))
        return losses

    def _add(self, k: int, i: int, g: torch.Tensor, sketch: bool) -> None:
        """Add parameter i's gradient piece of image batch k into the rows."""
        t = self.store.tensors[i]
        per = len(self.images) // self.groups
        g = g.reshape(-1)
        if self.sketches is None:
            t[k // per].add_(g.to(device=t.device, dtype=t.dtype))
            return
        t[0].add_(g.to(device=t.device, dtype=t.dtype))
        if sketch:
            self._sketch_into(self.sketches.data[k // per], i, g)

    def _sketch_into(self, buf: torch.Tensor, i: int, g: torch.Tensor) -> None:
        """Add the sketch of parameter i's local piece ``g`` into ``buf`` (replicated pieces on rank 0 only, so
        that summing over ranks counts them once)."""
        if self._reduce_sketch and not self.layout.sharded[i] and self.layout.rank != 0:
            return
        key, offset, start, width = self._sk[i]
        sketch_add(buf, g.reshape(-1).to(device=buf.device, dtype=buf.dtype).contiguous(), key, offset, start, width)

    def _reference_by_grad(self, batches: Sequence[int], sketch: bool = True) -> list[float]:
        """Single process: ``torch.autograd.grad`` per batch, so ``.grad`` is never touched."""
        losses = []
        with _isolated(self.model, self.checkpointing):
            for k in batches:
                loss = self.loss_fn(self.model, self.images[k])
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                losses.append(float(loss.detach()))
                for i, gr in enumerate(grads):
                    if gr is not None:
                        self._add(k, i, gr, sketch)
                del grads, loss
        return losses

    def _reference_by_backward(self, batches: Sequence[int], sketch: bool = True) -> list[float]:
        """Distributed: the run's own backward (DDP averages, FSDP2 and ZeRO-3 reduce-scatter), gradients saved
        and restored.

        Each batch's gradient pieces are added into its group's row and then cleared. Every rank runs
        the same number of backward passes.
        """
        trainable = [p for p in unwrap(self.model).parameters() if p.requires_grad]
        losses = []
        saved = self.layout.take_grads(trainable)
        try:
            with _isolated(self.model, self.checkpointing):
                for k in batches:
                    loss = self.loss_fn(self.model, self.images[k])
                    losses.append(float(loss.detach()))
                    loss.backward()
                    del loss
                    # read each batch's gradient piece and clear it (ZeRO-3 may overwrite rather than add)
                    with torch.no_grad():
                        for i, p in enumerate(self.params):
                            g = self.layout.grad(p)
                            if g is not None:
                                self._add(k, i, g, sketch)
                    self.layout.clear_grads(trainable)
        finally:
            self.layout.put_grads(trainable, saved)
        return losses

    # ------------------------------------------------------------------ update
    def _update_dots(self, spread: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Dots of p.grad with ḡ_img per parameter (P,), with each kept group row (G',) over all parameters (exact,
        or sketched; with sketched rows only when ``spread``, since that costs a sketch of the update), and squared
        norms (P,)."""
        P = len(self.params)
        exact_rows = self.sketches is None
        dots = np.zeros((P, self._rows if exact_rows else 1))
        sq = np.zeros(P)
        buf = (torch.zeros(self.spec.k, dtype=self.acc_dtype, device=self.sketches.device)
               if not exact_rows and spread else None)
        for i, p in enumerate(self.params):
            g = self.layout.grad(p)
            if g is None:
                continue
            g = g.reshape(-1).to(self.acc_dtype)
            ref = self.store.tensors[i][: self._rows if exact_rows else 1].to(device=g.device, dtype=self.acc_dtype)
            dots[i] = torch.mv(ref, g).to("cpu", torch.float64).numpy()
            sq[i] = float(torch.dot(g, g))
            if buf is not None:
                self._sketch_into(buf, i, g)
        # sharded parameters: sum the local pieces across ranks (one all-reduce of P × (G'+1) scalars)
        both = self.layout.reduce_rows(np.concatenate([dots, sq[:, None]], axis=1))
        dots, sq = both[:, :-1], both[:, -1]
        if exact_rows:
            groups = dots.sum(axis=0)
            mean = dots.mean(axis=1)
        else:
            mean = dots[:, 0]
            groups = np.zeros(0)
            if buf is not None:
                if self._reduce_sketch:
                    buf = self.layout.sum_tensor(buf)
                groups = (self.sketches.data[: self._rows] @ buf).to("cpu", torch.float64).numpy()
        finite = bool(np.isfinite(dots).all() and np.isfinite(sq).all() and np.isfinite(groups).all())
        return mean, groups, sq, finite

    def _project(self, coef: float) -> None:
        """``p.grad -= coef * ḡ_img`` over the selected parameters (ḡ_img = mean of the kept rows)."""
        for i, p in enumerate(self.params):
            rows = self.store.tensors[i][: self._rows if self.sketches is None else 1]
            self.layout.subtract(p, rows.to(self.acc_dtype).mean(dim=0) * coef)

    def before_step(self, step: int) -> dict[str, Any] | None:
        """Call after backward and clipping, right before ``optimizer.step()``.

        Returns:
            The trajectory row on probe steps, else None.
        """
        due = step % self.every == 0
        if not due and not (self.guard == "project" and self._have_reference):
            return None
        row: dict[str, Any] = {"step": step}
        if due:
            row.update(self.refresh_reference())
        if not self._have_reference:
            if due:
                row.update(finite=False, note="no finite image-probe group")
                self._record(row)
            return row if due else None
        mean, col, sq, finite = self._update_dots(spread=due)  # col: (G',) the update's dot with each group mean
        a = float(col.mean()) if self.sketches is None else float(mean.sum())
        un = math.sqrt(max(float(sq.sum()), 0.0))
        cos = a / (un * math.sqrt(self._ref_sqnorm)) if un > 0 and self._ref_sqnorm > 0 else float("nan")
        if not finite:
            msg = f"step {step}: non-finite update gradient"
            if due:
                row.update(finite=False, note=msg)
                self._record(row)
            self._warn(msg)
            if self.guard == "stop":
                self._stop(msg)
            return row if due else None
        projected = False
        if self.guard == "project" and a < 0 and self._ref_sqnorm > 0:
            self._project(a / self._ref_sqnorm)
            self.fired["project"] += 1
            projected = True
        if not due:
            return None
        # spread over the image groups (the update itself is one vector, so that is the only source)
        se = float(np.std(col, ddof=1) / math.sqrt(len(col))) if len(col) >= 2 else None
        mod_dots = np.zeros(len(self.modules))
        np.add.at(mod_dots, self.module_index, mean)
        row.update(
            finite=True,
            alignment=a,
            alignment_stderr=se,
            cos=cos,
            update_norm=un,
            reference_norm=math.sqrt(max(self._ref_sqnorm, 0.0)),
            projected=projected,
            modules={m: float(mod_dots[i]) for i, m in enumerate(self.modules)},
        )
        if a < 0 and self.guard in ("warn", "stop"):
            self.fired[self.guard] += 1
            msg = (f"step {step}: update gradient conflicts with the image probe "
                   f"(<g_update, ḡ_img> = {a:.4g}, cos {cos:.3f})")
            self._warn(msg)
            if self.guard == "stop":
                self._stop(msg)
        self._record(row)
        return row

    def _warn(self, msg: str) -> None:
        if self.layout.rank == 0:  # every rank reaches the same decision; one says so
            warnings.warn(msg, stacklevel=3)

    def _stop(self, msg: str) -> None:
        self.should_stop = True
        self.stop_reason = msg

    def _record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.trajectory is not None:
            self.trajectory.parent.mkdir(parents=True, exist_ok=True)
            with open(self.trajectory, "a") as fh:
                fh.write(json.dumps(_jsonable(row)) + "\n")

    def truncate_trajectory(self, last_step: int) -> int:
        """Drop trajectory rows after ``last_step`` (on resume from a checkpoint); return rows kept."""
        from gradprobe.train._common import truncate_jsonl

        return truncate_jsonl(self.trajectory, last_step) if self.trajectory is not None else 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
