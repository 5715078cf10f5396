"""Held-out accuracy along a Trainer run, scored free and answer-restricted.

Rows go to ``<output_dir>/gradprobe_eval.jsonl``: ``{"step", "image_free", "image_restricted",
"video_free", "video_restricted", "n_image", "n_video"}`` and the per-record correctness behind each
accuracy (``image_free_items`` … as strings of ``0``/``1``, for paired comparisons), and each record's question
type and ``m_min`` (``image_qtypes``, ``video_qtypes``, ``image_m_min``, ``video_m_min``). Step s is the model after s optimizer
steps, as in the alignment trajectory (whose row s probes the update applied after s steps).
Evaluation runs in eval mode with the RNG state restored, so it does not change the run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from gradprobe.outputs import EVAL_FILE
from gradprobe.train._common import truncate_jsonl
from gradprobe.train.evaluate import accuracy, record_types
from gradprobe.train.monitor import _isolated


class AccuracyCallback(TrainerCallback):
    """Evaluate image and video accuracy every ``every`` optimizer steps (and before the first).

    Args:
        image_records, video_records: held-out records with ``choices``.
        image_collator, video_collator: collators that keep labels (the video one at the evaluation budget).
        every: evaluate every this many steps.
    """

    def __init__(self, image_records: Sequence[Mapping[str, Any]], video_records: Sequence[Mapping[str, Any]],
                 image_collator: Any, video_collator: Any, *, every: int) -> None:
        self.images, self.videos = list(image_records), list(video_records)
        self.image_collator, self.video_collator = image_collator, video_collator
        self.every = every
        #: each record's question type and m_min, for per-type changes (:func:`~gradprobe.train.evaluate.type_changes`)
        self.types = {kind: record_types(records) for kind, records in (("image", self.images), ("video", self.videos))}
        self.rows: list[dict[str, Any]] = []

    def _evaluate(self, args: Any, step: int, model: Any) -> None:
        with _isolated(model):
            img = accuracy(model, self.image_collator, self.images)
            vid = accuracy(model, self.video_collator, self.videos)
        row = {
            "step": step,
            "image_free": img["free"], "image_restricted": img["restricted"], "n_image": img["n"],
            "video_free": vid["free"], "video_restricted": vid["restricted"], "n_video": vid["n"],
            **{f"{kind}_{how}_items": acc[f"{how}_items"] for kind, acc in (("image", img), ("video", vid))
               for how in ("free", "restricted")},
            **{f"{kind}_{field}": values for kind, types in self.types.items() for field, values in types.items()},
        }
        self.rows.append(row)
        with open(Path(args.output_dir) / EVAL_FILE, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        # resumed from checkpoint S: row S was written (in on_step_end) before S was saved; later rows are redone
        truncate_jsonl(Path(args.output_dir) / EVAL_FILE, state.global_step)
        if state.global_step == 0:
            self._evaluate(args, 0, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or control.should_training_stop or state.global_step >= state.max_steps:
            self._evaluate(args, state.global_step, model)
