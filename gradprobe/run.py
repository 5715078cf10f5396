"""End-to-end runs from paths and options: what the command line calls.

:func:`run_align` resolves the model and data (the embedded toy default when
none are given), builds paired image and video batches, and calls
:func:`gradprobe.align`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradprobe._checks import check_positive_int, parse_frames
from gradprobe.errors import DataError, InputError
from gradprobe.estimators.align import AlignReport, Progress, align
from gradprobe.probe.store import resolve_dtype
from gradprobe.toybox import ToySpec, ensure_toy

#: The toy that ``gradprobe align`` uses when no model is given.
DEFAULT_TOY = ToySpec()


@dataclass
class AlignOptions:
    """Options of :func:`run_align` (the command line's ``gradprobe align``)."""

    frames: str | Sequence[int] = "8,16,32,64"
    model: str | None = None
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
    image_groups: int | None = None
    device: str = "auto"
    dtype: str | None = None
    reference_device: str = "model"
    reference_dtype: str | None = None
    seed: int = 0
    n_boot: int = 2000
    out: str | None = None
    cache_dir: str | None = None


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


def _chunks(records: list[dict[str, Any]], size: int, count: int, what: str, path: Path,
            option: str) -> list[list[dict[str, Any]]]:
    """``count`` consecutive batches of ``size`` records, or a DataError naming ``option``."""
    need = size * count
    if len(records) < need:
        raise DataError(
            f"{path}: {len(records)} {what} records, need {need} ({count} batches of {size}); "
            f"lower {option} or the batch size"
        )
    return [records[i * size : (i + 1) * size] for i in range(count)]


def _architecture(model_dir: Path) -> str:
    from gradprobe.models.registry import architecture_of

    return architecture_of(model_dir)


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


def run_align(
    opts: AlignOptions,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> AlignReport:
    """Run ``gradprobe align`` from options: load model and data, build batches, measure.

    Raises:
        GradprobeError: any bad option, path, record or budget (one line, for the CLI).
    """
    from gradprobe.models import toy as toy_adapter

    log = log or (lambda s: None)
    frames = parse_frames(opts.frames) if isinstance(opts.frames, str) else parse_frames(list(opts.frames))
    for m in frames:
        toy_adapter.check_budget(m)
    for name in ("image_batches", "video_batches", "batch_size", "video_batch_size"):
        check_positive_int(name.replace("_", "-"), getattr(opts, name))
    device = _device(opts.device)
    dtype = resolve_dtype(opts.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)

    given = [opts.model, opts.image_data, opts.video_data]
    meta: dict[str, Any] = {}
    if not any(given):
        toy = ensure_toy(DEFAULT_TOY, opts.cache_dir, log=log)
        model_dir, image_path, video_path = toy.model_dir, toy.data("probe", "images"), toy.data("probe", "videos")
        meta["source"] = "toy"
        meta["toy"] = {"root": str(toy.root), "image_accuracy": toy.info.get("image_accuracy")}
    elif all(given):
        model_dir, image_path, video_path = Path(opts.model), Path(opts.image_data), Path(opts.video_data)
        meta["source"] = "paths"
    else:
        raise InputError("give all of --model, --image-data and --video-data, or none of them for the toy default")
    _architecture(Path(model_dir))
    image_records = toy_adapter.read_records(image_path)
    video_records = toy_adapter.read_records(video_path)
    image_root = Path(opts.data_root) if opts.data_root else Path(image_path).parent
    video_root = Path(opts.data_root) if opts.data_root else Path(video_path).parent
    if not all("image" in r for r in image_records):
        raise DataError(f"{image_path}: every record must have an 'image' field")
    if not all("video" in r for r in video_records):
        raise DataError(f"{video_path}: every record must have a 'video' field")
    img_chunks = _chunks(image_records, opts.batch_size, opts.image_batches, "image", Path(image_path),
                         "--image-batches")
    vid_chunks = _chunks(video_records, opts.video_batch_size, opts.video_batches, "video", Path(video_path),
                         "--video-batches")

    log(f"loading {model_dir}")
    model, processor = toy_adapter.load(model_dir, dtype=dtype, device=str(device))
    image_collate = toy_adapter.ToyCollator(processor, image_root)
    images = list(_LazyBatches(img_chunks, image_collate, device, dtype))
    cache: dict[str, Any] = {}
    videos = {
        m: _LazyBatches(vid_chunks, toy_adapter.ToyCollator(processor, video_root, frames=m, cache=cache), device, dtype)
        for m in frames
    }
    meta.update(
        model=str(model_dir),
        image_data=str(image_path),
        video_data=str(video_path),
        batch_size=opts.batch_size,
        video_batch_size=opts.video_batch_size,
        sampler="uniform",
        pixel_policy="fixed per-frame resolution",
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    torch.manual_seed(opts.seed)
    return align(
        model,
        images,
        videos,
        toy_adapter.loss_fn,
        include=opts.include or None,
        exclude=opts.exclude or None,
        roles=opts.roles,
        role_of=toy_adapter.role_of,
        module_of=toy_adapter.module_of,
        image_groups=opts.image_groups,
        reference_device=opts.reference_device,
        reference_dtype=opts.reference_dtype,
        n_boot=opts.n_boot,
        seed=opts.seed,
        batch_info=toy_adapter.batch_info,
        out_dir=opts.out,
        progress=progress,
        meta=meta,
    )

