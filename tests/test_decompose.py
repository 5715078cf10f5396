"""The α(m) decomposition: planted problems with known g_sh, g_tmp, α(m) and noise, a brute-force twin,
scale invariance, degenerate cases, interruption and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_batches, tiny_loss
from planted import Linear, Planted, linear_loss

import gradprobe
from gradprobe.errors import DataError, InputError
from gradprobe.estimators import decompose as dec
from gradprobe.probe._reference import reference_decomposition

FRAMES = [2, 4, 8, 16, 32]  # α = log2(m)/2; E A(m) = 1 − 0.6 α: 0.7, 0.4, 0.1, −0.2, −0.5 → m* = 16

pytestmark = pytest.mark.filterwarnings("ignore:only .* groups")


def _verdicts(summary):
    return {c["check"]: c["verdict"] for c in summary["checks"]}


def _no_nan(obj):
    """summary.json is strict JSON: no NaN or infinity anywhere."""
    json.dumps(obj, allow_nan=False)


def test_noiseless_planted_recovers_g_sh_g_tmp_alpha_and_m_star_exactly():
    p = Planted()
    rng = np.random.default_rng(0)
    images, videos, shared = p.draw_decomposition(8, 8, FRAMES, 0.0, 0.0, lambda m: 0.0, rng)
    rep = gradprobe.decompose(Linear(), images, videos, linear_loss, shared=shared, n_boot=200)
    s = rep.summary
    nt = np.linalg.norm(p.t)
    # only the direction of g_tmp is identified: α(m) = α_true(m) ‖t‖ and ρ_tmp = ρ_tmp_true / ‖t‖
    assert s["rho_sh"]["value"] == pytest.approx(p.rho_sh, abs=1e-12)
    assert s["rho_tmp"]["value"] == pytest.approx(p.rho_tmp / nt, rel=1e-10)
    for b in s["budgets"]:
        m = b["frames"]
        assert b["alpha"] == pytest.approx(p.alpha(m) * nt, rel=1e-10)
        assert b["contrib_tmp"] == pytest.approx(-p.alpha(m) * p.rho_tmp, rel=1e-10)
        assert b["A"] == pytest.approx(p.truth(m), abs=1e-12)
        assert b["A_pred"] == pytest.approx(p.truth(m), abs=1e-12)
        assert b["residual"] == pytest.approx(0.0, abs=1e-12)
        assert b["var_eps"] == pytest.approx(0.0, abs=1e-12)
        # d_m lies along ĝ_tmp: all of ‖d_m‖² is explained, except where d_m = 0 (no share to speak of)
        assert (b["explained"] is None) if p.alpha(m) == 0 else b["explained"] == pytest.approx(1.0, rel=1e-9)
    # ĝ_tmp = Σ c_m d_m with d_m = α_true(m) t is the unit vector along t
    c = s["tmp_direction"]["coefficients"]
    g_tmp = sum(c[str(m)] * p.alpha(m) * p.t for m in FRAMES)
    assert np.allclose(g_tmp, p.t / nt, atol=1e-10)
    assert s["tmp_direction"]["explained"] == pytest.approx(1.0, rel=1e-10)
    assert s["m_star"]["model"]["value"] == 16
    assert s["m_star"]["empirical"]["value"] == 16
    assert s["m_star"]["model"]["bootstrap"]["16"] == 1.0
    assert s["m_star"]["model"]["zero_crossing"] == pytest.approx(2 ** (3 + 1 / 3), rel=1e-9)
    v = _verdicts(s)
    assert v["assumption_3"] == v["assumption_4"] == v["assumption_5_residual"] == v["alpha_monotone"] == "held"
    assert v["assumption_5_variance"] == "held"  # Var ε = 0 at every m: constant is non-decreasing
    _no_nan(s)


def test_smallest_budget_as_shared_shifts_alpha_and_rho_sh_consistently():
    """Default g_sh = E g^(2): α(2) = 0 exactly, α(m) = (α_true(m) − α_true(2)) ‖t‖, ρ_sh = E A(2)."""
    p = Planted()
    rng = np.random.default_rng(0)
    images, videos, _ = p.draw_decomposition(4, 6, FRAMES, 0.0, 0.0, lambda m: 0.0, rng)
    s = gradprobe.decompose(Linear(), images, videos, linear_loss, n_boot=100).summary
    nt = np.linalg.norm(p.t)
    assert s["budgets"][0]["alpha"] == 0.0
    assert s["rho_sh"]["value"] == pytest.approx(p.truth(2), abs=1e-12)
    for b in s["budgets"]:
        assert b["alpha"] == pytest.approx((p.alpha(b["frames"]) - p.alpha(2)) * nt, abs=1e-10)
        assert b["A_pred"] == pytest.approx(p.truth(b["frames"]), abs=1e-12)
    assert s["m_star"]["model"]["value"] == 16
    assert s["shared"]["mode"] == "smallest_in_grid"


def test_per_budget_shared_variant_is_paired_per_m():
    """A shared variant per budget (like the static sampler) with its own m-dependent part: d_m = α(m) t."""
    p = Planted()
    rng = np.random.default_rng(4)
    d = len(p.u)
    e = np.linalg.qr(np.column_stack([p.u, p.s, p.t, rng.standard_normal(d)]))[0][:, 3]  # ⟂ u, s, t
    images = [p._split(p.u) for _ in range(4)]
    shared = {m: [p._split(p.s + 0.3 * math.log2(m) * e)] * 4 for m in FRAMES}
    videos = {m: [p._split(p.s + 0.3 * math.log2(m) * e + p.alpha(m) * p.t)] * 4 for m in FRAMES}
    s = gradprobe.decompose(Linear(), images, videos, linear_loss, shared=shared, n_boot=100).summary
    nt = np.linalg.norm(p.t)
    for b in s["budgets"]:
        assert b["alpha"] == pytest.approx(p.alpha(b["frames"]) * nt, rel=1e-10)
        assert b["rho_sh"] == pytest.approx(p.rho_sh, abs=1e-12)
        assert b["shared"] == f"shared m={b['frames']}"
    assert s["rho_sh"]["varies_with_m"] is True
    assert s["m_star"]["model"]["value"] == 16


def _noisy(seed, J=48, K=16, loss_scale=1.0, **kw):
    p = Planted(**kw)
    rng = np.random.default_rng(seed)
    images, videos, shared = p.draw_decomposition(K, J, FRAMES, 0.04, 0.1, lambda m: 0.02 * math.log2(m), rng)

    def loss(model, c):
        return loss_scale * linear_loss(model, c)

    return p, gradprobe.decompose(Linear(), images, videos, loss, shared=shared, n_boot=2000, seed=seed)


def _near(estimate, ci, truth):
    """Within twice the interval's half-width (about 4 standard errors) of the truth: one run checks
    recovery; coverage is what test_intervals_cover_in_repeated_planted_runs checks."""
    return abs(estimate - truth) <= (ci[1] - ci[0])


def test_per_budget_share_is_none_where_noise_dominates():
    """A budget's share of ‖d_m‖² along ĝ_tmp is α² / ‖d_m‖² (noise-corrected); where that estimate is not
    positive or is below α², noise dominates it and there is no share (None), rather than a "share" of 752."""
    from gradprobe.estimators.decompose import _share

    assert _share(0.25, 1.0) == 0.25 and _share(1.0, 1.0) == 1.0
    assert _share(0.0015, 2.03e-6) is None and _share(0.1, -0.003) is None and _share(0.0, 0.0) is None


def test_noisy_planted_estimates_recover_the_truth():
    p, rep = _noisy(1)
    s = rep.summary
    nt = np.linalg.norm(p.t)
    d = len(p.u)
    assert _near(s["rho_sh"]["value"], s["rho_sh"]["ci95"], p.rho_sh)
    assert s["rho_sh"]["ci95"][1] - s["rho_sh"]["ci95"][0] < 0.2
    assert _near(s["rho_tmp"]["value"], s["rho_tmp"]["ci95"], p.rho_tmp / nt)
    for b in s["budgets"]:
        m = b["frames"]
        assert _near(b["alpha"], b["alpha_ci95"], p.alpha(m) * nt)
        assert _near(b["contrib_tmp"], b["contrib_tmp_ci95"], -p.alpha(m) * p.rho_tmp)
        assert _near(b["residual"], b["residual_ci95"], 0.0)
        assert _near(b["var_eps"], b["var_eps_ci95"], d * (0.1**2 + (0.02 * math.log2(m)) ** 2))
        assert _near(b["A"], b["A_ci95_t"], p.truth(m))
    assert s["m_star"]["model"]["value"] == 16
    assert s["m_star"]["model"]["bootstrap"]["16"] > 0.9
    assert s["m_star"]["empirical"]["value"] == 16
    assert all(v == "held" for v in _verdicts(s).values())  # Var ε grows with m here
    # the measured A(m) is align's estimate on the same batches
    assert rep.budgets["A"].tolist() == pytest.approx([b["A"] for b in s["budgets"]])


def test_intervals_cover_in_repeated_planted_runs():
    """Coverage of the bootstrap intervals over independent planted data sets (numpy twin of the engine)."""
    p = Planted()
    nt = np.linalg.norm(p.t)
    rng = np.random.default_rng(7)
    d, G, H, per, reps = len(p.u), 8, 8, 3, 150
    frames = [2, 8, 32]
    hits = {"rho_sh": 0, "rho_tmp": 0, "contrib": 0, "alpha": 0}
    for r in range(reps):
        img = p.u + 0.3 * rng.standard_normal((G, d))  # image-group means
        z = 0.4 * rng.standard_normal((H * per, d))
        X = [p.s + p.alpha(m) * p.t + z + 0.2 * rng.standard_normal((H * per, d)) for m in frames]
        X.append(p.s + z)  # the shared variant
        Y = np.stack([x.reshape(H, per, d).mean(axis=1) for x in X], axis=1)  # (H, V, d)
        raw = dec._Raw(T=np.stack([img @ x.T for x in X]), S=np.stack([(x * x).sum(1) for x in X]),
                       group=np.repeat(np.arange(H), per), gram=np.einsum("hvd,kwd->hvkw", Y, Y),
                       img_gram=img @ img.T)
        sh = [3, 3, 3]
        a, C, E2, _ = dec._moments(raw, np.ones((1, G)), np.ones((1, H)))
        pt = {k: v[0] for k, v in dec._decompose(a, C, E2, sh, 3).items()}
        boot = dec._run_boot(raw, sh, 3, 1000, r, (pt["D"], pt["u"]))
        checks = {"rho_sh": (boot.ci("rho_sh", pt["rho_sh"][0], 0), p.rho_sh),
                  "rho_tmp": (boot.ci("rho_tmp", pt["rho_tmp"]), p.rho_tmp / nt),
                  "contrib": (boot.ci("contrib_tmp", pt["contrib_tmp"][2], 2), -p.alpha(32) * p.rho_tmp),
                  "alpha": (boot.ci("alpha", pt["alpha"][2], 2), p.alpha(32) * nt)}
        for k, (ci, truth) in checks.items():
            hits[k] += ci[0] <= truth <= ci[1]
    cover = {k: v / reps for k, v in hits.items()}
    # binomial sd at 0.95 with 150 reps is 0.018. With 400 reps: 0.94–0.965 at 8 video groups and 0.95 at
    # 12, but 0.91 (α) at 6 and 0.85 at 4: hence the warning below 8 groups. Resampled copies of a group
    # pair through a bias-corrected diagonal (_cross_mean); leaving them out gave 0.87 here.
    assert all(c >= 0.88 for c in cover.values()), cover


def test_checks_are_invariant_to_rescaling_the_loss():
    _, small = _noisy(2, J=12, K=8)
    _, big = _noisy(2, J=12, K=8, loss_scale=1000.0)
    a, b = small.summary, big.summary
    assert _verdicts(a) == _verdicts(b)
    for key in ("model", "empirical"):
        assert a["m_star"][key]["value"] == b["m_star"][key]["value"]
        assert a["m_star"][key]["bootstrap"] == b["m_star"][key]["bootstrap"]
    assert b["rho_sh"]["value"] == pytest.approx(1e6 * a["rho_sh"]["value"], rel=1e-9)
    assert b["rho_tmp"]["value"] == pytest.approx(1e3 * a["rho_tmp"]["value"], rel=1e-9)
    for x, y in zip(a["budgets"], b["budgets"], strict=True):
        assert y["alpha"] == pytest.approx(1e3 * x["alpha"], rel=1e-9)
        assert y["contrib_tmp"] == pytest.approx(1e6 * x["contrib_tmp"], rel=1e-9)
        assert y["var_eps"] == pytest.approx(1e6 * x["var_eps"], rel=1e-9)
    for x, y in zip(a["checks"], b["checks"], strict=True):
        if x["ci95"]:
            assert y["ci95"][0] / x["ci95"][0] == pytest.approx(y["value"] / x["value"], rel=1e-6)


def test_constant_alpha_gives_zero_alpha_and_no_temporal_direction():
    """Every budget's gradient equals the shared one: α ≡ 0, ρ_tmp undefined, a clear answer, no NaN."""
    p = Planted()
    rng = np.random.default_rng(3)
    images, videos, _ = p.draw_decomposition(8, 8, FRAMES, 0.05, 0.1, lambda m: 0.0, rng, alpha=lambda m: 0.0)
    s = gradprobe.decompose(Linear(), images, videos, linear_loss, n_boot=300).summary
    assert all(b["alpha"] == 0.0 and b["contrib_tmp"] == 0.0 for b in s["budgets"])
    assert s["tmp_direction"]["resolved"] is False
    assert s["rho_tmp"]["value"] is None
    v = _verdicts(s)
    assert v["assumption_4"] == "inconclusive"
    assert "no temporal direction" in next(c for c in s["checks"] if c["check"] == "assumption_4")["reason"]
    assert v["alpha_monotone"] == "held"
    assert v["assumption_3"] == "held"
    assert s["m_star"]["model"]["value"] is None
    assert "no threshold" in s["m_star"]["model"]["note"]
    _no_nan(s)


