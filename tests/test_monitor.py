"""The training monitor: exact against brute force, leaves .grad and RNG untouched, guards act."""

import json

import numpy as np
import pytest
import torch
from conftest import TinyNet, make_batches, tiny_loss

from gradprobe.probe._reference import flat_grad
from gradprobe.train.monitor import AlignmentMonitor


def _update(model, batch):
    model.zero_grad(set_to_none=True)
    tiny_loss(model, batch).backward()


def _flat_dotgrad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double().numpy()


def test_alignment_matches_bruteforce_and_grad_is_untouched():
    model = TinyNet()
    images = make_batches(4, seed=1)
    mon = AlignmentMonitor(model, images, tiny_loss, every=1, image_groups=2)
    _update(model, make_batches(1, seed=9, shift=0.5)[0])
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rng = torch.get_rng_state()
    row = mon.before_step(0)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(before[n], p.grad)
    assert torch.equal(rng, torch.get_rng_state())
    names = [n for n, p in model.named_parameters() if p.grad is not None and n != "unused"]
    g_img = np.mean([flat_grad(model, names, tiny_loss, b) for b in images], axis=0)
    g_upd = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names]).numpy()
    assert row["alignment"] == pytest.approx(g_img @ g_upd, rel=1e-10)
    assert row["cos"] == pytest.approx(g_img @ g_upd / np.linalg.norm(g_img) / np.linalg.norm(g_upd), rel=1e-10)
    assert sum(row["modules"].values()) == pytest.approx(row["alignment"], rel=1e-10)


def test_project_removes_the_conflict():
    model = TinyNet()
    images = make_batches(4, seed=1)
    mon = AlignmentMonitor(model, images, tiny_loss, every=1, guard="project")
    names = [n for n, _ in model.named_parameters() if n != "unused"]
    g_img = np.mean([flat_grad(model, names, tiny_loss, b) for b in images], axis=0)
    # find an update that conflicts with the image probe
    for seed in range(50):
        _update(model, make_batches(1, seed=100 + seed, shift=1.5)[0])
        g = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names]).numpy()
        if g @ g_img < 0:
            break
    else:
        pytest.skip("no conflicting update found")
    row = mon.before_step(0)
    assert row["alignment"] < 0 and row["projected"]
    g_after = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names]).numpy()
    assert g_after @ g_img == pytest.approx(0.0, abs=1e-10 * np.linalg.norm(g) * np.linalg.norm(g_img))
    np.testing.assert_allclose(g_after, g - (g @ g_img) / (g_img @ g_img) * g_img, rtol=1e-10, atol=1e-14)
    assert mon.fired["project"] == 1


def test_warn_and_stop():
    model = TinyNet()
    mon = AlignmentMonitor(model, make_batches(2, seed=1), tiny_loss, every=1, guard="stop")
    # an update exactly opposite to the image probe conflicts for sure
    model.zero_grad(set_to_none=True)
    (-sum(tiny_loss(model, b) for b in make_batches(2, seed=1)) / 2).backward()
    with pytest.warns(UserWarning, match="conflicts with the image probe"):
        row = mon.before_step(0)
    assert row["cos"] == pytest.approx(-1.0, abs=1e-9)
    assert mon.should_stop and "step 0" in mon.stop_reason
    assert mon.fired["stop"] == 1


def test_trajectory_file_and_resume_truncation(tmp_path):
    model = TinyNet()
    path = tmp_path / "traj.jsonl"
    mon = AlignmentMonitor(model, make_batches(2, seed=1), tiny_loss, every=2, trajectory=path)
    for step in range(6):
        _update(model, make_batches(1, seed=step)[0])
        mon.before_step(step)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert mon.truncate_trajectory(2) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 2]


def test_non_finite_update_stops():
    model = TinyNet()
    mon = AlignmentMonitor(model, make_batches(2, seed=1), tiny_loss, every=1, guard="stop")
    _update(model, make_batches(1, seed=3)[0])
    model.head.weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite update"):
        row = mon.before_step(0)
    assert row["finite"] is False and mon.should_stop


def test_non_finite_probe_batch_drops_its_group():
    """A NaN image-probe batch removes its group; the result equals a probe set without that group."""
    model = TinyNet()
    images = make_batches(4, seed=1)
    x, y = images[1]
    x = x.clone()
    x[0, 0] = float("nan")
    poisoned = [images[0], (x, y), images[2], images[3]]
    _update(model, make_batches(1, seed=9, shift=0.5)[0])
    row = AlignmentMonitor(model, poisoned, tiny_loss, every=1, image_groups=4).before_step(0)
    assert row["image_groups_used"] == 3
    clean = [images[0], images[2], images[3]]
    ref = AlignmentMonitor(model, clean, tiny_loss, every=1, image_groups=3).before_step(0)
    assert row["alignment"] == pytest.approx(ref["alignment"], rel=1e-12)
    assert row["cos"] == pytest.approx(ref["cos"], rel=1e-12)


def test_sketched_groups_keep_the_alignment_exact():
    """With sketched group rows the alignment, cosine, modules and projection come from one exact mean row;
    only the interval's spread over image groups is sketched, and it equals the spread of the sketched group
    means' dots with the sketched update (checked here against the sketch map applied to flat gradients)."""
    from gradprobe.probe.measure import sketch_spec
    from gradprobe.probe.select import select_parameters
    from gradprobe.probe.sketch import _add_torch, param_key

    images = make_batches(4, seed=1)
    update = make_batches(1, seed=9, shift=0.5)[0]
    rows = {}
    for mode in ("exact", 256):
        model = TinyNet()
        mon = AlignmentMonitor(model, images, tiny_loss, every=1, image_groups=2, sketch=mode, sketch_seed=3)
        _update(model, update)
        rows[mode] = mon.before_step(0)
    for key in ("alignment", "cos", "update_norm", "reference_norm"):
        assert rows[256][key] == pytest.approx(rows["exact"][key], rel=1e-10), key
    assert rows[256]["modules"] == pytest.approx(rows["exact"]["modules"], rel=1e-10)
    # the sketched spread, by brute force: S applied to the flat group means and the flat update
    model = TinyNet()
    sel = select_parameters(model)
    spec = sketch_spec(sel, 256, 3)
    pos = {m: i for i, m in enumerate(spec.modules)}

    def sk(vec):
        out, at = torch.zeros(256, dtype=torch.float64), 0
        for name, p, m in zip(sel.names, sel.params, sel.modules, strict=True):
            _add_torch(out, torch.tensor(vec[at:at + p.numel()]), param_key(3, name), 0, spec.starts[pos[m]],
                       spec.widths[pos[m]])
            at += p.numel()
        return out.numpy()

    grads = [flat_grad(model, sel.names, tiny_loss, b) for b in images]
    groups = [sk((grads[0] + grads[1]) / 2), sk((grads[2] + grads[3]) / 2)]
    upd = sk(flat_grad(model, sel.names, tiny_loss, update))
    col = np.array([g @ upd for g in groups])
    assert rows[256]["alignment_stderr"] == pytest.approx(np.std(col, ddof=1) / np.sqrt(2), rel=1e-9)


def test_sketch_auto_keeps_exact_rows_when_they_fit():
    mon = AlignmentMonitor(TinyNet(), make_batches(4, seed=1), tiny_loss, every=1, sketch="auto")
    assert mon.sketches is None and "auto" in mon.sketch_reason
