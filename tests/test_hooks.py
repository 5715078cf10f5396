"""Hooks exist only inside the context and are removed even when the run raises."""

import pytest
import torch
from conftest import make_batches, tiny_loss

import gradprobe
from gradprobe.probe import GradientProbe, select_parameters


def _hook_count(model):
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


def test_hooks_registered_only_inside(tiny):
    probe = GradientProbe(tiny, select_parameters(tiny))
    assert _hook_count(tiny) == 0
    with probe.attached():
        assert _hook_count(tiny) == len(list(tiny.parameters()))
    assert _hook_count(tiny) == 0


def test_no_hook_survives_a_raising_loss(tiny):
    calls = {"n": 0}

    def bad_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return tiny_loss(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        gradprobe.align(tiny, make_batches(2, 1), {2: make_batches(3, 2)}, bad_loss)
    assert _hook_count(tiny) == 0
    assert all(p.requires_grad for p in tiny.parameters())
    assert tiny.training


def test_no_hook_survives_a_raising_backward(tiny):
    def loss_then_fail(model, batch):
        loss = tiny_loss(model, batch)

        class Fail(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                raise RuntimeError("backward failed")

        return Fail.apply(loss)

    probe = GradientProbe(tiny, select_parameters(tiny))
    with pytest.raises(RuntimeError, match="backward failed"), probe.attached():
        probe.run_batch(loss_then_fail, make_batches(1, 1)[0])
    assert _hook_count(tiny) == 0
    assert not probe.active


def test_frozen_parameters_are_not_selected(tiny):
    tiny.head.weight.requires_grad_(False)
    sel = select_parameters(tiny)
    assert "head.weight" not in sel.names
    assert "head.bias" in sel.names