def test_constant_nonzero_alpha_is_non_decreasing():
    p = Planted()
    rng = np.random.default_rng(5)
    images, videos, shared = p.draw_decomposition(8, 16, FRAMES, 0.02, 0.05, lambda m: 0.0, rng,
                                                  alpha=lambda m: 1.0)
    s = gradprobe.decompose(Linear(), images, videos, linear_loss, shared=shared, n_boot=500).summary
    alphas = [b["alpha"] for b in s["budgets"]]
    assert max(alphas) - min(alphas) < 0.05 * max(alphas)
    assert _verdicts(s)["alpha_monotone"] == "held"
    assert s["m_star"]["model"]["value"] is None  # 1 − 0.6 > 0 at every m


def test_zero_rho_tmp_is_inconclusive_not_nan():
    p = Planted(rho_tmp=0.0)
    rng = np.random.default_rng(6)
    images, videos, shared = p.draw_decomposition(8, 16, FRAMES, 0.05, 0.1, lambda m: 0.0, rng)
    s = gradprobe.decompose(Linear(), images, videos, linear_loss, shared=shared, n_boot=500).summary
    lo, hi = s["rho_tmp"]["ci95"]
    assert lo < 0 < hi
    assert _verdicts(s)["assumption_4"] == "inconclusive"
    assert s["m_star"]["model"]["value"] is None
    assert all(abs(b["contrib_tmp"]) < 0.1 for b in s["budgets"])
    _no_nan(s)


