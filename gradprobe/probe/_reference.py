"""Brute-force float64 twins of the streamed estimators, for tests.

Everything here flattens whole gradients and is slow on purpose: it is the
obviously-correct version the fast paths are checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch


def flat_grad(model: torch.nn.Module, names: Sequence[str], loss_fn: Callable[..., torch.Tensor], batch: Any) -> np.ndarray:
    """The gradient over ``names`` (in order) as one float64 vector; zeros where a parameter gets none."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    parts = [
        (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).to(torch.float64).cpu()
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(parts).numpy()


def reference_alignment(
    model: torch.nn.Module,
    names: Sequence[str],
    modules: Sequence[str],
    image_batches: Sequence[Any],
    video_batches: Mapping[int, Sequence[Any]],
    loss_fn: Callable[..., torch.Tensor],
    groups: int,
) -> dict[str, Any]:
    """Flatten every gradient and compute what :func:`gradprobe.align` streams.

    Returns a dict with ``gram`` (G, G), ``D[m]`` (G, J), ``sq[m]`` (J,), ``pair[m]``
    (sum over j<j' of dots), and per-module versions under ``mod_*`` keyed by module name.
    """
    named = dict(model.named_parameters())
    sizes = [named[n].numel() for n in names]
    bounds = np.cumsum([0] + sizes)
    mod_names = list(dict.fromkeys(modules))
    masks = {}
    for mn in mod_names:
        mask = np.zeros(bounds[-1], dtype=bool)
        for i, m in enumerate(modules):
            if m == mn:
                mask[bounds[i] : bounds[i + 1]] = True
        masks[mn] = mask
    img = np.stack([flat_grad(model, names, loss_fn, b) for b in image_batches])
    per = len(image_batches) // groups
    means = np.stack([img[g * per : (g + 1) * per].mean(axis=0) for g in range(groups)])
    out: dict[str, Any] = {"gram": means @ means.T, "D": {}, "sq": {}, "pair": {}, "means": means}
    out["mod_gram"] = {mn: means[:, k] @ means[:, k].T for mn, k in masks.items()}
    out["mod_D"], out["mod_sq"], out["mod_pair"] = {}, {}, {}
    for m, batches in video_batches.items():
        V = np.stack([flat_grad(model, names, loss_fn, b) for b in batches])
        out["D"][m] = means @ V.T
        out["sq"][m] = (V * V).sum(axis=1)
        gramv = V @ V.T
        out["pair"][m] = (gramv.sum() - np.trace(gramv)) / 2
        out["mod_D"][m] = {mn: means[:, k] @ V[:, k].T for mn, k in masks.items()}
        out["mod_sq"][m] = {mn: (V[:, k] ** 2).sum(axis=1) for mn, k in masks.items()}
        out["mod_pair"][m] = {}
        for mn, k in masks.items():
            gv = V[:, k] @ V[:, k].T
            out["mod_pair"][m][mn] = (gv.sum() - np.trace(gv)) / 2
    return out


def reference_decomposition(
    model: torch.nn.Module,
    names: Sequence[str],
    loss_fn: Callable[..., torch.Tensor],
    image_batches: Sequence[Any],
    variants: Sequence[Sequence[Any]],
    shared_of: Sequence[int],
    image_groups: int,
    video_groups: int,
) -> dict[str, Any]:
    """Flatten every gradient and compute the point estimates of :func:`gradprobe.decompose` from vectors.

    ``variants`` lists each variant's batches (the budgets first, in grid order, then any shared
    variants); ``shared_of[i]`` is the variant that is budget i's shared one. Cross terms are averaged
    over distinct video groups of explicit difference vectors d_i,h = ḡ_i,h − ḡ_sh(i),h.
    """
    img = np.stack([flat_grad(model, names, loss_fn, b) for b in image_batches])
    per = len(image_batches) // image_groups
    means = np.stack([img[g * per : (g + 1) * per].mean(axis=0) for g in range(image_groups)])
    X = [np.stack([flat_grad(model, names, loss_fn, b) for b in v]) for v in variants]
    J = X[0].shape[0]
    ph = J // video_groups
    Y = [np.stack([x[h * ph : (h + 1) * ph].mean(axis=0) for h in range(video_groups)]) for x in X]
    M = len(shared_of)
    pairs = [(h, k) for h in range(video_groups) for k in range(video_groups) if h != k]

    def cross(P: np.ndarray, Q: np.ndarray) -> float:
        return float(np.mean([P[h] @ Q[k] for h, k in pairs]))

    a = np.array([float((means @ x.T).mean()) for x in X])
    dvec = [Y[i] - Y[shared_of[i]] for i in range(M)]
    D = np.array([[cross(dvec[i], dvec[k]) for k in range(M)] for i in range(M)])
    D = (D + D.T) / 2
    b = np.array([float((means @ (X[i] - X[shared_of[i]]).T).mean()) for i in range(M)])
    w, U = np.linalg.eigh(D)
    lam, u = w[-1], U[:, -1]
    alpha = np.sqrt(max(lam, 0.0)) * u
    nz = np.nonzero(np.abs(alpha) > 1e-9 * np.abs(alpha).max())[0]
    if nz.size and alpha[nz[-1]] < 0:
        u, alpha = -u, -alpha
    rho_tmp = -(u @ b) / np.sqrt(lam)
    rho_sh = a[list(shared_of)]
    A = a[:M]
    var = np.array([float((X[i] ** 2).sum(axis=1).mean()) - cross(Y[i], Y[i]) for i in range(M)])
    return {"A": A, "rho_sh": rho_sh, "alpha": alpha, "rho_tmp": float(rho_tmp), "D": D, "b": b,
            "residual": A - (rho_sh - alpha * rho_tmp), "var_eps": var, "eigenvalue": float(lam)}
