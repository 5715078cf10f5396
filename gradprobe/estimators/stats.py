"""Statistics for alignment estimates: two-way intervals, joint bootstrap, U-statistics, m*.

The alignment of video batch j with the image reference is
``d_j = <ḡ_img, g_j> = (1/G) Σ_g D[g, j]`` where ``D[g, j] = <ḡ_g, g_j>`` and
``ḡ_g`` is the mean gradient of image group g (the K image batches split into G
equal groups). Image groups and video batches are independent draws, so the
grand mean of D is unbiased for ``E[A(m)] = <E g_img, E g_vid^(m)>`` and its
variance has two sources, the image groups (rows) and the video batches
(columns). Writing ``D[g, j] = μ + a_g + b_j + e_gj``,

    Var(D̄) = σ_a²/G + σ_b²/J + σ_e²/(GJ),

and ``s_R²/G + s_C²/J`` (sample variances of the row means and the column
means) has expectation ``σ_a²/G + σ_b²/J + 2σ_e²/(GJ)``: an estimate that carries
both sources and errs on the safe side by ``σ_e²/(GJ)``. Student-t intervals use
Welch–Satterthwaite degrees of freedom. The bootstrap resamples rows and columns
independently (the "pigeonhole" bootstrap), again slightly conservative.
Ignoring the rows (treating ḡ_img as exact) under-covers when image batches are
noisy; the tests show both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

from gradprobe.errors import DataError


@dataclass(frozen=True)
class MeanCI:
    """Mean of a two-way table with its standard error and intervals."""

    n: int  # video batches (columns)
    groups: int  # image groups (rows)
    mean: float
    stderr: float | None
    df: float | None
    ci_t: tuple[float, float] | None
    #: the sampling variance of the mean from the video batches and from the image groups (ḡ_img)
    var_video: float | None = None
    var_image: float | None = None


def _var(x: np.ndarray) -> float:
    return float(np.var(x, ddof=1)) if x.size > 1 else float("nan")


def two_way_mean(D: np.ndarray, confidence: float = 0.95, extra_var: float = 0.0) -> MeanCI:
    """Grand mean of ``D`` (rows: image groups, columns: video batches) with a t interval.

    With one row the image term cannot be estimated and is left out (the
    interval then treats ḡ_img as exact); with one column no interval is given.
    ``extra_var`` is a further variance of known size (the sketch error), added to the sampling
    variance; it counts as having infinite degrees of freedom (Welch–Satterthwaite), so with few
    sampling degrees of freedom the t quantile falls as it grows.
    """
    D = np.asarray(D, dtype=np.float64)
    G, J = D.shape
    mean = float(D.mean())
    if J < 2:
        return MeanCI(J, G, mean, None, None, None)
    col = D.mean(axis=0)
    terms = [(_var(col) / J, J - 1)]
    if G >= 2:
        terms.append((_var(D.mean(axis=1)) / G, G - 1))
    v = sum(t for t, _ in terms) + max(float(extra_var), 0.0)
    se = math.sqrt(v)
    denom = sum(t * t / d for t, d in terms)
    df = (v * v / denom) if denom > 0 else float(J - 1)
    parts = {"var_video": terms[0][0], "var_image": terms[1][0] if G >= 2 else None}
    if se == 0.0:
        return MeanCI(J, G, mean, 0.0, df, (mean, mean), **parts)
    q = float(_st.t.ppf(0.5 + confidence / 2, df))
    return MeanCI(J, G, mean, se, df, (mean - q * se, mean + q * se), **parts)


def joint_bootstrap(
    tables: Mapping[int, tuple[np.ndarray, Sequence[int]]],
    n_boot: int,
    rng: np.random.Generator,
) -> dict[int, np.ndarray]:
    """Bootstrap the grand means of several budgets' tables jointly.

    Args:
        tables: budget m → (D_m of shape (G, J_m), the video-batch index of each column).
            All budgets share the same G image groups (the same reference), and
            columns with the same index are the same clips (paired), so one draw
            resamples the image groups once and the batch indices once for every budget.
        n_boot: number of resamples.
        rng: random generator.

    Returns:
        budget m → array of ``n_boot`` resampled means (NaN where a draw held no
        batch of that budget).
    """
    if not tables:
        return {}
    G = next(iter(tables.values()))[0].shape[0]
    universe = sorted({int(j) for _, idx in tables.values() for j in idx})
    pos = {j: i for i, j in enumerate(universe)}
    U = len(universe)
    wr = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)  # (B, G)
    wc = rng.multinomial(U, np.full(U, 1.0 / U), size=n_boot).astype(np.float64)  # (B, U)
    out = {}
    for m, (D, idx) in tables.items():
        cols = wc[:, [pos[int(j)] for j in idx]]  # (B, J_m)
        num = np.einsum("bg,gj,bj->b", wr, np.asarray(D, dtype=np.float64), cols)
        den = wr.sum(axis=1) * cols.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[m] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def percentile_ci(
    draws: np.ndarray, confidence: float = 0.95, df: float | None = None
) -> tuple[float, float] | None:
    """Percentile interval of bootstrap draws, expanded for small samples when ``df`` is given.

    The plain percentile bootstrap is too narrow with few resampling units (its
    variance carries the factor (n−1)/n and normal tails). The expanded percentile
    interval (Hesterberg, 2015) takes the quantiles at tail level α'/2 where
    ``Φ⁻¹(1 − α'/2) = sqrt(n/(n−1)) · t_{df, 1−α/2}`` with ``n = df + 1``; ``df`` is
    the Satterthwaite degrees of freedom of the two-way variance.
    """
    d = draws[np.isfinite(draws)]
    if d.size < 2:
        return None
    a = (1 - confidence) / 2
    if df is not None and math.isfinite(df) and df > 0:
        z = math.sqrt((df + 1) / df) * float(_st.t.ppf(1 - a, df))
        a = float(_st.norm.sf(z))
    lo, hi = np.quantile(d, [a, 1 - a])
    return float(lo), float(hi)


def widen(ci: tuple[float, float] | None, point: float, extra_var: float, df: float | None,
          confidence: float = 0.95) -> tuple[float, float] | None:
    """An interval around ``point`` widened by an independent error of variance ``extra_var``: each half-width
    h becomes ``√(h² + (q·σ)²)`` with q the t quantile at ``df`` (normal without df)."""
    if ci is None or extra_var <= 0:
        return ci
    a = 0.5 + confidence / 2
    q = float(_st.t.ppf(a, df)) if df is not None and math.isfinite(df) and df > 0 else float(_st.norm.ppf(a))
    e = (q * math.sqrt(extra_var)) ** 2
    return point - math.sqrt((point - ci[0]) ** 2 + e), point + math.sqrt((ci[1] - point) ** 2 + e)


def unbiased_sqnorm_from_gram(gram: np.ndarray) -> float | None:
    """``‖E g‖²`` from the Gram matrix of independent estimates: the mean of its off-diagonal.

    The diagonal holds ``‖g_i‖² = ‖E g‖² + noise``; distinct pairs have expectation
    ``‖E g‖²`` exactly. None with fewer than two estimates.
    """
    gram = np.asarray(gram, dtype=np.float64)
    n = gram.shape[0]
    if n < 2:
        return None
    off = gram.sum() - np.trace(gram)
    return float(off / (n * (n - 1)))


def unbiased_sqnorm_from_pairs(pair_sum: float, n: int) -> float | None:
    """``‖E g‖²`` from ``Σ_{i<j} <g_i, g_j>`` over n independent estimates."""
    if n < 2:
        return None
    return float(pair_sum / (n * (n - 1) / 2))


def sqrt_or_none(x: float | None) -> float | None:
    """Square root of a squared-norm estimate; None when absent or negative (noise-dominated)."""
    if x is None or not math.isfinite(x) or x < 0:
        return None
    return math.sqrt(x)


def empirical_m_star(frames: Sequence[int], means: Sequence[float]) -> int | None:
    """Smallest budget whose mean alignment is ≤ 0 (Proposition 2); None if none is."""
    for m, a in sorted(zip(frames, means, strict=True)):
        if math.isfinite(a) and a <= 0:
            return int(m)
    return None


def m_star_resolved(budgets: Sequence[Mapping[str, Any]], m_star: int | None) -> tuple[bool, str]:
    """Whether the 95% intervals resolve the empirical m*, and why.

    m* is resolved when A(m*)'s interval lies below 0 and the interval at the next smaller budget lies
    above 0 (or m* is the grid's smallest budget); "no m* in the grid" is resolved when every interval
    lies above 0. Budgets without an interval resolve nothing.
    """
    ci: dict[int, Any] = {int(b["frames"]): b.get("ci95_t") for b in sorted(
        (b for b in budgets if b.get("mean") is not None), key=lambda b: int(b["frames"]))}
    if m_star is None:
        open_ = [m for m, c in ci.items() if not c or c[0] <= 0]
        if open_:
            return False, f"mean A > 0 at every budget, but the interval at m = {open_[0]} reaches 0 or below"
        return True, "every interval lies above 0"
    c = ci.get(m_star)
    if not c or c[1] >= 0:
        return False, f"A({m_star}) ≤ 0 but its interval reaches 0 or above"
    smaller = [m for m in ci if m < m_star]
    if smaller and (not ci[smaller[-1]] or ci[smaller[-1]][0] <= 0):
        return False, f"the interval at m = {smaller[-1]}, the budget before, reaches 0 or below"
    return True, f"A({m_star})'s interval lies below 0" + (f" and A({smaller[-1]})'s above 0" if smaller else "")


def zero_crossing(frames: Sequence[int], means: Sequence[float]) -> float | None:
    """Budget where the mean alignment first crosses from > 0 to ≤ 0, interpolated linearly in log2 m.

    None when no budget is ≤ 0, or when the smallest budget is already ≤ 0 (the
    crossing lies below the grid).
    """
    pts = sorted(zip(frames, means, strict=True))
    for i, (m, a) in enumerate(pts):
        if math.isfinite(a) and a <= 0:
            if i == 0:
                return None
            m0, a0 = pts[i - 1]
            x0, x1 = math.log2(m0), math.log2(m)
            if a0 == a:
                return float(m)
            x = x0 + a0 * (x1 - x0) / (a0 - a)
            return float(2.0**x)
    return None


def m_star_distribution(frames: Sequence[int], draws: Mapping[int, np.ndarray]) -> dict[str, float]:
    """Bootstrap distribution of the empirical m*: ``{"<m>": p, ..., "none": p}`` (sums to 1)."""
    frames = sorted(frames)
    M = np.stack([draws[m] for m in frames], axis=1)  # (B, |M|)
    nonpos = np.isfinite(M) & (M <= 0)
    first = np.where(nonpos.any(axis=1), nonpos.argmax(axis=1), -1)
    out: dict[str, float] = {}
    for i, m in enumerate(frames):
        out[str(m)] = float(np.mean(first == i))
    out["none"] = float(np.mean(first == -1))
    return out


def weighted_mean_ci(x: Sequence[float], w: Sequence[float] | None = None,
                     confidence: float = 0.95) -> tuple[float, float | None, tuple[float, float] | None]:
    """Weighted mean of per-batch values with a Student-t interval over the batches.

    ``w`` are weights summing to 1 (default equal). The standard error is
    ``√(n/(n−1) Σ w_i² (x_i − x̄)²)``, which is ``s/√n`` for equal weights; n − 1 degrees of
    freedom. Returns ``(mean, stderr, ci)``, with no interval for one value.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    w = np.full(n, 1.0 / n) if w is None else np.asarray(w, dtype=np.float64)
    mean = float((w * x).sum())
    if n < 2:
        return mean, None, None
    se = math.sqrt(n / (n - 1) * float((w**2 * (x - mean) ** 2).sum()))
    q = float(_st.t.ppf(0.5 + confidence / 2, n - 1))
    return mean, se, (mean - q * se, mean + q * se)


def paired_difference(after: str, before: str) -> dict[str, Any]:
    """Mean of per-record differences of two 0/1 strings over the same records, with a 95% t interval."""
    a = np.frombuffer(after.encode(), dtype=np.uint8) - ord("0")
    b = np.frombuffer(before.encode(), dtype=np.uint8) - ord("0")
    if len(a) != len(b) or len(a) < 2:
        raise DataError("paired difference needs the same records (at least 2) in both evaluations")
    d = a.astype(float) - b.astype(float)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    half = float(_st.t.ppf(0.975, len(d) - 1)) * se
    lo, hi = mean - half, mean + half
    return {"diff": mean, "stderr": se, "ci95": [lo, hi], "n": len(d), "excludes_zero": bool(lo > 0 or hi < 0)}