def test_single_budget():
    p = Planted()
    rng = np.random.default_rng(8)
    images, videos, shared = p.draw_decomposition(4, 6, [16], 0.0, 0.0, lambda m: 0.0, rng)
    # with the smallest budget as the shared variant there is nothing to decompose: α = 0
    s = gradprobe.decompose(Linear(), images, videos, linear_loss, n_boot=100).summary
    assert s["budgets"][0]["alpha"] == 0.0 and s["rho_tmp"]["value"] is None
    assert "one budget" in next(c for c in s["checks"] if c["check"] == "alpha_monotone")["reason"]
    assert s["m_star"]["model"]["value"] == 16  # ρ_sh = E A(16) = −0.2 ≤ 0
    _no_nan(s)
    # with a separate shared variant α(16) = ‖d‖ and the prediction is exact
    s = gradprobe.decompose(Linear(), images, videos, linear_loss, shared=shared, n_boot=100).summary
    assert s["budgets"][0]["alpha"] == pytest.approx(p.alpha(16) * np.linalg.norm(p.t), rel=1e-10)
    assert s["budgets"][0]["A_pred"] == pytest.approx(p.truth(16), abs=1e-12)
    v = _verdicts(s)
    assert v["alpha_monotone"] == v["assumption_5_variance"] == "inconclusive"
    assert s["m_star"]["model"]["value"] == 16
    _no_nan(s)


