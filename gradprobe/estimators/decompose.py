"""The α(m) decomposition of the video gradient (Eq. 15–23), its assumption checks, and the model-based m*.

Section 5.3 writes the video gradient at frame budget m as ``g_vid^(m) = g_sh + α(m) g_tmp + ε(m)``
and, with ``ρ_sh = E⟨g_img, g_sh⟩`` and ``ρ_tmp = −E⟨g_img, g_tmp⟩``, predicts
``E⟨g_img, g_vid^(m)⟩ = ρ_sh − α(m) ρ_tmp`` (Eq. 20) and the threshold
``m* = min{m : α(m) ρ_tmp ≥ ρ_sh}`` (Eq. 22). This module estimates every piece.

What is estimated:

* **g_sh** is the mean gradient of a temporally collapsed variant of the *same clips*: by default
  the smallest budget (one variant for every m); or, at each budget m, the clips with one frame
  copied m times (``static``) or with their frames in random order (``shuffled``), so that the
  sequence length matches (then g_sh, and ρ_sh, may depend on m; the tables show it).
* **ĝ_tmp and α(m).** With ``d_m = E g_vid^(m) − g_sh``, ĝ_tmp is the unit vector along the leading
  eigenvector of the Gram matrix ``D[m, m'] = ⟨d_m, d_m'⟩`` over the grid (the best rank-one fit of
  the d_m), and ``α(m) = ⟨d_m, ĝ_tmp⟩``, signed so that α at the largest budget is ≥ 0. Only the
  direction of g_tmp is identified, so α carries its norm; ``α(m) ρ_tmp`` does not depend on that
  choice. ĝ_tmp is ``Σ_m c_m d_m`` with the coefficients c_m reported in ``summary.json``.
* **ε(m)** ``= g_vid^(m) − g_sh − α(m) ĝ_tmp``. Its interaction with the image gradient,
  ``E⟨g_img, ε(m)⟩ = A(m) − (ρ_sh − α(m) ρ_tmp)``, is the residual of Eq. 20 (Assumption 5), and
  ``Var ε(m) = E‖g^(m)‖² − ‖E g^(m)‖²`` is the total variance of one batch's gradient (g_sh and
  α(m) ĝ_tmp are fixed vectors).

How: image batches are split into G groups whose mean gradients are kept
as reference rows; the J video batches into H groups, and the mean gradient of every variant
(each budget and each shared variant) in each video group is kept as a row too. Backward hooks
dot every video batch's gradient with the image rows and add it into its group row, so no
gradient is ever held twice. Then

* ``⟨E g_img, E g_v⟩`` is the grand mean of the image-group × video-batch dots (unbiased: the
  two are independent draws);
* ``⟨E g_v, E g_w⟩`` is the mean of ``⟨ḡ_v,h, ḡ_w,h'⟩`` over *distinct* video groups h ≠ h'
  (unbiased: distinct groups hold different clips; the same group's variants share clips);
* ``E‖g_v‖²`` is the mean of the per-batch squared norms.

Intervals are expanded percentile intervals of a bootstrap that resamples image groups and video
groups jointly; their degrees of freedom are a Satterthwaite combination of the two marginal
bootstrap variances. The measured A(m) also gets the two-way t interval of
:func:`gradprobe.align` (the same batches give the same mean).

Checks (``held`` / ``violated`` / ``inconclusive``, each with its statistic and interval) use a
practical tolerance τ = ``tolerance`` × the scale of the quantity: a claim "x ≥ 0" holds when the
interval's lower end is ≥ −τ and is violated when its upper end is < −τ; "x ≈ 0" holds when the
interval lies inside [−τ, τ] and is violated when it lies outside; "x > 0" (Assumption 3) is a
sign test without tolerance. Everything is homogeneous in the loss scale, so the verdicts do not
change when the loss is multiplied by a constant.
"""

from __future__ import annotations

import datetime as _dt
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from gradprobe import outputs as io
from gradprobe._checks import check_frames
from gradprobe._version import __version__
from gradprobe.errors import DataError, InputError, RunInterrupted
from gradprobe.estimators import stats
from gradprobe.probe.hooks import LossFn
from gradprobe.probe.measure import Measurement, Progress, group_count, image_group_count
from gradprobe.probe.select import ModuleOf, RoleOf

__all__ = ["DecomposeInterrupted", "DecomposeReport", "decompose"]

SCHEMA, BUDGETS, BATCHES, CHECKS = io.DECOMPOSE_SCHEMA, io.DECOMPOSE_BUDGETS, io.DECOMPOSE_BATCHES, io.DECOMPOSE_CHECKS
SHARED_MODES = ("smallest", "static", "shuffled")
HELD, VIOLATED, INCONCLUSIVE = "held", "violated", "inconclusive"
#: Default largest number of video groups (each keeps one mean gradient per variant).
MAX_VIDEO_GROUPS = 12
#: Fewer video groups than this and the bootstrap intervals under-cover (tests/test_decompose.py).
MIN_VIDEO_GROUPS = 8
#: relative size below which an eigenvalue or a difference counts as rounding, not signal
_ROUNDING = 1e-9


@dataclass
class DecomposeReport:
    """Result of :func:`decompose`.

    Attributes:
        summary: exactly the dict written to ``summary.json`` (schema ``gradprobe.decompose/1``).
        budgets: one row per budget (``decompose.csv``): A(m), ρ_sh, α(m), the contributions, the
            prediction of Eq. 20, the residual and Var ε(m), with intervals.
        checks: one row per check (``decompose_checks.csv``).
        batches: one row per variant × video batch (``decompose_batches.csv``).
    """

    summary: dict[str, Any]
    budgets: pd.DataFrame
    checks: pd.DataFrame
    batches: pd.DataFrame

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write summary.json and the CSV tables into ``out_dir`` (created if needed)."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.budgets.to_csv(d / BUDGETS, index=False)
        self.checks.to_csv(d / CHECKS, index=False)
        self.batches.to_csv(d / BATCHES, index=False)
        io.write_json(d / io.SUMMARY, self.summary)
        return d


