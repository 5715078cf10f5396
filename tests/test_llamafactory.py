"""LLaMA-Factory end to end on the toy: its own run_exp, template, dataset pipeline and collator, with the
alignment callback bound through ``gradprobe.integrations.llamafactory``.

LLaMA-Factory pins transformers, accelerate and peft below gradprobe's own environment, so ``.ci/run``
runs this file in a virtual environment of its own with ``GRADPROBE_REQUIRE_STACKS=1`` (there a missing
LLaMA-Factory is a failure); elsewhere it is skipped when LLaMA-Factory is not installed.
"""

import json
import re

import pytest
import torch
from conftest import require_stack

require_stack("llamafactory")


@pytest.fixture(scope="module")
def lf_data(exported_toy):
    """The toy's data as `gradprobe toy --export llamafactory DIR` writes it."""
    return exported_toy("llamafactory")


def _args(tiny_toy, data, out, **extra):
    return dict(stage="sft", do_train=True, model_name_or_path=str(tiny_toy.model_dir), template="qwen2_vl",
                dataset_dir=str(data), dataset="shapesworld_probe_videos",
                output_dir=str(out), overwrite_output_dir=True, per_device_train_batch_size=2, max_steps=4,
                learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                report_to="none", cutoff_len=2048, video_maxlen=8, video_fps=8.0, image_max_pixels=4096,
                video_max_pixels=4096, use_cpu=True, dataloader_num_workers=0, bf16=False, fp16=False,
                seed=0, data_seed=0, **{"finetuning_type": "full", **extra})


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_probe_batches_are_formatted_by_llamafactory(tiny_toy, lf_data, tmp_path):
    from llamafactory.extras.constants import IGNORE_INDEX

    from gradprobe.integrations.llamafactory import probe_features

    feats = probe_features(_args(tiny_toy, lf_data, tmp_path / "p"), "shapesworld_probe_images", 4)
    tok = tiny_toy.load()[1].tokenizer
    records = json.loads((lf_data / "shapesworld_probe_images.json").read_text())
    for f, rec in zip(feats, records, strict=False):
        tokens = tok.convert_ids_to_tokens(f["input_ids"])
        # the qwen2_vl template: its default system turn, then the image, the question and the labelled answer
        assert tokens[:2] == ["<|im_start|>", "system"] and "<|vision_start|>" in tokens
        answer = tok.decode([t for t in f["labels"] if t != IGNORE_INDEX])
        assert answer.split() == [rec["conversations"][1]["value"], "<|im_end|>"], answer
        assert f["images"] == [str(lf_data / rec["images"][0])]


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_run_exp_with_the_callback_bound(finetuning, tiny_toy, lf_data, tmp_path):
    from gradprobe.integrations.llamafactory import run_exp

    out = tmp_path / "watched"
    args = _args(tiny_toy, lf_data, out, finetuning_type=finetuning, freeze_vision_tower=False)
    cb = run_exp(args, image_dataset="shapesworld_probe_images", probe_batches=2, probe_batch_size=4, every=2)
    rows = [json.loads(x) for x in (out / "gradprobe_trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2] and all(r["finite"] and r["update_norm"] > 0 for r in rows)
    assert len(cb.image_batches) == 2 and "pixel_values" in cb.image_batches[0]  # collated by LF's collator
    # the scalars reach the Trainer's log history (and so every report_to logger); its loss is logged each step
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "gradprobe/alignment" in h] == [1, 3]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    if finetuning == "lora":
        # LoRA adapters sit on the blocks' linear layers: no update in the embeddings, merger or head
        assert all(re.search(r"\.(blocks|layers)\.\d+$", m) for r in rows for m in r["modules"]), rows[0]["modules"]
        return
    assert any(m.startswith("model.visual") for m in rows[0]["modules"])
    # observe mode: the same run without the callback ends at bitwise the same weights
    from llamafactory.train.tuner import run_exp as lf_run_exp

    plain = tmp_path / "plain"
    lf_run_exp(args=_args(tiny_toy, lf_data, plain, freeze_vision_tower=False))
    a, b = _weights(out), _weights(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_budgeted_frames_train_in_llamafactory(tiny_toy, tmp_path):
    """`gradprobe budget --export llamafactory DIR`: each clip as the list of its frames at its budget, read by
    LLaMA-Factory's own dataset pipeline (its nested-frame video form) and trained on."""
    from llamafactory.train.tuner import run_exp as lf_run_exp

    from gradprobe.budget import BudgetOptions, run_budget

    data = tmp_path / "lf"
    run_budget(BudgetOptions(out=str(tmp_path / "b"), frames="2,4", method="sufficiency",
                             model=str(tiny_toy.model_dir), video_data=str(tiny_toy.data("probe", "videos")),
                             export=("llamafactory", str(data))))
    recs = json.loads((data / "budgeted_videos.json").read_text())
    manifest = {json.loads(x)["id"]: json.loads(x)["frames"] for x in (tmp_path / "b" / "manifest.jsonl").open()}
    assert all(len(r["videos"][0]) == manifest[r["id"]] == r["frames"] for r in recs)
    out = tmp_path / "run"
    lf_run_exp({**_args(tiny_toy, data, out), "dataset": "budgeted_videos", "max_steps": 2})
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