def test_matches_bruteforce_on_a_nonlinear_model(tiny):
    """Streamed Gram route vs flattened gradients (float64, TinyNet), per-budget shared variant."""
    images = make_batches(6, 1)
    frames = [2, 4, 8]
    videos = {m: make_batches(6, 100, shift=0.1 * m) for m in frames}  # same seed: paired "clips"
    shared = {m: make_batches(6, 100, shift=0.05) for m in frames}
    rep = gradprobe.decompose(tiny, images, videos, tiny_loss, shared=shared, image_groups=3, video_groups=3,
                              n_boot=50)
    names = [n for n, p in tiny.named_parameters()]
    ref = reference_decomposition(tiny, names, tiny_loss, images, [videos[m] for m in frames] +
                                  [shared[m] for m in frames], [3, 4, 5], 3, 3)
    b = rep.summary["budgets"]
    assert [x["A"] for x in b] == pytest.approx(ref["A"], rel=1e-10)
    assert [x["rho_sh"] for x in b] == pytest.approx(ref["rho_sh"], rel=1e-10)
    assert [x["alpha"] for x in b] == pytest.approx(ref["alpha"], rel=1e-9)
    assert rep.summary["rho_tmp"]["value"] == pytest.approx(ref["rho_tmp"], rel=1e-9)
    assert [x["residual"] for x in b] == pytest.approx(ref["residual"], rel=1e-8, abs=1e-12)
    assert [x["var_eps"] for x in b] == pytest.approx(ref["var_eps"], rel=1e-10)
    assert rep.summary["tmp_direction"]["eigenvalue"] == pytest.approx(ref["eigenvalue"], rel=1e-10)
    assert rep.summary["settings"]["reference_rows"] == 3 + 3 * 6