class DecomposeInterrupted(RunInterrupted):
    """Raised when a run is interrupted; ``.report`` holds the decomposition over the finished video groups."""

    what = "decomposition run"


@dataclass(frozen=True)
class _Variant:
    label: str
    frames: int | None
    role: str  # "budget" or "shared"
    batches: Sequence[Any]


def _seq(batches: Iterable[Any]) -> Sequence[Any]:
    return batches if isinstance(batches, Sequence) else list(batches)


def check_tolerance(tolerance: float) -> float:
    """The checks' relative tolerance: a finite number > 0."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
        math.isfinite(tolerance) and tolerance > 0
    ):
        raise InputError(f"tolerance: expected a number > 0, got {tolerance!r}")
    return float(tolerance)


def decompose(
    model: torch.nn.Module,
    image_batches: Iterable[Any],
    video_batches: Mapping[int, Iterable[Any]],
    loss_fn: LossFn,
    *,
    shared: Iterable[Any] | Mapping[int, Iterable[Any]] | None = None,
    shared_label: str | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    roles: str | Sequence[str] | None = None,
    role_of: RoleOf | None = None,
    module_of: ModuleOf | None = None,
    image_groups: int | None = None,
    video_groups: int | None = None,
    sketch: str | int | None = "auto",
    sketch_seed: int = 0,
    reference_device: str = "model",
    reference_dtype: str | torch.dtype | None = None,
    tolerance: float = 0.1,
    redundant_from: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    eval_mode: bool = True,
    batch_info: Callable[[Any], Mapping[str, Any]] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    meta: Mapping[str, Any] | None = None,
) -> DecomposeReport:
    """Estimate g_sh, ĝ_tmp, α(m), ρ_sh, ρ_tmp and ε(m), check Assumptions 3–5, and give both m*.

    Args:
        model: any ``torch.nn.Module``; put in eval mode for the run and restored.
        image_batches: K image minibatches (split into G groups).
        video_batches: frame budget m → its video minibatches; batch j holds the same clips at
            every m (paired), and there are J ≥ 2 of them.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        shared: the temporally collapsed variant that defines g_sh, paired with the video batches:
            None (default) uses the smallest budget of ``video_batches``; a sequence of batches is one
            shared variant for every m (e.g. the smallest budget the model accepts); a mapping
            m → batches is a shared variant per budget (e.g. the ``static`` sampler at every m).
        shared_label: how the shared variant is described in the outputs.
        include, exclude, roles, role_of, module_of: parameter selection.
        image_groups: G (must divide K; default the largest divisor of K ≤ 8).
        video_groups: H (must divide J, ≥ 2; default the largest divisor of J between 2 and 12). With
            fewer than 8 the intervals of α(m), ρ_tmp and Var ε(m) under-cover.
            Memory: (G + H × variants) reference rows of the selected parameters' size.
        sketch: ``auto``, ``exact`` or a number of buckets k: rows as exact copies or as sketches
            (:mod:`gradprobe.probe.measure`); with sketches G defaults to K.
        sketch_seed: seed of the sketch map.
        reference_device, reference_dtype: where and in what dtype the rows are kept.
        tolerance: relative tolerance τ of the checks (see the module docstring).
        redundant_from: check "Var ε(m) non-decreasing" over the budgets ≥ this (default: all).
        n_boot: bootstrap resamples (0: no intervals, every check inconclusive).
        seed: seed of the bootstrap.
        eval_mode: run the model in eval mode.
        batch_info: ``batch_info(batch) -> dict`` of extra per-batch columns.
        out_dir: if given, per-batch rows are appended to ``decompose_batches.csv`` as they are
            computed and every output is written at the end (or on interruption).
        progress: progress callbacks.
        meta: extra JSON-safe fields recorded under ``summary["meta"]``.

    Raises:
        InputError, BudgetError, DataError: bad options or data.
        DecomposeInterrupted: on KeyboardInterrupt, carrying the report over the finished video groups.
    """
    if not isinstance(video_batches, Mapping):
        raise InputError("video_batches must map each frame budget m to its batches")
    frames = check_frames(video_batches.keys())
    M = len(frames)
    variants = [_Variant(f"m={m}", m, "budget", _seq(video_batches[m])) for m in frames]
    if shared is None:
        sh_of = [0] * M
        mode, label = "smallest_in_grid", shared_label or f"smallest budget in the grid (m={frames[0]})"
    elif isinstance(shared, Mapping):
        if check_frames(shared.keys()) != frames:
            raise InputError("shared: a per-budget shared variant needs batches at exactly the budgets of video_batches")
        variants += [_Variant(f"shared m={m}", m, "shared", _seq(shared[m])) for m in frames]
        sh_of = list(range(M, 2 * M))
        mode, label = "per_budget", shared_label or "per-budget shared variant"
    else:
        variants.append(_Variant("shared", None, "shared", _seq(shared)))
        sh_of = [M] * M
        mode, label = "fixed", shared_label or "shared variant"
    V = len(variants)
    J = len(variants[0].batches)
    for v in variants:
        if len(v.batches) != J:
            raise DataError(f"{v.label}: {len(v.batches)} batches, but {variants[0].label} has {J}; every budget and "
                            "the shared variant need the same clips in the same order (paired)")
    if J < 2:
        raise DataError(f"{J} video batches: the decomposition needs at least 2 (Gram terms across distinct batches)")
    images = list(image_batches)
    K = len(images)
    if K == 0:
        raise DataError("no image batches")
    G = image_group_count(K, image_groups)
    H = group_count(J, video_groups, "video_groups", "video batches", minimum=2, maximum=MAX_VIDEO_GROUPS)
    tolerance = check_tolerance(tolerance)
    if redundant_from is not None and not any(m >= redundant_from for m in frames):
        raise InputError(f"redundant_from: no budget is >= {redundant_from} (budgets: {frames})")
    if n_boot < 0:
        raise InputError(f"n_boot: expected >= 0, got {n_boot}")
    meas = Measurement(model, loss_fn, include=include, exclude=exclude, roles=roles, role_of=role_of,
                       module_of=module_of, sketch=sketch, sketch_seed=sketch_seed, exact_rows=G + H * V,
                       reference_device=reference_device, reference_dtype=reference_dtype, eval_mode=eval_mode,
                       batch_info=batch_info, progress=progress)
    if meas.sketched and image_groups is None:
        G = K  # a sketched row costs k numbers: every image batch is its own row
    progress = meas.progress
    per_img, per_vid = K // G, J // H
    image_rows: list[dict[str, Any]] = []
    batch_rows: list[dict[str, Any]] = []
    img_store = meas.store(G)
    vid_store = meas.store(H * V)
    n_mod = len(meas.module_names)
    TM = np.full((n_mod, V, G, J), np.nan)  # per module: dots of each batch with each image-group mean
    S = np.full((V, J), np.nan)  # squared norms
    losses = np.full((V, J), np.nan)
    finite = np.zeros((V, J), dtype=bool)
    done = np.zeros(H, dtype=bool)
    finite_groups: list[int] = []
    with meas.session(Path(out_dir) / BATCHES if out_dir is not None else None):
        finite_groups = meas.image_phase(images, img_store, per_img, image_rows)
        progress.start("video", J * V)
        for j in range(J):
            h = j // per_vid
            for v, var in enumerate(variants):
                r, info = meas.run(var.batches[j], refs=img_store, accumulate=vid_store, accumulate_row=h * V + v)
                col = r.dots.sum(axis=0)
                TM[:, v, : len(col), j] = r.dots
                S[v, j] = float(r.sqnorm.sum())
                losses[v, j] = r.loss
                finite[v, j] = r.finite
                row = {"variant": var.label, "role": var.role, "frames": var.frames, "batch": j, "group": h,
                       "loss": r.loss, "sqnorm": S[v, j], "dot_img": float(col.mean()) if col.size else None,
                       "finite": r.finite, **info}
                batch_rows.append(row)
                meas.record(row)
                if not r.finite:
                    meas.warn(f"{var.label} batch {j}: non-finite loss or gradient; video group {h} is excluded")
                progress.advance("video")
            if j % per_vid == per_vid - 1:
                done[h] = True
        progress.finish("video")

    complete = meas.complete
    warn = meas.warn
    G_used = len(finite_groups)
    groups = [h for h in range(H) if done[h] and finite[:, h * per_vid : (h + 1) * per_vid].all()]
    if not complete and len(groups) < H:
        warn(f"interrupted: {len(groups)} of {H} video groups finished; the decomposition uses those")
    elif len(groups) < H:
        warn(f"{H - len(groups)} of {H} video groups excluded (non-finite batches)")
    if groups and len(groups) < MIN_VIDEO_GROUPS:
        warn(f"only {len(groups)} video groups: with fewer than {MIN_VIDEO_GROUPS} the intervals of α(m), ρ_tmp and "
             "Var ε(m) under-cover (about 91% at 6 groups and 85% at 4 in planted tests); use more video batches "
             "or video_groups")
    raw = None
    if G_used and len(groups) >= 2:
        cols = np.concatenate([np.arange(h * per_vid, (h + 1) * per_vid) for h in groups])
        vid_store.scale_(torch.full((vid_store.rows,), 1.0 / per_vid, dtype=torch.float64))
        gram_m = meas.gram(vid_store).reshape(n_mod, H, V, H, V)[np.ix_(range(n_mod), groups, range(V), groups,
                                                                               range(V))]
        img_gram_m = meas.gram(img_store)
        TM = TM[:, :, :G_used][:, :, :, cols]
        group = np.repeat(np.arange(len(groups)), per_vid)
        raw = _Raw(T=TM.sum(axis=0), S=S[:, cols], group=group, gram=gram_m.sum(axis=0),
                   img_gram=img_gram_m.sum(axis=0))
        if meas.sketched:  # the moments per module, for the sketch error of the expected vectors' Gram
            raw.modules = [_Raw(T=TM[i], S=np.zeros_like(raw.S), group=group, gram=gram_m[i], img_gram=img_gram_m[i])
                           for i in range(n_mod)]
            raw.widths = meas.sketch_widths()
    elif complete:
        raise DataError("fewer than 2 video groups have only finite batches: nothing to decompose")
    report = _finalize(
        raw=raw, frames=frames, variants=variants, sh_of=sh_of, mode=mode, label=label, tolerance=tolerance,
        redundant_from=redundant_from, n_boot=n_boot, seed=seed, complete=complete,
        settings={
            "image_batches": K, "image_groups": G, "image_groups_used": G_used, "video_batches": J,
            "video_groups": H, "video_groups_used": len(groups), "variants": [v.label for v in variants],
            "reference_device": reference_device, "reference_dtype": str(meas.ref_dtype).removeprefix("torch."),
            "reference_rows": G + H * V, "n_params": meas.selection.numel, "n_tensors": len(meas.selection),
            "include": include, "exclude": exclude, "roles": roles, "tolerance": tolerance,
            "redundant_from": redundant_from, "n_boot": n_boot, "seed": seed, "eval_mode": eval_mode,
            "sketch": meas.settings(),
        },
        image_rows=image_rows, batch_rows=batch_rows, losses=losses, per_vid=per_vid, groups=groups,
        warn_list=meas.warnings, meta=dict(meta or {}),
    )
    if out_dir is not None:
        report.save(out_dir)
    if not complete:
        raise DecomposeInterrupted(report)
    return report


# ---------------------------------------------------------------------------- estimation


@dataclass
class _Raw:
    """What the run measured, restricted to the finite image groups and the finished video groups."""

    T: np.ndarray  # (V, G, J): ⟨ḡ_img,g, g_v,j⟩
    S: np.ndarray  # (V, J): ‖g_v,j‖²
    group: np.ndarray  # (J,): video group of each batch (0 … H−1)
    gram: np.ndarray  # (H, V, H, V): ⟨ḡ_v,h, ḡ_w,h'⟩ of the video-group means
    img_gram: np.ndarray  # (G, G) of the image-group means
    modules: list[_Raw] | None = None  # sketch mode: the same per module
    widths: np.ndarray | None = None  # sketch mode: buckets per module

    @functools.cached_property
    def gammas(self) -> list[tuple[np.ndarray, float]]:
        """Sketch mode: per module, Γ of the expected vectors and the module's buckets (:func:`_module_gammas`)."""
        return _module_gammas(self)

    @property
    def H(self) -> int:
        return self.gram.shape[0]


