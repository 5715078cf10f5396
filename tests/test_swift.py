"""ms-swift end to end on the toy's data: its own SFT pipeline, template and collator, with the alignment
callback bound through ``gradprobe.integrations.swift``.

Runs in its own environment in ``.ci/run`` (ms-swift's pins, with ``GRADPROBE_REQUIRE_STACKS=1``: there a
missing ms-swift is a failure); elsewhere it is skipped when ms-swift is not installed.
"""

import json

from conftest import require_stack

require_stack("swift")


def test_sft_main_with_the_callback_bound(exported_toy, tmp_path):
    """On the tiny LLaVA-1.5 checkpoint (ms-swift's Qwen templates hard-code the released vocabulary's ids of
    the visual tokens, which a tokenizer trained here does not have), trained on the toy's images."""
    from gradprobe.data import shapesworld as sw
    from gradprobe.integrations.swift import sft_main
    from gradprobe.models.tiny import create_tiny

    model = create_tiny("llava", tmp_path / "llava", sw.vocabulary())
    out = tmp_path / "out"
    argv = ["--model", str(model), "--model_type", "llava1_5_hf", "--template", "llava1_5_hf",
            "--dataset", str(exported_toy("swift") / "shapesworld_train_images.jsonl"), "--output_dir", str(out),
            "--add_version", "false", "--max_steps", "4", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--tuner_type", "full", "--freeze_vit", "false",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--torch_dtype", "float32",
            "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--learning_rate", "1e-3"]
    cb = sft_main(argv, image_data=str(exported_toy("swift") / "shapesworld_probe_images.jsonl"), probe_batches=2,
                  probe_batch_size=4, every=2)
    rows = [json.loads(x) for x in (out / "gradprobe_trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2] and all(r["finite"] and r["update_norm"] > 0 for r in rows)
    assert any("vision_tower" in m for m in rows[0]["modules"]), rows[0]["modules"]  # --freeze_vit false
    # probes encoded by the pipeline's template: the answer is labelled, the image is in the batch
    batch = cb.image_batches[0]
    assert "pixel_values" in batch and (batch["labels"] != -100).any()
    # the scalars reach the Trainer's log history; its own loss is logged at every step
    history = cb._trainer.state.log_history
    assert [h["step"] for h in history if "gradprobe/alignment" in h] == [1, 3]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
