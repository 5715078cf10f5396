"""LLaMA-Factory: ``run_exp`` with the alignment callback, and probe batches through its own pipeline.

:func:`probe_features` tokenizes image probe records exactly as LLaMA-Factory prepares training
records: its argument parser, its template (``get_template_and_fix_tokenizer``) and its dataset
pipeline (``get_dataset``, stage ``sft``), with the run's own arguments and only ``dataset`` replaced
by the probe dataset. :func:`run_exp` hands those features to the callback as :class:`Uncollated`
chunks, which the Trainer's own collator (``SFTDataCollatorWith4DAttentionMask``, the instance that
collates training batches) collates when training begins, and runs LLaMA-Factory's ``run_exp`` with
the callback bound to the Trainer it builds.

Example::

    from gradprobe.integrations.llamafactory import run_exp
    args = {"stage": "sft", "do_train": True, "model_name_or_path": "...", "template": "qwen2_vl",
            "dataset_dir": "data", "dataset": "my_videos", "output_dir": "out", ...}
    cb = run_exp(args, image_dataset="my_image_probe", every=50)

Parsing LLaMA-Factory's arguments seeds its RNGs; the probe features are prepared before
LLaMA-Factory parses them again (and seeds again) for the run, so the run itself is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradprobe.errors import InputError
from gradprobe.train.callback import AlignmentCallback, Uncollated

#: the run's arguments that say nothing about the probe records, or would split or cap them
_DROP = ("eval_dataset", "val_size", "max_samples", "streaming", "packing", "neat_packing", "tokenized_path")


def probe_features(args: Mapping[str, Any], dataset: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` records of ``dataset`` as LLaMA-Factory's SFT pipeline prepares them.

    Args:
        args: the run's LLaMA-Factory arguments (as for ``run_exp``).
        dataset: the name of the image probe dataset in ``dataset_info.json``.
        count: how many records.

    Raises:
        InputError: the dataset has fewer records than asked for.
    """
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    a = {k: v for k, v in args.items() if k not in _DROP}
    a.update(dataset=dataset, max_samples=count)
    model_args, data_args, training_args, _, _ = get_train_args(a)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    data = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    train = data["train_dataset"]
    if len(train) < count:
        raise InputError(f"{dataset}: {len(train)} usable probe records, need {count}")
    return [train[i] for i in range(count)]


def probe_records(args: Mapping[str, Any], dataset: str, *, batches: int, batch_size: int) -> Uncollated:
    """``batches`` chunks of ``batch_size`` probe records (see :func:`probe_features`), for the callback."""
    for name, v in (("batches", batches), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{name}: expected a positive integer, got {v!r}")
    feats = probe_features(args, dataset, batches * batch_size)
    return Uncollated([feats[i * batch_size : (i + 1) * batch_size] for i in range(batches)])


def run_exp(args: Mapping[str, Any], *, image_dataset: str, probe_batches: int = 4, probe_batch_size: int = 8,
            callbacks: Sequence[Any] = (), **callback_options: Any) -> AlignmentCallback:
    """LLaMA-Factory's ``run_exp`` watched by an :class:`AlignmentCallback`; returns the callback.

    Args:
        args: LLaMA-Factory's arguments (a dict, as its ``run_exp`` takes).
        image_dataset: the image probe dataset's name in the run's ``dataset_info.json``.
        probe_batches, probe_batch_size: the probe set, built by :func:`probe_records`.
        callbacks: further callbacks for the run.
        **callback_options: :class:`AlignmentCallback` options (``every``, ``guard``, ``role_of``, …).
    """
    from llamafactory.train.tuner import run_exp as lf_run_exp

    probes = probe_records(args, image_dataset, batches=probe_batches, batch_size=probe_batch_size)
    cb = AlignmentCallback(probes, **callback_options)
    lf_run_exp(args=dict(args), callbacks=[*callbacks, cb])
    return cb
