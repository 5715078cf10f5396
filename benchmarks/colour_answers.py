"""What trap checkpoints answer to the toy's held-out image colour questions: right, a colour drawn in the
picture (another shape's), or a colour that is not in it.

    python benchmarks/colour_answers.py runs/trap-s0 runs/trap-s1 ... \
        --out benchmarks/results/toy_v6/colour_answers.json --markdown

For each trap directory (a `gradprobe trap --out`), the starting toy and every run's `final/` checkpoint answer
the colour questions among the held-out images the trap scored (its first 300 by default), restricted to the four
colours as the trap's restricted accuracy is. Each answer names a colour drawn in the image (the asked shape's,
or another shape's) or one that is not (ShapesWorld draws flat colours, so a colour is in the image when one of
its pixels is). A uniform guess among the four colours names one in the image with probability k/4 for an image
with k colours, and is right with probability 1/4; the table gives that expectation beside what the
checkpoints did. The checkpoints are loaded with `from_pretrained`; nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradprobe.data.records import read_samples
from gradprobe.data.shapesworld import COLOURS
from gradprobe.models.registry import family_named
from gradprobe.train.collate import SampleCollator
from gradprobe.train.evaluate import answer_rows, choice_ids


def colours_in(path: Path) -> set[str]:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {c for c, rgb in COLOURS.items() if (pixels == np.array(rgb)).all(axis=1).any()}


def answers(model_dir: Path, data: Path, records: list) -> list[str]:
    """The restricted argmax answer to each record (the first answer token, as the trap scores it)."""
    model, adapter = family_named("toy").adapter_class().load(model_dir)
    collate = SampleCollator(adapter, data)
    out = []
    for rec, row, _ in answer_rows(model, collate, records):
        choices = list(rec.extra["choices"])
        out.append(choices[int(row[torch.tensor(choice_ids(collate.tokenizer, choices))].argmax())])
    return out


def checkpoints(trap: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """The starting toy and the runs' final checkpoints of one trap directory, labelled as trap_seeds.py does."""
    runs = sorted(p.parent.parent for p in trap.glob("*frames-*/final/config.json"))
    if not runs:
        sys.exit(f"colour_answers.py: {trap}: no */final/ checkpoint (a gradprobe trap --out with its checkpoints?)")
    start = Path(json.loads((runs[0] / "sft_summary.json").read_text())["model"])
    named = []
    for run in runs:
        sampler, m = run.name.rsplit("-frames-", 1) if "-frames-" in run.name else ("uniform", run.name[7:])
        named.append(((sampler != "uniform", sampler.startswith("hybrid"), sampler, int(m)), f"{sampler} {m}", run))
    found = [("start", start)] + [(label, run / "final") for _, label, run in sorted(named)]
    return start.parent / "data", found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traps", nargs="+", type=Path, help="gradprobe trap output directories, one per seed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = ap.parse_args()
    seeds = []
    for trap in a.traps:
        data, found = checkpoints(trap)
        # every held-out image the trap scored, in its batches (the same logits), then its colour questions
        n_eval = json.loads((found[1][1].parent / "sft_summary.json").read_text())["options"]["eval_images"]
        scored = read_samples(data / "eval_images.jsonl", kind="image").samples[:n_eval]
        colour = [i for i, r in enumerate(scored) if r.extra.get("qtype") == "colour"]
        records = [scored[i] for i in colour]
        if not records:
            sys.exit(f"colour_answers.py: {trap}: no colour question among the {n_eval} held-out images it scored")
        drawn = [colours_in(data / r.media) for r in records]
        expected = float(np.mean([len(d) / 4 for d in drawn]))
        runs = {}
        for label, model_dir in found:
            print(f"{trap}: {label}", file=sys.stderr)
            every = answers(model_dir, data, scored)
            said = [every[i] for i in colour]
            runs[label] = {
                "n": len(records), "correct": sum(s == r.answer for s, r in zip(said, records, strict=True)),
                "in_image": sum(s in d for s, d in zip(said, drawn, strict=True)),
                "answers": {c: said.count(c) for c in COLOURS},
            }
        seeds.append({"trap": str(trap), "in_image_if_uniform": expected, "runs": runs})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"seeds": seeds}, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)
    if a.markdown:
        labels = list(seeds[0]["runs"])
        n = seeds[0]["runs"]["start"]["n"]
        print(f"| checkpoint | right (per seed; n = {n}, a uniform guess 0.25) | names a colour drawn in the image "
              f"(per seed; a uniform guess {seeds[0]['in_image_if_uniform']:.2f}) |")
        print("|---|---|---|")
        for lab in labels:
            got = [s["runs"].get(lab) for s in seeds]
            acc = " / ".join("—" if g is None else f"{g['correct'] / g['n']:.2f}" for g in got)
            seen = " / ".join("—" if g is None else f"{g['in_image'] / g['n']:.2f}" for g in got)
            print(f"| {lab} | {acc} | {seen} |")


if __name__ == "__main__":
    main()
