"""Sketched against exact rows on the tiny toy (a real Qwen2.5-VL loaded with from_pretrained), overall and
per module, at several k: the differences stay within the stated error of the sketch on these batches."""

import json

import numpy as np
import pandas as pd
import pytest

from gradprobe.run import AlignOptions, run_align

pytestmark = pytest.mark.filterwarnings("ignore:only .* groups")


def _run(toy, sketch, out, seed=11):
    opts = AlignOptions(frames="2,4", model=str(toy.model_dir), image_data=str(toy.data("probe", "images")),
                        video_data=str(toy.data("probe", "videos")), image_batches=4, batch_size=4,
                        video_batches=4, video_batch_size=2, image_groups=4, n_boot=0, sketch=sketch,
                        sketch_seed=seed, out=str(out))
    rep = run_align(opts)
    return rep.summary, pd.read_csv(out / "modules.csv")


def _widths(out):
    """Buckets per module of a run's sketch map (saved with its sketches)."""
    spec = json.loads(str(np.load(out / "sketches.npz")["spec"]))
    return dict(zip(spec["modules"], spec["widths"], strict=True))


def _z(exact, exact_mods, sk, sk_mods):
    """(sketched − exact) / stated sd, overall per budget and per module."""
    overall = [(bs["mean"] - be["mean"]) / bs["sketch_sd_batches"]
               for be, bs in zip(exact["budgets"], sk["budgets"], strict=True)]
    merged = exact_mods.merge(sk_mods, on=["frames", "module"], suffixes=("_exact", "_sketch"))
    assert len(merged) == len(exact_mods)
    live = merged[merged["sketch_sd_batches"] > 0]
    return np.array(overall), ((live["mean_sketch"] - live["mean_exact"]) / live["sketch_sd_batches"]).to_numpy()


def test_sketched_alignment_within_its_stated_error(tiny_toy, tmp_path):
    exact, exact_mods = _run(tiny_toy, "exact", tmp_path / "exact")
    assert exact["settings"]["sketch"]["mode"] == "exact"
    sds, sk_runs = {}, {}
    for k in (2**10, 2**14, 2**18):
        sk, sk_mods = _run(tiny_toy, k, tmp_path / f"k{k}")
        sk_runs[k] = sk
        assert sk["settings"]["sketch"]["mode"] == "sketch" and sk["settings"]["sketch"]["k"] == k
        for be, bs in zip(exact["budgets"], sk["budgets"], strict=True):
            # squared norms and losses are exact in both modes
            assert bs["mean_batch_norm_vid"] == pytest.approx(be["mean_batch_norm_vid"], rel=1e-5)
            assert bs["mean_loss"] == pytest.approx(be["mean_loss"], rel=1e-6)
        z_overall, z_mod = _z(exact, exact_mods, sk, sk_mods)
        assert np.abs(z_overall).max() < 4 and np.abs(z_mod).max() < 5, (k, z_overall, z_mod)
        sds[k] = np.mean([b["sketch_sd_batches"] for b in sk["budgets"]])
        # module subtotals add up to the overall sketched mean
        for m, grp in sk_mods.groupby("frames"):
            total = next(b["mean"] for b in sk["budgets"] if b["frames"] == m)
            assert grp["mean"].sum() == pytest.approx(total, rel=1e-5, abs=1e-9)
    # the stated variance of a module is (plug-in numerator) / (its buckets): 16 times the buckets, a quarter of the
    # error, except that each module gets a floor of 32 buckets first (which alone takes lm_head's ratio from 0.25
    # to 0.27). So: the stated sd at 2^14 equals what 2^18's numerators give at 2^14's widths, up to the plug-in
    # noise of the sketched inner products and norms in the numerators (4-19% on this toy's modules at 2^14)
    w = {k: _widths(tmp_path / f"k{k}") for k in (2**14, 2**18)}
    mods = {k: pd.read_csv(tmp_path / f"k{k}" / "modules.csv") for k in (2**14, 2**18)}
    for m in (2, 4):
        big = mods[2**18][mods[2**18].frames == m]
        numer = big["sketch_sd_batches"] ** 2 * big["module"].map(w[2**18])
        predicted = np.sqrt((numer / big["module"].map(w[2**14])).sum())
        stated = next(b["sketch_sd_batches"] for b in sk_runs[2**14]["budgets"] if b["frames"] == m)
        assert stated == pytest.approx(predicted, rel=0.15), (m, stated, predicted)
    assert sds[2**18] / sds[2**14] < 0.3


def test_stated_sketch_error_is_calibrated(tiny_toy, tmp_path):
    """Over 10 maps at k = 2^12, the squared z-scores average about 1 (the stated variance is an upper bound of
    the exact one; 40 maps gave 0.93–0.99 overall and 1.15 over modules, whose few buckets make their plug-in
    norms noisy)."""
    exact, exact_mods = _run(tiny_toy, "exact", tmp_path / "exact")
    zo, zm = [], []
    for seed in range(10):
        sk, sk_mods = _run(tiny_toy, 2**12, tmp_path / f"s{seed}", seed=seed)
        a, b = _z(exact, exact_mods, sk, sk_mods)
        zo.append(a)
        zm.append(b)
    zo, zm = np.concatenate(zo), np.concatenate(zm)
    assert abs(zo.mean()) < 0.8 and abs(zm.mean()) < 0.3  # no bias
    assert 0.3 < np.mean(zo**2) < 1.8, np.mean(zo**2)
    assert 0.6 < np.mean(zm**2) < 1.5, np.mean(zm**2)
