import math
import os
from dataclasses import asdict

import pytest
import torch

from gradprobe.toybox import TINY

# one thread per pytest-xdist worker (the workers share the cores), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


class TinyNet(torch.nn.Module):
    """A small nonlinear model with named blocks, an unused parameter and a shared (tied) weight."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Linear(5, 6).to(dtype)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6).to(dtype) for _ in range(2)])
        self.head = torch.nn.Linear(6, 3).to(dtype)
        self.unused = torch.nn.Parameter(torch.randn(4, dtype=dtype, generator=g))
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        h = torch.tanh(self.blocks[0](h))  # block 0 used twice: its grad accumulates over two uses
        return self.head(h)


def tiny_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def make_batches(n, seed, shift=0.0, dtype=torch.float64, size=4):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 5, generator=g, dtype=dtype) + shift, torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


@pytest.fixture
def tiny():
    return TinyNet()


TINY_TOY = asdict(TINY)


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory):
    """A tiny toy built through the real path (ShapesWorld files, save_pretrained, Trainer, from_pretrained)."""
    from gradprobe.toybox import ensure_toy

    return ensure_toy(TINY, tmp_path_factory.mktemp("toycache"))


def require_stack(module: str) -> None:
    """A training stack's end-to-end test: skipped where the stack is not installed, except in the stack's own
    environment in ``.ci/run`` (``GRADPROBE_REQUIRE_STACKS=1``), where its absence is a failure."""
    if not os.environ.get("GRADPROBE_REQUIRE_STACKS"):
        pytest.importorskip(module)


@pytest.fixture(scope="session")
def exported_toy(tiny_toy, tmp_path_factory):
    """``exported_toy(fmt)``: the tiny toy's data as ``gradprobe toy --export FMT DIR`` writes it."""
    made = {}

    def export(fmt):
        if fmt not in made:
            made[fmt] = tmp_path_factory.mktemp(fmt)
            tiny_toy.export(fmt, made[fmt])
        return made[fmt]

    return export


def assert_close(a, b, rel=1e-6, path=""):
    """Two JSON-like trees are equal: the same keys, lengths and non-float leaves, floats within ``rel``."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-12), f"{path}: {a} vs {b}"
    else:
        assert a == b, path
