"""The Trainer callback on the real toy: observe mode leaves the run bitwise unchanged; rows and logs appear."""

import json

import pytest
import torch

from gradprobe.models import toy
from gradprobe.train.callback import AlignmentCallback, watch
from gradprobe.train.collate import SampleCollator, SampleDataset


def _trainer(tiny_toy, out, steps=4, callbacks=(), max_grad_norm=1.0, save_steps=None, weights=None):
    from transformers import Trainer, TrainingArguments

    model, adapter = toy.ToyAdapter.load(weights or tiny_toy.model_dir)
    records = tiny_toy.samples("probe", "videos")[:8]
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, max_grad_norm=max_grad_norm, logging_steps=1, report_to="none",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=SampleDataset(records),
                      processing_class=adapter.processor, data_collator=SampleCollator(adapter, tiny_toy.data_dir, frames=2),
                      callbacks=list(callbacks))
    return trainer, model, adapter


def _probe_set(tiny_toy, adapter):
    recs = tiny_toy.samples("probe", "images")[:8]
    coll = SampleCollator(adapter, tiny_toy.data_dir)
    return [coll(recs[i : i + 2]) for i in range(0, 8, 2)]


def test_observe_mode_is_bitwise_identical(tiny_toy, tmp_path):
    plain, model_a, _ = _trainer(tiny_toy, tmp_path / "a")
    plain.train()
    watched, model_b, adapter = _trainer(tiny_toy, tmp_path / "b")
    cb = watch(watched, _probe_set(tiny_toy, adapter), every=1, role_of=toy.role_of, module_of=toy.module_of)
    watched.train()
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    rows = [json.loads(x) for x in (tmp_path / "b" / "gradprobe_trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["finite"] and r["update_norm"] > 0 for r in rows)
    assert "model.visual.merger" in rows[0]["modules"]
    logged = [h for h in watched.state.log_history if "gradprobe/alignment" in h]
    assert len(logged) == 4
    assert cb.monitor.fired == {"warn": 0, "stop": 0, "project": 0}


def test_unbound_callback_adds_to_logs(tiny_toy, tmp_path):
    class Capture(AlignmentCallback):
        seen = []

        def on_log(self, args, state, control, logs=None, **kw):
            super().on_log(args, state, control, logs=logs, **kw)
            self.seen.append(dict(logs or {}))

    trainer, _, adapter = _trainer(tiny_toy, tmp_path, steps=2)
    cb = Capture(_probe_set(tiny_toy, adapter), every=1)
    trainer.add_callback(cb)
    trainer.train()
    assert any("gradprobe/cos" in logs for logs in cb.seen)


def test_callback_passed_to_the_constructor_reaches_every_logger(tiny_toy, tmp_path):
    """As LLaMA-Factory's run_exp and ms-swift pass it (``callbacks=[...]``): the callback binds itself, so its
    scalars reach a reporting integration (a callback ahead of it, as report_to's are) and the log history,
    while the Trainer keeps its own loss at every logging step."""
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):  # stands for TensorBoard / W&B: registered before user callbacks
        seen: list = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.seen.append(dict(logs or {}))

    _, _, adapter = _trainer(tiny_toy, tmp_path / "p", steps=1)
    cb = AlignmentCallback(_probe_set(tiny_toy, adapter), every=2)
    trainer, _, _ = _trainer(tiny_toy, tmp_path / "run", steps=4, callbacks=[Reporter(), cb])
    assert cb._trainer is trainer
    trainer.train()
    history = trainer.state.log_history
    assert [h["step"] for h in history if "gradprobe/alignment" in h] == [1, 3]  # rows of steps 0 and 2, logged after
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert sum("gradprobe/cos" in logs for logs in Reporter.seen) == 2


def test_stop_guard_ends_training(tiny_toy, tmp_path):
    """A planted conflict: the probe uses -loss, so ḡ_img flips sign against a positively aligned update."""
    trainer, _, adapter = _trainer(tiny_toy, tmp_path, steps=6)
    watch(trainer, _probe_set(tiny_toy, adapter), loss_fn=lambda m, b: -m(**b).loss, every=1, guard="stop")
    with pytest.warns(UserWarning, match="step 0: update gradient conflicts"):
        trainer.train()
    assert trainer.state.global_step == 1  # the conflicting step is taken, then training ends cleanly
    guard = json.loads((tmp_path / "gradprobe_guard.json").read_text())
    assert guard["fired"]["stop"] == 1 and guard["stop_reason"].startswith("step 0")


def test_project_guard_changes_only_conflicting_steps(tiny_toy, tmp_path):
    trainer, model, adapter = _trainer(tiny_toy, tmp_path, steps=3)
    cb = watch(trainer, _probe_set(tiny_toy, adapter), loss_fn=lambda m, b: -m(**b).loss, every=1,
               guard="project")
    trainer.train()
    assert cb.monitor.fired["project"] == 3
    assert all(r["projected"] for r in cb.monitor.rows)


def test_resume_appends_without_duplicates(tiny_toy, tmp_path):
    trainer, _, adapter = _trainer(tiny_toy, tmp_path, steps=4, save_steps=2)
    watch(trainer, _probe_set(tiny_toy, adapter), every=1)
    trainer.train()
    path = tmp_path / "gradprobe_trajectory.jsonl"
    first = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in first] == [0, 1, 2, 3]
    # resume from the step-2 checkpoint: rows of steps 2 and 3 are recomputed, not duplicated.
    # The weights come through from_pretrained: transformers' Trainer resume does not map the
    # legacy key names save_pretrained writes for Qwen2.5-VL and would keep the initial weights.
    trainer, _, adapter = _trainer(tiny_toy, tmp_path, steps=4, save_steps=2, weights=tmp_path / "checkpoint-2")
    watch(trainer, _probe_set(tiny_toy, adapter), every=1)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    again = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in again] == [0, 1, 2, 3]
    assert again[:2] == first[:2]
    for a, b in zip(again[2:], first[2:], strict=False):
        assert a["alignment"] == pytest.approx(b["alignment"], rel=1e-4)


