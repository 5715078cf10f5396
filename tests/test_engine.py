"""The streamed engine against the float64 brute-force reference, overall and per module."""

import numpy as np
import pytest
import torch
from conftest import make_batches, tiny_loss

import gradprobe
from gradprobe.probe import GradientProbe, select_parameters
from gradprobe.probe._reference import reference_alignment
from gradprobe.probe.select import default_module_of

RTOL = 1e-10


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _run(tiny, groups, **kw):
    images = make_batches(6, seed=1)
    videos = {4: make_batches(5, seed=2, shift=0.3), 16: make_batches(5, seed=2, shift=0.9)}
    rep = gradprobe.align(tiny, images, videos, tiny_loss, image_groups=groups, n_boot=200, **kw)
    sel = select_parameters(tiny, include=kw.get("include"), exclude=kw.get("exclude"))
    ref = reference_alignment(tiny, sel.names, sel.modules, images, videos, tiny_loss, groups)
    return rep, ref


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_overall_matches_bruteforce(tiny, groups):
    rep, ref = _run(tiny, groups)
    for b in rep.summary["budgets"]:
        m = b["frames"]
        D = ref["D"][m]
        assert rel(b["mean"], D.mean()) <= RTOL
        rows = rep.batches[rep.batches.frames == m].sort_values("batch")
        assert rel(rows["value"], D.mean(axis=0)) <= RTOL
        for g in range(groups):
            assert rel(rows[f"dot_g{g}"], D[g]) <= RTOL
        assert rel(rows["norm_vid"], np.sqrt(ref["sq"][m])) <= RTOL
        img_norm = np.sqrt(ref["gram"].mean())
        assert rel(rows["cos"], D.mean(axis=0) / (img_norm * np.sqrt(ref["sq"][m]))) <= RTOL
        J = D.shape[1]
        assert rel(b["sqnorm_vid_unbiased"], ref["pair"][m] / (J * (J - 1) / 2)) <= RTOL
        if groups >= 2:
            G = ref["gram"]
            assert rel(b["sqnorm_img_unbiased"], (G.sum() - np.trace(G)) / (groups * (groups - 1))) <= RTOL
        else:
            assert b["sqnorm_img_unbiased"] is None


def test_per_module_matches_bruteforce(tiny):
    rep, ref = _run(tiny, 3)
    mods = rep.modules
    assert set(mods.module) == {"embed", "blocks.0", "blocks.1", "head", "unused"}
    for m in (4, 16):
        for name, Dm in ref["mod_D"][m].items():
            row = mods[(mods.frames == m) & (mods.module == name)].iloc[0]
            if np.abs(Dm).max() == 0:
                assert row["mean"] == 0.0
                continue
            assert rel(row["mean"], Dm.mean()) <= RTOL
            mb = rep.module_batches
            vals = mb[(mb.frames == m) & (mb.module == name)].sort_values("batch")["value"]
            assert rel(vals, Dm.mean(axis=0)) <= RTOL
        # module subtotals add up to the total, batch by batch
        tot = rep.module_batches[rep.module_batches.frames == m].groupby("batch")["value"].sum()
        assert rel(tot.values, ref["D"][m].mean(axis=0)) <= RTOL


def test_unused_parameter_is_legal_and_zero(tiny):
    rep, _ = _run(tiny, 2)
    row = rep.modules[(rep.modules.module == "unused")]
    assert (row["mean"] == 0).all()
    assert row["mean_cos"].isna().all()


def test_selection_regex_matches_bruteforce(tiny):
    rep, ref = _run(tiny, 2, include=r"^blocks\.", exclude=r"bias$")
    assert rep.summary["settings"]["n_params"] == 2 * 36
    for b in rep.summary["budgets"]:
        assert rel(b["mean"], ref["D"][b["frames"]].mean()) <= RTOL


def test_float32_model_uses_float32_accumulation():
    from conftest import TinyNet

    net = TinyNet(dtype=torch.float32)
    images = make_batches(4, seed=1, dtype=torch.float32)
    videos = {2: make_batches(3, seed=2, dtype=torch.float32)}
    rep = gradprobe.align(net, images, videos, tiny_loss, n_boot=0)
    assert rep.summary["settings"]["accumulate_dtype"] == "float32"
    net64 = net.to(torch.float64)
    sel = select_parameters(net64)
    ref = reference_alignment(
        net64, sel.names, sel.modules, [(x.double(), y) for x, y in images],
        {2: [(x.double(), y) for x, y in videos[2]]}, tiny_loss, 4
    )
    assert rel(rep.summary["budgets"][0]["mean"], ref["D"][2].mean()) <= 1e-5


def test_probe_does_not_change_the_model(tiny):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    tiny.train()
    _run(tiny, 2)
    assert tiny.training
    for n, p in tiny.named_parameters():
        assert torch.equal(before[n], p.detach())
        assert p.requires_grad
        assert p.grad is None


def test_default_module_keys():
    assert default_module_of("model.language_model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3"
    assert default_module_of("model.visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0"
    assert default_module_of("model.visual.merger.mlp.0.weight") == "model.visual.merger"
    assert default_module_of("lm_head.weight") == "lm_head"
    assert default_module_of("blocks.1.weight") == "blocks.1"
    assert default_module_of("unused") == "unused"


def test_probe_counts_gradient_of_shared_weight_once(tiny):
    """A weight used twice in forward: the hook sees the accumulated gradient once."""
    sel = select_parameters(tiny, include=r"^blocks\.0\.weight$")
    probe = GradientProbe(tiny, sel)
    batch = make_batches(1, seed=5)[0]
    with probe.attached():
        r = probe.run_batch(tiny_loss, batch)
    g = torch.autograd.grad(tiny_loss(tiny, batch), [tiny.blocks[0].weight])[0]
    assert rel(r.sqnorm.sum(), float((g * g).sum())) <= RTOL


def test_reference_on_cpu_equals_model_device(tiny):
    a, _ = _run(tiny, 2)
    b, _ = _run(tiny, 2, reference_device="cpu")
    assert a.summary["budgets"] == b.summary["budgets"]


def test_bfloat16_reference_is_close():
    from conftest import TinyNet

    net = TinyNet(dtype=torch.float32)
    images = make_batches(4, seed=1, dtype=torch.float32)
    videos = {2: make_batches(4, seed=2, shift=0.5, dtype=torch.float32)}
    full = gradprobe.align(net, images, videos, tiny_loss, n_boot=0)
    half = gradprobe.align(net, images, videos, tiny_loss, n_boot=0, reference_dtype="bfloat16")
    assert half.summary["settings"]["reference_dtype"] == "bfloat16"
    f, h = full.summary["budgets"][0], half.summary["budgets"][0]
    assert h["mean"] == pytest.approx(f["mean"], rel=2e-2)
    assert h["mean"] != f["mean"]  # the rows really are stored in bf16


def test_bad_reference_options(tiny):
    with pytest.raises(gradprobe.InputError, match="reference_device"):
        _run(tiny, 2, reference_device="gpu0")
    with pytest.raises(gradprobe.InputError, match="unknown dtype"):
        _run(tiny, 2, reference_dtype="int8")
    with pytest.raises(gradprobe.InputError, match="cannot be split"):
        gradprobe.align(tiny, make_batches(5, 1), {2: make_batches(2, 2)}, tiny_loss, image_groups=2)
    with pytest.raises(gradprobe.InputError, match="unknown role"):
        gradprobe.align(tiny, make_batches(2, 1), {2: make_batches(2, 2)}, tiny_loss, roles="decoder")
