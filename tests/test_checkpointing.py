"""Activation checkpointing in measurement passes (:mod:`gradprobe.probe.checkpoint`): in float64 on every
family's tiny checkpoint, gradients with and without it are equal, each parameter's gradient is accumulated
once, and nothing of it outlives the block."""

import pytest
import torch

from gradprobe.data import shapesworld as sw
from gradprobe.data.clips import ClipStore
from gradprobe.data.records import read_samples
from gradprobe.errors import InputError
from gradprobe.models.base import load_image, loss_fn
from gradprobe.models.registry import family_for
from gradprobe.models.tiny import FAMILY_NAMES, create_tiny
from gradprobe.probe.checkpoint import check_checkpointing, checkpoint_blocks, checkpointed

M = 4  # frames: even, as Qwen's temporal patches ask


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    sw.generate(d, n_images=2, n_videos=2, seed=1, split="probe")
    return d


def _batches(family, world, root, **load):
    model, adapter = family_for(create_tiny(family, root, sw.vocabulary())).adapter_class().load(
        root, dtype=torch.float64, **load)
    images = read_samples(world / "probe_images.jsonl").samples
    videos = read_samples(world / "probe_videos.jsonl").samples
    decoded = {s.media: load_image(world, s) for s in images}
    batches = [adapter.collate(images, images=decoded), adapter.collate(videos, store=ClipStore(world, [M]), m=M)]
    return model.eval(), [{k: v.double() if torch.is_floating_point(v) else v for k, v in b.items()
                           if isinstance(v, torch.Tensor)} for b in batches]


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradients_equal_with_and_without_checkpointing(family, world, tmp_path):
    model, batches = _batches(family, world, tmp_path / family)
    blocks = checkpoint_blocks(model)
    kinds = {type(m).__name__ for _, m in blocks}
    assert any("Vision" in k or "Encoder" in k for k in kinds) and any("Decoder" in k for k in kinds), kinds
    fired: dict[str, int] = {}
    handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: fired.__setitem__(n, fired.get(n, 0) + 1))
               for n, p in model.named_parameters()]
    # a module inside each block counts its forwards: the recomputation in the backward runs it again
    calls = dict.fromkeys((n for n, _ in blocks), 0)
    for name, m in blocks:
        inner = next(c for c in m.modules() if isinstance(c, torch.nn.Linear))
        handles.append(inner.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1)))
    try:
        for batch in batches:
            calls.update(dict.fromkeys(calls, 0))
            plain = _grads(model, batch)
            ran = dict(calls)
            calls.update(dict.fromkeys(calls, 0))
            fired.clear()
            with checkpointed(model) as names:
                assert names == [n for n, _ in blocks]
                ckpt = _grads(model, batch)
            # a block with gradients ran once more, in the backward; one without (LLaVA's last vision layer,
            # whose output is not read) did not
            trained = {n for n in calls if any(p.startswith(n + ".") for p in plain)}
            assert trained and calls == {n: ran[n] * (2 if n in trained else 1) for n in calls}
            assert set(fired) == set(plain) and set(fired.values()) == {1}  # every gradient accumulated once
            assert set(ckpt) == set(plain)
            for n in plain:
                scale = plain[n].norm().item() or 1.0
                assert (ckpt[n] - plain[n]).norm().item() <= 1e-12 * scale, n
    finally:
        for h in handles:
            h.remove()
    assert not model.training and not any("forward" in vars(m) for _, m in blocks)


def test_restored_after_an_error_and_mode_kept(world, tmp_path):
    model, (image, _) = _batches("qwen2_5_vl", world, tmp_path / "q")
    model.train()
    with pytest.raises(RuntimeError, match="boom"), checkpointed(model) as names:
        assert names
        raise RuntimeError("boom")
    assert model.training and not any("forward" in vars(m) for _, m in checkpoint_blocks(model))
    with checkpointed(model, enabled=False) as names:
        assert names == []


def test_double_backward_through_the_recomputation(world, tmp_path):
    """A Hessian-vector product by double backward is the same with checkpointing (eager attention)."""
    model, (image, _) = _batches("llava", world, tmp_path / "l", attn_implementation="eager")
    params = [p for n, p in model.named_parameters() if "language_model" in n and p.requires_grad][-4:]
    v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def hvp():
        g = torch.autograd.grad(loss_fn(model, image), params, create_graph=True)
        gv = sum((a * b).sum() for a, b in zip(g, v, strict=True))
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(gv, params)])

    plain = hvp()
    with checkpointed(model):
        ckpt = hvp()
    assert (ckpt - plain).norm() <= 1e-12 * plain.norm()


def test_bad_value_is_one_line():
    assert check_checkpointing("ON") == "on"
    with pytest.raises(InputError, match="checkpointing: expected one of auto, on, off, got 'maybe'"):
        check_checkpointing("maybe")
