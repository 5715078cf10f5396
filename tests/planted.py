"""Planted problems: linear losses whose gradients are known in closed form.

``loss(θ; c) = <θ, c>`` has gradient ``c`` whatever θ is, so a batch *is* its
gradient. Image batches are ``u + σ_img ξ``; video batch j at budget m is
``s + α(m) t + σ_vid ζ_j`` with ζ_j shared across m (the same clips at every
budget). Then ``E[A(m)] = <u, s> + α(m) <u, t> = ρ_sh − α(m) ρ_tmp``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class Linear(torch.nn.Module):
    def __init__(self, sizes=(30, 20)):
        super().__init__()
        self.shared = torch.nn.Parameter(torch.zeros(sizes[0], dtype=torch.float64))
        self.temporal = torch.nn.Parameter(torch.zeros(sizes[1], dtype=torch.float64))


def linear_loss(model, c):
    return (model.shared * c[0]).sum() + (model.temporal * c[1]).sum()


class Planted:
    """Directions u, s, t with <u, s> = rho_sh and <u, t> = -rho_tmp, and α(m) = log2(m) / 2."""

    def __init__(self, rho_sh=1.0, rho_tmp=0.6, sizes=(30, 20), seed=0):
        rng = np.random.default_rng(seed)
        self.sizes = sizes
        d = sum(sizes)
        q, _ = np.linalg.qr(rng.standard_normal((d, 3)))
        e1, e2, e3 = q.T
        self.u = e1
        self.s = rho_sh * e1 + 0.7 * e2
        self.t = -rho_tmp * e1 + 0.9 * e3
        self.rho_sh, self.rho_tmp = rho_sh, rho_tmp

    @staticmethod
    def alpha(m):
        return math.log2(m) / 2

    def truth(self, m):
        return self.rho_sh - self.alpha(m) * self.rho_tmp

    def _split(self, v):
        a = self.sizes[0]
        return (torch.tensor(v[:a]), torch.tensor(v[a:]))

    def draw(self, K, J, frames, sigma_img, sigma_vid, rng):
        d = len(self.u)
        images = [self._split(self.u + sigma_img * rng.standard_normal(d)) for _ in range(K)]
        clips = [rng.standard_normal(d) for _ in range(J)]
        videos = {
            m: [self._split(self.s + self.alpha(m) * self.t + sigma_vid * z) for z in clips] for m in frames
        }
        return images, videos

    def draw_decomposition(self, K, J, frames, sigma_img, sigma_clip, sigma_frames, rng, alpha=None):
        """Images, videos per budget and the shared variant for the decomposition.

        Video batch j at budget m is ``s + α(m) t + σ_clip ζ_j + σ_frames(m) ξ_jm`` (ζ_j: the clip, the
        same in every variant; ξ_jm: fresh noise whose size ``sigma_frames(m)`` may grow with m); the
        shared variant of batch j is ``s + σ_clip ζ_j``. So g_sh = s, g_tmp = t, ε(m) has mean 0 and
        Var ε(m) = d (σ_clip² + σ_frames(m)²).
        """
        alpha = alpha or self.alpha
        d = len(self.u)
        images = [self._split(self.u + sigma_img * rng.standard_normal(d)) for _ in range(K)]
        clips = [rng.standard_normal(d) for _ in range(J)]
        videos = {m: [self._split(self.s + alpha(m) * self.t + sigma_clip * z + sigma_frames(m) * rng.standard_normal(d))
                      for z in clips] for m in frames}
        shared = [self._split(self.s + sigma_clip * z) for z in clips]
        return images, videos, shared
