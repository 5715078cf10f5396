"""Activation checkpointing in measurement passes (:mod:`gradprobe.probe.checkpoint`): in float64 on every
family's tiny checkpoint, gradients with and without it are equal, each parameter's gradient is accumulated
once, and nothing of it outlives the block."""

import pytest
import torch
from conftest import assert_close

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
    sw.generate(d, n_images=4, n_videos=4, seed=1, split="probe")
    return d


def _batches(family, world, root, **load):
    model, adapter = family_for(create_tiny(family, root, sw.vocabulary())).adapter_class().load(
        root, dtype=torch.float64, **load)
    images = read_samples(world / "probe_images.jsonl").samples[:2]
    videos = read_samples(world / "probe_videos.jsonl").samples[:2]
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


def _toy_options(toy, out, **kw):
    return dict(frames="2,4", model=str(toy.model_dir), image_data=str(toy.data("probe", "images")),
                video_data=str(toy.data("probe", "videos")), image_batches=4, batch_size=4, video_batches=4,
                video_batch_size=2, dtype="float64", device="cpu", out=str(out), **kw)


def _statistics(summary):
    return {k: v for k, v in summary.items() if k not in ("meta", "settings", "timing", "warnings", "created")}


@pytest.mark.parametrize("command", ["align", "decompose", "curvature"])
def test_statistics_equal_with_and_without_checkpointing(command, tiny_toy, tmp_path):
    """Every summary statistic of align, decompose and curvature on the toy (float64, exact rows) is the same
    with checkpointing on as off, within 1e-12 relative; the summary records which ran."""
    from gradprobe import run

    options, fn = {"align": (run.AlignOptions, run.run_align), "decompose": (run.DecomposeOptions, run.run_decompose),
                   "curvature": (run.CurvatureOptions, run.run_curvature)}[command]
    extra = {"curvature": dict(max_iter=8, backend="double_backward")}.get(command, dict(sketch="exact", n_boot=200))
    got = {c: fn(options(**_toy_options(tiny_toy, tmp_path / c, checkpointing=c, **extra))).summary
           for c in ("off", "on")}
    on, off = got["on"]["meta"]["checkpointing"], got["off"]["meta"]["checkpointing"]
    assert on["on"] and on["blocks"] > 0 and on["reason"] == "--checkpointing on"
    assert not off["on"] and off["blocks"] == 0
    assert _statistics(got["on"])  # something to compare
    assert_close(_statistics(got["off"]), _statistics(got["on"]), rel=1e-12)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_align_statistics_equal_on_every_family(family, world, tmp_path):
    """`align` on each family's tiny checkpoint (float64, exact rows): every summary statistic the same with
    checkpointing on as off."""
    from gradprobe.run import AlignOptions, run_align

    model = create_tiny(family, tmp_path / family, sw.vocabulary())
    got = {c: run_align(AlignOptions(
        frames="4,8", model=str(model), image_data=str(world / "probe_images.jsonl"),
        video_data=str(world / "probe_videos.jsonl"), image_batches=2, batch_size=2, video_batches=2,
        video_batch_size=2, dtype="float64", device="cpu", sketch="exact", n_boot=100, checkpointing=c,
        out=str(tmp_path / c))).summary for c in ("off", "on")}
    loaded, _ = family_for(model).adapter_class().load(model)
    assert got["on"]["meta"]["checkpointing"]["blocks"] == len(checkpoint_blocks(loaded)) > 0
    assert_close(_statistics(got["off"]), _statistics(got["on"]), rel=1e-12)


def test_auto_turns_on_when_a_batch_would_not_fit(tiny_toy, tmp_path, monkeypatch):
    """``auto`` checkpoints when the memory bound without it exceeds the free memory, and the refusal names the
    bound with it; with ``off`` the same budget is refused, pointing at ``on``."""
    from gradprobe import run
    from gradprobe.errors import BudgetError
    from gradprobe.probe import measure

    def bounds():
        from transformers import AutoConfig

        from gradprobe.models.toy import ToyAdapter

        model, adapter = ToyAdapter.load(tiny_toy.model_dir)
        config = AutoConfig.from_pretrained(tiny_toy.model_dir)
        return [adapter.min_batch_bytes(config, 32, 32, 4, 2, torch.float64, quadratic_attention=True,
                                        checkpointing=c) for c in (False, True)]

    plain, kept = bounds()
    assert kept < plain
    monkeypatch.setattr(measure, "free_bytes", lambda device: (plain + kept) // 2)
    s = run.run_align(run.AlignOptions(**_toy_options(tiny_toy, tmp_path / "auto", n_boot=50))).summary
    c = s["meta"]["checkpointing"]
    assert c["requested"] == "auto" and c["on"] and c["blocks"] > 0 and c["reason"].startswith("auto: ")
    with pytest.raises(BudgetError, match=r"without activation checkpointing \(.* with --checkpointing on\)"):
        run.run_align(run.AlignOptions(**_toy_options(tiny_toy, tmp_path / "off", checkpointing="off")))
    monkeypatch.setattr(measure, "free_bytes", lambda device: kept // 2)
    with pytest.raises(BudgetError, match="with activation checkpointing; cpu has"):
        run.run_align(run.AlignOptions(**_toy_options(tiny_toy, tmp_path / "none")))


def test_cli_refuses_a_bad_value_in_one_line(tiny_toy, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["align", "--checkpointing", "maybe", "--model", str(tiny_toy.model_dir),
                                 "--image-data", str(tiny_toy.data("probe", "images")),
                                 "--video-data", str(tiny_toy.data("probe", "videos")), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "checkpointing: expected one of auto, on, off, got 'maybe'" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_monitor_probe_rows_equal_with_checkpointing(world, tmp_path):
    """The training callback's probe passes: the same row with checkpointing on as off (float64), the
    run's gradients untouched; ``auto`` follows the run's own gradient checkpointing."""
    from gradprobe.train.monitor import AlignmentMonitor

    model, (image, video) = _batches("qwen2_5_vl", world, tmp_path / "q")
    model.train()
    model.zero_grad(set_to_none=True)
    loss_fn(model, video).backward()  # the update the monitor reads
    update = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rows = {}
    for mode in ("off", "on"):
        mon = AlignmentMonitor(model, [image, image], loss_fn, every=1, checkpointing=mode)
        assert mon.checkpointing == (mode == "on")
        rows[mode] = mon.before_step(0)
        assert model.training and all(torch.equal(p.grad, update[n]) for n, p in model.named_parameters()
                                      if n in update)
    assert_close({k: v for k, v in rows["off"].items() if k != "seconds"},
                 {k: v for k, v in rows["on"].items() if k != "seconds"}, rel=1e-12)
    assert not AlignmentMonitor(model, [image], loss_fn).checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert AlignmentMonitor(model, [image], loss_fn).checkpointing
    with pytest.raises(InputError, match="checkpointing: expected"):
        AlignmentMonitor(model, [image], loss_fn, checkpointing="yes")
