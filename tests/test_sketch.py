"""The gradient sketch: one map in every implementation, unbiased inner products with the stated
variance, sums over pieces, determinism across processes, and the probe's sketch mode against exact."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TinyNet, make_batches, tiny_loss

import gradprobe
from gradprobe.errors import InputError
from gradprobe.probe import GradientProbe, select_parameters
from gradprobe.probe._reference import flat_grad
from gradprobe.probe.measure import parse_sketch
from gradprobe.probe.sketch import SketchSpec, _add_numba, _add_torch, inner_variance, param_key, sketch_buckets
from gradprobe.probe.store import SketchStore


def _sketch(values, name, k, seed=0, offset=0, dtype=torch.float64, add=_add_torch):
    buf = torch.zeros(k, dtype=dtype)
    add(buf, torch.as_tensor(values, dtype=dtype), param_key(seed, name), offset, 0, k)
    return buf


def test_spec_partitions_buckets_in_proportion():
    spec = SketchSpec.build([("a", 3000), ("b", 1000), ("c", 0)], k=1003)
    # 32 + 32 + 1 first (an empty module gets one bucket), the other 938 as 3000 : 1000 (703.5, 234.5: the
    # tied remainder goes to the first)
    assert spec.widths == (32 + 704, 32 + 234, 1)
    assert sum(spec.widths) == spec.k and spec.starts == (0, 736, 1002)
    # 32 + 10 > 40: one each first, the other 38 in proportion (37.87, 0.13)
    assert SketchSpec.build([("a", 3000), ("b", 10)], k=40).widths == (39, 1)
    assert SketchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.fingerprint == SketchSpec.build([("a", 3000), ("b", 1000), ("c", 0)], k=1003).fingerprint
    assert spec.fingerprint != SketchSpec.build([("a", 3000), ("b", 1000), ("c", 0)], k=1003, seed=1).fingerprint
    with pytest.raises(InputError, match="at least one"):
        SketchSpec.build([("a", 5), ("b", 5)], k=1)


@pytest.mark.parametrize("text,want", [("auto", "auto"), ("exact", "exact"), ("2^20", 1 << 20), ("4096", 4096),
                                       (None, "auto"), (128, 128)])
def test_parse_sketch(text, want):
    assert parse_sketch(text) == want


@pytest.mark.parametrize("bad", ["fast", "0", "2^40", "-3", True, 2.5])
def test_parse_sketch_rejects(bad):
    with pytest.raises(InputError, match="sketch"):
        parse_sketch(bad)


def test_hash_is_balanced_and_signs_are_fair():
    b, neg = sketch_buckets(param_key(0, "w"), 0, 1 << 18, 64)
    counts = torch.bincount(b, minlength=64).double()
    expected = (1 << 18) / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 63 + 5 * np.sqrt(2 * 63)  # 63 degrees of freedom, 5 sd
    assert abs(float(neg.double().mean()) - 0.5) < 5 * 0.5 / np.sqrt(1 << 18)


@pytest.mark.parametrize("offset", [0, 12345, 2**40 + 7])
def test_compiled_kernel_equals_torch(offset):
    pytest.importorskip("numba")
    v = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = _sketch(v, "blocks.0.weight", 997, offset=offset)
    b = _sketch(v, "blocks.0.weight", 997, offset=offset, add=_add_numba)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_triton_kernel_equals_torch_in_the_interpreter():
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from gradprobe.probe import _triton, sketch\n"
        "v = torch.randn(5000, generator=torch.Generator().manual_seed(0))\n"
        "for off, w in ((0, 777), (2**40 + 3, 1 << 20)):\n"
        "    a = torch.zeros(w + 3); b = torch.zeros(w + 3)\n"
        "    key = sketch.param_key(2, 'x.weight')\n"
        "    sketch._add_torch(a, v, key, off, 3, w)\n"
        "    _triton.sketch_add(b, v, key, off, 3, w)\n"
        "    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_pieces_sum_to_the_whole():
    """A gradient split into pieces (shards) sketches to the sum of its pieces' sketches at their offsets."""
    v = torch.randn(10007, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    whole = _sketch(v, "w", 513)
    parts = torch.zeros(513, dtype=torch.float64)
    for lo, hi in ((0, 3001), (3001, 3002), (3002, 10007)):
        parts += _sketch(v[lo:hi], "w", 513, offset=lo)
    assert torch.allclose(whole, parts, rtol=0, atol=1e-12)


def test_same_map_in_another_process_and_dtype():
    v = torch.linspace(-1, 1, 4099, dtype=torch.float64)
    here = _sketch(v, "model.layers.3.mlp.up_proj.weight", 1 << 12, seed=7)
    code = (
        "import torch, sys\n"
        "from gradprobe.probe.sketch import _add_torch, param_key\n"
        "v = torch.linspace(-1, 1, 4099, dtype=torch.float64)\n"
        "buf = torch.zeros(1 << 12, dtype=torch.float64)\n"
        "_add_torch(buf, v, param_key(7, 'model.layers.3.mlp.up_proj.weight'), 0, 0, 1 << 12)\n"
        "sys.stdout.write(buf.numpy().tobytes().hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout) == here.numpy().tobytes()
    # a bf16 gradient is sketched through its fp32 values: the same map
    h = v.to(torch.bfloat16)
    assert torch.allclose(_sketch(h.float(), "model.layers.3.mlp.up_proj.weight", 1 << 12, seed=7, dtype=torch.float32),
                          _sketch(h.double(), "model.layers.3.mlp.up_proj.weight", 1 << 12, seed=7).float(),
                          rtol=1e-6, atol=1e-6)


def _planted_pairs():
    rng = np.random.default_rng(0)
    n = 3000
    x, y = rng.standard_normal(60), rng.standard_normal(50)
    rank1 = np.outer(x, y).ravel()  # the shape of a linear layer's gradient
    out = {"gaussian": (rng.standard_normal(n), rng.standard_normal(n))}
    a = rng.standard_normal(n)
    out["correlated"] = (a, 0.8 * a + 0.6 * rng.standard_normal(n))
    out["rank_one"] = (rank1, rank1 + 0.5 * rng.standard_normal(rank1.size))
    heavy = rng.standard_t(2, n)
    out["heavy_tailed"] = (heavy, heavy * rng.standard_normal(n))
    return out


@pytest.mark.parametrize("case", ["gaussian", "correlated", "rank_one", "heavy_tailed"])
def test_unbiased_with_the_stated_variance(case):
    """Over 3000 seeds: the mean of ⟨Sa, Sb⟩ is ⟨a, b⟩ and its variance is (‖a‖²‖b‖² + ⟨a,b⟩² − 2Σa²b²)/w."""
    a, b = _planted_pairs()[case]
    w, seeds = 64, 3000
    ta, tb = torch.tensor(a), torch.tensor(b)
    est = np.array([float(_sketch(ta, "p", w, seed=s) @ _sketch(tb, "p", w, seed=s)) for s in range(seeds)])
    truth = float(a @ b)
    exact_var = (a @ a * (b @ b) + truth**2 - 2 * float((a * a * b * b).sum())) / w
    se = np.sqrt(exact_var / seeds)
    assert abs(est.mean() - truth) < 4.5 * se
    ratio = est.var(ddof=1) / exact_var
    assert 0.85 < ratio < 1.15, ratio
    bound = inner_variance(np.array([a @ a]), np.array([b @ b]), np.array([truth]), [w]).sum()
    assert bound >= exact_var


def test_module_partition_gives_unbiased_module_products():
    rng = np.random.default_rng(3)
    spec = SketchSpec.build([("m1", 800), ("m2", 200)], k=100)
    a = [rng.standard_normal(800), rng.standard_normal(200)]
    b = [0.5 * a[0] + rng.standard_normal(800), -a[1] + rng.standard_normal(200)]
    ests = []
    for seed in range(800):
        sa, sb = torch.zeros(100, dtype=torch.float64), torch.zeros(100, dtype=torch.float64)
        for i, (start, width) in enumerate(zip(spec.starts, spec.widths, strict=True)):
            key = param_key(seed, f"m{i + 1}.weight")
            _add_torch(sa, torch.tensor(a[i]), key, 0, start, width)
            _add_torch(sb, torch.tensor(b[i]), key, 0, start, width)
        ests.append([float(sa[sl] @ sb[sl]) for sl in spec.slices()])
    ests = np.array(ests)
    for i in range(2):
        truth = float(a[i] @ b[i])
        var = inner_variance(np.array(a[i] @ a[i]), np.array(b[i] @ b[i]), np.array(truth), [spec.widths[i]])
        assert abs(ests[:, i].mean() - truth) < 4.5 * np.sqrt(var / len(ests))


def test_probe_sketch_is_the_sketch_of_the_flat_gradient(tiny):
    """In the hooks, parameter by parameter, the probe builds the same sketch as sketching the flattened
    float64 gradient; squared norms stay exact; dots with stored sketches are per module."""
    sel = select_parameters(tiny)
    mods = sel.module_names
    numel = {m: sum(p.numel() for p, mm in zip(sel.params, sel.modules, strict=True) if mm == m) for m in mods}
    spec = SketchSpec.build(list(numel.items()), k=257, seed=5)
    probe = GradientProbe(tiny, sel, sketch=spec)
    a, b = make_batches(2, seed=4)
    store = SketchStore(spec, 1, torch.float64, "cpu")
    with probe.attached():
        ra = probe.run_batch(tiny_loss, a, accumulate=store, keep_sketch=True)
        rb = probe.run_batch(tiny_loss, b, refs=store)
    want = torch.zeros(257, dtype=torch.float64)
    ga = flat_grad(tiny, sel.names, tiny_loss, a)
    gb = flat_grad(tiny, sel.names, tiny_loss, b)
    pos = 0
    for name, p, mod in zip(sel.names, sel.params, sel.modules, strict=True):
        i = mods.index(mod)
        _add_torch(want, torch.tensor(ga[pos : pos + p.numel()]), param_key(5, name), 0, spec.starts[i], spec.widths[i])
        pos += p.numel()
    assert torch.allclose(ra.sketch, want, rtol=1e-12, atol=1e-14)
    assert np.isclose(ra.sqnorm.sum(), ga @ ga, rtol=1e-12)
    assert np.isclose(rb.sqnorm.sum(), gb @ gb, rtol=1e-12)
    sb = torch.zeros(257, dtype=torch.float64)
    pos = 0
    for name, p, mod in zip(sel.names, sel.params, sel.modules, strict=True):
        i = mods.index(mod)
        _add_torch(sb, torch.tensor(gb[pos : pos + p.numel()]), param_key(5, name), 0, spec.starts[i], spec.widths[i])
        pos += p.numel()
    per_module = np.array([float(want[sl] @ sb[sl]) for sl in spec.slices()])
    assert np.allclose(rb.dots[:, 0], per_module, rtol=1e-10, atol=1e-14)


def test_exact_store_refused_by_a_sketching_probe(tiny):
    sel = select_parameters(tiny)
    spec = SketchSpec.build([(m, 1) for m in sel.module_names], k=64)
    probe = GradientProbe(tiny, sel, sketch=spec)
    with probe.attached(), pytest.raises(InputError, match="SketchStore"):
        probe.run_batch(tiny_loss, make_batches(1, 0)[0], refs=gradprobe.ReferenceStore(sel.params, 1, torch.float64))


def _sketched_coverage(k, reps, seed):
    """Planted alignment with noise along one direction per side (so the exact two-way intervals are close to
    nominal: 0.9575 with these settings and seed); a new sketch map in every replicate."""
    from planted import Linear, linear_loss

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((50, 4)))
    u, v, truth = q[:, 0], 0.3 * q[:, 0] + q[:, 1], 0.3

    def split(x):
        return torch.tensor(x[:30]), torch.tensor(x[30:])

    hits = hits_plain = 0
    shares = []
    for rep in range(reps):
        images = [split(u + 0.5 * rng.standard_normal() * q[:, 2] + 0.02 * rng.standard_normal(50)) for _ in range(8)]
        videos = {8: [split(v + 0.5 * rng.standard_normal() * q[:, 3] + 0.02 * rng.standard_normal(50))
                      for _ in range(12)]}
        b = gradprobe.align(Linear(), images, videos, linear_loss, n_boot=0, sketch=k,
                            sketch_seed=rep).summary["budgets"][0]
        hits += b["ci95_t"][0] <= truth <= b["ci95_t"][1]
        # the same interval without the sketch error
        se_plain = np.sqrt(max(b["stderr"] ** 2 - b["sketch_sd"] ** 2, 0.0))
        half = (b["ci95_t"][1] - b["ci95_t"][0]) / 2 * se_plain / b["stderr"]
        hits_plain += abs(b["mean"] - truth) <= half
        shares.append(b["sketch_share"])
    return hits / reps, hits_plain / reps, float(np.mean(shares))


@pytest.mark.slow
@pytest.mark.parametrize("k", [16, 256])
def test_sketched_intervals_cover(k):
    """Coverage of the planted E[A(m)] through the hooks with a sketch of k buckets (50 coordinates): the
    intervals that carry the sketch error cover; those that leave it out do not."""
    cover, cover_plain, share = _sketched_coverage(k, reps=800, seed=21)
    # binomial sd at 0.95 with 800 reps is 0.0077
    assert 0.93 <= cover <= 0.97, cover
    assert share > 0.3 and cover_plain < 0.85, (share, cover_plain)


def test_sketches_of_two_runs_combine(tmp_path):
    """Two runs on two checkpoints with the same map: run 1's sketched ḡ_img dotted with run 2's sketched mean
    video gradient estimates the cross inner product of the two runs' exact gradients, within its stated sd."""
    from gradprobe.outputs import SKETCHES, read_sketches

    images = make_batches(6, seed=1)
    videos = {4: make_batches(5, seed=2, shift=0.3)}
    first, second = TinyNet(), TinyNet()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    for model, name in ((first, "a"), (second, "b")):
        gradprobe.align(model, images, videos, tiny_loss, sketch=256, sketch_seed=9, n_boot=0, out_dir=tmp_path / name)
    spec_a, a = read_sketches(tmp_path / "a" / SKETCHES)
    spec_b, b = read_sketches(tmp_path / "b" / SKETCHES)
    assert SketchSpec.from_dict(spec_a).fingerprint == SketchSpec.from_dict(spec_b).fingerprint
    assert a["image_groups"].shape == (6, 256) and b["video_mean_m4"].shape == (256,)
    sel = select_parameters(first)
    g_img = np.mean([flat_grad(first, sel.names, tiny_loss, x) for x in images], axis=0)
    g_vid = np.mean([flat_grad(second, sel.names, tiny_loss, x) for x in videos[4]], axis=0)
    estimate = float(a["image_groups"].mean(axis=0) @ b["video_mean_m4"])
    spec = SketchSpec.from_dict(spec_a)
    var = 0.0
    starts = np.cumsum([0] + [q.numel() for q in sel.params])[:-1]
    mods = sel.module_names
    for i, m in enumerate(mods):
        idx = np.concatenate([np.arange(s0, s0 + p.numel())
                              for s0, p, mm in zip(starts, sel.params, sel.modules, strict=True) if mm == m])
        var += inner_variance(np.array(g_img[idx] @ g_img[idx]), np.array(g_vid[idx] @ g_vid[idx]),
                              np.array(g_img[idx] @ g_vid[idx]), [spec.widths[i]])
    assert abs(estimate - g_img @ g_vid) < 4.5 * np.sqrt(var), (estimate, g_img @ g_vid, np.sqrt(var))
