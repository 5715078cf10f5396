"""``gradprobe budget``: a frame budget per training clip (Hybrid-Frame), written as a manifest that
``gradprobe sft --manifest`` reads, and scored against ShapesWorld's ground truth ``m_min``.

Files in ``out``: ``manifest.jsonl`` (one line per clip: ``{"id", "frames", "method", "score", "scores",
"qtype", "m_min"}``, appended as each clip is done, so an interrupted run resumes without redoing finished
clips), ``budget_settings.json`` (what the manifest was made with; a resumed run must match it) and
``budget_summary.json`` (the distribution of budgets, mean frames, visual tokens saved against the largest
budget and, with ``score``, the table against ``m_min``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradprobe._checks import parse_frames
from gradprobe.budget.methods import METHODS, BudgetMethod, Context, grid_target, method_named, register
from gradprobe.errors import DataError, InputError
from gradprobe.outputs import write_json

__all__ = ["METHODS", "BudgetMethod", "BudgetOptions", "Context", "method_named", "register", "run_budget",
           "score_manifest"]

MANIFEST = "manifest.jsonl"
SETTINGS = "budget_settings.json"
SUMMARY = "budget_summary.json"


@dataclass
class BudgetOptions:
    """Options of :func:`run_budget` (the command line's ``gradprobe budget``)."""

    out: str = "gradprobe-budget"
    frames: str = "8,16,32,64"
    method: str = "redundancy"
    tolerance: float | None = None
    model: str | None = None
    video_data: str | None = None
    data_root: str | None = None
    embedder: str | None = None
    judge: str | None = None
    limit: int | None = None
    score: bool = False
    alignment: int = 0
    image_data: str | None = None
    export: tuple[str, str] | None = None
    device: str = "auto"
    checkpointing: str = "auto"
    cache_dir: str | None = None


def _settings(opts: BudgetOptions, grid: list[int], tolerance: float, model: str, data: str) -> dict[str, Any]:
    return {"method": opts.method, "frames": grid, "tolerance": tolerance, "model": model, "video_data": data,
            "embedder": opts.embedder, "judge": opts.judge}


def read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    """The lines of a manifest (a torn last line from an interrupted write is dropped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _check_options(opts: BudgetOptions) -> None:
    """The options' own checks, before any model or record is read.

    Raises:
        GradprobeError: a bad value, path or combination (one line, for the CLI).
    """
    from gradprobe._checks import check_positive_int
    from gradprobe.models.registry import family_for
    from gradprobe.probe.checkpoint import check_checkpointing

    if opts.limit is not None:
        check_positive_int("limit", opts.limit)
    check_positive_int("alignment", opts.alignment, 0)
    check_checkpointing(opts.checkpointing)
    if opts.export is not None:
        from gradprobe.data.export import FORMATS

        if opts.export[0] not in FORMATS:
            raise InputError(f"--export: unknown format {opts.export[0]!r}; use one of {', '.join(FORMATS)}")
        if Path(opts.export[1]).exists() and not Path(opts.export[1]).is_dir():
            raise InputError(f"--export: {opts.export[1]} exists and is not a directory")
    if opts.image_data and not Path(opts.image_data).is_file():
        raise InputError(f"image-data: {opts.image_data} not found")
    if bool(opts.model) != bool(opts.video_data):
        raise InputError("give both --model and --video-data, or neither for the toy default")
    for name in ("embedder", "judge"):
        path = getattr(opts, name)
        if path and not Path(path).is_dir():
            raise InputError(f"{name}: {path} is not a directory")
    if opts.judge:
        family_for(opts.judge)  # a supported family, or a one-line error


def run_budget(opts: BudgetOptions, log: Callable[[str], None] | None = None, progress: Any = None) -> dict[str, Any]:
    """Allocate a budget to every clip, write the manifest and the summary; return the summary.

    Raises:
        GradprobeError: bad options, paths or records (before any model is loaded).
    """
    from gradprobe.data.records import read_samples
    from gradprobe.models.registry import family_for, family_named
    from gradprobe.probe.measure import Progress
    from gradprobe.run import DEFAULT_TOY, _device
    from gradprobe.toybox import ensure_toy

    log = log or (lambda s: None)
    progress = progress or Progress()
    grid = parse_frames(opts.frames)
    cls = method_named(opts.method)
    tolerance = cls.default_tolerance if opts.tolerance is None else float(opts.tolerance)
    if not tolerance >= 0:
        raise InputError(f"tolerance: expected a number ≥ 0, got {opts.tolerance}")
    _check_options(opts)
    adapter_cls = (family_for(opts.model) if opts.model else family_named("toy")).adapter_class()
    for m in grid:
        adapter_cls.check_budget(m)
    device = _device(opts.device)
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} is not a directory")
    if opts.alignment and opts.model and not opts.image_data:
        raise InputError("alignment: give --image-data (image records for ḡ_img) with --model")
    if opts.model:
        model_dir, data = Path(opts.model), Path(opts.video_data)
        image_data = Path(opts.image_data) if opts.image_data else None
    else:
        toy = ensure_toy(DEFAULT_TOY, opts.cache_dir, log=log, progress=progress)
        model_dir, data = toy.model_dir, toy.data("train", "videos")
        image_data = Path(opts.image_data) if opts.image_data else toy.data("probe", "images")
    samples = read_samples(data, kind="video").samples
    if opts.limit is not None:
        samples = samples[: opts.limit]
    if opts.score and not all("m_min" in s.extra for s in samples):
        raise DataError(f"{data}: --score needs records with an m_min (ShapesWorld's carry one)")
    settings = _settings(opts, grid, tolerance, str(model_dir), str(data))
    out.mkdir(parents=True, exist_ok=True)
    if (out / SETTINGS).is_file():
        before = json.loads((out / SETTINGS).read_text())
        if before != settings:
            changed = ", ".join(k for k in settings if before.get(k) != settings[k])
            raise InputError(f"out: {out} holds a manifest made with other settings ({changed}); use another --out")
    else:
        write_json(out / SETTINGS, settings)
    rows = read_manifest_rows(out / MANIFEST)
    done = {r["id"] for r in rows}
    todo = [s for s in samples if s.id not in done]
    if rows:
        log(f"resuming: {len(rows)} of {len(samples)} clips already allocated")
        (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))  # drop a torn last line
    memory = _allocate(opts, cls, adapter_cls, model_dir, data, grid, tolerance, todo, rows, out, device, log,
                       progress) if todo else None
    by_id = {s.id: s for s in samples}
    rows = [r for r in rows if r["id"] in by_id]
    summary = summarize(rows, grid, opts, tolerance, cls)
    if memory is not None:
        summary["checkpointing"] = memory
    summary.update(_tokens(rows, [by_id[r["id"]] for r in rows], grid[-1], adapter_cls, model_dir,
                           Path(opts.data_root) if opts.data_root else data.parent))
    if opts.score:
        summary["score"] = score_manifest(rows, grid)
    if opts.alignment:
        summary["alignment"] = _alignment(opts, rows, by_id, grid, adapter_cls, model_dir, data, image_data, out,
                                          device, log, progress)
    if opts.export is not None:
        from gradprobe.data.export import export_budgeted

        fmt, where = opts.export
        dst = export_budgeted([by_id[r["id"]] for r in rows], {r["id"]: int(r["frames"]) for r in rows}, where,
                              fmt, root=Path(opts.data_root) if opts.data_root else data.parent)
        summary["export"] = {"format": fmt, "file": str(dst)}
        log(f"wrote {fmt} records with each clip's frames at its budget: {dst}")
    write_json(out / SUMMARY, summary)
    return summary


def _allocate(opts: BudgetOptions, cls: Any, adapter_cls: Any, model_dir: Path, data: Path, grid: list[int],
              tolerance: float, todo: list[Any], rows: list[dict[str, Any]], out: Path, device: Any,
              log: Callable[[str], None], progress: Any) -> dict[str, Any] | None:
    """Score and allocate each clip of ``todo``, appending its row to ``rows`` and to the manifest as it is done
    (an interrupted run keeps every finished clip). Returns the memory plan of a method that runs a backward
    (:func:`gradprobe.run.plan_memory`: activation checkpointing, or a refusal before any clip), else None."""
    import torch

    from gradprobe.data.clips import ClipStore
    from gradprobe.probe.checkpoint import checkpointed
    from gradprobe.run import plan_memory

    log(f"loading {model_dir}")
    model, adapter = adapter_cls.load(model_dir, device=str(device))
    model.eval()
    store = ClipStore(Path(opts.data_root) if opts.data_root else data.parent, grid, size_of=adapter.frame_size)
    memory = None
    if cls.backward:  # one clip at the largest budget
        memory = plan_memory(adapter, model_dir, store, todo, grid[-1], 1, device, torch.float32,
                             quadratic=device.type == "cpu", checkpointing=opts.checkpointing)
    method = cls(Context(model=model, adapter=adapter, store=store, grid=grid, tolerance=tolerance,
                         embedder=opts.embedder, judge=opts.judge, log=log))
    phase = f"allocating budgets ({opts.method})"
    progress.start(phase, len(todo))
    with open(out / MANIFEST, "a") as fh, checkpointed(model, bool(memory and memory["on"])):
        for s in todo:
            sc = method.scores(s)
            m = method.choose(sc)
            row = {"id": s.id, "frames": m, "method": opts.method, "score": sc[m],
                   "scores": {str(k): v for k, v in sc.items()}, **method.extra(s)}
            for key in ("qtype", "m_min"):
                if key in s.extra:
                    row[key] = s.extra[key]
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows.append(row)
            store._frames.pop(s.media, None)  # each clip is read once: keep nothing
            progress.advance(phase)
    progress.finish(phase)
    return memory


def _alignment(opts: BudgetOptions, rows: list[dict[str, Any]], by_id: dict[str, Any], grid: list[int],
               adapter_cls: Any, model_dir: Path, data: Path, image_data: Path, out: Path, device: Any,
               log: Callable[[str], None], progress: Any) -> dict[str, Any]:
    """Eq. 28 per clip (see :mod:`gradprobe.budget.alignment`) for the first ``opts.alignment`` clips allocated
    below the largest budget; rows in ``alignment.csv`` (kept across interruptions: finished clips are not
    measured again)."""
    import csv

    import torch

    from gradprobe.budget.alignment import clip_alignment
    from gradprobe.data.clips import ClipStore
    from gradprobe.data.records import read_samples
    from gradprobe.models.base import load_image
    from gradprobe.probe.checkpoint import checkpointed
    from gradprobe.run import plan_memory

    path = out / "alignment.csv"
    done = list(csv.DictReader(path.open())) if path.is_file() else []
    seen = {r["id"] for r in done}
    want = [r for r in rows if r["frames"] < grid[-1]][: opts.alignment]
    todo = [(by_id[r["id"]], int(r["frames"])) for r in want if r["id"] not in seen]
    images = read_samples(image_data, kind="image").samples[:32]
    model, adapter = adapter_cls.load(model_dir, device=str(device))
    root = image_data.parent
    loaded = {s.media: load_image(root, s) for s in images}
    batches = [adapter.collate(images[i:i + 8], images=loaded) for i in range(0, len(images), 8)]
    store = ClipStore(Path(opts.data_root) if opts.data_root else data.parent, grid, size_of=adapter.frame_size)
    memory = plan_memory(adapter, model_dir, store, [s for s, _ in todo], grid[-1], 1, device, torch.float32,
                         quadratic=device.type == "cpu", checkpointing=opts.checkpointing)
    fields = ["id", "frames", "A_allocated", "A_largest", "difference", "qtype", "m_min"]
    new = not path.is_file()
    with path.open("a", newline="") as fh, checkpointed(model, memory["on"]):
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()

        def write(row: dict[str, Any]) -> None:
            writer.writerow(row)
            fh.flush()

        log(f"Eq. 28: {len(todo)} clips below the largest budget ({len(done)} done before)")
        res = clip_alignment(model, adapter, store, batches, todo, grid[-1], on_row=write, progress=progress)
    from gradprobe.estimators.stats import weighted_mean_ci

    allrows = [{k: float(r[k]) for k in ("A_allocated", "A_largest", "difference")} for r in done] + res["rows"]
    out_ci = {}
    for key in ("A_allocated", "A_largest", "difference"):
        x = [r[key] for r in allrows if r[key] == r[key]]
        mean, se, ci = weighted_mean_ci(x) if x else (None, None, None)
        out_ci[key] = {"mean": mean, "stderr": se, "ci95": list(ci) if ci else None}
    return {"n": len(allrows), "image_batches": len(batches), "mode": res["mode"], **out_ci, "note": res["note"]}


def summarize(rows: list[dict[str, Any]], grid: list[int], opts: BudgetOptions, tolerance: float,
              cls: type[BudgetMethod]) -> dict[str, Any]:
    """Distribution of budgets and mean frames."""
    n = len(rows)
    return {"schema": "gradprobe.budget/1", "method": opts.method, "statistic": cls.statistic,
            "tolerance": tolerance, "frames": grid, "n": n,
            "counts": {str(m): sum(r["frames"] == m for r in rows) for m in grid},
            "mean_frames": sum(r["frames"] for r in rows) / n if n else None,
            **({"parsed_fraction": sum(bool(r["parsed"]) for r in rows) / n} if n and "parsed" in rows[0] else {}),
            "note": "each clip gets the smallest budget whose score (distance to the largest budget) is within "
                    "the tolerance, else the largest"}


def _tokens(rows: list[dict[str, Any]], samples: Sequence[Any], big: int, adapter_cls: Any, model_dir: Path,
            root: Path) -> dict[str, Any]:
    """Visual tokens the language model reads under the manifest and with every clip at the largest budget
    (the family's token rule at each clip's size, from the processor's settings; nothing is run)."""
    from transformers import AutoProcessor

    from gradprobe.data.clips import ClipStore

    adapter = adapter_cls(AutoProcessor.from_pretrained(model_dir))
    store = ClipStore(root, [big])
    got = full = 0
    for r, s in zip(rows, samples, strict=True):
        info = store.info(s)
        got += adapter.visual_tokens(info.height, info.width, int(r["frames"]))[1]
        full += adapter.visual_tokens(info.height, info.width, big)[1]
    return {"visual_tokens": got, "visual_tokens_at_largest": full,
            "tokens_saved_fraction": 1 - got / full if full else None}


def score_manifest(rows: list[dict[str, Any]], grid: list[int]) -> dict[str, Any]:
    """Per question type (and overall): exact match with ``m_min`` mapped onto the grid, the rate of
    under-allocation (budget < m_min: the clip's evidence is lost), the rate of over-allocation and mean
    frames, for the manifest and for each uniform budget of the grid."""
    types = sorted({r.get("qtype", "all") for r in rows})

    def table(assign: Callable[[dict[str, Any]], int]) -> dict[str, Any]:
        out = {}
        for q in [*types, "all"]:
            sel = [r for r in rows if q == "all" or r.get("qtype", "all") == q]
            if not sel:
                continue
            got = [assign(r) for r in sel]
            target = [grid_target(int(r["m_min"]), grid) for r in sel]
            out[q] = {
                "n": len(sel),
                "exact": sum(g == t for g, t in zip(got, target, strict=True)) / len(sel),
                "under": sum(g < int(r["m_min"]) for g, r in zip(got, sel, strict=True)) / len(sel),
                "over": sum(t is not None and g > t for g, t in zip(got, target, strict=True)) / len(sel),
                "mean_frames": sum(got) / len(sel),
            }
        return out

    return {"manifest": table(lambda r: int(r["frames"])),
            "uniform": {str(m): table(lambda r, m=m: m) for m in grid},
            "note": "target: the smallest budget of the grid ≥ m_min; exact: budget = target; under: budget < "
                    "m_min (the evidence is not sampled); over: budget > target"}
