"""Spectral estimates from Hessian-vector products: Lanczos, power iteration, Hutchinson, SLQ.

Every function takes ``matvec(v) -> H v`` over vectors that are lists of tensors and a
template ``like`` (the shapes, dtypes and devices of a vector), so it runs on a
:class:`gradprobe.estimators.hvp.HessianOperator` or on any explicit symmetric matrix.

β, the spectral norm of Assumption 1, is ``max(|λ_max|, |λ_min|)``; both ends are reported
because a Hessian away from a minimum has negative eigenvalues that can dominate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats as sstats

from gradprobe.errors import InputError
from gradprobe.estimators.hvp import Vec, vaxpy, vdot, vnorm, vrandom, vscale

MatVec = Callable[[Vec], Vec]

METHODS = ("lanczos", "power")


@dataclass
class Spectrum:
    """Extreme eigenvalues of a symmetric operator.

    Attributes:
        method: ``lanczos`` or ``power``.
        top, bottom: the largest and smallest eigenvalue found (for ``power`` without
            ``both_ends``, ``bottom`` is None and ``top`` is the dominant eigenvalue, with its sign).
        beta: ``max(|top|, |bottom|)``, the spectral-norm estimate.
        products: Hessian-vector products used.
        converged: the stopping rule was met before the iteration cap.
        residual: Lanczos: the residual bound ``β_k |s_k|`` of the Ritz value that gives β (there is an
            eigenvalue within it); power: ``‖Hv − λv‖`` at the end.
        history: per iteration: ``products``, ``top``, ``bottom``, ``beta``.
        ritz, weights: Lanczos only: Ritz values and the squared first components of their
            eigenvectors (the quadrature weights of stochastic Lanczos quadrature).
    """

    method: str
    top: float
    bottom: float | None
    beta: float
    products: int
    converged: bool
    residual: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    ritz: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def to_dict(self, history: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not history:
            d.pop("history")
        return d


def _check(max_iter: int, tol: float) -> None:
    if not isinstance(max_iter, int) or max_iter < 1:
        raise InputError(f"max_iter: expected a positive integer, got {max_iter!r}")
    if not (tol > 0 and math.isfinite(tol)):
        raise InputError(f"tol: expected a positive tolerance, got {tol!r}")


def _unit(v: Vec) -> Vec:
    n = vnorm(v)
    if n == 0:
        raise InputError("start vector is zero")
    return vscale(v, 1.0 / n)


def lanczos(
    matvec: MatVec,
    like: Sequence[torch.Tensor],
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    start: Vec | None = None,
    reorthogonalize: bool = True,
) -> Spectrum:
    """Extreme eigenvalues by the Lanczos process.

    Stops when the residual bound of both extreme Ritz values is at most ``tol × β`` (each is
    then within ``tol × β`` of an eigenvalue), when an invariant subspace is found, or after
    ``max_iter`` products.

    Args:
        matvec: ``v -> H v`` (H symmetric).
        like: template vector.
        max_iter: cap on products (= Lanczos steps).
        tol: relative tolerance of the residual rule.
        seed: seed of the Gaussian start vector.
        start: a start vector instead of a random one.
        reorthogonalize: keep every Lanczos vector and orthogonalise against all of them
            (memory: ``max_iter`` vectors); without it only three vectors are kept and the
            extreme Ritz values still converge but may repeat ("ghosts").
    """
    _check(max_iter, tol)
    v = _unit(list(start) if start is not None else vrandom(like, torch.Generator().manual_seed(seed)))
    basis: list[Vec] = [v] if reorthogonalize else []
    alphas: list[float] = []
    betas: list[float] = []
    prev: Vec | None = None
    history: list[dict[str, float]] = []
    converged = False
    residual = None
    theta = np.zeros(0)
    S = np.zeros((0, 0))
    scale = 0.0
    for k in range(max_iter):
        w = matvec(v)
        a = vdot(w, v)
        w = vaxpy(w, -a, v)
        if prev is not None:
            w = vaxpy(w, -betas[-1], prev)
        if reorthogonalize:
            for _ in range(2):  # twice is enough
                for u in basis:
                    w = vaxpy(w, -vdot(w, u), u)
        alphas.append(a)
        b = vnorm(w)
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, S = np.linalg.eigh(T)
        scale = max(abs(theta[0]), abs(theta[-1]), scale)
        res_top, res_bot = b * abs(S[-1, -1]), b * abs(S[-1, 0])
        beta = max(abs(theta[-1]), abs(theta[0]))
        residual = res_top if abs(theta[-1]) >= abs(theta[0]) else res_bot
        history.append({"products": k + 1, "top": float(theta[-1]), "bottom": float(theta[0]),
                        "beta": float(beta), "residual": float(max(res_top, res_bot))})
        if b <= 1e-12 * max(scale, 1e-300) or b == 0.0:  # invariant subspace: the Ritz values are eigenvalues
            converged, residual = True, 0.0
            break
        if k >= 1 and max(res_top, res_bot) <= tol * beta:
            converged = True
            break
        betas.append(b)
        prev, v = v, vscale(w, 1.0 / b)
        if reorthogonalize:
            basis.append(v)
    weights = (S[0, :] ** 2).tolist()
    return Spectrum(
        method="lanczos", top=float(theta[-1]), bottom=float(theta[0]),
        beta=float(max(abs(theta[-1]), abs(theta[0]))), products=len(alphas), converged=converged,
        residual=float(residual) if residual is not None else None, history=history,
        ritz=[float(x) for x in theta], weights=[float(x) for x in weights],
    )


def _power(matvec: MatVec, v: Vec, max_iter: int, tol: float, shift: float, history: list[dict[str, float]],
           offset: int) -> tuple[float, Vec, int, bool, float]:
    lam = None
    converged = False
    hv: Vec = v
    n = 0
    for n in range(1, max_iter + 1):
        hv = matvec(v)
        if shift:
            hv = vaxpy(hv, -shift, v)
        new = vdot(hv, v)
        history.append({"products": offset + n, "estimate": new + shift})
        norm = vnorm(hv)
        if norm == 0:
            lam, converged = new, True
            break
        # PyHessian's rule: stop when the Rayleigh quotient changes by less than tol (relative)
        if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
            lam, converged = new, True
            break
        lam = new
        if n == max_iter:  # keep v: it is the vector whose product hv is, so the residual below is its own
            break
        v = vscale(hv, 1.0 / norm)
    res = vnorm(vaxpy(hv, -lam, v)) if lam is not None else float("nan")
    return float(lam), v, n, converged, res


def power_iteration(
    matvec: MatVec,
    like: Sequence[torch.Tensor],
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    both_ends: bool = False,
) -> Spectrum:
    """The dominant eigenvalue by power iteration (PyHessian's method and stopping rule).

    Stops when the Rayleigh quotient changes by less than ``tol`` relative between
    iterations, or after ``max_iter`` products. The dominant eigenvalue is the one of
    largest magnitude, so ``|top| = β``. With ``both_ends`` a second run on ``H − λ I`` finds
    the other end of the spectrum (up to ``max_iter`` more products).

    ``converged`` means that stopping rule fired (at both ends with ``both_ends``); it is not a bound
    on the distance to the extreme eigenvalue: with two nearly equal eigenvalues at an end the
    quotient can stall far from it. ``residual`` is ``‖Hv − λv‖`` of the returned estimate (the larger
    of the two ends' with ``both_ends``); some eigenvalue lies within it of λ (Krylov–Weinstein), which
    is the guarantee the run gives.
    """
    _check(max_iter, tol)
    v = _unit(vrandom(like, torch.Generator().manual_seed(seed)))
    history: list[dict[str, float]] = []
    lam, _, n1, conv1, res = _power(matvec, v, max_iter, tol, 0.0, history, 0)
    top, bottom, products, converged = lam, None, n1, conv1
    if both_ends:
        v2 = _unit(vrandom(like, torch.Generator().manual_seed(seed + 1)))
        mu, _, n2, conv2, res2 = _power(matvec, v2, max_iter, tol, lam, history, n1)
        other = mu + lam
        top, bottom = max(lam, other), min(lam, other)
        products, converged, res = n1 + n2, conv1 and conv2, max(res, res2)
    for h in history:
        h.setdefault("estimate", float("nan"))
    return Spectrum(
        method="power", top=float(top), bottom=None if bottom is None else float(bottom),
        beta=float(max(abs(top), abs(bottom) if bottom is not None else 0.0)), products=products, converged=converged, residual=float(res),
        history=[{"products": h["products"], "top": h["estimate"], "bottom": float("nan"),
                  "beta": abs(h["estimate"]), "residual": float("nan")} for h in history],
    )


def extreme_eigenvalues(matvec: MatVec, like: Sequence[torch.Tensor], method: str = "lanczos",
                        **kw: Any) -> Spectrum:
    """:func:`lanczos` or :func:`power_iteration` (with both ends) by name."""
    if method == "lanczos":
        return lanczos(matvec, like, **kw)
    if method == "power":
        return power_iteration(matvec, like, both_ends=True, **kw)
    raise InputError(f"method: unknown eigenvalue method {method!r}; use {' or '.join(METHODS)}")


@dataclass
class TraceEstimate:
    """Hutchinson's estimate of ``tr H`` with a Student-t interval over the probe vectors."""

    mean: float
    stderr: float | None
    ci95: tuple[float, float] | None
    samples: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hutchinson_trace(matvec: MatVec, like: Sequence[torch.Tensor], *, samples: int = 20,
                     seed: int = 0) -> TraceEstimate:
    """``tr H ≈ mean_i z_iᵀ H z_i`` over Rademacher vectors ``z_i`` (unbiased; exact for diagonal H)."""
    if not isinstance(samples, int) or samples < 1:
        raise InputError(f"trace samples: expected a positive integer, got {samples!r}")
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(samples):
        z = vrandom(like, gen, "rademacher")
        vals.append(vdot(z, matvec(z)))
    x = np.array(vals)
    mean = float(x.mean())
    if samples < 2:
        return TraceEstimate(mean, None, None, vals)
    se = float(x.std(ddof=1) / math.sqrt(samples))
    h = float(sstats.t.ppf(0.975, samples - 1)) * se
    return TraceEstimate(mean, se, (mean - h, mean + h), vals)


def spectral_density(matvec: MatVec, like: Sequence[torch.Tensor], *, vectors: int = 4, steps: int = 30,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature: nodes and weights of the spectral density.

    Each of ``vectors`` Rademacher start vectors gives ``steps`` Ritz values and weights
    (summing to 1); the density is their average, so ``Σ w f(λ) ≈ tr f(H) / n`` for the
    dimension ``n``. Returns ``(nodes, weights)``.
    """
    nodes, weights = [], []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(vectors):
        z = vrandom(like, gen, "rademacher")
        s = lanczos(matvec, like, max_iter=steps, tol=1e-300, start=z)
        nodes += s.ritz
        weights += [w / vectors for w in s.weights]
    return np.array(nodes), np.array(weights)
