"""Frame samplers Φ_m: which frame indices of a T-frame clip a budget of m frames sees."""

from __future__ import annotations

import numpy as np

from gradprobe.errors import BudgetError

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
