"""Seaborn plots of saved alignment outputs. Plots read files only, never a live run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from gradprobe import outputs as io
from gradprobe.errors import DataError
from gradprobe.outputs import read_align_dir


def _mpl() -> Any:
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def alignment_curve(summary: dict[str, Any], batches: pd.DataFrame, ax: Any = None) -> Any:
    """Mean alignment A(m) ± 95% CI against m (log2 axis), per-batch points, zero line, m* marked."""
    import numpy as np
    import seaborn as sns

    plt = _mpl()
    sns.set_theme(style="whitegrid", context="notebook")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    rows = [b for b in summary["budgets"] if b.get("mean") is not None]
    if not rows:
        ax.set_title("no budget measured")
        return ax
    fr = [b["frames"] for b in rows]
    mean = [b["mean"] for b in rows]
    ok = batches[batches["finite"].astype(bool)] if "finite" in batches else batches
    jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(ok))
    ax.scatter(ok["frames"].to_numpy() * 2.0**jitter, ok["value"], s=10, color="0.55", alpha=0.6,
               label="per video batch", zorder=1)
    ci = [(b["ci95_t"] or [b["mean"], b["mean"]]) for b in rows]
    lo = [m - c[0] for m, c in zip(mean, ci, strict=True)]
    hi = [c[1] - m for m, c in zip(mean, ci, strict=True)]
    ax.errorbar(fr, mean, yerr=[lo, hi], fmt="o-", color="C0", capsize=4, lw=2, label="mean A(m), 95% CI (t)")
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    ms = summary.get("m_star") or {}
    if ms.get("empirical") is not None:
        resolved = ms.get("resolved", True)
        ax.axvline(ms["empirical"], color="C3", lw=2.5, ls="--" if resolved else ":", zorder=3,
                   label=f"m* = {ms['empirical']}" + (" (empirical)" if resolved else " (from the means; not resolved)"))
    if ms.get("zero_crossing") is not None:
        ax.axvline(ms["zero_crossing"], color="C1", lw=1.5, ls="-.", label=f"zero crossing ≈ {ms['zero_crossing']:.1f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(fr)
    ax.set_xticklabels([str(f) for f in fr])
    ax.set_xlabel("frame budget m")
    ax.set_ylabel("⟨ḡ_img, g_vid⟩ per video batch")
    counts = sorted({b["n"] for b in rows})
    per = f"{counts[0]} video batches per budget" if len(counts) == 1 else \
        "video batches per budget: " + ", ".join(f"{b['n']} at m = {b['frames']}" for b in rows)
    done = "" if summary.get("complete", True) else "; interrupted, partial"
    ax.set_title(f"image–video gradient alignment ({per}{done})", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return ax


def module_heatmap(modules: pd.DataFrame, ax: Any = None, value: str = "mean_cos") -> Any:
    """Module × budget heatmap of the mean per-module cosine (or another ``modules.csv`` column)."""
    import seaborn as sns

    plt = _mpl()
    order = list(dict.fromkeys(modules["module"]))
    table = modules.pivot_table(index="module", columns="frames", values=value, aggfunc="first").reindex(order)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * table.shape[1] + 4, 0.32 * table.shape[0] + 1.5))
    finite = table.abs().stack()
    vmax = float(finite.max()) if len(finite) and math.isfinite(float(finite.max())) else 1.0
    label = "cosine with ḡ_img; < 0 = conflict" if value == "mean_cos" else f"{value.replace('_', ' ')}; < 0 = conflict"
    sns.heatmap(table, cmap="RdBu_r", center=0.0, vmin=-vmax, vmax=vmax, annot=table.shape[0] <= 30, fmt=".2f",
                cbar_kws={"label": label}, ax=ax)
    ax.set_xlabel("frame budget m")
    ax.set_ylabel("module (vision blocks, merger / projector, language layers, head)")
    ax.set_title(f"per-module {value.replace('_', ' ')} with ḡ_img")
    return ax


def _jsonl(path: Path) -> pd.DataFrame:
    return pd.DataFrame(io.read_jsonl(path))


def training_trajectory(traj: pd.DataFrame, evals: pd.DataFrame, axes: Any = None) -> Any:
    """Two panels against optimizer step: cos(g_update, ḡ_img) and held-out accuracies."""
    import seaborn as sns

    plt = _mpl()
    sns.set_theme(style="whitegrid", context="notebook")
    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax0, ax1 = axes
    if len(traj) and "cos" in traj:
        ok = traj[traj["finite"].astype(bool)] if "finite" in traj else traj
        ax0.plot(ok["step"], ok["cos"], "o-", color="C0", label="cos(g_update, ḡ_img)")
        if "projected" in ok and ok["projected"].fillna(False).astype(bool).any():
            pr = ok[ok["projected"].fillna(False).astype(bool)]
            ax0.scatter(pr["step"], pr["cos"], color="C3", zorder=3, label="projected")
        ax0.axhline(0.0, color="k", lw=0.8, ls="--")
        ax0.set_ylabel("cosine")
        ax0.legend(fontsize=8)
    ax0.set_title("alignment of the run's update with the held-out image probe")
    if len(evals):
        for col, style, label in (("image_free", "C1-", "image (free)"), ("image_restricted", "C1--", "image (restricted)"),
                                  ("video_free", "C2-", "video (free)"), ("video_restricted", "C2--", "video (restricted)")):
            ax1.plot(evals["step"], evals[col], style, marker="o", ms=3, label=label)
        ax1.set_ylim(0, 1)
        ax1.legend(fontsize=8, ncol=2)
    else:
        ax1.text(0.5, 0.5, "no evaluation rows", ha="center", transform=ax1.transAxes)
    ax1.set_ylabel("held-out accuracy")
    ax1.set_xlabel("optimizer step")
    return axes


def budget_trajectory(budgets: pd.DataFrame, ax: Any = None) -> Any:
    """A(m) = E<g_img, g_vid^(m)> on the fixed probe set against optimizer step, one line per budget, 95% t CI."""
    plt = _mpl()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    rows = [{"step": r["step"], **b} for _, r in budgets.iterrows() for b in r["budgets"]]
    df = pd.DataFrame(rows)
    for i, (m, g) in enumerate(df.groupby("frames", sort=True)):
        g = g.sort_values("step")
        ax.plot(g["step"], g["mean"], "o-", ms=3, color=f"C{i}", label=f"m={m}")
        ci = g["ci95_t"].dropna()
        if len(ci):
            lo = [c[0] for c in ci]
            hi = [c[1] for c in ci]
            ax.fill_between(g.loc[ci.index, "step"], lo, hi, color=f"C{i}", alpha=0.15, lw=0)
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("A(m) (95% CI)")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8, ncol=min(4, df["frames"].nunique()))
    return ax


def trap_curves(evals: pd.DataFrame, traj: pd.DataFrame, axes: Any = None) -> Any:
    """The temporal-trap experiment: image accuracy, video accuracy and cos(g_update, ḡ_img) against step, per budget.

    Solid lines: free exact match; dashed: restricted to each question's valid answers. Colour: the budget;
    marker: the frame sampler (circles uniform, squares static, triangles shuffled; controls drawn fainter).
    """
    import seaborn as sns

    plt = _mpl()
    sns.set_theme(style="whitegrid", context="notebook")
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
    frame = evals if len(evals) else traj
    grid = sorted(frame["frames"].unique())
    runs = sorted({(str(s), int(m)) for s, m in zip(frame.get("sampler", ["uniform"] * len(frame)), frame["frames"],
                                                    strict=True)}, key=io.run_order)
    colors = dict(zip(grid, sns.color_palette("viridis", len(grid)), strict=True))
    markers = {"uniform": "o", "static": "s", "shuffled": "^"}

    def select(df: pd.DataFrame, sampler: str, m: int) -> pd.DataFrame:
        keep = df["frames"] == m
        if "sampler" in df:
            keep &= df["sampler"] == sampler
        return df[keep].sort_values("step")

    def label(sampler: str, m: int) -> str:
        return f"m={m}" + ("" if sampler == "uniform" else f" {sampler}")

    for ax, kind in zip(axes[:2], ("image", "video"), strict=True):
        for sampler, m in runs:
            ev = select(evals, sampler, m)
            ax.plot(ev["step"], ev[f"{kind}_free"], "-", color=colors[m], marker=markers.get(sampler, "o"), ms=3,
                    alpha=1.0 if sampler == "uniform" else 0.6, label=label(sampler, m))
            ax.plot(ev["step"], ev[f"{kind}_restricted"], "--", color=colors[m],
                    alpha=1.0 if sampler == "uniform" else 0.6)
        ax.set_title(f"held-out {kind} accuracy (solid: free, dashed: restricted)", fontsize=10)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    ax = axes[2]
    if len(traj):
        for sampler, m in runs:
            tr = select(traj[traj["finite"].astype(bool)], sampler, m)
            ax.plot(tr["step"], tr["cos"], "-", marker=markers.get(sampler, "o"), ms=3, color=colors[m],
                    alpha=1.0 if sampler == "uniform" else 0.6, label=label(sampler, m))
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    ax.set_title("cos(g_update, ḡ_img) along the run", fontsize=10)
    ax.set_xlabel("optimizer step")
    return axes


def checkpoint_curves(table: pd.DataFrame, ax: Any = None) -> Any:
    """A(m) ± 95% t CI against m (log2 axis), one line per checkpoint (``checkpoints.csv``)."""
    plt = _mpl()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(table["checkpoint"]))
    for i, lab in enumerate(labels):
        g = table[(table["checkpoint"] == lab) & table["mean"].notna()].sort_values("frames")
        shift = 2.0 ** (0.04 * (i - (len(labels) - 1) / 2))  # keep error bars apart
        lo, hi = g["ci95_t_lo"].fillna(g["mean"]), g["ci95_t_hi"].fillna(g["mean"])
        ax.errorbar(g["frames"] * shift, g["mean"], yerr=[g["mean"] - lo, hi - g["mean"]], fmt="o-", capsize=3,
                    color=plt.cm.viridis(i / max(1, len(labels) - 1)), label=lab)
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    fr = sorted(table["frames"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(fr)
    ax.set_xticklabels([str(f) for f in fr])
    ax.set_xlabel("frame budget m")
    ax.set_ylabel("mean A(m), 95% CI (t)")
    ax.set_title("image–video gradient alignment per checkpoint")
    ax.legend(fontsize=8)
    return ax


def lookahead_plot(steps: pd.DataFrame, axes: Any = None) -> Any:
    """Predicted vs actual one-step loss change against η, one colour per budget (``lookahead.csv``).

    Left: ΔL_img measured (points), Eq. 8 (line) and the Eq. 13 range (band). Right: ΔL_vid
    measured (points), its second-order value (line) and the Eq. 14 bound (dashed).
    """
    plt = _mpl()
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    frames = sorted(steps["frames"].unique())
    for i, m in enumerate(frames):
        g = steps[steps["frames"] == m].sort_values("lr")
        c = plt.cm.viridis(i / max(1, len(frames) - 1))
        axes[0].plot(g["lr"], g["d_img_eq8"], "-", color=c, label=f"m={m} Eq. 8")
        axes[0].fill_between(g["lr"], g["d_img_lower_eq13"], g["d_img_upper"], color=c, alpha=0.12)
        axes[0].plot(g["lr"], g["d_img"], "o", color=c, mfc="none", label=f"m={m} measured")
        axes[1].plot(g["lr"], g["d_vid_second_order"], "-", color=c, label=f"m={m} 2nd order")
        if g["d_vid_bound_eq14"].notna().any():
            axes[1].plot(g["lr"], g["d_vid_bound_eq14"], "--", color=c, label=f"m={m} Eq. 14 bound")
        axes[1].plot(g["lr"], g["d_vid"], "o", color=c, mfc="none", label=f"m={m} measured")
    for ax, what in zip(axes, ("ΔL_img", "ΔL_vid"), strict=True):
        ax.set_xscale("log")
        lin = float(steps[["d_img", "d_vid"]].abs().replace(0, float("nan")).min().min())
        ax.set_yscale("symlog", linthresh=lin if math.isfinite(lin) and lin > 0 else 1e-12)
        ax.axhline(0.0, color="k", lw=0.8, ls=":")
        ax.set_xlabel("step size η")
        ax.set_ylabel(f"{what} after θ − η g_vid")
        ax.legend(fontsize=7)
    axes[0].set_title("image loss: measured vs Eq. 8 (band: Eq. 13 with β_img)", fontsize=10)
    axes[1].set_title("video loss: measured vs second order and Eq. 14", fontsize=10)
    return axes


def spectrum_convergence(spectra: pd.DataFrame, ax: Any = None) -> Any:
    """β estimate against Hessian-vector products for every eigenvalue run (``spectra.csv``)."""
    plt = _mpl()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    for label, g in spectra.groupby("operator", sort=False):
        ax.plot(g["products"], g["beta"], ".-", label=str(label))
    ax.set_yscale("log")
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel("β estimate (max |eigenvalue|)")
    ax.set_title("convergence of the spectral-norm estimates", fontsize=10)
    ax.legend(fontsize=7)
    return ax


def _curvature_plots(d: Path) -> list[Path]:
    plt = _mpl()
    paths = []
    steps = pd.read_csv(d / io.LOOKAHEAD) if (d / io.LOOKAHEAD).stat().st_size else pd.DataFrame()
    if len(steps):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        lookahead_plot(steps, axes)
        fig.tight_layout()
        paths.append(d / "lookahead.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if (d / io.SPECTRA).is_file() and (d / io.SPECTRA).stat().st_size > 1:
        spectra = pd.read_csv(d / io.SPECTRA)
        if len(spectra):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            spectrum_convergence(spectra, ax)
            fig.tight_layout()
            paths.append(d / "spectra.png")
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    if not paths:
        raise DataError(f"{d}: the curvature run has no rows to plot yet")
    return paths


def _band(ax: Any, x: Sequence[float], cis: Sequence[Any], color: str) -> None:
    ok = [i for i, c in enumerate(cis) if c]
    if ok:
        ax.fill_between([x[i] for i in ok], [cis[i][0] for i in ok], [cis[i][1] for i in ok], color=color, alpha=0.15)


def decompose_plot(summary: dict[str, Any], axes: Any = None) -> Any:
    """The decomposition of ``gradprobe decompose`` against m (``summary.json``).

    Left: the contributions ρ_sh and −α(m) ρ_tmp, their sum (the prediction of Eq. 20) and the
    measured A(m) with its 95% t interval; both m* marked. Right: α(m) and Var ε(m). Bands: 95%
    bootstrap intervals.
    """
    plt = _mpl()
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    b = summary["budgets"]
    m = [r["frames"] for r in b]
    ax = axes[0]
    ax.plot(m, [r["contrib_sh"] for r in b], "-", color="tab:green", label="ρ_sh (shared)")
    _band(ax, m, [r["rho_sh_ci95"] for r in b], "tab:green")
    ax.plot(m, [r["contrib_tmp"] for r in b], "-", color="tab:purple", label="−α(m) ρ_tmp (temporal)")
    _band(ax, m, [r["contrib_tmp_ci95"] for r in b], "tab:purple")
    ax.plot(m, [r["A_pred"] for r in b], "--", color="tab:blue", label="predicted ρ_sh − α(m) ρ_tmp")
    _band(ax, m, [r["A_pred_ci95"] for r in b], "tab:blue")
    lo = [r["A"] - r["A_ci95_t"][0] if r["A_ci95_t"] else 0.0 for r in b]
    hi = [r["A_ci95_t"][1] - r["A"] if r["A_ci95_t"] else 0.0 for r in b]
    ax.errorbar(m, [r["A"] for r in b], yerr=[lo, hi], fmt="o", color="k", capsize=3, label="measured A(m)")
    ax.axhline(0.0, color="k", lw=0.8, ls=":")
    stars = summary.get("m_star") or {}
    for key, style, name in (("model", "-.", "m* model (Eq. 22)"), ("empirical", ":", "m* empirical")):
        v = (stars.get(key) or {}).get("value")
        if v is not None:
            ax.axvline(v, color="tab:red", ls=style, lw=1.2, label=f"{name} = {v}")
    ax.set_ylabel("contribution to ⟨g_img, g_vid^(m)⟩")
    ax.set_title(f"Eq. 20 vs measured A(m); g_sh: {summary['shared']['label']}", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(m, [r["alpha"] for r in b], "o-", color="tab:purple", label="α(m)")
    _band(ax, m, [r["alpha_ci95"] for r in b], "tab:purple")
    ax.set_ylabel("α(m) = ⟨d_m, ĝ_tmp⟩", color="tab:purple")
    tw = ax.twinx()
    lo = [r["var_eps"] - r["var_eps_ci95"][0] if r["var_eps_ci95"] else 0.0 for r in b]
    hi = [r["var_eps_ci95"][1] - r["var_eps"] if r["var_eps_ci95"] else 0.0 for r in b]
    tw.errorbar(m, [r["var_eps"] for r in b], yerr=[lo, hi], fmt="s--", color="tab:orange", capsize=3,
                label="Var ε(m)")
    tw.set_ylabel("Var ε(m) = tr Cov g_vid^(m) (per batch)", color="tab:orange")
    ax.set_title("temporal coefficient and residual variance", fontsize=9)
    for a in axes:
        a.set_xscale("log", base=2)
        a.set_xticks(m)
        a.set_xticklabels([str(x) for x in m])
        a.set_xlabel("frames m")
    return axes


def _decompose_png(d: Path) -> Path:
    try:
        summary = json.loads((d / io.SUMMARY).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{d / io.SUMMARY}: cannot read ({e})") from None
    if summary.get("schema") != io.DECOMPOSE_SCHEMA:
        raise DataError(f"{d / io.SUMMARY}: schema is {summary.get('schema')!r}, expected {io.DECOMPOSE_SCHEMA!r}")
    if not summary.get("budgets"):
        raise DataError(f"{d}: {summary.get('note', 'no budgets to plot')}")
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    decompose_plot(summary, axes)
    fig.tight_layout()
    fig.savefig(d / "decompose.png", dpi=120)
    plt.close(fig)
    return d / "decompose.png"


def plot_dir(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Draw the plots of an output dir: ``gradprobe align`` (alignment curve, module heatmap; A(m) per
    checkpoint when several were measured),
    ``gradprobe sft`` (training trajectory, with A(m) along the run when it was tracked) or
    ``gradprobe trap`` (accuracy and alignment per budget), ``gradprobe curvature`` (predicted vs
    actual one-step loss change, convergence of β) or ``gradprobe decompose`` (contributions against m).

    Raises:
        DataError: if the directory is neither.
    """
    plt = _mpl()
    d = Path(out_dir)
    if d.is_dir() and (d / "checkpoints.csv").is_file():
        table = pd.read_csv(d / "checkpoints.csv")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        checkpoint_curves(table, ax)
        fig.tight_layout()
        fig.savefig(d / "checkpoints.png", dpi=120)
        plt.close(fig)
        return [d / "checkpoints.png"]
    if d.is_dir() and (d / io.TRAP_SUMMARY).is_file():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
        trap_curves(*io.load_trap(d), axes)
        fig.tight_layout()
        fig.savefig(d / "trap.png", dpi=120)
        plt.close(fig)
        return [d / "trap.png"]
    if d.is_dir() and not (d / io.SUMMARY).exists() and (d / io.TRAJECTORY).is_file():
        budgets = _jsonl(d / io.TRAINING_BUDGETS)
        fig, axes = plt.subplots(3 if len(budgets) else 2, 1, figsize=(7, 8.5 if len(budgets) else 6), sharex=True)
        training_trajectory(_jsonl(d / io.TRAJECTORY), _jsonl(d / io.EVAL_FILE), axes[:2])
        if len(budgets):
            budget_trajectory(budgets, axes[2])
            axes[1].set_xlabel("")
        fig.tight_layout()
        fig.savefig(d / "trajectory.png", dpi=120)
        plt.close(fig)
        return [d / "trajectory.png"]
    if d.is_dir() and (d / io.LOOKAHEAD).is_file():
        return _curvature_plots(d)
    if d.is_dir() and (d / io.DECOMPOSE_BUDGETS).is_file():
        return [_decompose_png(d)]
    summary, batches, modules = read_align_dir(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    alignment_curve(summary, batches, ax)
    fig.tight_layout()
    paths.append(d / "alignment_curve.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if len(modules):
        n_mod = modules["module"].nunique()
        fig, ax = plt.subplots(figsize=(1.1 * modules["frames"].nunique() + 5, 0.32 * n_mod + 1.8))
        module_heatmap(modules, ax)
        fig.tight_layout()
        paths.append(d / "modules_heatmap.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
