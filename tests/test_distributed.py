"""Two CPU processes (gloo) give the single-process numbers: DDP, FSDP2 and ZeRO-3, the monitor with the project guard
and the Trainer callback.

Each distributed run is launched with torchrun (``torch.distributed.run --standalone``) in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_close

pytestmark = pytest.mark.slow  # subprocesses and whole runs: `pytest -m "not slow"` skips them

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    if mode.startswith("single"):
        cmd = [sys.executable, str(WORKER), mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), mode, str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp_unbound"])
def test_two_ranks_equal_single_process(mode, single, tmp_path):
    got = _run(mode, tmp_path)
    # the planted conflict makes the project guard act, so the weights depend on the projection too
    assert single["fired"]["project"] >= 1
    assert len(single["rows"]) == 3 and all(r["alignment"] < 0 for r in single["rows"])
    assert_close(single["rows"], got["rows"])
    assert got["fired"] == single["fired"]
    assert_close(single["params"], got["params"])


@pytest.fixture(scope="module")
def single_sketch(tmp_path_factory):
    return _run("single_sketch", tmp_path_factory.mktemp("single_sketch"))


@pytest.mark.parametrize("mode", ["ddp_sketch", "fsdp_sketch"])
def test_sketched_groups_over_two_ranks_equal_single_process(mode, single_sketch, single, tmp_path):
    """With sketched image-group rows (64 buckets): each rank sketches its own pieces at their global offsets
    and the sketches are summed, so the sketched interval equals the single process's; the alignment, the
    projection and the weights are those of exact rows."""
    got = _run(mode, tmp_path)
    assert_close(single_sketch["rows"], got["rows"])
    assert got["fired"] == single_sketch["fired"] == single["fired"]
    assert_close(single_sketch["params"], got["params"])
    for exact, sk in zip(single["rows"], single_sketch["rows"], strict=True):
        for key in ("alignment", "cos", "update_norm", "reference_norm", "modules"):
            assert_close(exact[key], sk[key], rel=1e-9, path=key)
        assert sk["alignment_stderr"] != exact["alignment_stderr"]  # the spread over groups comes from sketches
    assert_close(single["params"], single_sketch["params"], rel=1e-9)


def test_deepspeed_zero3_equals_single_process(tmp_path):
    """ZeRO-3 (2 gloo ranks, CPU): gradient partitions through DeepSpeed's public accessors.

    DeepSpeed clips inside its step, after the monitor, so the reference clips in that order too. ZeRO-3
    takes float32 modules only (DeepSpeed 0.19.7 and later refuse float64), so both runs are float32 and the
    tolerances are those of float32 sums reduced in another order (observed: 1.5e-6 relative).
    """
    pytest.importorskip("deepspeed")
    ref = _run("single_late_clip", tmp_path)
    got = _run("zero3", tmp_path)
    assert ref["fired"]["project"] >= 1 and got["fired"] == ref["fired"]
    assert_close(ref["rows"], got["rows"], rel=2e-5)
    for name, values in ref["params"].items():
        assert got["params"][name] == pytest.approx(values, abs=1e-6), name
    # ZeRO-1/2 expose only the assembled gradient publicly: refused with a reason
    assert "ZeRO stage 2" in _run("zero2", tmp_path)["error"]


def test_unwrapped_model_with_different_probe_sets_is_an_error(tmp_path):
    got = _run("ddp_mismatch", tmp_path)
    assert "differs between ranks" in got["error"]


TRAINER_WORKER = Path(__file__).with_name("dist_trainer_worker.py")


def _trainer_run(how, out, ranks):
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    out.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([*launch, str(TRAINER_WORKER), str(out), how], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def trainer_single(tmp_path_factory):
    """One process: the reference of every mode (bound, init and unbound compute the same there)."""
    return _trainer_run("bound", tmp_path_factory.mktemp("trainer_single"), 1)


@pytest.mark.parametrize("how", ["bound", "init", "unbound"])
def test_trainer_callback_under_ddp_equals_single_process(how, trainer_single, tmp_path):
    """transformers' Trainer with accelerate's DDP (gloo, 2 ranks) against one process, global batch 4."""
    single, ddp = trainer_single, _trainer_run(how, tmp_path, 2)
    assert len(single["rows"]) == 2 and single["fired"]["project"] >= 1
    # bound, the callback works on the DDP wrapper (probe through DDP's backward); unbound, on every rank alone
    assert ddp["by_backward"] == (how != "unbound") and not single["by_backward"]
    assert_close(single["rows"], ddp["rows"])
    assert ddp["fired"] == single["fired"]
    assert_close(single["params"], ddp["params"])


def test_trainer_callback_under_accelerate_fsdp2_equals_single_process(trainer_single, tmp_path):
    """Trainer with accelerate's FSDP2 (`fsdp=True`, `fsdp_config={"version": 2}`; gloo, 2 ranks): the callback
    reads its pieces of the sharded gradients; rows and final weights equal one process's (float64)."""
    got = _trainer_run("fsdp2", tmp_path, 2)
    assert got["by_backward"] and got["fired"] == trainer_single["fired"]
    assert_close(trainer_single["rows"], got["rows"])
    assert_close(trainer_single["params"], got["params"])


def test_trainer_callback_under_deepspeed_zero3_equals_single_process(tmp_path):
    """Trainer with DeepSpeed ZeRO-3 (2 gloo ranks). accelerate runs DeepSpeed's whole step inside
    `accelerator.backward`, before `on_pre_optimizer_step`; the callback measures (and projects) right before
    that step, so its rows and the final weights equal one float32 process's without clipping (DeepSpeed would
    clip after the callback, the Trainer before it)."""
    pytest.importorskip("deepspeed")
    ref = _trainer_run("single32", tmp_path / "one", 1)
    got = _trainer_run("zero3", tmp_path / "two", 2)
    assert ref["fired"]["project"] >= 1 and got["fired"] == ref["fired"]
    assert_close(ref["rows"], got["rows"], rel=2e-5)
    for name, values in ref["params"].items():
        assert got["params"][name] == pytest.approx(values, abs=1e-6), name


TOY_WORKER = Path(__file__).with_name("dist_toy_trainer_worker.py")


def _toy_run(how, out, ranks, toy):
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    out.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([*launch, str(TOY_WORKER), str(out), how, str(toy.root)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("how, reference, rel, weights", [("fsdp2", "single", 1e-6, 1e-12),
                                                          ("zero3", "single32", 2e-5, 1e-6)])
def test_trainer_callback_on_the_toy_sharded_equals_single_process(tiny_toy, tmp_path, how, reference, rel, weights):
    """The toy end to end (its processor, collator and Trainer) under accelerate's FSDP2 (float64) and DeepSpeed
    ZeRO-3 (float32, no clipping) on two gloo ranks: the callback's rows and the final weights equal one
    process's."""
    if how == "zero3":
        pytest.importorskip("deepspeed")
    ref = _toy_run(reference, tmp_path / "one", 1, tiny_toy)
    got = _toy_run(how, tmp_path / "two", 2, tiny_toy)
    assert got["by_backward"] and len(ref["rows"]) == 2 and got["fired"] == ref["fired"]
    assert all(r["finite"] and r["reference_norm"] > 0 for r in ref["rows"])
    assert_close(ref["rows"], got["rows"], rel=rel)
    for name, values in ref["params"].items():
        assert got["params"][name] == pytest.approx(values, rel=rel, abs=weights), name
