"""A transformers ``TrainerCallback`` that watches image–video alignment during the real run.

The run's own update gradient is the video gradient: in ``on_pre_optimizer_step`` (after
accumulation and clipping) the callback hands the model to an :class:`AlignmentMonitor`,
which recomputes the held-out image probe gradient at the current parameters and dots it
with the update. Rows go to ``<output_dir>/gradprobe_trajectory.jsonl``; scalars go through
the Trainer's own logging (``trainer.log``) when the callback is bound to the trainer, so
TensorBoard, W&B and CSV loggers and ``state.log_history`` receive them. It is bound by
:func:`watch`, and binds itself when it is passed to the Trainer's constructor
(``Trainer(..., callbacks=[cb])``, which is how LLaMA-Factory's ``run_exp`` and ms-swift pass
callbacks: see :mod:`gradprobe.integrations`). Added after construction with
``trainer.add_callback`` it stays unbound: its scalars are then only added to the next ``on_log``
call's ``logs``, which the reporting integrations and the log history have already read, so they
reach nothing but callbacks after it; its JSONL rows are written either way.

With ``video_probe`` (budget m → fixed video batches, the same clips at every m), every
``budgets_every`` steps the callback also runs :func:`gradprobe.align` at the current
parameters (after the optimizer step, when gradients are already zeroed) and appends A(m)
with intervals and m* to ``<output_dir>/gradprobe_budgets.jsonl``, so the threshold can be
followed along the run.

Distributed runs (DDP, FSDP2 through accelerate): bound (``watch``), the callback gets the
Trainer's wrapped model and each rank gives its own share of the image probe batches. Unbound
(e.g. passed through a stack's ``callbacks=[...]``), it sees the unwrapped model: under DDP
every rank then needs the whole probe set; FSDP2 parameters are sharded DTensors either way,
so each rank gives its share; so are DeepSpeed ZeRO-3 partitions (bound: the engine). See
:mod:`gradprobe.train.distributed`. The multi-budget probe is single-process only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from gradprobe.errors import InputError
from gradprobe.outputs import TRAINING_BUDGETS, TRAJECTORY
from gradprobe.train._common import truncate_jsonl
from gradprobe.train.monitor import AlignmentMonitor, _isolated

#: Rows of the multi-budget probe: A(m) and m* per probe step.
BUDGETS = TRAINING_BUDGETS


def hf_loss(model: Any, batch: Mapping[str, Any]) -> Any:
    """The model's own loss on a batch that carries ``labels``, its tensors moved to the model's device.

    Probe batches are collated once, before the Trainer has placed the model; ``.to`` is a no-op when
    they already live there.
    """
    from gradprobe.models.base import strip_info

    device = next(model.parameters()).device
    return model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in strip_info(batch).items()}).loss


class Uncollated:
    """Probe records the Trainer's own ``data_collator`` collates when training begins (chunks of features
    as the stack's dataset pipeline prepared them), so probe batches are formatted exactly like training
    batches. Under DDP each rank takes every ``world``-th chunk; the count must divide evenly."""

    def __init__(self, chunks: Sequence[Sequence[Any]]) -> None:
        self.chunks = [list(c) for c in chunks]

    def collate(self, trainer: Any) -> list[Any]:
        if trainer is None:
            raise InputError("uncollated probe records need the Trainer: pass the callback to its constructor "
                             "or use gradprobe.watch")
        world, rank = trainer.args.world_size, trainer.args.process_index
        if len(self.chunks) % world:
            raise InputError(f"{len(self.chunks)} probe batches cannot be shared evenly by {world} ranks")
        return [trainer.data_collator(c) for c in self.chunks[rank::world]]


class AlignmentCallback(TrainerCallback):
    """Probe ``<g_update, ḡ_img>`` every ``every`` optimizer steps of a ``Trainer`` run.

    Args:
        image_batches: held-out image batches (already collated), or :class:`Uncollated` records for the
            Trainer's own collator.
        loss_fn: ``loss_fn(model, batch)``; default: ``model(**batch).loss``.
        every: probe every this many optimizer steps.
        guard: ``observe``, ``warn``, ``stop`` or ``project`` (see :mod:`gradprobe.train.monitor`).
        **monitor_options: passed to :class:`AlignmentMonitor` (selection, image_groups, ...).
    """

    def __init__(self, image_batches: Sequence[Any], loss_fn: Any = None, *, every: int = 50,
                 guard: str = "observe", video_probe: Mapping[int, Sequence[Any]] | None = None,
                 budgets_every: int | None = None, **monitor_options: Any) -> None:
        self.image_batches = image_batches if isinstance(image_batches, Uncollated) else list(image_batches)
        self.video_probe = dict(video_probe) if video_probe else None
        self.budgets_every = budgets_every or every
        self.budget_rows: list[dict[str, Any]] = []
        self.loss_fn = loss_fn or hf_loss
        self.every = every
        self.guard = guard
        self.options = monitor_options
        self.monitor: AlignmentMonitor | None = None
        self._trainer: Any = None
        self._pending: dict[str, float] | None = None
        self._state: Any = None
        self._control: Any = None

    def bind(self, trainer: Any) -> AlignmentCallback:
        """Log through ``trainer.log`` (reaches every logging integration)."""
        self._trainer = trainer
        return self

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Passed to a Trainer's constructor (``callbacks=[...]``, as LLaMA-Factory's run_exp and ms-swift
        # do), the callback binds itself to that Trainer: the one whose __init__ is calling us.
        if self._trainer is None:
            self._trainer = _constructing_trainer()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if isinstance(self.image_batches, Uncollated):
            self.image_batches = self.image_batches.collate(self._trainer)
        # the Trainer hands callbacks the unwrapped model; a distributed run needs the DDP/FSDP wrapper
        wrapped = getattr(self._trainer, "model_wrapped", None)
        if wrapped is None:  # unbound (or not prepared yet): the model the Trainer hands callbacks
            wrapped = model
        self.monitor = AlignmentMonitor(
            wrapped, self.image_batches, self.loss_fn, every=self.every, guard=self.guard,
            trajectory=Path(args.output_dir) / TRAJECTORY, **self.options,
        )
        # resumed from a checkpoint after step S: rows of steps >= S are recomputed, so drop them
        self.monitor.truncate_trajectory(state.global_step - 1)
        if self.video_probe is not None and self.monitor.layout.active:
            raise InputError("video_probe (the multi-budget probe) runs in single-process training only")
        if self.video_probe is not None:
            truncate_jsonl(Path(args.output_dir) / BUDGETS, state.global_step)  # row S precedes checkpoint S
            if state.global_step == 0:
                self._budgets(args, 0, model)

    def _budgets(self, args: Any, step: int, model: Any) -> None:
        """A(m) and m* on the fixed video probe set at every budget, at the current parameters."""
        import warnings

        from gradprobe.estimators.align import align

        opts = {k: v for k, v in self.options.items() if k in ("include", "exclude", "roles", "role_of",
                                                                 "module_of", "image_groups", "reference_dtype", "sketch",
                                                                 "sketch_seed")}
        with _isolated(model, self.monitor.checkpointing), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-run notes stay in the row itself
            rep = align(model, self.image_batches, self.video_probe, self.loss_fn, n_boot=500, **opts)
        keep = ("frames", "n", "mean", "stderr", "ci95_t", "ci95_boot", "frac_negative", "mean_cos")
        row = {"step": step, "budgets": [{k: b.get(k) for k in keep} for b in rep.summary["budgets"]],
               "m_star": rep.summary["m_star"], "warnings": rep.summary["warnings"]}
        self.budget_rows.append(row)
        with open(Path(args.output_dir) / BUDGETS, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._state, self._control = state, control
        engine = self._deepspeed_engine()
        if engine is not None and "step" not in vars(engine):
            # accelerate runs DeepSpeed's whole step (clip, update, zero_grad) inside accelerator.backward, before
            # on_pre_optimizer_step: measure (and guard) right before it instead
            original = engine.step

            def step(*a: Any, **kw: Any) -> Any:
                self._before_step(self._state, self._control)
                return original(*a, **kw)

            engine.step = step

    def _deepspeed_engine(self) -> Any:
        """The DeepSpeed engine the Trainer steps (None for any other run)."""
        if self.monitor is None or not self.monitor.layout.deepspeed:
            return None
        return getattr(self._trainer, "model_wrapped", None) if self._trainer is not None else None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._deepspeed_engine() is None:
            self._before_step(state, control)

    def _before_step(self, state: Any, control: Any) -> None:
        row = self.monitor.before_step(state.global_step)
        if row is not None and row.get("finite"):
            self._pending = {
                "gradprobe/alignment": row["alignment"],
                "gradprobe/cos": row["cos"],
                "gradprobe/update_norm": row["update_norm"],
                "gradprobe/image_probe_loss": row["image_loss"],
            }
        if self.monitor.should_stop:
            control.should_training_stop = True

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # gradients are already zeroed here, so the multi-budget probe disturbs nothing
        if self.video_probe is not None and state.global_step % self.budgets_every == 0:
            self._budgets(args, state.global_step, model)
        if self._pending and self._trainer is not None:
            pending, self._pending = self._pending, None
            # Trainer.log resets control.should_log; put it back, or the Trainer skips its own loss log here
            should_log = control.should_log
            self._trainer.log(pending)
            control.should_log = should_log

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        engine = self._deepspeed_engine()
        if engine is not None:
            vars(engine).pop("step", None)  # the engine's own step again
        m = self.monitor
        if m.layout.rank != 0:
            return
        report = {"guard": self.guard, "fired": m.fired, "probes": len(m.rows), "stop_reason": m.stop_reason}
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "gradprobe_guard.json").write_text(json.dumps(report, indent=2) + "\n")


def _constructing_trainer() -> Any:
    """The ``transformers.Trainer`` whose ``__init__`` is on the call stack (None if there is none)."""
    import inspect

    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and frame.f_code.co_name == "__init__":
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def watch(trainer: Any, image_batches: Sequence[Any], **options: Any) -> AlignmentCallback:
    """Add an :class:`AlignmentCallback` to ``trainer`` and bind it for logging."""
    cb = AlignmentCallback(image_batches, **options).bind(trainer)
    trainer.add_callback(cb)
    return cb
