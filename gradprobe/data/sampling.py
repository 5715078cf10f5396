"""Frame samplers Φ_m: which frames of a T-frame clip a budget of m frames sees.

* ``uniform`` — m indices spread evenly over the clip, endpoints included (the paper's Φ_m);
* ``static`` — the middle frame copied m times (Appendix B.2: no temporal information, same length);
* ``shuffled`` — the uniform frames in a random order (seeded by the clip and m, so reruns agree).

Every sampler returns m indices; the frames' nominal positions (timestamps) stay those of the
uniform sampler, so only the frames' content changes between samplers, not sequence length.
"""

from __future__ import annotations

import zlib

import numpy as np

from gradprobe.errors import BudgetError, InputError

SAMPLERS = ("uniform", "static", "shuffled")


def uniform_indices(total: int, m: int) -> np.ndarray:
    """m indices spread evenly over ``[0, total-1]``, endpoints included (the paper's Φ_m).

    ``m > total`` repeats frames. ``m == 1`` takes the middle frame.
    """
    if total < 1:
        raise BudgetError("video has no frames")
    if m < 1:
        raise BudgetError(f"frames: {m} is not a positive integer")
    if m == 1:
        return np.array([(total - 1) // 2])
    return np.round(np.linspace(0, total - 1, m)).astype(np.int64)


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise InputError(f"sampler: unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    return name


def sample_indices(total: int, m: int, sampler: str = "uniform", key: str = "") -> np.ndarray:
    """The m frame indices that ``sampler`` shows of a ``total``-frame clip named ``key``."""
    check_sampler(sampler)
    idx = uniform_indices(total, m)
    if sampler == "static":
        return np.full(m, (total - 1) // 2, dtype=np.int64)
    if sampler == "shuffled":
        rng = np.random.default_rng([zlib.crc32(key.encode()), m])
        return idx[rng.permutation(m)]
    return idx
