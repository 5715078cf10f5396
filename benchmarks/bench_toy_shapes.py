"""A Video-SFT step of the toy and of smaller variants of it at one budget: what a cheaper toy would save.

Usage (on quiet cores):
    python benchmarks/bench_toy_shapes.py --frames 64 --threads 2 --out benchmarks/results/toy_shapes_cpu.json
CPU check of the script itself:
    python benchmarks/bench_toy_shapes.py --frames 4 --repeats 1 --warmup 0

Each variant is the toy's Qwen2.5-VL config (:func:`gradprobe.models.toy.toy_config`, randomly initialised, with
the toy's batched vision attention) with one thing changed:

* ``toy``: as built (vision patch 8: a 32 × 32 frame is 16 patches, 4 visual tokens per temporal group);
* ``patch16``: vision patch 16 (4 patches, 1 visual token per temporal group; an image 4 tokens instead of 16);
* ``vision32``: vision hidden 32 and MLP 64 (from 64 and 128);
* ``text3``: three language-model layers (from two);
* ``patch16+text3``: both.

The batch is 8 clips at ``--frames`` (the trap's recipe), each a prompt of the toy's length around the clip's
visual tokens, random pixels, the answer token labelled. One step is a forward, a backward and an AdamW step;
the JSON has the median of ``--repeats`` steps after ``--warmup``, and each variant's ratio to ``toy``. Nothing
is trained and nothing is read from disk: the variants cannot be compared on what they learn here, only on
what a step costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "toy": {},
    "patch16": {"patch": 16},
    "vision32": {"vision_hidden": 32},
    "text3": {"text_layers": 3},
    "patch16+text3": {"patch": 16, "text_layers": 3},
}
#: a ShapesWorld clip's stored frame side in pixels
SIDE = 32
#: the toy's prompt around a clip: role and template tokens before the clip, question and answer after it
BEFORE, AFTER = 4, 14


def step_ms(frames: int, batch_size: int, warmup: int, repeats: int, *, patch: int = 8, vision_hidden: int = 64,
            text_layers: int = 2) -> dict[str, float]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from gradprobe.data.shapesworld import vocabulary
    from gradprobe.models.toy import batch_vision_attention, build_processor, toy_config

    vocab = build_processor(vocabulary()).tokenizer.get_vocab()
    cfg = toy_config(vocab, text_layers=text_layers)
    cfg.vision_config.patch_size = patch
    cfg.vision_config.hidden_size = vision_hidden
    cfg.vision_config.intermediate_size = 2 * vision_hidden
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    batch_vision_attention(model)
    model.train()
    side, groups = SIDE // patch, max(1, frames // 2)
    tokens = groups * (side // 2) ** 2
    words = vocab["red"]
    ids = [words] * (BEFORE - 1) + [vocab["<|vision_start|>"]] + [vocab["<|video_pad|>"]] * tokens + \
        [vocab["<|vision_end|>"]] + [words] * (AFTER - 1)
    input_ids = torch.tensor([ids] * batch_size)
    labels = torch.full_like(input_ids, -100)
    labels[:, -2] = words
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 pixel_values_videos=torch.randn(batch_size * groups * side * side, 3 * 2 * patch * patch),
                 video_grid_thw=torch.tensor([[groups, side, side]] * batch_size),
                 second_per_grid_ts=torch.full((batch_size,), 16.0 / max(frames, 2)), labels=labels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        model.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times), "visual_tokens": batch_size * tokens,
            "vision_patches": int(batch["pixel_values_videos"].shape[0]),
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out")
    a = p.parse_args()
    if a.frames < 1 or a.batch_size < 1 or a.repeats < 1 or a.warmup < 0:
        sys.exit("bench_toy_shapes.py: --frames, --batch-size and --repeats must be ≥ 1, --warmup ≥ 0")
    torch.set_num_threads(a.threads)
    rows = {}
    for name, kw in VARIANTS.items():
        rows[name] = step_ms(a.frames, a.batch_size, a.warmup, a.repeats, **kw)
        print(f"{name}: {rows[name]['ms']:.1f} ms per step", file=sys.stderr)
    for r in rows.values():
        r["ratio_to_toy"] = r["ms"] / rows["toy"]["ms"]
    print(f"| variant | parameters | visual tokens per batch | vision patches per batch | ms per step (m = {a.frames}) "
          "| ratio to the toy |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['parameters']:,} | {r['visual_tokens']} | {r['vision_patches']} | {r['ms']:.1f} | "
              f"{r['ratio_to_toy']:.2f} |")
    if a.out:
        out = {"frames": a.frames, "batch_size": a.batch_size, "threads": a.threads, "repeats": a.repeats,
               "torch": torch.__version__, "platform": platform.platform(), "variants": rows}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
