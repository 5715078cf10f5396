"""The per-sample form of Eq. 28: does a clip's allocated budget conflict less with images than the largest?

For each clip whose allocated budget m_c is below the largest budget M, the alignment of its answer-loss
gradient with the mean image gradient, ``A_c(m) = ⟨ḡ_img, g_c(m)⟩``, at m_c and at M; their paired
difference ``A_c(m_c) − A_c(M)`` over clips gets a Student-t interval (over clips, with ḡ_img held fixed:
the image reference is one mean over the image batches given, exact or sketched as in ``gradprobe align``).
Positive: the allocation makes the clip's update less harmful to images, as Eq. 28 says it should when the
dropped frames carry the conflicting temporal component.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradprobe.estimators.stats import weighted_mean_ci


def clip_alignment(model: Any, adapter: Any, store: Any, image_batches: Sequence[Any],
                   clips: Sequence[tuple[Any, int]], largest: int, *, sketch: str | int = "auto",
                   on_row: Callable[[dict[str, Any]], None] | None = None, progress: Any = None) -> dict[str, Any]:
    """A_c at each clip's allocated budget and at the largest, and their paired difference.

    Args:
        image_batches: collated image batches on the model's device (their mean gradient is ḡ_img).
        clips: (sample, allocated budget) pairs, the budget below ``largest``.
        on_row: called with each clip's row as it is measured.

    Returns:
        ``{"n", "allocated", "largest", "difference", "mode", "rows"}``; each of the three a
        ``{"mean", "stderr", "ci95"}`` over clips.
    """
    from gradprobe.budget.methods import to_model
    from gradprobe.models.base import loss_fn
    from gradprobe.probe.measure import Measurement

    meas = Measurement(model, loss_fn, role_of=adapter.role_of, module_of=adapter.module_of, sketch=sketch,
                       exact_rows=1, progress=progress)
    rows: list[dict[str, Any]] = []
    with meas.session():
        ref = meas.store(1)
        with warnings.catch_warnings():  # one image group by design: ḡ_img is held fixed (see the module docstring)
            warnings.filterwarnings("ignore", message="only one image group")
            meas.image_phase(list(image_batches), ref, len(image_batches), [])
        if progress is not None:
            progress.start("clips (Eq. 28)", len(clips))
        for sample, m in clips:
            a = {}
            for budget in (m, largest):
                r, _ = meas.run(to_model(adapter.collate([sample], store=store, m=budget), model), refs=ref)
                a[budget] = float(r.dots.sum()) if r.finite else float("nan")
            row = {"id": sample.id, "frames": m, "A_allocated": a[m], "A_largest": a[largest],
                   "difference": a[m] - a[largest], **{k: sample.extra[k] for k in ("qtype", "m_min")
                                                      if k in sample.extra}}
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if progress is not None:
                progress.advance("clips (Eq. 28)")
        if progress is not None:
            progress.finish("clips (Eq. 28)")
    good = [r for r in rows if np.isfinite(r["difference"])]

    def ci(key: str) -> dict[str, Any]:
        if not good:
            return {"mean": None, "stderr": None, "ci95": None}
        mean, se, interval = weighted_mean_ci([r[key] for r in good])
        return {"mean": mean, "stderr": se, "ci95": list(interval) if interval else None}

    return {"n": len(good), "allocated": ci("A_allocated"), "largest": ci("A_largest"),
            "difference": ci("difference"), "mode": meas.mode, "complete": meas.complete, "rows": rows,
            "note": "A_c(m) = ⟨ḡ_img, g_c(m)⟩ per clip whose allocated budget is below the largest; difference: "
                    "A at the allocated budget minus at the largest (positive: less conflict), Student-t over "
                    "clips with ḡ_img held fixed"}
