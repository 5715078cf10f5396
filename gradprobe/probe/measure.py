"""The measurement core: one run's parameter selection, probe, mode (exact rows or sketches), stores,
progress, warnings, per-batch rows and interruption, shared by every estimator that streams batches.

An estimator states how many reference rows it needs; :class:`Measurement` decides the mode:

* ``exact``: rows are full copies of the selected gradient (:class:`ReferenceStore`), the twin every
  sketch is tested against; memory ``rows × selected parameters × dtype size``;
* ``sketch`` (``k`` buckets): rows are sketches (:class:`SketchStore`, ``k`` numbers each) and every
  inner product is a sketched one (:mod:`gradprobe.probe.sketch`); memory ``rows × k × 4`` bytes,
  whatever the model's size;
* ``auto``: exact when the exact rows take at most :data:`EXACT_SHARE` of the free memory of the
  device that holds them, otherwise a sketch with :data:`~gradprobe.probe.sketch.DEFAULT_K` buckets.

Squared norms and losses are exact in both modes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradprobe import outputs as io
from gradprobe._checks import check_positive_int
from gradprobe.errors import DataError, InputError
from gradprobe.probe.context import measurement_mode
from gradprobe.probe.hooks import BatchGrad, GradientProbe, LossFn
from gradprobe.probe.select import ModuleOf, RoleOf, Selection, select_parameters
from gradprobe.probe.sketch import DEFAULT_K, MAX_K, SketchSpec
from gradprobe.probe.store import ReferenceStore, SketchStore, check_reference_device, resolve_dtype

__all__ = [
    "EXACT_SHARE", "Measurement", "Progress", "group_count", "image_group_count", "parse_sketch", "resolve_mode",
    "sketch_spec",
]

#: ``auto`` keeps exact rows when they need at most this share of the free memory where they live.
EXACT_SHARE = 0.25
#: Default largest number of image groups (reference rows) kept.
MAX_DEFAULT_GROUPS = 8
#: Fewer image groups than this and the intervals can under-cover (see tests/test_planted.py).
MIN_GOOD_GROUPS = 4


class Progress:
    """Progress callbacks; the default does nothing. The CLI passes a rich-backed one."""

    def start(self, phase: str, total: int | None) -> None:
        pass

    def advance(self, phase: str) -> None:
        pass

    def finish(self, phase: str) -> None:
        pass


def parse_sketch(value: str | int | None) -> str | int:
    """``auto``, ``exact``, or a number of buckets k (an integer, or ``2^N``).

    Raises:
        InputError: anything else, or k out of range.
    """
    if value is None:
        return "auto"
    if isinstance(value, bool):
        raise InputError(f"sketch: expected auto, exact or a number of buckets, got {value!r}")
    if isinstance(value, int | np.integer):
        k = int(value)
    else:
        text = str(value).strip().lower()
        if text in ("auto", "exact"):
            return text
        m = re.fullmatch(r"2\s*\^\s*(\d+)|(\d+)", text)
        if not m:
            raise InputError(f"sketch: expected auto, exact or a number of buckets (such as 1048576 or 2^20), "
                             f"got {value!r}")
        k = 2 ** int(m.group(1)) if m.group(1) is not None else int(m.group(2))
    if not 1 <= k <= MAX_K:
        raise InputError(f"sketch: k={k} buckets is out of range; use 1 to 2^31 (default 2^20)")
    return k


def group_count(n: int, groups: int | None, option: str = "image_groups", what: str = "image batches",
                minimum: int = 1, maximum: int = MAX_DEFAULT_GROUPS) -> int:
    """How many equal groups to split ``n`` batches into: ``groups`` (which must divide n) or, by default,
    the largest divisor of n between ``minimum`` and ``maximum``."""
    if groups is None:
        divisors = [d for d in range(minimum, min(n, maximum) + 1) if n % d == 0]
        if not divisors:
            raise InputError(f"{option}: {n} {what} have no divisor between {minimum} and {maximum}; "
                             f"give {option} or use another number of batches")
        return max(divisors)
    g = check_positive_int(option, groups, minimum)
    if n % g:
        raise InputError(f"{option}: {n} {what} cannot be split into {g} equal groups")
    return g


def image_group_count(k: int, image_groups: int | None) -> int:
    """G for K image batches: the given count (which must divide K) or the largest divisor of K ≤ 8."""
    return group_count(k, image_groups)


def resolve_mode(sketch: str | int | None, exact_bytes: int, device: torch.device, what: str = "exact rows",
                 ) -> tuple[str | int, str]:
    """``exact`` or k for a run whose exact rows need ``exact_bytes`` on ``device``, and the reason.

    ``auto`` keeps exact rows when they need at most :data:`EXACT_SHARE` of the device's free memory,
    else sketches with :data:`~gradprobe.probe.sketch.DEFAULT_K` buckets.

    Raises:
        InputError: ``sketch`` is malformed, or ``exact`` rows cannot fit in the free memory at all.
    """
    mode = parse_sketch(sketch)
    free = free_bytes(device)
    if mode == "auto":
        fits = free is None or exact_bytes <= EXACT_SHARE * free
        where = ("free memory unknown" if free is None else
                 f"{'within' if fits else 'more than'} {EXACT_SHARE:.0%} of the {_gib(free)} free on {device}")
        return ("exact" if fits else DEFAULT_K), f"auto: {what} need {_gib(exact_bytes)}, {where}"
    if mode == "exact" and free is not None and exact_bytes > free:
        raise InputError(f"sketch exact: {what} need {_gib(exact_bytes)} but {device} has {_gib(free)} free; "
                         "use --sketch auto or a number of buckets, or select fewer parameters (--include, --roles)")
    return mode, f"asked for {'exact rows' if mode == 'exact' else f'a sketch with k={mode}'}"


def sketch_spec(selection: Selection, k: int = DEFAULT_K, seed: int = 0) -> SketchSpec:
    """The sketch map of a parameter selection: k buckets split between its modules by size."""
    numel: dict[str, int] = {}
    for name, p in zip(selection.modules, selection.params, strict=True):
        numel[name] = numel.get(name, 0) + p.numel()
    return SketchSpec.build(list(numel.items()), k, seed)


def free_bytes(device: torch.device) -> int | None:
    """Free memory of a device (CUDA: the driver's free count; CPU: MemAvailable), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


class Measurement:
    """Selection, probe and stores of one run, in exact or sketch mode.

    Args:
        model: any ``torch.nn.Module``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        include, exclude, roles, role_of, module_of: parameter selection.
        sketch: ``auto``, ``exact`` or k (see :func:`parse_sketch`).
        sketch_seed: seed of the sketch map.
        exact_rows: reference rows the estimator needs in exact mode (decides ``auto``).
        reference_device: ``model`` or ``cpu``: where rows live.
        reference_dtype: dtype of exact rows (sketches accumulate in fp32, fp64 for fp64 models).
        eval_mode: run the model in eval mode.
        batch_info: ``batch_info(batch) -> dict`` of extra per-batch columns.
        progress: progress callbacks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        roles: str | Sequence[str] | None = None,
        role_of: RoleOf | None = None,
        module_of: ModuleOf | None = None,
        sketch: str | int | None = "auto",
        sketch_seed: int = 0,
        exact_rows: int = 1,
        reference_device: str = "model",
        reference_dtype: str | torch.dtype | None = None,
        eval_mode: bool = True,
        batch_info: Callable[[Any], Mapping[str, Any]] | None = None,
        progress: Progress | None = None,
    ) -> None:
        check_reference_device(reference_device)
        if isinstance(sketch_seed, bool) or not isinstance(sketch_seed, int | np.integer):
            raise InputError(f"sketch_seed: expected an integer, got {sketch_seed!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.selection = select_parameters(model, include=include, exclude=exclude, roles=roles, role_of=role_of,
                                           module_of=module_of)
        sel = self.selection
        self.acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in sel.params) else torch.float32
        self.ref_dtype = resolve_dtype(reference_dtype, self.acc_dtype, "reference_dtype")
        self.reference_device = reference_device
        self.eval_mode = eval_mode
        self.batch_info = batch_info
        self.progress = progress or Progress()
        self.warnings: list[str] = []
        self.complete = True
        home = sel.params[0].device if reference_device == "model" else torch.device("cpu")
        self.home = home
        row_bytes = sel.numel * torch.empty((), dtype=self.ref_dtype).element_size()
        self.exact_bytes = exact_rows * row_bytes
        mode, self.reason = resolve_mode(sketch, self.exact_bytes, home, f"{exact_rows} exact rows of {sel.numel:,} "
                                         "parameters")
        self.mode = "exact" if mode == "exact" else "sketch"
        self.spec: SketchSpec | None = None
        if self.mode == "sketch":
            self.spec = sketch_spec(sel, int(mode), int(sketch_seed))
        self.probe = GradientProbe(model, sel, sketch=self.spec)
        self.module_names = self.probe.module_names
        self.module_index = self.probe.module_index
        self._stores: list[ReferenceStore | SketchStore] = []
        self._sink: io.RowSink | None = None

    # ------------------------------------------------------------------ stores
    @property
    def sketched(self) -> bool:
        return self.mode == "sketch"

    def store(self, rows: int) -> ReferenceStore | SketchStore:
        """A new store of ``rows`` rows in this run's mode."""
        if self.spec is not None:
            s: ReferenceStore | SketchStore = SketchStore(self.spec, rows, self.acc_dtype, self.home)
        else:
            s = ReferenceStore(self.selection.params, rows, self.ref_dtype, self.reference_device)
        self._stores.append(s)
        return s

    def gram(self, store: ReferenceStore | SketchStore) -> np.ndarray:
        """Per-module Gram matrices of a store's rows, ``(modules, rows, rows)`` (summed across the ranks of a
        sharded model: exact rows hold each rank's pieces; sketched rows are already whole)."""
        if isinstance(store, ReferenceStore) and self.probe.group.active:
            part = store.module_gram(self.module_index, len(self.module_names), self.acc_dtype,
                                     owned=self.probe.group.owned)
            return self.probe.group.all_reduce(part)
        return store.module_gram(self.module_index, len(self.module_names), self.acc_dtype)

    def sketch_widths(self) -> np.ndarray | None:
        """Buckets per module (sketch mode), else None."""
        return None if self.spec is None else np.asarray(self.spec.widths, dtype=np.float64)

    # ------------------------------------------------------------------ running
    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)

    @contextlib.contextmanager
    def session(self, sink: str | os.PathLike[str] | None = None) -> Iterator[Measurement]:
        """Measurement state and hooks for the block; rows go to ``sink`` (CSV) as they come. Ctrl-C ends the
        block quietly with :attr:`complete` False; everything is restored in ``finally``."""
        if sink is not None:
            Path(sink).parent.mkdir(parents=True, exist_ok=True)
            self._sink = io.RowSink(sink)
        try:
            with measurement_mode(self.model, self.selection, eval_mode=self.eval_mode), self.probe.attached():
                yield self
        except KeyboardInterrupt:
            self.complete = False
        finally:
            if self._sink is not None:
                self._sink.close()
                self._sink = None

    def run(self, batch: Any, **kw: Any) -> tuple[BatchGrad, dict[str, Any]]:
        """Forward and backward one batch (see :meth:`GradientProbe.run_batch`); also its ``batch_info``."""
        info = dict(self.batch_info(batch)) if self.batch_info is not None else {}
        return self.probe.run_batch(self.loss_fn, batch, **kw), info

    def record(self, row: Mapping[str, Any]) -> None:
        """Append one per-batch row to the sink (kept even if the run is killed)."""
        if self._sink is not None:
            self._sink.write(row)

    def image_phase(self, images: Sequence[Any], store: ReferenceStore | SketchStore, per: int,
                    rows: list[dict[str, Any]]) -> list[int]:
        """Accumulate image-group mean gradients into ``store``: group g holds batches ``g·per … (g+1)·per − 1``.

        A group with a non-finite batch is dropped from ``store``; the kept rows are scaled to means.
        ``rows`` gets one dict per image batch as it is measured. Returns the kept groups.

        Raises:
            DataError: every image batch gave a non-finite loss or gradient.
        """
        G = store.rows
        self.progress.start("image", len(images))
        bad_group = np.zeros(G, dtype=bool)
        for k, batch in enumerate(images):
            g = k // per
            r = self.probe.run_batch(self.loss_fn, batch, accumulate=store, accumulate_row=g)
            if not r.finite:
                bad_group[g] = True
                self.warn(f"image batch {k}: non-finite loss or gradient; its group {g} is excluded")
            rows.append({"batch": k, "group": g, "loss": r.loss,
                         "norm": math.sqrt(max(r.sqnorm.sum(), 0.0)) if r.finite else float("nan"),
                         "finite": r.finite})
            self.progress.advance("image")
        self.progress.finish("image")
        finite_groups = [g for g in range(G) if not bad_group[g]]
        if not finite_groups:
            raise DataError("every image batch gave a non-finite loss or gradient")
        if len(finite_groups) < G:
            store.keep_rows(finite_groups)
        store.scale_(torch.full((store.rows,), 1.0 / per, dtype=torch.float64))
        if store.rows < 2:
            self.warn("only one image group: intervals treat ḡ_img as exact and norm_img is unavailable; "
                      "use more image batches or image_groups >= 2")
        elif store.rows < MIN_GOOD_GROUPS:
            self.warn(f"only {store.rows} image groups: with fewer than {MIN_GOOD_GROUPS} the intervals may "
                      "under-cover when image-batch noise dominates; use more image batches or image_groups")
        return finite_groups

    def settings(self) -> dict[str, Any]:
        """What ``summary.json`` records of the mode."""
        rows = sum(s.rows for s in self._stores)
        out: dict[str, Any] = {
            "mode": self.mode,
            "chosen": self.reason,
            "rows": rows,
            "rows_bytes": sum(s.nbytes for s in self._stores),
            "exact_rows_bytes": self.exact_bytes,
        }
        if self.spec is not None:
            out.update(k=self.spec.k, seed=self.spec.seed, fingerprint=self.spec.fingerprint,
                       hash_version=self.spec.to_dict()["hash_version"],
                       note="sketched inner products: unbiased, Var = Σ_modules (‖a‖²‖b‖² + ⟨a,b⟩²)/w_module; "
                            "squared norms and losses exact")
        return out


def _gib(n: float) -> str:
    g = n / 2**30
    return f"{g:,.0f} GiB" if g >= 1000 else f"{g:.3g} GiB"