def _cross_mean(gram: np.ndarray, diag: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mean of a Gram matrix over pairs of distinct resampled units, unit h drawn ``w[b, h]`` times.

    ``gram`` is (n, n, …) over the units and ``diag`` (n, …) its diagonal. With every weight 1 this
    is the U-statistic over distinct units (pairs h ≠ k: unbiased for ⟨E x, E y⟩). A resample pairs
    two copies of one unit; the diagonal ⟨x_h, y_h⟩ would then add the units' own noise, so copies
    pair through ``⟨x_h, y_h⟩ − (mean diagonal − U)`` instead: the resampled statistic keeps the mean
    of the U-statistic and a linear term proportional to the weights, as for a plain mean. (Leaving
    the copies' pairs out instead weights unit h by w_h (W − w_h) and understates the variance.)
    """
    n = gram.shape[0]
    off = gram.sum(axis=(0, 1)) - diag.sum(axis=0)
    u0 = off / (n * (n - 1))
    surrogate = diag - (diag.mean(axis=0) - u0)
    sub = "bh,hk...,bk->b..."
    total = np.einsum(sub, w, gram, w) - np.einsum("bh,h...->b...", w**2, diag - surrogate)
    W = w.sum(axis=1)
    total = total - np.einsum("bh,h...->b...", w, surrogate)
    return total / (W * (W - 1)).reshape((-1,) + (1,) * (total.ndim - 1))


def _moments(raw: _Raw, wg: np.ndarray, wh: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unbiased moments under weights on image groups ``wg`` (B, G) and video groups ``wh`` (B, H).

    Returns ``a`` (B, V): ⟨E g_img, E g_v⟩; ``C`` (B, V, V): ⟨E g_v, E g_w⟩ over distinct video groups;
    ``E2`` (B, V): E‖g_v‖²; ``img_sq`` (B,): ‖E g_img‖² over distinct image groups (NaN with one group).
    """
    H = raw.H
    onehot = np.eye(H)[raw.group]  # (J, H)
    per = onehot.sum(axis=0)
    Tg = np.einsum("vgj,jh->vgh", raw.T, onehot) / per  # (V, G, H)
    Sg = raw.S @ onehot / per  # (V, H)
    a = np.einsum("bg,vgh,bh->bv", wg, Tg, wh) / (wg.sum(1) * wh.sum(1))[:, None]
    gram = raw.gram.transpose(0, 2, 1, 3)  # (H, H, V, V)
    C = _cross_mean(gram, gram[np.arange(H), np.arange(H)], wh)
    C = (C + C.transpose(0, 2, 1)) / 2
    E2 = wh @ Sg.T / wh.sum(1)[:, None]
    ig = raw.img_gram
    img_sq = _cross_mean(ig, np.diag(ig), wg) if ig.shape[0] >= 2 else np.full(len(wg), np.nan)
    return a, C, E2, img_sq


def _decompose(a: np.ndarray, C: np.ndarray, E2: np.ndarray, sh_of: Sequence[int], M: int,
               ref: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The decomposition from the moments, vectorised over the leading (bootstrap) axis.

    ``ref = (D0, u0)``, the point estimate's d-Gram and signed eigenvector: each draw's direction is
    signed to agree with it (``u_bᵀ D0 u0 ≥ 0``). Without ``ref`` the sign makes α at the largest
    budget with a non-zero α positive.
    """
    B = a.shape[0]
    s = np.asarray(sh_of)
    A = a[:, :M]
    rho_sh = a[:, s]
    b = A - rho_sh  # ⟨E g_img, d_m⟩
    D = C[:, :M, :M] - C[:, :M][:, :, s] - C[:, s][:, :, :M] + C[:, s][:, :, s]
    D = (D + D.transpose(0, 2, 1)) / 2
    own = s == np.arange(M)  # a budget that is its own shared variant: d_m = 0 exactly, not up to rounding
    D[:, own, :] = 0.0
    D[:, :, own] = 0.0
    b[:, own] = 0.0
    sqd = np.einsum("bii->bi", D)
    scale = np.maximum(np.nan_to_num(np.abs(np.einsum("bii->bi", C[:, :M, :M]))).max(axis=1), np.finfo(float).tiny)
    ok = np.isfinite(D).all(axis=(1, 2))
    lam = np.full(B, np.nan)
    u = np.zeros((B, M))
    if ok.any():
        w, U = np.linalg.eigh(D[ok])
        lam[ok], u[ok] = w[:, -1], U[:, :, -1]
    resolved = ok & (lam > _ROUNDING * scale)
    u[~resolved] = 0.0
    sq = np.sqrt(np.where(resolved, lam, 0.0))
    alpha = sq[:, None] * u
    if ref is None:
        big = np.abs(alpha) > _ROUNDING * np.maximum(np.abs(alpha).max(axis=1, keepdims=True), np.finfo(float).tiny)
        last = np.where(big.any(axis=1), M - 1 - np.argmax(big[:, ::-1], axis=1), 0)
        sign = np.where(alpha[np.arange(B), last] < 0, -1.0, 1.0)
    else:
        D0, u0 = ref
        sign = np.where(np.einsum("bi,ij,j->b", u, D0, u0) < 0, -1.0, 1.0)
    u = u * sign[:, None] + 0.0  # + 0.0: no negative zeros
    alpha = alpha * sign[:, None] + 0.0
    proj = (u * b).sum(axis=1)  # uᵀb = √λ ⟨E g_img, ĝ_tmp⟩
    with np.errstate(invalid="ignore", divide="ignore"):
        rho_tmp = np.where(resolved, -proj / np.where(sq > 0, sq, 1.0), np.nan)
        coef = np.where(resolved[:, None], u / np.where(sq > 0, sq, 1.0)[:, None], 0.0)
        trace = sqd.sum(axis=1)
        explained = np.where(resolved & (trace > 0), lam / np.where(trace > 0, trace, 1.0), np.nan)
    alpha_rho = -u * proj[:, None]  # α(m) ρ_tmp = −u_m uᵀb (0 when no direction is resolved)
    A_pred = rho_sh - alpha_rho
    return {
        "A": A, "rho_sh": rho_sh, "b": b, "D": D, "lam": lam, "resolved": resolved, "u": u, "alpha": alpha,
        "rho_tmp": rho_tmp, "coef": coef, "alpha_rho": alpha_rho, "contrib_tmp": -alpha_rho, "A_pred": A_pred,
        "resid": A - A_pred, "var": E2[:, :M] - np.einsum("bii->bi", C[:, :M, :M]), "sqnorm_d": sqd,
        "explained": explained, "norm_sh_sq": np.einsum("bii->bi", C)[:, s], "rho_sh_mean": rho_sh.mean(axis=1),
        "norm_vid_sq": np.einsum("bii->bi", C[:, :M, :M]), "E2": E2[:, :M],
    }


@dataclass
class _Boot:
    """Bootstrap draws: joint, image groups only, video groups only."""

    joint: dict[str, np.ndarray]
    img: dict[str, np.ndarray]
    vid: dict[str, np.ndarray]
    G: int
    H: int
    plain: dict[str, np.ndarray] | None = None  # sketch mode: the joint draws without the sketch error

    def ci(self, key: str, point: float, index: Any = ()) -> tuple[float, float] | None:
        """Expanded percentile interval of ``key`` (element ``index`` of it, if given)."""
        return self.ci_of(point, lambda d: d[key][:, index] if index != () else d[key])

    def ci_of(self, point: float, pick: Callable[[dict[str, np.ndarray]], np.ndarray],
              plain: bool = False) -> tuple[float, float] | None:
        """Expanded percentile interval of the statistic ``pick(draws)``; df from the two marginal bootstrap
        variances (Satterthwaite). ``plain``: from the joint draws without the sketch error."""
        if not math.isfinite(point):
            return None
        terms = []
        for draws, n in ((self.img, self.G), (self.vid, self.H)):
            x = pick(draws)
            x = x[np.isfinite(x)]
            v = float(np.var(x, ddof=1)) if x.size > 1 else 0.0
            if n >= 2 and v > 0:
                terms.append((v, n - 1))
        if not terms:
            return (point, point) if plain or self.plain is None else stats.percentile_ci(pick(self.joint))
        v = sum(t for t, _ in terms)
        df = v * v / sum(t * t / d for t, d in terms)
        return stats.percentile_ci(pick(self.joint if not plain else self.plain), df=df)

    def share(self, key: str, point: float, index: Any = ()) -> float | None:
        """The share of ``key``'s interval width that the sketch error adds (None without a sketch)."""
        if self.plain is None:
            return None
        pick = (lambda d: d[key][:, index]) if index != () else (lambda d: d[key])
        wide, narrow = self.ci_of(point, pick), self.ci_of(point, pick, plain=True)
        if not wide or not narrow or wide[1] <= wide[0]:
            return None
        return 1.0 - (narrow[1] - narrow[0]) / (wide[1] - wide[0])


def _run_boot(raw: _Raw, sh_of: Sequence[int], M: int, n_boot: int, seed: int,
              ref: tuple[np.ndarray, np.ndarray] | None) -> _Boot:
    rng = np.random.default_rng(seed)
    G, H = raw.T.shape[1], raw.H
    wg = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)
    wh = rng.multinomial(H, np.full(H, 1.0 / H), size=n_boot).astype(np.float64)
    ones_g, ones_h = np.ones((n_boot, G)), np.ones((n_boot, H))
    err = _sketch_error(raw, n_boot, rng) if raw.modules is not None else None
    out = []
    plain = None
    for wgi, whi in ((wg, wh), (wg, ones_h), (ones_g, wh)):
        a, C, E2, img_sq = _moments(raw, wgi, whi)
        if err is not None and not out:  # the joint draws carry the sketch error too
            d = _decompose(a, C, E2, sh_of, M, ref)
            d["img_sq"] = img_sq
            plain = d
            a, C, img_sq = a + err[:, 0, 1:], C + err[:, 1:, 1:], img_sq + err[:, 0, 0]
        d = _decompose(a, C, E2, sh_of, M, ref)
        d["img_sq"] = img_sq
        out.append(d)
    return _Boot(out[0], out[1], out[2], G, H, plain)


def _sketch_error(raw: _Raw, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Draws of the sketch error of the Gram matrix Γ of the expected vectors (E g_img, then E g_v of every
    variant), ``(n_boot, V+1, V+1)``.

    Given the map, the bootstrap already carries every sketch term that varies with the resampled groups;
    by the law of total variance what it misses is the map's error on Γ itself. For a CountSketch with w
    buckets that error has covariance ``(Γ_ik Γ_jl + Γ_il Γ_jk)/w`` (up to fourth-moment terms), per module,
    independent between modules; it is drawn as ``L M Lᵀ/√w`` with ``Γ = L Lᵀ`` (Γ's estimate with negative
    eigenvalues set to 0) and M a symmetric Gaussian matrix (variance 2 on the diagonal, 1 off it).
    """
    V = raw.T.shape[0]
    total = np.zeros((n_boot, V + 1, V + 1))
    for gamma, w in raw.gammas:
        lam, U = np.linalg.eigh(gamma)
        L = U * np.sqrt(np.maximum(lam, 0.0))
        X = rng.standard_normal((n_boot, V + 1, V + 1))
        total += L @ ((X + X.transpose(0, 2, 1)) / math.sqrt(2)) @ L.T / math.sqrt(w)
    return total


def _module_gammas(raw: _Raw) -> list[tuple[np.ndarray, float]]:
    """Per module: the estimated Gram matrix Γ of the expected vectors (E g_img, then every variant's E g_v)
    and the module's number of buckets. ``‖E g_img‖²`` falls back to the norm of the estimate with one group."""
    assert raw.modules is not None and raw.widths is not None
    G, H = raw.T.shape[1], raw.H
    V = raw.T.shape[0]
    out = []
    for r, w in zip(raw.modules, raw.widths, strict=True):
        a, C, _, img_sq = _moments(r, np.ones((1, G)), np.ones((1, H)))
        gamma = np.zeros((V + 1, V + 1))
        gamma[0, 0] = img_sq[0] if math.isfinite(img_sq[0]) else float(r.img_gram.mean())
        gamma[0, 1:] = gamma[1:, 0] = a[0]
        gamma[1:, 1:] = C[0]
        out.append((gamma, float(w)))
    return out


# ---------------------------------------------------------------------------- checks


def _check(name: str, claim: str, statistic: str, value: float | None, ci: tuple[float, float] | None,
           verdict: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"check": name, "claim": claim, "statistic": statistic, "value": value,
            "ci95": list(ci) if ci else None, "verdict": verdict, "reason": reason, **extra}


def _positive(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return INCONCLUSIVE
    return HELD if ci[0] > 0 else VIOLATED if ci[1] <= 0 else INCONCLUSIVE


def _at_least(ci: tuple[float, float] | None, tau: float) -> str:
    """Claim x ≥ 0 within tolerance τ."""
    if ci is None:
        return INCONCLUSIVE
    return HELD if ci[0] >= -tau else VIOLATED if ci[1] < -tau else INCONCLUSIVE


def _near_zero(ci: tuple[float, float] | None, tau: float) -> str:
    if ci is None:
        return INCONCLUSIVE
    if -tau <= ci[0] and ci[1] <= tau:
        return HELD
    return VIOLATED if ci[0] > tau or ci[1] < -tau else INCONCLUSIVE


def _combine(verdicts: Sequence[str]) -> str:
    if VIOLATED in verdicts:
        return VIOLATED
    return HELD if verdicts and all(v == HELD for v in verdicts) else INCONCLUSIVE


def _monotone(name: str, claim: str, frames: Sequence[int], cols: Sequence[int], values: np.ndarray,
              boot: _Boot | None, key: str, tau: float, what: str) -> dict[str, Any]:
    """Consecutive steps over the budgets ``cols`` (indices into ``frames``) of the per-budget ``values``
    (bootstrap draws under ``key``), each ≥ −τ."""
    if len(cols) < 2:
        return _check(name, claim, f"steps of {what}", None, None, INCONCLUSIVE,
                      "one budget: no step to test; give at least two budgets", steps=[])
    steps = []
    for i, k in itertools.pairwise(cols):
        val = float(values[k] - values[i])
        ci = boot.ci_of(val, lambda d, i=i, k=k: d[key][:, k] - d[key][:, i]) if boot is not None else None
        steps.append({"from": frames[i], "to": frames[k], "value": val, "ci95": list(ci) if ci else None,
                      "verdict": _at_least(ci, tau)})
    worst = min(steps, key=lambda s: s["ci95"][0] if s["ci95"] else s["value"])
    verdict = _combine([s["verdict"] for s in steps])
    if boot is None:
        reason = "no interval (n_boot=0)"
    elif verdict == HELD:
        reason = f"every step's interval lies above −τ = {-tau:.3g}"
    elif verdict == VIOLATED:
        bad = [s for s in steps if s["verdict"] == VIOLATED]
        reason = "decreases beyond τ between " + ", ".join(f"m={s['from']}→{s['to']}" for s in bad)
    else:
        reason = f"some step's interval reaches below −τ = {-tau:.3g} but does not exclude a step ≥ −τ"
    return _check(name, claim, f"smallest step of {what} (m={worst['from']}→{worst['to']})", worst["value"],
                  tuple(worst["ci95"]) if worst["ci95"] else None, verdict, reason, tolerance=tau, steps=steps)


# ---------------------------------------------------------------------------- report


def _share(part: float, whole: float) -> float | None:
    """``part / whole`` as a share of ``whole`` (α(m)² of the noise-corrected ‖d_m‖²); None where the estimate of
    ``whole`` is not positive or below ``part`` (noise dominates it: a "share" above 1 measures nothing)."""
    if whole <= 0 or part > whole * (1 + 1e-9):
        return None
    return part / whole


def _finalize(*, raw: _Raw | None, frames: list[int], variants: list[_Variant], sh_of: list[int], mode: str,
              label: str, tolerance: float, redundant_from: int | None, n_boot: int, seed: int, complete: bool,
              settings: dict[str, Any], image_rows: list[dict[str, Any]], batch_rows: list[dict[str, Any]],
              losses: np.ndarray, per_vid: int, groups: list[int], warn_list: list[str],
              meta: dict[str, Any]) -> DecomposeReport:
    M = len(frames)
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "gradprobe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "frames": frames,
        "settings": settings,
        "shared": {"mode": mode, "label": label,
                   "variant_of_budget": {str(m): variants[sh_of[i]].label for i, m in enumerate(frames)}},
    }
    n_img = sum(1 for r in image_rows if r["finite"])
    summary["image"] = {"n_batches": len(image_rows), "n_finite": n_img, "groups": settings["image_groups_used"],
                        "mean_loss": float(np.mean([r["loss"] for r in image_rows if r["finite"]])) if n_img else None}
    summary["video"] = {"n_batches": settings["video_batches"], "groups": len(groups), "batches_per_group": per_vid,
                        "batches_used": len(groups) * per_vid}
    if raw is None:
        summary.update(budgets=[], checks=[], m_star=None, rho_sh=None, rho_tmp=None, tmp_direction=None,
                       note="fewer than 2 video groups finished: nothing to decompose", warnings=warn_list, meta=meta)
        return DecomposeReport(io._clean(summary), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(batch_rows))

    a, C, E2, img_sq = _moments(raw, np.ones((1, raw.T.shape[1])), np.ones((1, raw.H)))
    pt = {k: v[0] for k, v in _decompose(a, C, E2, sh_of, M).items()}
    pt["img_sq"] = float(img_sq[0])
    boot = _run_boot(raw, sh_of, M, n_boot, seed, (pt["D"], pt["u"])) if n_boot > 0 else None

    def ci(key: str, index: Any = ()) -> tuple[float, float] | None:
        if boot is None:
            return None
        v = pt[key][index] if index != () else pt[key]
        return boot.ci(key, float(v), index)

    resolved = bool(pt["resolved"])
    rho_tmp = float(pt["rho_tmp"]) if resolved else None
    norm_img = stats.sqrt_or_none(pt["img_sq"])
    # scales of the tolerances: the alignment terms, α, Var ε
    # (each with a floor at rounding level of the terms it is computed from)
    scale_A = float(np.nanmax(np.abs(np.concatenate([pt["rho_sh"], pt["alpha_rho"], pt["A"]]))))
    scale_alpha = float(np.abs(pt["alpha"]).max())
    top_sq = float(np.nanmax(np.abs(pt["E2"])))  # the largest E‖g‖²: what the Gram terms are differences of
    tau_A = tolerance * scale_A + _ROUNDING * math.sqrt(top_sq * max(abs(pt["img_sq"]), 0.0) if
                                                        math.isfinite(pt["img_sq"]) else 0.0)
    tau_alpha = tolerance * scale_alpha + _ROUNDING * math.sqrt(top_sq)

    # ---- per budget
    # the sketch error of A(m) for its two-way t interval, as in align: (‖E g_img‖²‖E g_m‖² + A²)/w per module
    sk_var_A = np.zeros(M)
    if raw.modules is not None:
        for gamma, w in raw.gammas:
            d = np.diag(gamma)
            sk_var_A += (max(d[0], 0.0) * np.maximum(d[1 : M + 1], 0.0) + gamma[0, 1 : M + 1] ** 2) / w
    rows = []
    for i, m in enumerate(frames):
        v = raw.T[i]  # (G, J) table of budget m, as align measures it
        tw = stats.two_way_mean(v, extra_var=float(sk_var_A[i]))
        ml = losses[i][np.isfinite(losses[i])]
        row = {
            "frames": m, "shared": variants[sh_of[i]].label, "n": v.shape[1],
            "A": float(pt["A"][i]), "A_ci95_t": list(tw.ci_t) if tw.ci_t else None, "A_ci95": ci("A", i),
            "rho_sh": float(pt["rho_sh"][i]), "rho_sh_ci95": ci("rho_sh", i),
            "alpha": float(pt["alpha"][i]), "alpha_ci95": ci("alpha", i),
            "contrib_sh": float(pt["rho_sh"][i]), "contrib_tmp": float(pt["contrib_tmp"][i]),
            "contrib_tmp_ci95": ci("contrib_tmp", i),
            "A_pred": float(pt["A_pred"][i]), "A_pred_ci95": ci("A_pred", i),
            "residual": float(pt["resid"][i]), "residual_ci95": ci("resid", i),
            "var_eps": float(pt["var"][i]), "var_eps_ci95": ci("var", i),
            "sqnorm_d": float(pt["sqnorm_d"][i]),
            "norm_vid": stats.sqrt_or_none(float(pt["norm_vid_sq"][i])),
            "explained": _share(float(pt["alpha"][i] ** 2), float(pt["sqnorm_d"][i])),
            "mean_loss": float(ml.mean()) if ml.size else None,
        }
        if boot is not None and boot.plain is not None:
            row.update({f"{name}_sketch_share": boot.share(key, float(pt[key][i]), i)
                        for name, key in (("A", "A"), ("rho_sh", "rho_sh"), ("alpha", "alpha"),
                                          ("contrib_tmp", "contrib_tmp"), ("var_eps", "var"))})
        rows.append(row)

    # ---- checks
    checks = []
    per_m = mode == "per_budget"
    sh_idx = list(range(M)) if per_m else [0]
    sh_cis = {i: ci("rho_sh", i) for i in sh_idx}
    v3 = _combine([_positive(sh_cis[i]) for i in sh_idx])
    # the decisive budget: the lowest upper end when violated, else the lowest lower end
    end = 1 if v3 == VIOLATED else 0
    lo_i = min(sh_idx, key=lambda i: sh_cis[i][end] if sh_cis[i] else pt["rho_sh"][i])
    reason3 = ("no interval (n_boot=0)" if boot is None else
               {HELD: "the interval lies above 0", VIOLATED: "the interval lies at or below 0",
                INCONCLUSIVE: "the interval contains 0"}[v3])
    if per_m:
        reason3 = f"{reason3} at m={frames[lo_i]}" + ("" if v3 == VIOLATED else " (the lowest of the budgets')")
    checks.append(_check("assumption_3", "ρ_sh = E⟨g_img, g_sh⟩ > 0",
                         "ρ_sh" + (f" at m={frames[lo_i]}" if per_m else ""), float(pt["rho_sh"][lo_i]),
                         sh_cis[lo_i], v3, reason3))
    if not resolved:
        checks.append(_check("assumption_4", "ρ_tmp = −E⟨g_img, g_tmp⟩ ≥ 0", "ρ_tmp", None, None, INCONCLUSIVE,
                             "no temporal direction: the budgets' mean gradients equal the shared one, so α(m) = 0 "
                             "and ρ_tmp is undefined"))
    else:
        c4 = ci("rho_tmp")
        tau4 = _ROUNDING * scale_A / max(scale_alpha, np.finfo(float).tiny)
        v4 = _at_least(c4, tau4)
        reason4 = ("no interval (n_boot=0)" if boot is None else
                   {HELD: "the interval lies at or above 0", VIOLATED: "the interval lies below 0",
                    INCONCLUSIVE: "the interval contains 0"}[v4])
        checks.append(_check("assumption_4", "ρ_tmp = −E⟨g_img, g_tmp⟩ ≥ 0", "ρ_tmp", rho_tmp, c4, v4, reason4))
    per5 = []
    for i, m in enumerate(frames):
        c = ci("resid", i)
        per5.append({"frames": m, "value": float(pt["resid"][i]), "ci95": list(c) if c else None,
                     "verdict": _near_zero(c, tau_A)})
    v5 = _combine([p["verdict"] for p in per5])
    worst5 = max(per5, key=lambda p: max(abs(p["ci95"][0]), abs(p["ci95"][1])) if p["ci95"] else abs(p["value"]))
    reason5 = ("no interval (n_boot=0)" if boot is None else
               {HELD: f"every budget's interval lies within ±τ = {tau_A:.3g}",
                VIOLATED: "outside ±τ at m=" + ",".join(str(p["frames"]) for p in per5 if p["verdict"] == VIOLATED),
                INCONCLUSIVE: f"some interval reaches beyond ±τ = {tau_A:.3g} without excluding ±τ"}[v5])
    checks.append(_check("assumption_5_residual", "E⟨g_img, ε(m)⟩ ≈ 0 (A(m) = ρ_sh − α(m) ρ_tmp)",
                         f"A(m) − (ρ_sh − α(m) ρ_tmp), largest at m={worst5['frames']}", worst5["value"],
                         tuple(worst5["ci95"]) if worst5["ci95"] else None, v5, reason5, tolerance=tau_A,
                         per_budget=per5))
    red = [i for i, m in enumerate(frames) if redundant_from is None or m >= redundant_from]
    var_vals = pt["var"][red]
    tau_var = (tolerance * float(np.abs(var_vals).max()) if var_vals.size else 0.0) + _ROUNDING * top_sq
    checks.append(_monotone("assumption_5_variance",
                            "Var ε(m) non-decreasing in m" + (f" for m ≥ {redundant_from}" if redundant_from else ""),
                            frames, red, pt["var"], boot, "var", tau_var, "Var ε(m)"))
    if not resolved:
        checks.append(_check("alpha_monotone", "α(m) non-decreasing in m", "α(m)", 0.0, (0.0, 0.0) if M > 1 else None,
                             HELD if M > 1 else INCONCLUSIVE,
                             "α(m) = 0 at every budget (constant)" if M > 1 else "one budget: no step to test"))
    else:
        checks.append(_monotone("alpha_monotone", "α(m) non-decreasing in m", frames, range(M), pt["alpha"], boot,
                                "alpha", tau_alpha, "α(m)"))

    # ---- m*
    A_pred, A = pt["A_pred"], pt["A"]
    model_star = {
        "value": stats.empirical_m_star(frames, A_pred),
        "zero_crossing": stats.zero_crossing(frames, A_pred),
        "bootstrap": stats.m_star_distribution(frames, {m: boot.joint["A_pred"][:, i] for i, m in enumerate(frames)})
        if boot else {},
        "definition": "min{m : α(m) ρ_tmp ≥ ρ_sh(m)} (Eq. 22)",
    }
    if checks[-1]["verdict"] == VIOLATED:
        model_star["note"] = ("α(m) decreases somewhere in the grid, so Proposition 2's premise fails: the first "
                              "budget with α ρ_tmp ≥ ρ_sh is given, but the sign may change back")
    elif model_star["value"] is None:
        model_star["note"] = "α(m) ρ_tmp < ρ_sh at every budget: no threshold in the grid"
    emp_star = {
        "value": stats.empirical_m_star(frames, A),
        "zero_crossing": stats.zero_crossing(frames, A),
        "bootstrap": stats.m_star_distribution(frames, {m: boot.joint["A"][:, i] for i, m in enumerate(frames)})
        if boot else {},
        "definition": "smallest m with mean A(m) ≤ 0, as gradprobe align measures it on these batches",
    }
    if emp_star["value"] is None:
        emp_star["note"] = "no sign change in the grid: mean A(m) > 0 at every budget"

    lam = float(pt["lam"]) if math.isfinite(pt["lam"]) else None
    tmp_dir = {
        "resolved": resolved,
        "eigenvalue": lam if resolved else 0.0,
        "eigenvalue_ci95": ci("lam") if resolved else None,
        "explained": float(pt["explained"]) if resolved else None,
        "coefficients": {str(m): float(pt["coef"][i]) for i, m in enumerate(frames)},
        "note": "ĝ_tmp = Σ_m c_m (E g_vid^(m) − g_sh(m)); eigenvalue = max over unit directions of Σ_m ⟨d_m, ·⟩²; "
                "explained = its share of Σ_m ‖d_m‖²",
    }
    if resolved and tmp_dir["eigenvalue_ci95"] and tmp_dir["eigenvalue_ci95"][0] <= 0:
        warn_list.append("the temporal direction is not resolved beyond noise (the eigenvalue's interval reaches 0): "
                         "α(m) and ρ_tmp mostly reflect batch noise")
    cos_tmp = (-rho_tmp / norm_img) if (resolved and norm_img) else None
    sh_sq = float(pt["norm_sh_sq"][0])
    summary.update(
        rho_sh={"value": float(pt["rho_sh_mean"]), "ci95": ci("rho_sh_mean"),
                "cos_img_sh": float(pt["rho_sh"][0]) / (norm_img * math.sqrt(sh_sq))
                if (norm_img and sh_sq > 0 and not per_m) else None,
                "varies_with_m": per_m,
                "note": "mean over the budgets of ρ_sh(m) (one shared variant per budget)" if per_m else
                "one shared variant for every budget"},
        rho_tmp={"value": rho_tmp, "ci95": ci("rho_tmp") if resolved else None, "cos_img_tmp": cos_tmp,
                 "sketch_share": boot.share("rho_tmp", rho_tmp) if boot is not None and resolved else None},
        image_norm=norm_img,
        tmp_direction=tmp_dir,
        budgets=rows,
        checks=checks,
        m_star={"model": model_star, "empirical": emp_star},
        warnings=warn_list,
        meta=meta,
    )
    summary = io._clean(summary)
    budgets_df = pd.DataFrame([_flat(r) for r in summary["budgets"]])
    checks_df = pd.DataFrame([_flat({k: v for k, v in c.items() if k not in ("steps", "per_budget")})
                              for c in summary["checks"]])
    return DecomposeReport(summary, budgets_df, checks_df, pd.DataFrame(batch_rows))


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    """Intervals as ``_lo`` / ``_hi`` columns."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k.endswith(("ci95", "_t")):
            out[f"{k}_lo"], out[f"{k}_hi"] = (v if v else (None, None))
        else:
            out[k] = v
    return out
