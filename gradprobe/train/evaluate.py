"""Accuracy of a model on ShapesWorld-style records, scored two ways.

* ``free``: the argmax over the whole vocabulary at the first answer position
  equals the answer token (exact match of a one-word answer).
* ``restricted``: the argmax over the question's valid answers (its ``choices``)
  equals the answer, as yes/no and multiple-choice benchmarks score.

A model that stops producing the words some answers use loses free accuracy
but not restricted accuracy; the pair separates lost perception from
answer-vocabulary drift.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gradprobe.data.records import Sample
from gradprobe.estimators.stats import paired_difference


def choice_ids(tokenizer: Any, choices: Sequence[str]) -> list[int]:
    """The token that starts each valid answer (a word-level tokenizer's whole word; a subword
    tokenizer's first piece of the word as it follows the template's space)."""
    out = []
    for c in choices:
        tid = tokenizer.convert_tokens_to_ids(c)
        if tid is None or tid == tokenizer.unk_token_id:
            tid = tokenizer(c, add_special_tokens=False)["input_ids"][0]
        out.append(int(tid))
    return out


@torch.no_grad()
def answer_rows(
    model: torch.nn.Module,
    collator: Any,
    records: Sequence[Sample],
    batch_size: int = 32,
) -> Iterator[tuple[Sample, torch.Tensor, int]]:
    """Per record, in order: the record, the logits that predict its answer's first token, and that token.

    The records are scored in batches of ``batch_size`` in eval mode (restored afterwards).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            batch = collator(chunk)
            logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"]
            for r, rec in enumerate(chunk):
                pos = int((labels[r] != -100).nonzero()[0])
                yield rec, logits[r, pos - 1], int(labels[r, pos])
    finally:
        model.train(was_training)


def accuracy(
    model: torch.nn.Module,
    collator: Any,
    records: Sequence[Sample],
    batch_size: int = 32,
) -> dict[str, float]:
    """Free and answer-restricted accuracy, with the majority-answer baseline.

    Args:
        collator: a :class:`~gradprobe.train.collate.SampleCollator` (labels mark the answer tokens).
        records: samples whose ``choices`` field lists the valid answers (restricted = free without it).

    Returns:
        ``{"free", "restricted", "majority", "n", "free_items", "restricted_items"}``; the last two
        are per-record correctness as strings of ``0``/``1`` (for paired comparisons between evaluations).
    """
    tok = collator.tokenizer
    free_items: list[bool] = []
    restricted_items: list[bool] = []
    answers = []
    for rec, row, target in answer_rows(model, collator, records, batch_size):
        free_items.append(int(row.argmax()) == target)
        choices = choice_ids(tok, list(rec.extra.get("choices") or []))
        if choices:
            best = choices[int(row[torch.tensor(choices)].argmax())]
            restricted_items.append(best == target)
        else:
            restricted_items.append(free_items[-1])
        answers.append(rec.answer)
    n = len(records)
    majority = max(answers.count(a) for a in set(answers)) / n if n else float("nan")
    return {
        "free": sum(free_items) / n if n else float("nan"),
        "restricted": sum(restricted_items) / n if n else float("nan"),
        "majority": majority,
        "n": n,
        "free_items": "".join("01"[c] for c in free_items),
        "restricted_items": "".join("01"[c] for c in restricted_items),
    }


def record_types(records: Sequence[Sample]) -> dict[str, list[Any]]:
    """What :func:`type_changes` needs of each record: its question type and ``m_min`` (None where absent)."""
    return {"qtypes": [str(r.extra.get("qtype", "all")) for r in records],
            "m_min": [r.extra.get("m_min") for r in records]}


def type_changes(first: dict[str, Any], last: dict[str, Any], kind: str, m: int | None) -> dict[str, Any]:
    """Accuracy per question type between two evaluations of the same records, split by whether the budget
    ``m`` reaches each record's ``m_min`` (``answerable``: m ≥ m_min, or no m_min; ``unanswerable``: the
    sampled frames miss the evidence).

    Args:
        first, last: evaluation rows holding ``{kind}_free_items``, ``{kind}_restricted_items``,
            ``{kind}_qtypes`` and ``{kind}_m_min``.
        kind: ``image`` or ``video``.
        m: the budget the records were scored at (None: every record counts as answerable).

    Returns:
        ``{qtype: {"answerable"|"unanswerable": {"n", "free", "restricted"}}}``, each score
        ``{"first", "last", "change"}`` with ``change`` from :func:`paired_difference` (None below 2 records).
    """
    qtypes, m_min = last.get(f"{kind}_qtypes"), last.get(f"{kind}_m_min")
    if qtypes is None:
        return {}
    groups: dict[str, dict[str, list[int]]] = {}
    for i, (q, mm) in enumerate(zip(qtypes, m_min, strict=True)):
        reach = "answerable" if m is None or mm is None or m >= mm else "unanswerable"
        groups.setdefault(q, {}).setdefault(reach, []).append(i)
    out: dict[str, Any] = {}
    for q in sorted(groups):
        out[q] = {}
        for reach, idx in sorted(groups[q].items()):
            entry: dict[str, Any] = {"n": len(idx)}
            for how in ("free", "restricted"):
                a = "".join(last[f"{kind}_{how}_items"][i] for i in idx)
                b = "".join(first[f"{kind}_{how}_items"][i] for i in idx)
                entry[how] = {"first": b.count("1") / len(b), "last": a.count("1") / len(a),
                              "change": paired_difference(a, b) if len(idx) > 1 else None}
            out[q][reach] = entry
    return out
