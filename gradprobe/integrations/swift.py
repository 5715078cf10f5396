"""ms-swift: its SFT pipeline with the alignment callback, and probe batches through its own template.

:func:`sft_main` runs ms-swift's ``SwiftSft`` pipeline (the ``swift sft`` command) with an
:class:`AlignmentCallback` bound to the Trainer the pipeline builds (through :func:`~gradprobe.watch`,
so its scalars reach every ``report_to`` logger and the log history). The image probe records are read
from any record file gradprobe reads, encoded by the pipeline's own template (``template.encode``, in
training mode, before the Trainer exists) and collated when training begins by the Trainer's own
collator (the template's ``data_collator``), so probes are formatted exactly like training batches.

Example::

    from gradprobe.integrations.swift import sft_main
    cb = sft_main(["--model", "...", "--dataset", "videos.jsonl", "--output_dir", "out", ...],
                  image_data="image_probe.jsonl", every=50)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradprobe.data.clips import resolve
from gradprobe.data.records import Sample, read_samples
from gradprobe.errors import DataError, InputError
from gradprobe.train.callback import AlignmentCallback, Uncollated, watch


def _pipeline_class() -> type:
    try:  # ms-swift 4.x
        from swift.pipelines.train.sft import SwiftSft
    except ImportError:  # ms-swift 3.x
        from swift.llm.train.sft import SwiftSft
    return SwiftSft


def _row(s: Sample, root: Path) -> dict[str, Any]:
    msgs, placed = [], False
    for role, text in s.turns:
        if role == "user" and not placed:
            text, placed = f"<{s.kind}>{text}", True
        msgs.append({"role": role, "content": text})
    path = resolve(root, s.media)
    if not path.is_file():
        raise DataError(f"{s.where}: {s.kind} file not found: {path}")
    return {"messages": msgs, s.kind + "s": [str(path.resolve())]}


def probe_records(template: Any, image_data: str, *, batches: int, batch_size: int,
                  data_root: str | None = None) -> Uncollated:
    """``batches`` chunks of ``batch_size`` image records encoded by an ms-swift template (train mode).

    Raises:
        InputError: a non-positive count.
        DataError: too few records, or a bad record or missing image.
    """
    for name, v in (("batches", batches), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{name}: expected a positive integer, got {v!r}")
    samples = read_samples(image_data, kind="image").samples
    need = batches * batch_size
    if len(samples) < need:
        raise DataError(f"{image_data}: {len(samples)} image records, need {need} ({batches} batches of {batch_size})")
    root = Path(data_root) if data_root else Path(image_data).parent
    feats = [template.encode(_row(s, root)) for s in samples[:need]]
    return Uncollated([feats[i * batch_size : (i + 1) * batch_size] for i in range(batches)])


def sft_main(argv: Sequence[str], *, image_data: str, probe_batches: int = 4, probe_batch_size: int = 8,
             data_root: str | None = None, **callback_options: Any) -> AlignmentCallback:
    """ms-swift's SFT pipeline watched by an :class:`AlignmentCallback`; returns the callback.

    Args:
        argv: ``swift sft`` arguments.
        image_data: image probe records (LLaVA or ShareGPT, JSON or JSONL).
        probe_batches, probe_batch_size: the probe set.
        data_root: directory the probe records' image paths are relative to (default: the file's).
        **callback_options: :class:`AlignmentCallback` options (``every``, ``guard``, ``role_of``, …).
    """
    base = _pipeline_class()
    holder: dict[str, AlignmentCallback] = {}

    class WatchedSft(base):  # type: ignore[misc, valid-type]
        def __init__(self, args: Any) -> None:
            super().__init__(args)
            # encoded here, before the Trainer seeds the run, so the run itself is unchanged
            self._gradprobe_probes = probe_records(self.template, image_data, batches=probe_batches,
                                                   batch_size=probe_batch_size, data_root=data_root)

        def train(self, trainer: Any) -> Any:
            holder["cb"] = watch(trainer, self._gradprobe_probes, **callback_options)
            return super().train(trainer)

    WatchedSft(list(argv)).main()
    return holder["cb"]
