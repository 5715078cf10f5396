"""Context managers that put a model into measurement state and always restore it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gradprobe.probe.select import Selection


@contextlib.contextmanager
def measurement_mode(model: torch.nn.Module, selection: Selection, *, eval_mode: bool = True) -> Iterator[None]:
    """Within the block: eval mode (no dropout) and gradients only for the selected parameters.

    Parameters outside the selection stop requiring grad, so backward neither
    computes nor stores their gradients. Everything is restored in ``finally``.
    """
    was_training = model.training
    chosen = {id(p) for p in selection.params}
    switched = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    try:
        if eval_mode:
            model.eval()
        for p in switched:
            p.requires_grad_(False)
        yield
    finally:
        for p in switched:
            p.requires_grad_(True)
        model.train(was_training)
