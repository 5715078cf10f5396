"""End-to-end runs from paths and options: what the command line calls.

:func:`run_align` resolves the model and data (the embedded toy default when
none are given), builds paired image and video batches, and calls
:func:`gradprobe.align`.

``_prepare`` is long because its order is the contract that bad input fails before heavy work: every option
check, then the paths and records, then the memory plan (:func:`plan_memory`), and only then the decoding of
images and clips; its pieces are the helpers below it.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradprobe._checks import check_positive_int, parse_frames
from gradprobe.errors import DataError, GradprobeError, InputError, ModelError
from gradprobe.estimators.align import AlignReport, Progress, align
from gradprobe.probe.checkpoint import check_checkpointing, checkpointed
from gradprobe.probe.measure import image_group_count, parse_sketch
from gradprobe.probe.store import resolve_dtype
from gradprobe.toybox import ToySpec, ensure_toy

#: The toy that ``gradprobe align`` uses when no model is given.
DEFAULT_TOY = ToySpec()


@dataclass
class RunOptions:
    """What every command that loads a model and data takes: model, data, batches, selection, device, seed."""

    frames: str | Sequence[int] = "8,16,32,64"
    model: str | Sequence[str] | None = None
    image_data: str | None = None
    video_data: str | None = None
    data_root: str | None = None
    image_batches: int = 8
    video_batches: int = 12
    batch_size: int = 16
    video_batch_size: int = 4
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    roles: str | None = None
    device: str = "auto"
    dtype: str | None = None
    device_map: str | None = None
    attn_implementation: str | None = None
    checkpointing: str = "auto"
    sampler: str = "uniform"
    pixel_policy: str = "fixed"
    frame_pixels: int | None = None
    total_pixels: int | None = None
    skip_bad: bool = False
    seed: int = 0
    out: str | None = None
    cache_dir: str | None = None


@dataclass
class AlignOptions(RunOptions):
    """Options of :func:`run_align` (the command line's ``gradprobe align``).

    ``model`` may name several checkpoints of one run (a list, or comma-separated): each is
    measured on the same batches (see :func:`run_align_checkpoints`).
    """

    image_groups: int | None = None
    reference_device: str = "model"
    reference_dtype: str | None = None
    sketch: str = "auto"
    sketch_seed: int = 0
    n_boot: int = 2000


class _LazyBatches(Sequence[Any]):
    """Chunks of records collated on access (so a long grid does not hold every batch at once)."""

    def __init__(self, chunks: list[list[dict[str, Any]]], collate: Callable[[list[dict[str, Any]]], Any],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.chunks, self.collate, self.device, self.dtype = chunks, collate, device, dtype

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("slicing is not supported")
        batch = self.collate(self.chunks[i])
        return {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }


def _chunks(records: list[Any], size: int, count: int, what: str, path: Path,
            option: str) -> list[list[Any]]:
    """``count`` consecutive batches of ``size`` records, or a DataError naming ``option``."""
    need = size * count
    if len(records) < need:
        raise DataError(
            f"{path}: {len(records)} {what} records, need {need} ({count} batches of {size}); "
            f"lower {option} or the batch size"
        )
    return [records[i * size : (i + 1) * size] for i in range(count)]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device: CUDA was requested but is not available on this machine")
    return dev


def model_list(model: str | Sequence[str] | None) -> list[str]:
    """``--model`` values: repeatable and/or comma-separated."""
    if model is None:
        return []
    items = [model] if isinstance(model, str) else list(model)
    return [m.strip() for item in items for m in str(item).split(",") if m.strip()]


def _good(samples: list[Any], need: int, load: Callable[[Any], Any], skip_bad: bool,
          skipped: list[str]) -> list[Any]:
    """The first ``need`` samples whose media load; bad ones raise, or are skipped and counted."""
    out = []
    for s in samples:
        if len(out) >= need:
            break
        try:
            load(s)
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{s.where}: {e}") from None
            skipped.append(f"{s.where}: {e}")
            continue
        out.append(s)
    return out


@dataclass
class _Prepared:
    """Everything but the model: resolved paths, good samples in batches, decoded media."""

    model_dirs: list[Path]
    family: Any
    frames: list[int]
    device: torch.device
    dtype: torch.dtype
    img_chunks: list[list[Any]]
    vid_chunks: list[list[Any]]
    images: dict[str, Any]
    store: Any
    meta: dict[str, Any]
    #: activation checkpointing in the measurement passes: ``on`` (bool), ``requested``, ``reason``
    checkpointing: dict[str, Any]


def _prepare(opts: RunOptions, log: Callable[[str], None],
             add_frames: Callable[[Any], Sequence[int]] | None = None,
             progress: Progress | None = None) -> _Prepared:
    """Resolve model and data paths, read and batch the records, decode the clips.

    ``add_frames(adapter_class)`` names budgets to decode beside the grid (e.g. the family's smallest).
    """
    from gradprobe.data.clips import ClipStore
    from gradprobe.data.records import read_samples
    from gradprobe.data.sampling import check_sampler
    from gradprobe.models.base import PixelPolicy, load_image
    from gradprobe.models.registry import family_for, family_named
    from gradprobe.outputs import check_out_dir
    from gradprobe.probe.select import check_selection
    from gradprobe.probe.store import check_reference_device

    frames = parse_frames(opts.frames) if isinstance(opts.frames, str) else parse_frames(list(opts.frames))
    # every option is checked before anything is built, decoded or loaded
    for name in ("image_batches", "video_batches", "batch_size", "video_batch_size"):
        check_positive_int(name.replace("_", "-"), getattr(opts, name))
    check_selection(opts.include or None, opts.exclude or None, opts.roles)
    if isinstance(opts, AlignOptions):  # the reference rows, the sketch and the bootstrap
        check_positive_int("n-boot", opts.n_boot, 0)
        if opts.image_groups is not None:
            image_group_count(opts.image_batches, opts.image_groups)
        check_reference_device(opts.reference_device)
        resolve_dtype(opts.reference_dtype, torch.float32, "reference_dtype")
        parse_sketch(opts.sketch)
    check_sampler(opts.sampler)
    check_checkpointing(opts.checkpointing)
    policy = PixelPolicy(opts.pixel_policy, opts.frame_pixels, opts.total_pixels)
    device = _device(opts.device)
    dtype = resolve_dtype(opts.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if opts.out is not None:
        check_out_dir(opts.out)

    models = model_list(opts.model)
    given = [models, opts.image_data, opts.video_data]
    if any(given) and not all(given):
        raise InputError("give all of --model, --image-data and --video-data, or none of them for the toy default")
    fams = [family_for(d) for d in models] if models else [family_named("toy")]
    if len({f.name for f in fams}) > 1:
        raise InputError("model: the checkpoints are of different families "
                         f"({', '.join(sorted({f.name for f in fams}))}); give checkpoints of one run")
    adapter_cls = fams[0].adapter_class()
    if add_frames is not None:
        frames = sorted({*frames, *add_frames(adapter_cls)})
    for m in frames:
        adapter_cls.check_budget(m)
    adapter_cls.check_policy(policy)
    meta: dict[str, Any] = {}
    if not models:
        if distributed_rank() > 0:
            # torchrun on a fresh cache: rank 0 takes the build lock first, so the build's log and progress are
            # the ones shown; the other ranks wait on the lock (losing this race is only cosmetic)
            time.sleep(2.0)
        toy = ensure_toy(DEFAULT_TOY, opts.cache_dir, log=log, progress=progress)
        model_dirs, image_path, video_path = [toy.model_dir], toy.data("probe", "images"), toy.data("probe", "videos")
        meta["source"] = "toy"
        meta["toy"] = {"root": str(toy.root), "image_accuracy": toy.info.get("image_accuracy")}
    else:
        model_dirs, image_path, video_path = [Path(m) for m in models], Path(opts.image_data), Path(opts.video_data)
        meta["source"] = "paths"
    image_root = Path(opts.data_root) if opts.data_root else Path(image_path).parent
    video_root = Path(opts.data_root) if opts.data_root else Path(video_path).parent
    if opts.data_root and not image_root.is_dir():
        raise InputError(f"data-root: {image_root} is not a directory")

    skipped: dict[str, list[str]] = {"image": [], "video": []}
    img_set = read_samples(image_path, kind="image", skip_bad=opts.skip_bad)
    vid_set = read_samples(video_path, kind="video", skip_bad=opts.skip_bad)
    skipped["image"] += img_set.skipped
    skipped["video"] += vid_set.skipped

    images: dict[str, Any] = {}

    def load_img(s: Any) -> None:
        if s.media not in images:
            images[s.media] = load_image(image_root, s)

    # frame sizes follow the first checkpoint's processor (checkpoints of one run share it)
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_dirs[0])
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dirs[0]}: cannot load the processor ({str(e).splitlines()[0]})") from None
    sizer = adapter_cls(processor, pixel_policy=policy)
    store = ClipStore(video_root, frames, opts.sampler, size_of=sizer.frame_size)
    need_img = opts.batch_size * opts.image_batches
    need_vid = opts.video_batch_size * opts.video_batches
    ckpt = plan_memory(sizer, model_dirs[0], store, vid_set.samples[:need_vid], max(frames), opts.video_batch_size,
                       device, dtype, quadratic=device.type == "cpu" or opts.attn_implementation == "eager",
                       checkpointing=opts.checkpointing)
    if ckpt["on"]:
        log(f"activation checkpointing on ({ckpt['reason']})")
    good_img = _good(img_set.samples, need_img, load_img, opts.skip_bad, skipped["image"])
    log(f"decoding {min(need_vid, len(vid_set.samples))} clips at {len(frames)} budgets ({opts.sampler} sampler)")
    good_vid = _good(vid_set.samples, need_vid, store.load, opts.skip_bad, skipped["video"])
    img_chunks = _chunks(good_img, opts.batch_size, opts.image_batches, "usable image", Path(image_path),
                         "--image-batches")
    vid_chunks = _chunks(good_vid, opts.video_batch_size, opts.video_batches, "usable video", Path(video_path),
                         "--video-batches")
    short = {m: sorted(s.id for c in vid_chunks for s in c if store.info(s).total < m) for m in frames}
    meta.update(
        image_data=str(image_path),
        video_data=str(video_path),
        data_format={"image": img_set.format, "video": vid_set.format},
        family=adapter_cls.family,
        batch_size=opts.batch_size,
        video_batch_size=opts.video_batch_size,
        sampler=opts.sampler,
        pixel_policy={"kind": policy.kind, "description": policy.describe(), "frame_pixels": policy.frame_pixels,
                      "total_pixels": policy.total_pixels},
        skipped={k: {"count": len(v), "first": v[:5]} for k, v in skipped.items()},
        short_clips={str(m): ids for m, ids in short.items() if ids},
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    for m, ids in short.items():
        if ids:
            log(f"frames={m}: {len(ids)} clips have fewer than {m} frames; their frames repeat (short_clips)")
    if any(skipped.values()):
        log(f"skipped {len(skipped['image'])} image and {len(skipped['video'])} video records (--skip-bad)")
    return _Prepared(model_dirs, fams[0], frames, device, dtype, img_chunks, vid_chunks, images, store, meta, ckpt)


def plan_memory(adapter: Any, model_dir: Path, store: Any, samples: Sequence[Any], m: int, batch: int,
                device: torch.device, dtype: torch.dtype, quadratic: bool, checkpointing: str = "auto") -> dict[str, Any]:
    """Decide activation checkpointing for the measurement passes and refuse a budget whose video batch cannot
    fit the free memory even so, before any clip is decoded: the adapter's lower bound on its forward and
    backward (:meth:`Adapter.min_batch_bytes`) for the largest clip among the first ones read. ``auto``
    checkpoints when the bound without it exceeds the free memory.

    Returns:
        ``{"requested", "on", "reason"}``.

    Raises:
        BudgetError: even the lower bound exceeds the free memory of the device.
    """
    from transformers import AutoConfig

    from gradprobe.data.video import VideoInfo
    from gradprobe.errors import BudgetError
    from gradprobe.probe.measure import _gib, free_bytes

    decided = {"requested": checkpointing, "on": checkpointing == "on",
               "reason": f"--checkpointing {checkpointing}" if checkpointing != "auto" else
               "auto: the free memory or the clip sizes are unknown, off"}
    free = free_bytes(device)
    sizes: list[VideoInfo] = []
    for s in samples[:8]:
        try:
            sizes.append(store.info(s))
        except GradprobeError:
            continue  # reported (or skipped) when the clip is decoded
    if free is None or not sizes:
        return decided
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        return decided  # reported when the model is loaded
    h, w = max(((i.height, i.width) for i in sizes), key=lambda hw: hw[0] * hw[1])
    plain, kept = (adapter.min_batch_bytes(config, h, w, m, batch, dtype, quadratic_attention=quadratic,
                                           checkpointing=c) for c in (False, True))
    if checkpointing == "auto":
        decided["on"] = plain > free
        decided["reason"] = (f"auto: a video batch at m={m} needs at least {_gib(plain)} without checkpointing, "
                             f"{_gib(kept)} with it; {device} has {_gib(free)} free")
    need = kept if decided["on"] else plain
    if need > free:
        patches, tokens = adapter.visual_tokens(h, w, m)
        how = "with activation checkpointing" if decided["on"] else (
            f"without activation checkpointing ({_gib(kept)} with --checkpointing on)")
        raise BudgetError(
            f"frames {m}: a video batch of {batch} clips is {batch * tokens:,} visual tokens ({tokens:,} per clip, "
            f"{patches:,} vision patches) and needs at least {_gib(need)} for its forward and backward {how}; "
            f"{device} has {_gib(free)} free. Lower --frames or --video-batch-size"
        )
    return decided


@contextlib.contextmanager
def _checkpointing(model: torch.nn.Module, prep: _Prepared, meta: dict[str, Any]) -> Iterator[None]:
    """The measurement passes of the block under activation checkpointing when ``prep`` decided so; ``meta``
    records the decision and how many blocks it wrapped."""
    with checkpointed(model, prep.checkpointing["on"]) as blocks:
        meta["checkpointing"] = dict(prep.checkpointing, blocks=len(blocks))
        yield


def _load(opts: RunOptions, prep: _Prepared, model_dir: Path,
          log: Callable[[str], None]) -> tuple[torch.nn.Module, Any, list[Any], dict[int, _LazyBatches]]:
    """Load one checkpoint with its adapter; its image batches and its video batches per budget."""
    from gradprobe.models.base import PixelPolicy

    log(f"loading {model_dir}")
    adapter_cls = prep.family.adapter_class()
    model, adapter = adapter_cls.load(
        model_dir, dtype=prep.dtype, device=str(prep.device), device_map=opts.device_map,
        attn_implementation=opts.attn_implementation,
        pixel_policy=PixelPolicy(opts.pixel_policy, opts.frame_pixels, opts.total_pixels),
    )
    device = next(model.parameters()).device
    images = list(_LazyBatches(prep.img_chunks, lambda c: adapter.collate(c, images=prep.images), device, prep.dtype))
    videos = {
        m: _LazyBatches(prep.vid_chunks, (lambda c, m=m: adapter.collate(c, store=prep.store, m=m)), device,
                        prep.dtype)
        for m in prep.frames
    }
    return model, adapter, images, videos


def _torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed_rank() -> int:
    """This process's rank under torchrun (0 in a single process)."""
    return int(os.environ.get("RANK", "0")) if _torchrun() else 0


def _init_distributed(device: torch.device) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1): the default process group (NCCL on CUDA, else gloo); True then."""
    import torch.distributed as dist

    if not _torchrun():
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` on each member of the model's ``layers`` and ``blocks`` lists (its decoder and
    vision blocks), then on the root, as the training stacks do. Every rank must then run the same batches."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # torch warns at every forward that the root returns a view (a ModelOutput field); nothing here writes into it
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "blocks"):
            for block in mod:
                fully_shard(block)
    return fully_shard(model)


def _distribute(model: torch.nn.Module, prep: _Prepared, meta: dict[str, Any], out: str | None,
                ) -> tuple[torch.nn.Module, str | None]:
    """Under torchrun: the model sharded across ranks (:func:`shard_model`), ``meta["ranks"]`` set, and the
    output directory kept for rank 0 alone (None on the others). In one process: both as given."""
    if not _init_distributed(prep.device):
        return model, out
    import torch.distributed as dist

    meta["ranks"] = dist.get_world_size()
    return shard_model(model), (out if dist.get_rank() == 0 else None)


def _fresh_out(out: str | os.PathLike[str] | None, log: Callable[[str], None]) -> None:
    """Before a run writes into ``out``: the files of an earlier run there are removed (gradprobe's own only)."""
    from gradprobe.outputs import clear_run_files

    if out is not None and (gone := clear_run_files(out)):
        log(f"{out}: replacing an earlier run's {', '.join(gone)}")


def _align_one(opts: AlignOptions, prep: _Prepared, model_dir: Path, out: str | None, progress: Progress | None,
               log: Callable[[str], None]) -> AlignReport:
    from gradprobe.models.base import batch_info, loss_fn

    model, adapter, images, videos = _load(opts, prep, model_dir, log)
    meta = dict(prep.meta, model=str(model_dir))
    model, out = _distribute(model, prep, meta, out)
    _fresh_out(out, log)
    torch.manual_seed(opts.seed)
    with _checkpointing(model, prep, meta):
        return align(
            model, images, videos, loss_fn, include=opts.include or None, exclude=opts.exclude or None,
            roles=opts.roles, role_of=adapter.role_of, module_of=adapter.module_of, image_groups=opts.image_groups,
            sketch=opts.sketch, sketch_seed=opts.sketch_seed, reference_device=opts.reference_device,
            reference_dtype=opts.reference_dtype, n_boot=opts.n_boot, seed=opts.seed, batch_info=batch_info,
            out_dir=out, progress=progress, meta=meta,
        )


def run_align(
    opts: AlignOptions,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> AlignReport:
    """Run ``gradprobe align`` from options: load model and data, build batches, measure.

    Raises:
        GradprobeError: any bad option, path, record or budget (one line, for the CLI); also when
            ``opts.model`` names several checkpoints (use :func:`run_align_checkpoints`).
    """
    log = log or (lambda s: None)
    if len(model_list(opts.model)) > 1:
        raise InputError("model: several checkpoints given; use run_align_checkpoints")
    prep = _prepare(opts, log, progress=progress)
    return _align_one(opts, prep, prep.model_dirs[0], opts.out, progress, log)


def _checkpoint_row(label: str, model: str, budget: dict[str, Any]) -> dict[str, Any]:
    """One row of checkpoints.csv: a budget's scalars, intervals as _lo/_hi columns, its batch_info."""
    row: dict[str, Any] = {"checkpoint": label, "model": model}
    for k, v in budget.items():
        if k in ("ci95_t", "ci95_boot"):
            row[f"{k}_lo"], row[f"{k}_hi"] = (v if v else (None, None))
        elif k == "batch_info":
            row.update(v)
        else:
            row[k] = v
    return row


def checkpoint_label(model_dir: Path, index: int) -> str:
    """A directory-safe name for a checkpoint: its position and its folder name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model_dir.name) or "model"
    return f"{index:02d}-{name}"


def run_align_checkpoints(
    opts: AlignOptions,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> list[tuple[str, AlignReport]]:
    """``gradprobe align`` for every checkpoint in ``opts.model``, on the same batches.

    With one checkpoint this is :func:`run_align` (outputs in ``<out>``). With several, each
    checkpoint's outputs go to ``<out>/<NN-name>/``; ``<out>/checkpoints.csv`` holds one row per
    checkpoint and budget and ``<out>/checkpoints.json`` lists the checkpoints in order. A checkpoint
    finished before an interruption keeps its outputs.
    """
    import pandas as pd

    from gradprobe import outputs as io

    log = log or (lambda s: None)
    prep = _prepare(opts, log, progress=progress)
    if len(prep.model_dirs) > 1 and distributed_rank() == 0:
        _fresh_out(opts.out, log)
    if len(prep.model_dirs) == 1:
        return [(checkpoint_label(prep.model_dirs[0], 0),
                 _align_one(opts, prep, prep.model_dirs[0], opts.out, progress, log))]
    reports: list[tuple[str, AlignReport]] = []
    out = Path(opts.out) if opts.out and distributed_rank() == 0 else None  # torchrun: rank 0 writes
    for i, d in enumerate(prep.model_dirs):
        label = checkpoint_label(d, i)
        reports.append((label, _align_one(opts, prep, d, str(out / label) if out else None, progress, log)))
        if out is not None:
            pd.DataFrame([_checkpoint_row(lab, r.summary["meta"]["model"], b)
                          for lab, r in reports for b in r.summary["budgets"]]).to_csv(out / io.CHECKPOINTS_CSV,
                                                                                      index=False)
            io.write_json(out / io.CHECKPOINTS_JSON, {
                "schema": "gradprobe.align-checkpoints/1",
                "checkpoints": [{"label": lab, "model": r.summary["meta"]["model"], "m_star": r.summary["m_star"]}
                                for lab, r in reports],
                "pending": [str(x) for x in prep.model_dirs[i + 1:]],
            })
    return reports


@dataclass
class CurvatureOptions(RunOptions):
    """Options of :func:`run_curvature` (the command line's ``gradprobe curvature``).

    Model, data, selection and device options are those of :class:`RunOptions` (one
    checkpoint); the batch counts default lower because every Hessian-vector product reads
    every batch.
    """

    image_batches: int = 4
    video_batches: int = 4
    lr: str | float | Sequence[float] = "1e-5"
    backend: str = "auto"
    method: str = "lanczos"
    max_iter: int = 100
    tol: float = 1e-3
    beta_vid: bool = True
    trace_samples: int = 0
    per_module: bool = False
    fd_step: float | None = None


def run_curvature(
    opts: CurvatureOptions,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Run ``gradprobe curvature`` from options: load model and data, build batches, measure
    β, q, η0 and the one-step lookahead (:func:`gradprobe.estimators.curvature.curvature`).

    Raises:
        GradprobeError: any bad option, path, record or budget (one line, for the CLI).
    """
    from gradprobe.estimators.curvature import check_options, curvature
    from gradprobe.models.base import loss_fn

    log = log or (lambda s: None)
    # cheap option checks before any model or data is loaded
    lrs = check_options(opts.lr, opts.backend, opts.method, opts.max_iter, opts.tol, opts.trace_samples,
                        opts.fd_step, sep="-")
    if len(model_list(opts.model)) > 1:
        raise InputError("model: curvature measures one checkpoint; give one --model")
    if _torchrun() and opts.backend in ("double_backward", "forward_over_reverse"):
        raise InputError(f"backend: {opts.backend} has no path on a sharded model under torchrun (FSDP2 has no "
                         "double backward); use finite_difference or auto")
    prep = _prepare(opts, log, progress=progress)
    model, adapter, images, videos = _load(opts, prep, prep.model_dirs[0], log)
    meta = dict(prep.meta, model=str(prep.model_dirs[0]))
    model, out = _distribute(model, prep, meta, opts.out)
    _fresh_out(out, log)
    torch.manual_seed(opts.seed)
    with _checkpointing(model, prep, meta):
        return curvature(
            model, images, videos, loss_fn,
            lrs=lrs, backend=opts.backend, method=opts.method, max_iter=opts.max_iter, tol=opts.tol,
            beta_vid=opts.beta_vid, trace_samples=opts.trace_samples, per_module=opts.per_module,
            include=opts.include or None, exclude=opts.exclude or None, roles=opts.roles,
            role_of=adapter.role_of, module_of=adapter.module_of, fd_step=opts.fd_step, seed=opts.seed,
            out_dir=out, progress=progress, meta=meta,
        )


@dataclass
class DecomposeOptions(AlignOptions):
    """Options of :func:`run_decompose` (the command line's ``gradprobe decompose``).

    ``shared`` picks the temporally collapsed variant that defines g_sh: ``smallest`` (the smallest
    budget the model accepts, measured once), ``static`` or ``shuffled`` (that sampler at every budget
    of the grid, on the same clips). The batch counts default higher than align's: the intervals of
    α(m) need at least 8 video groups, and ρ_sh and ρ_tmp carry the image-side noise.
    """

    frames: str | Sequence[int] = "2,8,16,32,64"
    image_batches: int = 16
    video_batches: int = 24
    shared: str = "smallest"
    video_groups: int | None = None
    tolerance: float = 0.1
    redundant_from: int | None = None


SHARED_LABELS = {
    "static": "static: the clip's middle frame copied m times, at every budget",
    "shuffled": "shuffled: the uniform frames in random order, at every budget",
}


def run_decompose(
    opts: DecomposeOptions,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Run ``gradprobe decompose`` from options: load model and data, build the budgets' batches and the
    shared variant's, and estimate the α(m) decomposition (:func:`gradprobe.estimators.decompose.decompose`).

    Raises:
        GradprobeError: any bad option, path, record or budget (one line, for the CLI).
    """
    from gradprobe.data.clips import ClipStore
    from gradprobe.estimators.decompose import SHARED_MODES, check_tolerance, decompose
    from gradprobe.models.base import batch_info, loss_fn

    log = log or (lambda s: None)
    if opts.shared not in SHARED_MODES:
        raise InputError(f"shared: unknown shared variant {opts.shared!r}; use one of {', '.join(SHARED_MODES)}")
    if opts.shared == opts.sampler:
        raise InputError(f"shared: the budgets already use the {opts.sampler} sampler; the shared variant must differ")
    check_tolerance(opts.tolerance)
    if opts.video_groups is not None:
        check_positive_int("video-groups", opts.video_groups, 2)
    if len(model_list(opts.model)) > 1:
        raise InputError("model: decompose measures one checkpoint; give one --model")
    grid = parse_frames(opts.frames) if isinstance(opts.frames, str) else parse_frames(list(opts.frames))
    if opts.redundant_from is not None and not any(m >= opts.redundant_from for m in grid):
        raise InputError(f"redundant-from: no budget is >= {opts.redundant_from} (budgets: {grid})")
    prep = _prepare(opts, log, add_frames=lambda a: [a.min_budget()] if opts.shared == "smallest" else [],
                    progress=progress)
    m0 = prep.family.adapter_class().min_budget()
    extra = m0 if opts.shared == "smallest" and m0 not in grid else None
    model, adapter, images, videos = _load(opts, prep, prep.model_dirs[0], log)
    meta = dict(prep.meta, model=str(prep.model_dirs[0]), shared=opts.shared, shared_frames=m0
                if opts.shared == "smallest" else None)
    model, out = _distribute(model, prep, meta, opts.out)
    _fresh_out(out, log)
    shared: Any
    if opts.shared == "smallest":
        shared = videos.pop(extra) if extra is not None else None
        label = f"smallest budget the model accepts (m={m0})" + (", also in the grid" if extra is None else "")
    else:
        st = ClipStore(prep.store.root, grid, opts.shared, size_of=prep.store.size_of)
        shared = {m: _LazyBatches(prep.vid_chunks, (lambda c, m=m: adapter.collate(c, store=st, m=m)),
                                  videos[m].device, prep.dtype) for m in grid}
        label = SHARED_LABELS[opts.shared]
    torch.manual_seed(opts.seed)
    with _checkpointing(model, prep, meta):
        return decompose(
            model, images, videos, loss_fn, shared=shared, shared_label=label,
            include=opts.include or None, exclude=opts.exclude or None, roles=opts.roles,
            role_of=adapter.role_of, module_of=adapter.module_of, image_groups=opts.image_groups,
            video_groups=opts.video_groups, sketch=opts.sketch, sketch_seed=opts.sketch_seed,
            reference_device=opts.reference_device,
            reference_dtype=opts.reference_dtype, tolerance=opts.tolerance, redundant_from=opts.redundant_from,
            n_boot=opts.n_boot, seed=opts.seed, batch_info=batch_info, out_dir=out, progress=progress, meta=meta,
        )