@pytest.mark.slow
def test_multi_budget_probe_along_the_run(tiny_toy, tmp_path):
    trainer, model_a, adapter = _trainer(tiny_toy, tmp_path / "a", steps=4)
    vids = tiny_toy.samples("probe", "videos")[:6]
    video_probe = {m: [SampleCollator(adapter, tiny_toy.data_dir, frames=m)(vids[i : i + 2]) for i in (0, 2, 4)]
                   for m in (2, 4)}
    cb = watch(trainer, _probe_set(tiny_toy, adapter), every=2, video_probe=video_probe)
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "a" / "gradprobe_budgets.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert [b["frames"] for b in r["budgets"]] == [2, 4] and all(b["n"] == 3 for b in r["budgets"])
        assert set(r["m_star"]) >= {"empirical", "bootstrap", "zero_crossing"}
    assert len(cb.budget_rows) == 3
    # the step-0 row is the probe of the untouched model: it equals a direct align() call
    import gradprobe

    fresh, _ = tiny_toy.load()
    direct = gradprobe.align(fresh, _probe_set(tiny_toy, adapter), video_probe, lambda m, b: m(**b).loss, n_boot=0)
    assert rows[0]["budgets"][0]["mean"] == pytest.approx(direct.summary["budgets"][0]["mean"], rel=1e-6)
    # and the run itself is unchanged by the probing
    plain, model_b, _ = _trainer(tiny_toy, tmp_path / "b", steps=4)
    plain.train()
    for (k, va), (_, vb) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=False):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("bound", [True, False])
def test_trainer_keeps_its_own_loss_log_at_every_logging_step(tiny_toy, tmp_path, bound):
    """With logging_steps=1 the Trainer logs its loss at every step, probe steps included, bound or not (a
    bound callback once reset the Trainer's should_log by logging inside on_step_end)."""
    trainer, _, adapter = _trainer(tiny_toy, tmp_path, steps=4)
    if bound:
        watch(trainer, _probe_set(tiny_toy, adapter), every=2)
    else:
        trainer.add_callback(AlignmentCallback(_probe_set(tiny_toy, adapter), every=2))
    trainer.train()
    own = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert [h["step"] for h in own] == [1, 2, 3, 4]
    if bound:  # the probe rows are their own entries, at the steps probed (0 and 2 before the update)
        assert len([h for h in trainer.state.log_history if "gradprobe/alignment" in h]) == 2


def test_top_level_exports():
    import gradprobe
    from gradprobe import AlignmentCallback as Exported
    from gradprobe.train import callback

    assert gradprobe.watch is callback.watch and Exported is callback.AlignmentCallback
    assert {"watch", "AlignmentCallback"} <= set(gradprobe.__all__)
    with pytest.raises(AttributeError):
        gradprobe.no_such_name  # noqa: B018