def test_model_is_restored(tiny):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    tiny.train()
    videos = {m: make_batches(4, 9, shift=0.1 * m) for m in (2, 4)}
    gradprobe.decompose(tiny, make_batches(4, 1), videos, tiny_loss, n_boot=10)
    assert tiny.training
    assert all(torch.equal(before[n], p) and p.grad is None and p.requires_grad for n, p in tiny.named_parameters())


def test_interrupted_run_keeps_finished_groups(tmp_path):
    p = Planted()
    rng = np.random.default_rng(9)
    images, videos, shared = p.draw_decomposition(4, 8, [2, 8], 0.01, 0.05, lambda m: 0.0, rng)
    calls = {"n": 0}

    def loss(model, c):
        calls["n"] += 1
        if calls["n"] > 4 + 3 * 6:  # images, then 6 of the 8 video batches × 3 variants
            raise KeyboardInterrupt
        return linear_loss(model, c)

    with pytest.raises(dec.DecomposeInterrupted) as e:
        gradprobe.decompose(Linear(), images, videos, loss, shared=shared, video_groups=4, n_boot=50,
                            out_dir=tmp_path)
    s = e.value.report.summary
    assert s["complete"] is False
    assert s["video"]["groups"] == 3 and s["video"]["batches_used"] == 6
    assert len(s["budgets"]) == 2
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["video"]["groups"] == 3
    assert len((tmp_path / dec.BATCHES).read_text().splitlines()) == 1 + 18


def test_interrupted_before_two_groups_reports_nothing_to_decompose(tmp_path):
    p = Planted()
    images, videos, shared = p.draw_decomposition(2, 4, [2], 0.0, 0.0, lambda m: 0.0, np.random.default_rng(0))

    def loss(model, c):
        raise KeyboardInterrupt

    with pytest.raises(dec.DecomposeInterrupted) as e:
        gradprobe.decompose(Linear(), images, videos, loss, shared=shared, out_dir=tmp_path)
    assert "nothing to decompose" in e.value.report.summary["note"]
    assert (tmp_path / "summary.json").is_file()


def test_non_finite_video_batch_drops_its_group():
    p = Planted()
    images, videos, shared = p.draw_decomposition(4, 8, [2, 8], 0.0, 0.0, lambda m: 0.0, np.random.default_rng(0))
    videos[8][5] = (videos[8][5][0] * float("nan"), videos[8][5][1])
    with pytest.warns(UserWarning, match="non-finite"):
        s = gradprobe.decompose(Linear(), images, videos, linear_loss, shared=shared, video_groups=4,
                                n_boot=50).summary
    assert s["video"]["groups"] == 3
    assert s["budgets"][1]["A"] == pytest.approx(p.truth(8), abs=1e-12)
    _no_nan(s)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(video_groups=3), InputError, "cannot be split"),
        (dict(video_groups=1), InputError, "video_groups"),
        (dict(tolerance=0.0), InputError, "tolerance"),
        (dict(tolerance=float("nan")), InputError, "tolerance"),
        (dict(redundant_from=64), InputError, "no budget"),
        (dict(n_boot=-1), InputError, "n_boot"),
        (dict(shared={2: [None] * 4}), InputError, "exactly the budgets"),
        (dict(shared=[None] * 3), DataError, "paired"),
    ],
)
def test_bad_options(kwargs, err, match):
    p = Planted()
    images, videos, _ = p.draw_decomposition(2, 4, [2, 8], 0.0, 0.0, lambda m: 0.0, np.random.default_rng(0))
    with pytest.raises(err, match=match):
        gradprobe.decompose(Linear(), images, videos, linear_loss, **kwargs)


