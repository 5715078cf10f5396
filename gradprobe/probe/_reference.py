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
