"""The engine on the real Qwen2.5-VL toy: streamed statistics equal the float64 brute force."""

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe.models import toy
from gradprobe.models.base import loss_fn
from gradprobe.probe import select_parameters
from gradprobe.probe._reference import reference_alignment
from gradprobe.train.collate import SampleCollator


def test_toy_qwen_float64_matches_bruteforce(tiny_toy):
    model, adapter = tiny_toy.load(dtype=torch.float64)
    imgs = tiny_toy.samples("probe", "images")[:8]
    vids = tiny_toy.samples("probe", "videos")[:6]
    ic = SampleCollator(adapter, tiny_toy.data_dir)
    images = [{k: v.double() if v.is_floating_point() else v for k, v in ic(imgs[i : i + 2]).items()}
              for i in range(0, 8, 2)]
    videos = {}
    for m in (2, 6):
        vc = SampleCollator(adapter, tiny_toy.data_dir, frames=m)
        videos[m] = [{k: v.double() if v.is_floating_point() else v for k, v in vc(vids[i : i + 2]).items()}
                     for i in range(0, 6, 2)]
    rep = gradprobe.align(model, images, videos, loss_fn, image_groups=2, n_boot=0,
                          role_of=toy.role_of, module_of=toy.module_of)
    sel = select_parameters(model, module_of=toy.module_of)
    ref = reference_alignment(model, sel.names, sel.modules, images, videos, loss_fn, 2)
    for b in rep.summary["budgets"]:
        D = ref["D"][b["frames"]]
        assert b["mean"] == pytest.approx(D.mean(), rel=1e-10)
        rows = rep.batches[rep.batches.frames == b["frames"]].sort_values("batch")
        np.testing.assert_allclose(rows["value"], D.mean(axis=0), rtol=1e-10)
        for name, Dm in ref["mod_D"][b["frames"]].items():
            got = rep.modules[(rep.modules.frames == b["frames"]) & (rep.modules.module == name)]["mean"].item()
            assert got == pytest.approx(Dm.mean(), rel=1e-9, abs=1e-12 * abs(D).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_vision_attention_equals_transformers_chunk_by_chunk(tiny_toy, dtype, monkeypatch):
    model, adapter = tiny_toy.load(dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    depth = model.config.vision_config.depth
    assert toy.batch_vision_attention(model) == 0  # switched once, by the load
    vids = tiny_toy.samples("probe", "videos")[:4]
    manifest = {vids[0].id: 2, vids[1].id: 8}  # clips at different budgets in one batch
    batches = [SampleCollator(adapter, tiny_toy.data_dir, frames=m)(vids) for m in (2, 6)]
    batches.append(SampleCollator(adapter, tiny_toy.data_dir, frames=4, frames_of=manifest)(vids))
    batches.append(SampleCollator(adapter, tiny_toy.data_dir)(tiny_toy.samples("probe", "images")[:4]))
    model.train()

    def run(batch):
        model.zero_grad()
        calls.clear()
        out = model(**batch)
        out.loss.backward()
        return [out.logits.detach()] + [p.grad.clone() for p in model.parameters()], len(calls)

    for batch in batches:
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        batched, n_batched = run(batch)
        with toy.chunked_vision_attention(model) as switched:  # transformers' own forward: a call per chunk
            chunked, n_chunked = run(batch)
        assert switched == depth  # every vision block, nothing else
        chunks = int(batch["video_grid_thw" if "video_grid_thw" in batch else "image_grid_thw"][:, 0].sum())
        text_layers = model.config.text_config.num_hidden_layers
        assert (n_batched, n_chunked) == (depth + text_layers, depth * chunks + text_layers)  # one call a layer
        for a, b in zip(batched, chunked, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    assert run(batches[0])[1] == depth + model.config.text_config.num_hidden_layers  # batched again after


def test_a_clips_temporal_positions_count_its_seconds(tiny_toy):
    import inspect

    model, adapter = tiny_toy.load()
    accepts = inspect.signature(model.model.get_rope_index).parameters
    clip = tiny_toy.samples("probe", "videos")[:1]  # 64 frames at 8 fps: 8 seconds
    for m, step in ((8, 2), (16, 1), (64, 1)):
        batch = SampleCollator(adapter, tiny_toy.data_dir, frames=m)(clip)
        positions = model.model.get_rope_index(**{k: v for k, v in batch.items() if k in accepts})[0]
        t = positions[0, 0, batch["input_ids"][0] == model.config.video_token_id]
        assert (t.diff() >= 0).all()
        assert t.unique().diff().tolist() == [step] * (8 // step - 1), m  # ⌊seconds × tokens_per_second (1)⌋


def test_toy_roles_cover_every_parameter(tiny_toy):
    model, _ = tiny_toy.load()
    roles = {toy.role_of(n) for n, _ in model.named_parameters()}
    assert roles == {"vision", "projector", "language", "head"}


def test_odd_budget_is_refused():
    with pytest.raises(gradprobe.BudgetError, match="even m"):
        toy.ToyAdapter.check_budget(7)


def test_building_the_toy_writes_nothing_to_stdout_and_reports_progress(tmp_path, capsys):
    """The toy is built on the first run of the default command: nothing on stdout (the results' place), and
    progress through the Progress phases (the CLI's bar) instead of the Trainer's printed loss dicts."""
    from conftest import TINY_TOY

    from gradprobe.probe.measure import Progress
    from gradprobe.toybox import ToySpec, ensure_toy

    class Record(Progress):
        def __init__(self):
            self.totals, self.steps = {}, {}

        def start(self, phase, total):
            self.totals[phase], self.steps[phase] = total, 0

        def advance(self, phase):
            self.steps[phase] += 1

    rec = Record()
    spec = ToySpec(**{**TINY_TOY, "steps": 3})
    ensure_toy(spec, tmp_path, progress=rec)
    out = capsys.readouterr()
    assert out.out == "", out.out[:500]
    assert "{'loss'" not in out.err
    files = sum(getattr(spec, f"n_{s}_{k}") for s in ("train", "eval", "probe") for k in ("images", "videos"))
    assert rec.totals == {"building the toy: data": files, "building the toy: image stage": 3}
    assert rec.steps == rec.totals


def test_cache_files_follow_the_umask(tiny_toy):
    """Every cached file gets the modes the umask allows (the weights' writer makes them owner-only)."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(tiny_toy.root): stat.S_IMODE(p.stat().st_mode) for p in tiny_toy.root.rglob("*")}
    assert (tiny_toy.root / "model" / "model.safetensors").exists()
    bad = {p: oct(m) for p, m in modes.items() if m != ((0o777 if (tiny_toy.root / p).is_dir() else 0o666) & ~umask)}
    assert not bad, bad


@pytest.mark.slow
def test_two_processes_on_a_fresh_cache_build_the_toy_once(tmp_path):
    """torchrun's ranks (or two runs) on an empty cache: one builds the toy, the other waits and reads it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); from conftest import TINY_TOY; "
            "from gradprobe.toybox import ToySpec, ensure_toy; "
            "t = ensure_toy(ToySpec(**TINY_TOY), sys.argv[1], log=lambda s: print(s, file=sys.stderr)); "
            "print(json.dumps(t.info))")
    here = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), here], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert sum("building the toy once" in e for _, e in outs) == 1, [e[-500:] for _, e in outs]
    assert json.loads(outs[0][0]) == json.loads(outs[1][0])
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow
def test_a_rank_under_torchrun_builds_the_toy_alone(tmp_path):
    """One torchrun rank building the toy on a fresh cache while the others wait on the lock: its image-stage
    Trainer runs as one process (with the launcher's variables it would wait for ranks that never come)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from conftest import TINY_TOY; "
            "from gradprobe.toybox import ToySpec, ensure_toy; t = ensure_toy(ToySpec(**TINY_TOY), sys.argv[1]); "
            "assert os.environ['WORLD_SIZE'] == '2'; print(t.model_dir)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip(), "config.json").is_file()