def test_bad_data():
    p = Planted()
    images, videos, _ = p.draw_decomposition(2, 4, [2, 8], 0.0, 0.0, lambda m: 0.0, np.random.default_rng(0))
    with pytest.raises(DataError, match="at least 2"):
        gradprobe.decompose(Linear(), images, {m: v[:1] for m, v in videos.items()}, linear_loss)
    with pytest.raises(DataError, match="paired"):
        gradprobe.decompose(Linear(), images, {2: videos[2], 8: videos[8][:2]}, linear_loss)
    with pytest.raises(DataError, match="no image batches"):
        gradprobe.decompose(Linear(), [], videos, linear_loss)
    with pytest.raises(InputError, match="no divisor"):
        gradprobe.decompose(Linear(), images, {m: [v[0]] * 13 for m, v in videos.items()}, linear_loss)
    with pytest.raises(InputError, match="map each frame budget"):
        gradprobe.decompose(Linear(), images, [videos[2]], linear_loss)


def test_per_budget_rho_sh_that_turns_negative_violates_assumption_3_at_that_budget():
    p = Planted()
    images = [p._split(p.u) for _ in range(4)]
    shared = {m: [p._split(p.s - 0.4 * math.log2(m) * p.u)] * 4 for m in FRAMES}  # ρ_sh(m) = 1 − 0.4 log2 m
    videos = {m: [p._split(p.s - 0.4 * math.log2(m) * p.u + p.alpha(m) * p.t)] * 4 for m in FRAMES}
    s = gradprobe.decompose(Linear(), images, videos, linear_loss, shared=shared, n_boot=100).summary
    c = next(c for c in s["checks"] if c["check"] == "assumption_3")
    assert c["verdict"] == "violated"
    assert c["statistic"] == "ρ_sh at m=32" and c["value"] == pytest.approx(1 - 0.4 * 5)
    assert [b["rho_sh"] for b in s["budgets"]] == pytest.approx([1 - 0.4 * math.log2(m) for m in FRAMES])


def _countsketch_matrix(seed, k, sizes=(30, 20)):
    """The sketch map of the planted Linear model (modules ``shared`` and ``temporal``) as a dense (k, d) matrix."""
    from gradprobe.probe.sketch import SketchSpec, param_key, sketch_buckets

    spec = SketchSpec.build([("shared", sizes[0]), ("temporal", sizes[1])], k=k, seed=seed)
    S = np.zeros((k, sum(sizes)))
    col = 0
    for name, n, start, width in zip(("shared", "temporal"), sizes, spec.starts, spec.widths, strict=True):
        b, neg = sketch_buckets(param_key(seed, name), 0, n, width)
        S[start + b.numpy(), col + np.arange(n)] = np.where(neg.numpy(), -1.0, 1.0)
        col += n
    return S, spec


