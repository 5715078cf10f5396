"""Activation checkpointing for measurement passes, which run in eval mode.

transformers checkpoints its layers (``GradientCheckpointingLayer``) only in train mode, and gradprobe measures
in eval mode (no dropout), so a measurement pass would otherwise keep every layer's activations for the
backward. :func:`checkpointed` wraps the ``forward`` of each block (every decoder layer and vision block:
transformers' ``GradientCheckpointingLayer`` instances, or the modules ``is_block`` names) in torch's
non-reentrant checkpoint, on the instance, and restores the instance in ``finally``:

* nothing global changes: no class, no torch or transformers function, no module's train/eval mode;
* module hooks (FSDP2's unshard, accelerate's device moves) stay outside the checkpoint, as in transformers'
  own checkpointing, since ``__call__`` runs them around ``forward``;
* each parameter's gradient is accumulated once, so a post-accumulate-grad hook fires once per parameter and
  backward (the non-reentrant variant recomputes inside the backward; the reentrant one can fire twice);
* a block's key/value cache is dropped for the pass (``use_cache=False``), since the recomputation would
  write it a second time; a loss needs no cache;
* double backward (Hessian-vector products) goes through the recomputation too.

Gradients equal those without checkpointing up to the order of floating-point sums
(tests/test_checkpointing.py: 1e-12 relative in float64, every family). What it saves is memory: each block
keeps its input for the backward instead of every activation inside it, at the cost of one more forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from gradprobe.errors import InputError

__all__ = ["CHECKPOINTING", "check_checkpointing", "checkpoint_blocks", "checkpointed"]

#: ``auto``: on when the memory bound says a batch would not fit without it; ``on``; ``off``.
CHECKPOINTING = ("auto", "on", "off")

#: Keyword arguments a block's cache comes in by (by transformers release and model).
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")

IsBlock = Callable[[str, torch.nn.Module], bool]


def check_checkpointing(value: Any) -> str:
    """``auto``, ``on`` or ``off``.

    Raises:
        InputError: anything else.
    """
    if not isinstance(value, str) or value.lower() not in CHECKPOINTING:
        raise InputError(f"checkpointing: expected one of {', '.join(CHECKPOINTING)}, got {value!r}")
    return value.lower()


def _transformers_layer(name: str, module: torch.nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers, or none: no block is known
        return False
    return isinstance(module, GradientCheckpointingLayer)


def checkpoint_blocks(model: torch.nn.Module, is_block: IsBlock | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The blocks :func:`checkpointed` wraps, outermost only (a block inside a block is not wrapped again).

    Args:
        model: the model.
        is_block: ``is_block(name, module)`` picks the blocks; default: transformers'
            ``GradientCheckpointingLayer`` instances (the decoder layers and vision blocks of every family).
    """
    pick = is_block or _transformers_layer
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if pick(name, module):
            found.append((name, module))
    return found


def _checkpointing(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # no backward, nothing to save
            return forward(*args, **kwargs)
        for key in _CACHE_KWARGS:
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def checkpointed(model: torch.nn.Module, enabled: bool = True,
                 is_block: IsBlock | None = None) -> Iterator[list[str]]:
    """Within the block, every block of ``model`` (:func:`checkpoint_blocks`) runs under non-reentrant
    activation checkpointing, whatever its mode; everything is restored in ``finally``.

    Yields:
        The names of the wrapped blocks (empty when ``enabled`` is False or the model has none).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).eval()
        >>> with checkpointed(model, is_block=lambda name, m: isinstance(m, torch.nn.Linear)) as names:
        ...     model(torch.ones(2, 3)).sum().backward()
        >>> names, "forward" in vars(model[0])
        (['0', '2'], False)
    """
    wrapped: list[tuple[torch.nn.Module, Any]] = []
    names: list[str] = []
    try:
        for name, module in checkpoint_blocks(model, is_block) if enabled else []:
            own = vars(module).get("forward")  # an instance forward someone set (accelerate's hooks)
            wrapped.append((module, own))
            module.forward = _checkpointing(module.forward)
            names.append(name)
        yield names
    finally:
        for module, own in reversed(wrapped):
            if own is None:
                del module.forward
            else:
                module.forward = own
