"""Image–video gradient alignment A(m) across frame budgets, with intervals and m*.

For each frame budget m and each video minibatch j (the same clips at every m),
``d_j(m) = <ḡ_img, g_vid,j^(m)>`` where ḡ_img is the mean gradient over K image
minibatches. The K image batches are split into G equal groups whose mean
gradients are kept in a reference store; every video gradient is dotted with each
group mean by backward hooks, giving a G × J table per budget from which the
statistics carry the uncertainty of both ḡ_img and the video batches
(:mod:`gradprobe.estimators.stats`).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
from gradprobe.probe.sketch import inner_variance

__all__ = ["AlignInterrupted", "AlignReport", "Progress", "align", "group_count", "image_group_count"]
@dataclass
class AlignReport:
    """Result of :func:`align`.

    Attributes:
        summary: exactly the dict written to ``summary.json`` (schema ``gradprobe.align/1``).
        sketches: with a sketch, the sketched rows (``image_groups``: (G, k); ``video_mean_m<m>``: (k,)),
            which combine with those of any run with the same map (:func:`gradprobe.outputs.read_sketches`).
        sketch_spec: the map (:class:`gradprobe.probe.sketch.SketchSpec`), with a sketch.
        batches: one row per budget × video batch (``alignment.csv``).
        modules: one row per budget × module (``modules.csv``).
        module_batches: one row per budget × module × video batch (``module_batches.csv``).
        images: one row per image batch (``images.csv``).
    """

    summary: dict[str, Any]
    batches: pd.DataFrame
    modules: pd.DataFrame
    module_batches: pd.DataFrame
    images: pd.DataFrame
    sketches: dict[str, np.ndarray] | None = None
    sketch_spec: Any = None

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write summary.json and the CSV tables into ``out_dir`` (created if needed); with a sketch also
        ``sketches.npz`` (the image-group rows and each budget's mean video gradient, sketched)."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.batches.to_csv(d / io.ALIGNMENT, index=False)
        self.modules.to_csv(d / io.MODULES, index=False)
        self.module_batches.to_csv(d / io.MODULE_BATCHES, index=False)
        self.images.to_csv(d / io.IMAGES, index=False)
        if self.sketches is not None:
            io.write_sketches(d / io.SKETCHES, self.sketch_spec.to_dict(), self.sketches)
        io.write_json(d / io.SUMMARY, self.summary)
        return d


class AlignInterrupted(RunInterrupted):
    """Raised when a run is interrupted; ``.report`` (an :class:`AlignReport`) holds everything computed so far."""

    what = "alignment run"


@dataclass
class _BudgetAcc:
    """What has been measured for one budget so far."""

    cols: list[np.ndarray] = field(default_factory=list)  # per batch: (G,) total dots
    mod_cols: list[np.ndarray] = field(default_factory=list)  # per batch: (Mods, G)
    sq: list[float] = field(default_factory=list)
    mod_sq: list[np.ndarray] = field(default_factory=list)
    idx: list[int] = field(default_factory=list)
    cos: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    pair: float = 0.0
    mod_pair: np.ndarray | None = None
    pair_valid: bool = True
    excluded: list[int] = field(default_factory=list)
    info: list[dict[str, Any]] = field(default_factory=list)


def align(
    model: torch.nn.Module,
    image_batches: Iterable[Any],
    video_batches: Mapping[int, Iterable[Any]],
    loss_fn: LossFn,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    roles: str | Sequence[str] | None = None,
    role_of: RoleOf | None = None,
    module_of: ModuleOf | None = None,
    image_groups: int | None = None,
    sketch: str | int | None = "auto",
    sketch_seed: int = 0,
    reference_device: str = "model",
    reference_dtype: str | torch.dtype | None = None,
    video_norms: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    eval_mode: bool = True,
    batch_info: Callable[[Any], Mapping[str, Any]] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    meta: Mapping[str, Any] | None = None,
) -> AlignReport:
    """Measure ``A(m) = <ḡ_img, g_vid^(m)>`` for every frame budget m.

    Args:
        model: any ``torch.nn.Module``; it is put in eval mode for the run and restored.
        image_batches: K ≥ 1 image minibatches (K ≥ 2 for intervals that carry ḡ_img's uncertainty).
        video_batches: frame budget m → its video minibatches; batch j must hold the same
            clips at every m (paired).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` (answer-token loss).
        include, exclude, roles, role_of, module_of: parameter selection
            (:func:`gradprobe.probe.select_parameters`).
        image_groups: G, the number of image-group means kept as reference rows;
            K must be a multiple of G. Default: the largest divisor of K that is ≤ 8 with exact
            rows, K (every image batch its own row) with sketches.
            Memory: G × (selected parameters) × dtype size exact, G × k × 4 bytes sketched.
        sketch: ``auto`` (exact rows when they fit a quarter of the free memory, else a sketch),
            ``exact``, or a number of buckets k (see :mod:`gradprobe.probe.measure`). With a sketch
            the intervals include the sketch error.
        sketch_seed: seed of the sketch map.
        reference_device: ``"model"`` or ``"cpu"`` (pinned); see :mod:`gradprobe.probe.store`.
        reference_dtype: dtype of the reference rows (default float32, float64 for float64 models).
        video_norms: keep a running sum per budget (one more reference-sized row) for the
            unbiased ``‖E g_vid^(m)‖``.
        n_boot: bootstrap resamples (0 disables the bootstrap).
        seed: seed of the bootstrap.
        eval_mode: run the model in eval mode (no dropout).
        batch_info: ``batch_info(batch) -> dict`` of extra per-batch columns (tokens, frames, …).
        out_dir: if given, rows are appended to ``alignment.csv`` there as they are computed
            and all outputs are written at the end (or on interruption).
        progress: progress callbacks.
        meta: extra JSON-safe fields recorded under ``summary["meta"]``.

    Returns:
        An :class:`AlignReport`.

    Raises:
        InputError: bad options.
        BudgetError: bad frame budgets.
        DataError: no image or video batches, or no finite ones.
        AlignInterrupted: on KeyboardInterrupt, carrying the partial report (saved to ``out_dir``).
    """
    if not isinstance(video_batches, Mapping):
        raise InputError("video_batches must map each frame budget m to its batches")
    frames = check_frames(video_batches.keys())
    images = list(image_batches)
    K = len(images)
    if K == 0:
        raise DataError("no image batches")
    G = image_group_count(K, image_groups)
    if n_boot < 0:
        raise InputError(f"n_boot: expected >= 0, got {n_boot}")
    meas = Measurement(model, loss_fn, include=include, exclude=exclude, roles=roles, role_of=role_of,
                       module_of=module_of, sketch=sketch, sketch_seed=sketch_seed,
                       exact_rows=G + int(video_norms), reference_device=reference_device,
                       reference_dtype=reference_dtype, eval_mode=eval_mode, batch_info=batch_info,
                       progress=progress)
    if meas.sketched and image_groups is None:
        G = K  # a sketched row costs k numbers: every image batch is its own row
    progress = meas.progress
    n_mod = len(meas.module_names)
    excluded: list[dict[str, Any]] = []
    image_rows: list[dict[str, Any]] = []
    batch_rows: list[dict[str, Any]] = []  # alignment.csv, in the order measured
    accs: dict[int, _BudgetAcc] = {}
    per = K // G
    store = meas.store(G)
    pair_store = meas.store(1) if video_norms else None
    gram_mod = np.zeros((n_mod, G, G))
    finite_groups: list[int] = []
    video_means: dict[int, np.ndarray] = {}  # sketch mode: the sketch of each budget's mean video gradient
    with meas.session(Path(out_dir) / io.ALIGNMENT if out_dir is not None else None):
        # ---- image phase: group means of the image gradients
        finite_groups = meas.image_phase(images, store, per, image_rows)
        gram_mod = meas.gram(store)
        img_norm = math.sqrt(max(gram_mod.sum(axis=0).mean(), 0.0))  # ‖ḡ_img‖ of the estimate itself

        # ---- video phase
        for m in frames:
            acc = accs.setdefault(m, _BudgetAcc(mod_pair=np.zeros(n_mod)))
            if pair_store is not None:
                pair_store.zero_()
            batches = video_batches[m]
            progress.start(f"frames={m}", len(batches) if hasattr(batches, "__len__") else None)
            for j, batch in enumerate(batches):
                r, info = meas.run(batch, refs=store, pair_sum=pair_store)
                d_col = r.dots.sum(axis=0)  # (G,)
                row = {"frames": m, "batch": j, "loss": r.loss, "finite": r.finite}
                if r.finite:
                    acc.cols.append(d_col)
                    acc.mod_cols.append(r.dots)
                    acc.sq.append(float(r.sqnorm.sum()))
                    acc.mod_sq.append(r.sqnorm)
                    acc.idx.append(j)
                    acc.losses.append(r.loss)
                    acc.info.append(info)
                    if r.pair is not None and acc.pair_valid:
                        acc.pair += float(r.pair.sum())
                        acc.mod_pair += r.pair
                    vn = math.sqrt(max(r.sqnorm.sum(), 0.0))
                    d = float(d_col.mean())
                    cos = d / (img_norm * vn) if img_norm > 0 and vn > 0 else float("nan")
                    acc.cos.append(cos)
                    row.update(value=d, cos=cos, norm_vid=vn)
                else:
                    acc.excluded.append(j)
                    acc.pair_valid = False
                    excluded.append({"frames": m, "batch": j, "reason": "non-finite loss or gradient"})
                    meas.warn(f"frames={m} batch {j}: non-finite loss or gradient; excluded from the statistics")
                    row.update(value=float("nan"), cos=float("nan"), norm_vid=float("nan"))
                row.update({f"dot_g{g}": float(v) for g, v in enumerate(d_col)})
                row.update(info)
                batch_rows.append(row)
                meas.record(row)
                progress.advance(f"frames={m}")
            progress.finish(f"frames={m}")
            if meas.sketched and pair_store is not None and acc.pair_valid and acc.cols:
                video_means[m] = pair_store.data[0].cpu().numpy() / len(acc.cols)  # the sum of the finite batches

    sel = meas.selection
    report = _finalize(
        frames=frames,
        accs=accs,
        gram_mod=gram_mod,
        mods=meas.module_names,
        selection=sel,
        midx=meas.module_index,
        image_rows=image_rows,
        batch_rows=batch_rows,
        n_groups=len(finite_groups),
        per=per,
        widths=meas.sketch_widths(),
        settings={
            "image_batches": K,
            "image_groups": G,
            "image_groups_used": len(finite_groups),
            "reference_device": reference_device,
            "reference_dtype": str(meas.ref_dtype).removeprefix("torch."),
            "accumulate_dtype": str(meas.acc_dtype).removeprefix("torch."),
            "n_params": sel.numel,
            "n_tensors": len(sel),
            "n_modules": n_mod,
            "include": include,
            "exclude": exclude,
            "roles": roles,
            "n_boot": n_boot,
            "seed": seed,
            "eval_mode": eval_mode,
            "video_norms": video_norms,
            "sketch": meas.settings(),
        },
        n_boot=n_boot,
        seed=seed,
        complete=meas.complete,
        warn_list=meas.warnings,
        excluded=excluded,
        meta=dict(meta or {}),
    )
    if meas.spec is not None:
        report.sketches = {"image_groups": store.data.cpu().numpy(),
                           **{f"video_mean_m{m}": v for m, v in video_means.items()}}
        report.sketch_spec = meas.spec
    if out_dir is not None:
        report.save(out_dir)
    if not meas.complete:
        raise AlignInterrupted(report)
    return report


def _finalize(
    *,
    frames: list[int],
    accs: dict[int, _BudgetAcc],
    gram_mod: np.ndarray,
    mods: list[str],
    selection: Any,
    midx: np.ndarray,
    image_rows: list[dict[str, Any]],
    batch_rows: list[dict[str, Any]],
    n_groups: int,
    per: int,
    widths: np.ndarray | None,
    settings: dict[str, Any],
    n_boot: int,
    seed: int,
    complete: bool,
    warn_list: list[str],
    excluded: list[dict[str, Any]],
    meta: dict[str, Any],
) -> AlignReport:
    n_mod = len(mods)
    gram = gram_mod.sum(axis=0) if n_groups else np.zeros((0, 0))
    img_sq_unb = stats.unbiased_sqnorm_from_gram(gram) if n_groups >= 2 else None
    img_norm_est = math.sqrt(max(gram.mean(), 0.0)) if n_groups else float("nan")
    mod_img_sq_unb = [stats.unbiased_sqnorm_from_gram(gram_mod[i]) if n_groups >= 2 else None for i in range(n_mod)]
    mod_img_norm_est = [math.sqrt(max(gram_mod[i].mean(), 0.0)) if n_groups else float("nan") for i in range(n_mod)]
    role_by_mod: dict[str, Any] = {}
    numel_by_mod = np.zeros(n_mod, dtype=np.int64)
    for i, p in enumerate(selection.params):
        numel_by_mod[midx[i]] += p.numel()
        role_by_mod.setdefault(mods[midx[i]], selection.roles[i])

    measured = [m for m in frames if m in accs and accs[m].cols]
    tables = {m: (np.stack(accs[m].cols, axis=1), accs[m].idx) for m in measured}  # (G, J)
    rng = np.random.default_rng(seed)
    draws = stats.joint_bootstrap(tables, n_boot, rng) if n_boot > 0 and tables else {}

    budgets = []
    module_rows: list[dict[str, Any]] = []
    module_batch_rows: list[dict[str, Any]] = []
    for m in frames:
        acc = accs.get(m)
        if acc is None or not acc.cols:
            if acc is not None or complete:
                budgets.append({"frames": m, "n": 0, "n_excluded": len(acc.excluded) if acc else 0, "mean": None})
            continue
        D, idx = tables[m]
        J = D.shape[1]
        MD = np.stack(acc.mod_cols, axis=2)  # (Mods, G, J)
        MS = np.stack(acc.mod_sq, axis=1)  # (Mods, J)
        pairs_ok = acc.pair_valid and settings["video_norms"]
        # The sketch error. Given the map S, the two-way variance already carries every sketch term that
        # varies with the batches; by the law of total variance what it misses is Var_S ⟨S E g_img, S E g_vid⟩
        # = (‖E g_img‖² ‖E g_vid‖² + A²)/w per module, from the unbiased squared norms (where one is
        # unavailable, the norm of the estimate, which is larger on average).
        sk_var = np.zeros(n_mod)
        if widths is not None:
            img_sq = np.array([s if s is not None else n * n for s, n in zip(mod_img_sq_unb, mod_img_norm_est,
                                                                               strict=True)])
            vid_sq = 2 * acc.mod_pair / (J * (J - 1)) if pairs_ok else MS.mean(axis=1)
            sk_var = inner_variance(img_sq, vid_sq, MD.mean(axis=(1, 2)), widths)
            # how far these sketched numbers may lie from exact rows on the same batches: the map's error on
            # the realised means ḡ_img and ḡ_vid (their norms include the batch noise)
            real_vid_sq = (MS.sum(axis=1) + 2 * acc.mod_pair) / J**2 if pairs_ok else MS.mean(axis=1)
            sk_var_batches = inner_variance(np.square(mod_img_norm_est), real_vid_sq, MD.mean(axis=(1, 2)), widths)
        ci = stats.two_way_mean(D, extra_var=float(sk_var.sum()))
        plain = stats.two_way_mean(D) if widths is not None else ci
        d = D.mean(axis=0)
        vnorm = np.sqrt(np.maximum(np.array(acc.sq), 0.0))
        cos = np.array(acc.cos)
        vid_sq_unb = stats.unbiased_sqnorm_from_pairs(acc.pair, J) if pairs_ok else None
        boot_ci = stats.percentile_ci(draws[m], df=plain.df) if m in draws else None
        boot_ci = stats.widen(boot_ci, ci.mean, float(sk_var.sum()), ci.df)
        norm_img = stats.sqrt_or_none(img_sq_unb)
        norm_vid = stats.sqrt_or_none(vid_sq_unb)
        info_means = {}
        if acc.info:
            info_df = pd.DataFrame(acc.info)
            for c in info_df.columns:
                if pd.api.types.is_numeric_dtype(info_df[c]):
                    info_means[c] = float(info_df[c].mean())
        budgets.append(
            {
                "frames": m,
                "n": J,
                "n_excluded": len(acc.excluded),
                "mean": ci.mean,
                "stderr": ci.stderr,
                "df": ci.df,
                # the share of the sampling variance due to the image reference ḡ_img (the rest: the video batches)
                "var_share_image": (plain.var_image / (plain.var_image + plain.var_video)
                                    if plain.var_image is not None and plain.var_image + plain.var_video > 0 else None),
                "ci95_t": list(ci.ci_t) if ci.ci_t else None,
                "ci95_boot": list(boot_ci) if boot_ci else None,
                "frac_negative": float(np.mean(d < 0)),
                "mean_cos": float(np.nanmean(cos)) if np.isfinite(cos).any() else None,
                "cos_of_means": (ci.mean / (norm_img * norm_vid)) if norm_img and norm_vid else None,
                "norm_img": norm_img,
                "norm_vid": norm_vid,
                "sqnorm_img_unbiased": img_sq_unb,
                "sqnorm_vid_unbiased": vid_sq_unb,
                "mean_batch_norm_vid": float(vnorm.mean()),
                "mean_loss": float(np.mean(acc.losses)),
                "batch_info": info_means,
                **({"sketch_sd": math.sqrt(sk_var.sum()), "sketch_share": _share(plain.stderr, ci.stderr),
                    "sketch_sd_batches": math.sqrt(sk_var_batches.sum())} if widths is not None else {}),
            }
        )
        # per module
        for i, name in enumerate(mods):
            ci_m = stats.two_way_mean(MD[i], extra_var=float(sk_var[i]))
            dm = MD[i].mean(axis=0)
            vn_m = np.sqrt(np.maximum(MS[i], 0.0))
            den = mod_img_norm_est[i] * vn_m
            cos_m = np.where(den > 0, dm / np.where(den > 0, den, 1.0), np.nan)
            vsq_m = stats.unbiased_sqnorm_from_pairs(float(acc.mod_pair[i]), J) if pairs_ok else None
            module_rows.append(
                {
                    "frames": m,
                    "module": name,
                    "role": role_by_mod.get(name),
                    "numel": int(numel_by_mod[i]),
                    "n": J,
                    "mean": ci_m.mean,
                    "stderr": ci_m.stderr,
                    "ci95_lo": ci_m.ci_t[0] if ci_m.ci_t else None,
                    "ci95_hi": ci_m.ci_t[1] if ci_m.ci_t else None,
                    "frac_negative": float(np.mean(dm < 0)),
                    "mean_cos": float(np.nanmean(cos_m)) if np.isfinite(cos_m).any() else None,
                    "share": ci_m.mean / ci.mean if ci.mean != 0 else None,
                    "norm_img": stats.sqrt_or_none(mod_img_sq_unb[i]),
                    "norm_vid": stats.sqrt_or_none(vsq_m),
                    **({"sketch_sd": math.sqrt(sk_var[i]), "sketch_sd_batches": math.sqrt(sk_var_batches[i])}
                       if widths is not None else {}),
                }
            )
            for jj, j in enumerate(idx):
                module_batch_rows.append(
                    {"frames": m, "module": name, "batch": j, "value": float(dm[jj]), "cos": float(cos_m[jj]),
                     "norm_vid": float(vn_m[jj])}
                )

    means = [b["mean"] for b in budgets if b.get("mean") is not None]
    mframes = [b["frames"] for b in budgets if b.get("mean") is not None]
    m_star: dict[str, Any] = {
        "empirical": stats.empirical_m_star(mframes, means) if means else None,
        "bootstrap": stats.m_star_distribution(mframes, draws) if draws else {},
        "zero_crossing": stats.zero_crossing(mframes, means) if means else None,
    }
    if means:
        m_star["resolved"], m_star["resolution"] = stats.m_star_resolved(budgets, m_star["empirical"])
        if m_star["empirical"] is None:
            m_star["note"] = "no sign change in the grid: mean alignment is > 0 at every budget"
        elif m_star["zero_crossing"] is None:
            m_star["note"] = "mean alignment is already <= 0 at the smallest budget; the crossing lies below the grid"
        else:
            m_star["note"] = "zero crossing interpolated linearly in log2(m) between the neighbouring budgets"
    n_img_finite = sum(1 for r in image_rows if r["finite"])
    summary = {
        "schema": io.ALIGN_SCHEMA,
        "gradprobe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "frames": frames,
        "settings": settings,
        "image": {
            "n_batches": len(image_rows),
            "n_finite": n_img_finite,
            "groups": n_groups,
            "batches_per_group": per,
            "norm": stats.sqrt_or_none(img_sq_unb),
            "sqnorm_unbiased": img_sq_unb,
            "norm_of_estimate": img_norm_est if n_groups else None,
            "mean_loss": float(np.mean([r["loss"] for r in image_rows if r["finite"]])) if n_img_finite else None,
        },
        "budgets": budgets,
        "m_star": m_star,
        "excluded": excluded,
        "warnings": warn_list,
        "meta": meta,
    }
    summary = io._clean(summary)
    return AlignReport(
        summary=summary,
        batches=pd.DataFrame(batch_rows),
        modules=pd.DataFrame(module_rows),
        module_batches=pd.DataFrame(module_batch_rows),
        images=pd.DataFrame(image_rows),
    )


def _share(plain: float | None, total: float | None) -> float | None:
    """The share of a standard error that the sketch error adds: 1 − (without it)/(with it); the half-width
    of an interval at a fixed quantile grows by the same share."""
    if plain is None or not total:
        return None
    return 1.0 - plain / total