def test_sketched_intervals_cover_in_repeated_planted_runs():
    """The coverage test above with every vector sketched (k = 24 buckets for 50 coordinates, a new map per
    run): the joint bootstrap plus the sketch-error draws cover; without the sketch error they do not."""
    p = Planted()
    nt = np.linalg.norm(p.t)
    rng = np.random.default_rng(8)
    d, G, H, per, reps = len(p.u), 8, 8, 3, 200
    frames = [2, 8, 32]
    keys = ("rho_sh", "rho_tmp", "contrib", "alpha")
    hits = dict.fromkeys(keys, 0)
    hits_plain = dict.fromkeys(keys, 0)
    for r in range(reps):
        S, spec = _countsketch_matrix(r, 24)
        img = p.u + 0.3 * rng.standard_normal((G, d))
        z = 0.4 * rng.standard_normal((H * per, d))
        X = [p.s + p.alpha(m) * p.t + z + 0.2 * rng.standard_normal((H * per, d)) for m in frames]
        X.append(p.s + z)
        sk = [slice(s, s + w) for s, w in zip(spec.starts, spec.widths, strict=True)]
        img_s, X_s = img @ S.T, [x @ S.T for x in X]

        def raw_of(cols, img_s=img_s, X_s=X_s, X=X):
            Y = np.stack([x[:, cols].reshape(H, per, -1).mean(axis=1) for x in X_s], axis=1)
            return dec._Raw(T=np.stack([img_s[:, cols] @ x[:, cols].T for x in X_s]),
                            S=np.stack([(x * x).sum(1) for x in X]), group=np.repeat(np.arange(H), per),
                            gram=np.einsum("hvd,kwd->hvkw", Y, Y), img_gram=img_s[:, cols] @ img_s[:, cols].T)

        raw = raw_of(slice(None))
        raw.modules = [raw_of(c) for c in sk]
        raw.widths = np.asarray(spec.widths, dtype=float)
        sh = [3, 3, 3]
        a, C, E2, _ = dec._moments(raw, np.ones((1, G)), np.ones((1, H)))
        pt = {k: v[0] for k, v in dec._decompose(a, C, E2, sh, 3).items()}
        boot = dec._run_boot(raw, sh, 3, 1000, r, (pt["D"], pt["u"]))
        checks = {"rho_sh": ("rho_sh", pt["rho_sh"][0], 0, p.rho_sh),
                  "rho_tmp": ("rho_tmp", pt["rho_tmp"], (), p.rho_tmp / nt),
                  "contrib": ("contrib_tmp", pt["contrib_tmp"][2], 2, -p.alpha(32) * p.rho_tmp),
                  "alpha": ("alpha", pt["alpha"][2], 2, p.alpha(32) * nt)}
        for name, (key, point, index, truth) in checks.items():
            pick = (lambda dd, key=key, index=index: dd[key][:, index]) if index != () else (
                lambda dd, key=key: dd[key])
            ci, ci_plain = boot.ci_of(point, pick), boot.ci_of(point, pick, plain=True)
            hits[name] += ci[0] <= truth <= ci[1]
            hits_plain[name] += ci_plain[0] <= truth <= ci_plain[1]
    cover = {k: v / reps for k, v in hits.items()}
    cover_plain = {k: v / reps for k, v in hits_plain.items()}
    # binomial sd at 0.95 with 200 reps is 0.015
    assert all(c >= 0.91 for c in cover.values()), cover
    assert min(cover_plain.values()) < 0.85, cover_plain


@pytest.mark.parametrize("k", [64, 1024])
def test_sketched_engine_recovers_the_planted_decomposition(k):
    """Through the hooks with a sketch of 50 coordinates: α(m), ρ and the A(m) within their intervals, which
    carry the sketch error; m* exactly at k=1024, and among the bootstrap's likely values at k=64."""
    p = Planted()
    rng = np.random.default_rng(1)
    images, videos, shared = p.draw_decomposition(16, 48, FRAMES, 0.04, 0.1, lambda m: 0.02 * math.log2(m), rng)
    rep = gradprobe.decompose(Linear(), images, videos, linear_loss, shared=shared, n_boot=2000, seed=1, sketch=k,
                              sketch_seed=3)
    s = rep.summary
    nt = np.linalg.norm(p.t)
    assert s["settings"]["sketch"]["mode"] == "sketch" and s["settings"]["sketch"]["k"] == k
    assert s["image"]["groups"] == 16  # every image batch its own row
    assert _near(s["rho_sh"]["value"], s["rho_sh"]["ci95"], p.rho_sh)
    assert _near(s["rho_tmp"]["value"], s["rho_tmp"]["ci95"], p.rho_tmp / nt)
    for b in s["budgets"]:
        m = b["frames"]
        assert _near(b["alpha"], b["alpha_ci95"], p.alpha(m) * nt)
        assert _near(b["contrib_tmp"], b["contrib_tmp_ci95"], -p.alpha(m) * p.rho_tmp)
        assert _near(b["A"], b["A_ci95_t"], p.truth(m))
        assert 0 < b["alpha_sketch_share"] < 1
    if k == 1024:
        assert s["m_star"]["model"]["value"] == 16
    assert s["m_star"]["model"]["bootstrap"]["16"] > 0.2
    _no_nan(s)
