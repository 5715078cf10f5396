"""Planted alignment curves with known answers: the estimators recover A(m), m* and the zero crossing."""

import math

import numpy as np
import pytest
from planted import Linear, Planted, linear_loss

import gradprobe
from gradprobe.estimators import stats

FRAMES = [2, 4, 8, 16, 32]  # truth: 0.7, 0.4, 0.1, -0.2, -0.5 -> m* = 16, crossing at 2**(3 + 1/3)


def test_noiseless_recovers_curve_exactly():
    p = Planted()
    rng = np.random.default_rng(0)
    images, videos = p.draw(4, 3, FRAMES, 0.0, 0.0, rng)
    rep = gradprobe.align(Linear(), images, videos, linear_loss, n_boot=100)
    for b in rep.summary["budgets"]:
        assert b["mean"] == pytest.approx(p.truth(b["frames"]), abs=1e-12)
        assert b["stderr"] == pytest.approx(0.0, abs=1e-12)
        assert b["frac_negative"] == (1.0 if p.truth(b["frames"]) < 0 else 0.0)
        # noiseless: unbiased norms equal the true norms
        assert b["norm_img"] == pytest.approx(np.linalg.norm(p.u), rel=1e-10)
        true_v = p.s + p.alpha(b["frames"]) * p.t
        assert b["norm_vid"] == pytest.approx(np.linalg.norm(true_v), rel=1e-10)
    ms = rep.summary["m_star"]
    assert ms["empirical"] == 16
    assert ms["zero_crossing"] == pytest.approx(2 ** (3 + 1 / 3), rel=1e-9)
    assert ms["bootstrap"]["16"] == 1.0


def test_noisy_recovers_curve_m_star_and_crossing():
    p = Planted()
    rng = np.random.default_rng(1)
    images, videos = p.draw(16, 48, FRAMES, 0.04, 0.1, rng)
    rep = gradprobe.align(Linear(), images, videos, linear_loss, n_boot=2000, seed=3)
    for b in rep.summary["budgets"]:
        truth = p.truth(b["frames"])
        lo, hi = b["ci95_t"]
        assert lo < truth < hi
        blo, bhi = b["ci95_boot"]
        assert blo < truth < bhi
        assert b["stderr"] < 0.05  # precise enough to separate budgets 0.3 apart
        assert abs(b["mean"] - truth) < 4 * b["stderr"]
    ms = rep.summary["m_star"]
    assert ms["empirical"] == 16
    assert ms["bootstrap"]["16"] > 0.9
    assert sum(ms["bootstrap"].values()) == pytest.approx(1.0)
    assert ms["zero_crossing"] == pytest.approx(2 ** (3 + 1 / 3), rel=0.1)
    # the unbiased norm estimates are near the truth; the plain norm of the noisy mean is inflated
    assert rep.summary["image"]["norm"] == pytest.approx(1.0, rel=0.1)
    assert rep.summary["image"]["norm_of_estimate"] > rep.summary["image"]["norm"]


def test_no_sign_change_is_a_result():
    p = Planted(rho_tmp=0.0)
    rng = np.random.default_rng(2)
    images, videos = p.draw(4, 6, [4, 8], 0.05, 0.05, rng)
    rep = gradprobe.align(Linear(), images, videos, linear_loss, n_boot=200)
    ms = rep.summary["m_star"]
    assert ms["empirical"] is None
    assert ms["zero_crossing"] is None
    assert ms["bootstrap"]["none"] == 1.0
    assert "no sign change" in ms["note"]


def test_negative_at_smallest_budget():
    p = Planted(rho_sh=0.1, rho_tmp=1.0)  # truth at m=2: 0.1 - 0.5 < 0
    rng = np.random.default_rng(3)
    images, videos = p.draw(4, 6, [2, 4], 0.0, 0.0, rng)
    rep = gradprobe.align(Linear(), images, videos, linear_loss, n_boot=50)
    ms = rep.summary["m_star"]
    assert ms["empirical"] == 2
    assert ms["zero_crossing"] is None
    assert "below the grid" in ms["note"]


def _coverage(reps, G, J, sigma_img, sigma_vid, seed):
    """Simulate D tables from independent noisy image groups and video batches."""
    rng = np.random.default_rng(seed)
    d = 40
    u = np.zeros(d)
    u[0] = 1.0
    v = np.zeros(d)
    v[0], v[1] = 0.3, 1.0
    truth = u @ v
    hit_two_way = hit_naive = hit_boot = 0
    for _ in range(reps):
        imgs = u + sigma_img * rng.standard_normal((G, d))
        vids = v + sigma_vid * rng.standard_normal((J, d))
        D = imgs @ vids.T
        ci = stats.two_way_mean(D)
        hit_two_way += ci.ci_t[0] <= truth <= ci.ci_t[1]
        # naive: treat ḡ_img as exact, spread over video batches only
        naive = stats.two_way_mean(D.mean(axis=0, keepdims=True))
        hit_naive += naive.ci_t[0] <= truth <= naive.ci_t[1]
        draws = stats.joint_bootstrap({0: (D, list(range(J)))}, 1000, rng)[0]
        lo, hi = stats.percentile_ci(draws, df=ci.df)
        hit_boot += lo <= truth <= hi
    return hit_two_way / reps, hit_naive / reps, hit_boot / reps


def test_intervals_cover_when_image_batches_are_noisy():
    two_way, naive, boot = _coverage(reps=1500, G=8, J=24, sigma_img=0.6, sigma_vid=0.15, seed=0)
    # binomial sd at 0.95 with 1500 reps is 0.0056
    assert 0.93 <= two_way <= 0.985
    assert naive < 0.85  # ignoring ḡ_img's uncertainty under-covers badly
    assert 0.93 <= boot <= 0.985  # expanded percentile bootstrap


def test_end_to_end_coverage_through_the_hooks():
    """The full pipeline (hooks, groups, intervals) covers the planted E[A(m)]."""
    p = Planted()
    rng = np.random.default_rng(11)
    hits, reps = 0, 120
    for _ in range(reps):
        images, videos = p.draw(8, 10, [8], 0.5, 0.3, rng)
        b = gradprobe.align(Linear(), images, videos, linear_loss, n_boot=0).summary["budgets"][0]
        hits += b["ci95_t"][0] <= p.truth(8) <= b["ci95_t"][1]
    # binomial sd at 0.95 with 120 reps is 0.02
    assert hits / reps >= 0.88


def test_zero_crossing_interpolates_in_log2():
    assert stats.zero_crossing([8, 32], [1.0, -1.0]) == pytest.approx(16.0)
    assert stats.zero_crossing([8, 16, 32], [1.0, 0.5, 0.0]) == pytest.approx(32.0)
    assert stats.empirical_m_star([8, 16, 32], [1.0, 0.5, 0.0]) == 32
    assert math.isclose(stats.zero_crossing([4, 16], [3.0, -1.0]), 2 ** (2 + 2 * 3 / 4))


def test_unbiased_sqnorm_removes_noise_inflation():
    rng = np.random.default_rng(5)
    mu = np.ones(10) * 0.1  # |mu|^2 = 0.1
    est, plain = [], []
    for _ in range(2000):
        X = mu + rng.standard_normal((5, 10))
        gram = X @ X.T
        est.append(stats.unbiased_sqnorm_from_gram(gram))
        plain.append(X.mean(axis=0) @ X.mean(axis=0))
    assert np.mean(est) == pytest.approx(0.1, abs=0.02)
    assert np.mean(plain) > 1.5  # inflated by Var/K = 10/5
