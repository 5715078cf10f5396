"""Peak memory of one video batch's forward and backward against its token count, with and without activation
checkpointing, plain and probed, per attention implementation: which term of c + a·n + b·n² each removes.

Usage (about 20 minutes on 2 cores; memory, not time, so other work on the machine does not change it):
    python benchmarks/bench_memory.py --out benchmarks/results/memory_cpu_1b.json --markdown
CPU check of the script itself (seconds):
    python benchmarks/bench_memory.py --shape tiny --side 32 --frames 2,4,6,8 --out /tmp/memory_tiny.json

The model is the ~1 B-parameter Qwen2.5-VL of ``bench_scale.py`` (:data:`gradprobe.models.tiny.QWEN2_5_VL_1B`,
random weights, float32, saved and loaded back with ``from_pretrained``). The batch is one clip of random
``--side`` × ``--side`` frames at each budget of ``--frames`` with a one-word answer, collated by the family's
adapter, so n, the language model's visual tokens, doubles with m. Each measurement runs in a child process
that samples its resident memory every millisecond; the figure is the peak during one forward and backward
minus the resident memory just before it (the model loaded, the batch built), so it holds the activations,
the gradients and the attention's work space:

* ``plain``: ``loss.backward()``, every gradient kept in ``.grad``, as in training;
* ``probed``: the same batch through gradprobe's measurement (:class:`gradprobe.probe.measure.Measurement`,
  a sketch of 2^16 buckets): each gradient is sketched in its hook and freed there.

Each at ``--checkpointing off`` and ``on`` (:func:`gradprobe.probe.checkpoint.checkpointed`), with the
attention implementations of ``--attn`` (``sdpa``: on the CPU a flash kernel that keeps no n × n
probabilities; ``eager``: the probabilities kept for the backward). The JSON holds every peak and, per
configuration, the least-squares fits of c + a·n and of c + a·n + b·n² (GiB, n in thousands of tokens), with an
environment record; ``--from JSON`` prints a saved run's table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from resident import PeakMemory


class _Clips:
    """A clip store of random frames: ``clip(sample, m)`` gives m frames of side × side."""

    def __init__(self, side: int) -> None:
        self.side = side

    def clip(self, sample: Any, m: int) -> Any:
        from gradprobe.data.clips import Clip

        frames = np.random.default_rng(m).integers(0, 256, (m, self.side, self.side, 3), dtype=np.uint8)
        idx = np.arange(m)
        return Clip(frames=frames, indices=idx, positions=idx, total=m, fps=2.0, short=False)


def child(a: argparse.Namespace) -> dict[str, Any]:
    """One measurement (``--child``): model and batch, then the peak of one forward and backward."""
    from gradprobe.data.records import parse_record
    from gradprobe.models.base import loss_fn, strip_info
    from gradprobe.models.registry import family_for
    from gradprobe.probe.checkpoint import checkpointed
    from gradprobe.probe.measure import Measurement

    torch.set_num_threads(a.threads)
    model, adapter = family_for(a.model).adapter_class().load(a.model, attn_implementation=a.attn)
    model.eval()
    sample = parse_record({"id": "clip", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhich colour appears first ?"}, {"from": "gpt", "value": "red"}]}, "clip")
    batch = adapter.collate([sample], store=_Clips(a.side), m=a.m)
    tokens = int((batch["input_ids"] == adapter.visual_token_ids()["video"]).sum())
    batch = strip_info(batch)
    with checkpointed(model, a.checkpointing == "on") as blocks:
        if a.mode == "plain":
            peak = PeakMemory()
            loss_fn(model, batch).backward()
        else:
            meas = Measurement(model, loss_fn, sketch=1 << 16)
            with meas.session():
                peak = PeakMemory()
                meas.run(batch)
        gib = peak.stop()
    return {"frames": a.m, "tokens": tokens, "peak_gib": gib, "blocks": len(blocks),
            "parameters": sum(p.numel() for p in model.parameters())}


def fit(rows: list[dict[str, Any]], quadratic: bool = True) -> dict[str, float]:
    """Least squares of peak (GiB) on 1, n and (``quadratic``) n², n in thousands of tokens."""
    n = np.array([r["tokens"] for r in rows], dtype=float) / 1000
    y = np.array([r["peak_gib"] for r in rows])
    terms = [np.ones_like(n), n, n * n][: 3 if quadratic else 2]
    coef, *_ = np.linalg.lstsq(np.stack(terms, axis=1), y, rcond=None)
    return dict(zip("cab", (float(x) for x in coef), strict=False))


def markdown(configs: list[dict[str, Any]]) -> str:
    """Peaks (GiB) per token count; the linear fit's slope and the quadratic fit's c, a, b."""
    tokens = [r["tokens"] for r in configs[0]["rows"]]
    head = ("| attention | checkpointing | pass | " + " | ".join(f"n = {t}" for t in tokens)
            + " | slope, linear fit (GiB per 1000 tokens) | quadratic fit: c, a, b |")
    lines = [head, "|" + "---|" * (5 + len(tokens))]
    for c in configs:
        q, lin = fit(c["rows"]), fit(c["rows"], quadratic=False)
        lines.append(f"| {c['attn']} | {c['checkpointing']} | {c['mode']} | "
                     + " | ".join(f"{r['peak_gib']:.2f}" for r in c["rows"])
                     + f" | {lin['a']:.2f} | {q['c']:.2f}, {q['a']:.2f}, {q['b']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=["1b", "tiny"])
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--frames", default="4,8,16,32", help="budgets, at least four (the fit has three terms)")
    ap.add_argument("--attn", default="sdpa,eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/gradprobe-memory")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", action="store_true", help="print the table on stdout")
    ap.add_argument("--from", dest="saved", default=None, help="print the table of a saved JSON; measure nothing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    if a.saved:
        print(markdown(json.loads(Path(a.saved).read_text())["configs"]))
        return
    frames = [int(x) for x in a.frames.split(",")]
    if len(frames) < 4:
        ap.error("--frames: give at least four budgets")
    from gradprobe.data import shapesworld as sw
    from gradprobe.models.tiny import create_tiny

    model = Path(a.work) / f"qwen2_5_vl-{a.shape}-{a.side}"
    if not (model / "config.json").is_file():
        with contextlib.redirect_stdout(sys.stderr):  # what the build's imports print is not a result
            create_tiny("qwen2_5_vl", model, sw.vocabulary(), shape=a.shape, side=a.side)
    configs = []
    for attn in a.attn.split(","):
        for checkpointing in ("off", "on"):
            for mode in ("plain", "probed"):
                rows = []
                for m in frames:
                    print(f"{attn} checkpointing {checkpointing} {mode} m={m}", file=sys.stderr)
                    res = subprocess.run(
                        [sys.executable, __file__, "--child", "--model", str(model), "--m", str(m), "--mode", mode,
                         "--checkpointing", checkpointing, "--attn", attn, "--side", str(a.side),
                         "--threads", str(a.threads)], capture_output=True, text=True, check=False)
                    if res.returncode != 0:
                        sys.exit(f"child failed ({attn}, {checkpointing}, {mode}, m={m}):\n{res.stderr[-3000:]}")
                    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                configs.append({"attn": attn, "checkpointing": checkpointing, "mode": mode, "rows": rows,
                                "fit": fit(rows), "fit_linear": fit(rows, quadratic=False)})
    out = {"shape": a.shape, "side": a.side, "frames": frames, "threads": a.threads, "configs": configs,
           "environment": {"torch": torch.__version__, "python": platform.python_version(),
                           "machine": platform.machine(), "processor": platform.processor()}}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)
    if a.markdown:
        print(markdown(configs))


if __name__ == "__main__":
    main()
