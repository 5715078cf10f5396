"""Non-finite gradients are reported per batch and excluded with a warning, never averaged in."""

import math

import numpy as np
import pytest
import torch
from planted import Linear, Planted, linear_loss

import gradprobe


def _poison(batch):
    a, b = batch
    a = a.clone()
    a[0] = float("nan")
    return (a, b)


def test_nan_video_batch_is_excluded():
    p = Planted()
    rng = np.random.default_rng(0)
    images, videos = p.draw(4, 6, [4, 8], 0.1, 0.1, rng)
    clean = gradprobe.align(Linear(), images, {4: videos[4][:2] + videos[4][3:], 8: videos[8]}, linear_loss, n_boot=0)
    videos[4][2] = _poison(videos[4][2])
    with pytest.warns(UserWarning, match=r"frames=4 batch 2: non-finite"):
        rep = gradprobe.align(Linear(), images, videos, linear_loss, n_boot=100)
    b4 = rep.summary["budgets"][0]
    assert b4["n"] == 5 and b4["n_excluded"] == 1
    assert b4["mean"] == pytest.approx(clean.summary["budgets"][0]["mean"], rel=1e-12)
    assert math.isfinite(b4["stderr"])
    # the running pair sum saw the bad batch, so the unbiased video norm is withheld for that budget
    assert b4["norm_vid"] is None
    assert rep.summary["budgets"][1]["norm_vid"] is not None
    assert rep.summary["excluded"] == [{"frames": 4, "batch": 2, "reason": "non-finite loss or gradient"}]
    bad = rep.batches[(rep.batches.frames == 4) & (rep.batches.batch == 2)].iloc[0]
    assert not bad["finite"] and np.isnan(bad["value"])
    assert any("non-finite" in w for w in rep.summary["warnings"])


def test_inf_image_batch_drops_its_group():
    p = Planted()
    rng = np.random.default_rng(1)
    images, videos = p.draw(4, 5, [4], 0.1, 0.1, rng)
    a, b = images[1]
    a = a.clone()
    a[3] = float("inf")
    images[1] = (a, b)
    with pytest.warns(UserWarning, match="image batch 1: non-finite"):
        rep = gradprobe.align(Linear(), images, videos, linear_loss, image_groups=4, n_boot=0)
    assert rep.summary["settings"]["image_groups_used"] == 3
    keep = [images[i] for i in (0, 2, 3)]
    ref = gradprobe.align(Linear(), keep, videos, linear_loss, image_groups=3, n_boot=0)
    assert rep.summary["budgets"][0]["mean"] == pytest.approx(ref.summary["budgets"][0]["mean"], rel=1e-12)


def test_all_image_batches_nonfinite_is_an_error():
    p = Planted()
    images, videos = p.draw(2, 3, [4], 0.1, 0.1, np.random.default_rng(2))
    images = [_poison(b) for b in images]
    with pytest.warns(UserWarning), pytest.raises(gradprobe.DataError, match="every image batch"):
        gradprobe.align(Linear(), images, videos, linear_loss)


def test_nan_loss_is_excluded():
    model = Linear()
    p = Planted()
    images, videos = p.draw(4, 4, [2], 0.1, 0.1, np.random.default_rng(3))

    def loss(m, c):
        out = linear_loss(m, c)
        return out * torch.nan if c is videos[2][0] else out

    with pytest.warns(UserWarning, match="frames=2 batch 0"):
        rep = gradprobe.align(model, images, videos, loss, n_boot=0)
    assert rep.summary["budgets"][0]["n"] == 3


def test_interrupt_keeps_what_was_computed(tmp_path):
    p = Planted()
    images, videos = p.draw(4, 5, [2, 4, 8], 0.1, 0.1, np.random.default_rng(4))
    calls = {"n": 0}

    def loss(m, c):
        calls["n"] += 1
        if calls["n"] == 4 + 5 + 3:  # third batch of the second budget
            raise KeyboardInterrupt
        return linear_loss(m, c)

    with pytest.raises(gradprobe.AlignInterrupted) as exc:
        gradprobe.align(Linear(), images, videos, loss, n_boot=50, out_dir=tmp_path)
    rep = exc.value.report
    assert rep.summary["complete"] is False
    assert [b["frames"] for b in rep.summary["budgets"]] == [2, 4]
    assert rep.summary["budgets"][0]["n"] == 5 and rep.summary["budgets"][1]["n"] == 2
    saved = (tmp_path / "summary.json").read_text()
    assert '"complete": false' in saved
    import pandas as pd

    rows = pd.read_csv(tmp_path / "alignment.csv")
    assert len(rows) == 7
