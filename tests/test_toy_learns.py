"""A regression guard for the toy's learnability: a short Video-SFT run on one temporal question type raises
restricted accuracy on held-out clips the budget can answer.

The full-size figures (every type, every budget, several seeds) are in benchmarks/RESULTS.md; this run is
reduced to fit CI: the tiny toy, ``order`` clips only ("which colour appears first ?"), m = 8.
"""

from gradprobe.data import shapesworld as sw
from gradprobe.sft import SFTOptions, run_sft

STEPS = 1000


def test_video_sft_learns_order(tiny_toy, tmp_path):
    data = tmp_path / "order"
    sw.generate(data, n_images=0, n_videos=400, seed=1, split="train", video_mix=("order",))
    sw.generate(data, n_images=0, n_videos=64, seed=1, split="eval", video_mix=("order",))
    s = run_sft(SFTOptions(
        out=str(tmp_path / "sft"), frames=8, model=str(tiny_toy.model_dir), video_data=str(data / "train_videos.jsonl"),
        image_probe=str(tiny_toy.data("probe", "images")), eval_image_data=str(tiny_toy.data("eval", "images")),
        eval_video_data=str(data / "eval_videos.jsonl"), eval_images=8, eval_videos=64, steps=STEPS, batch_size=8,
        lr=1e-3, probe_every=STEPS, probe_batches=1, save_steps=STEPS, keep_clips=True,
    ))
    order = s["types"]["video"]["order"]["answerable"]
    assert order["n"] >= 32
    r = order["restricted"]
    # restricted scoring: chance is 1/4 (four colours); the paired interval over records excludes no change
    assert r["last"] - r["first"] >= 0.2, r
    assert r["change"]["ci95"][0] > 0, r
    assert r["last"] > 0.25 + 2 * (0.25 * 0.75 / order["n"]) ** 0.5, r  # above chance by two standard errors
