"""The embedded default: ShapesWorld data plus a toy Qwen2.5-VL trained on its images.

:func:`ensure_toy` builds it once and caches it: it generates the data, creates
the toy model and processor (saved and reloaded with ``from_pretrained``), and
trains the image stage with transformers' ``Trainer`` so the default model has
real image skill to lose. The cache lives in the user cache directory
(``GRADPROBE_CACHE`` or an explicit directory moves it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradprobe.errors import InputError

#: Bump when the toy's data, model or training recipe changes, so stale caches are not reused.
TOY_VERSION = 6


@dataclass(frozen=True)
class ToySpec:
    """What to build. The defaults make the toy of ``gradprobe align``; tests use a smaller one."""

    seed: int = 0
    steps: int = 900
    batch_size: int = 32
    lr: float = 3e-4
    n_train_images: int = 4000
    n_eval_images: int = 300
    n_probe_images: int = 256
    n_train_videos: int = 2000
    n_eval_videos: int = 400
    n_probe_videos: int = 96

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_train_images", "n_eval_images", "n_probe_images", "n_probe_videos"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}: expected a positive integer, got {getattr(self, name)}")

    @property
    def key(self) -> str:
        return (
            f"toy-v{TOY_VERSION}-s{self.seed}-n{self.steps}-b{self.batch_size}-lr{self.lr:g}"
            f"-i{self.n_train_images}.{self.n_eval_images}.{self.n_probe_images}"
            f"-v{self.n_train_videos}.{self.n_eval_videos}.{self.n_probe_videos}"
        )


#: The smallest toy the real build path makes (six Trainer steps on 48 images, in seconds): what the tests
#: and ``benchmarks/learnability.py`` train from.
TINY = ToySpec(steps=6, batch_size=8, n_train_images=48, n_eval_images=24, n_probe_images=32,
               n_train_videos=4, n_eval_videos=4, n_probe_videos=12)


@dataclass(frozen=True)
class Toy:
    """A built toy: where its model and data are, and its held-out image accuracy."""

    root: Path
    spec: ToySpec
    info: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def data(self, split: str, kind: str) -> Path:
        """Path of a JSONL file: split in train/eval/probe, kind in images/videos."""
        return self.data_dir / f"{split}_{kind}.jsonl"

    def samples(self, split: str, kind: str) -> list[Any]:
        """The samples of one record file (see :meth:`data`)."""
        from gradprobe.data.records import read_samples

        return read_samples(self.data(split, kind)).samples

    def load(self, **options: Any) -> tuple[torch.nn.Module, Any]:
        """The toy model and its adapter, through ``from_pretrained`` (options: ``dtype``, ``device``)."""
        from gradprobe.models.toy import ToyAdapter

        return ToyAdapter.load(self.model_dir, **options)

    def export(self, fmt: str, out: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the toy's six record files (train/eval/probe × images/videos) in a training stack's
        layout (``llamafactory`` or ``swift``, see :mod:`gradprobe.data.export`), named
        ``shapesworld_<split>_<kind>``."""
        from gradprobe.data.export import export_records

        files = {f"shapesworld_{split}_{kind}": self.data(split, kind)
                 for split in ("train", "eval", "probe") for kind in ("images", "videos")}
        return export_records(files, out, fmt)


def default_cache_dir() -> Path:
    """``$GRADPROBE_CACHE``, else ``$XDG_CACHE_HOME/gradprobe``, else ``~/.cache/gradprobe``."""
    env = os.environ.get("GRADPROBE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gradprobe"


def share_modes(root: str | os.PathLike[str]) -> None:
    """Give every file and directory under ``root`` the modes the umask allows (some writers, e.g. the
    weights' ``save_pretrained``, create files readable by their owner only; a cache shared between users
    would then look incomplete to the others)."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)


def ensure_toy(
    spec: ToySpec | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    rebuild: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Any = None,
) -> Toy:
    """Return the cached toy, building it first if needed.

    Args:
        spec: what to build (default :class:`ToySpec`).
        cache_dir: where toys are cached (default :func:`default_cache_dir`).
        rebuild: build again even if cached.
        log: receives progress lines.
        progress: a :class:`~gradprobe.probe.measure.Progress` (phases ``building the toy: data`` and
            ``building the toy: image stage``, one step per file and per optimizer step).
    """
    spec = spec or ToySpec()
    log = log or (lambda s: None)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / spec.key
    done = target / "toy.json"
    if done.is_file() and not rebuild:
        return _cached(target, spec)
    root.mkdir(parents=True, exist_ok=True)
    # several processes at once (torchrun's ranks, two runs on one cache): one builds, the others wait for it
    with _exclusive(root / (spec.key + ".lock"), log):
        if done.is_file() and not rebuild:
            return _cached(target, spec)
        return _build_into(spec, root, target, log, progress)


def _cached(target: Path, spec: ToySpec) -> Toy:
    from gradprobe.models.toy import mark

    mark(target / "model")  # toys cached before the marker existed
    return Toy(target, spec, json.loads((target / "toy.json").read_text()))


@contextlib.contextmanager
def _exclusive(path: Path, log: Callable[[str], None]) -> Any:
    """Hold an exclusive lock on ``path`` (POSIX ``flock``; no lock where there is none)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another process is building this toy; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: what torchrun (and other launchers) set to make a Trainer distributed
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@contextlib.contextmanager
def _one_process() -> Any:
    """The launcher's variables hidden: the toy is built by one process alone, whose image-stage Trainer must
    not wait for the other ranks (they wait on the build lock)."""
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _build_into(spec: ToySpec, root: Path, target: Path, log: Callable[[str], None], progress: Any) -> Toy:
    tmp = root / (spec.key + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # the Trainer prints its logs (stdout carries results only); one process, even under torchrun
    with contextlib.redirect_stdout(sys.stderr), _one_process():
        info = _build(spec, tmp, log, progress)
    (tmp / "toy.json").write_text(json.dumps(info, indent=2) + "\n")
    share_modes(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return Toy(target, spec, info)


def _build(spec: ToySpec, root: Path, log: Callable[[str], None], progress: Any = None) -> dict[str, Any]:
    from gradprobe.data import shapesworld as sw
    from gradprobe.models import toy
    from gradprobe.probe.measure import Progress
    from gradprobe.train.image_stage import train_image_stage

    progress = progress or Progress()
    t0 = time.time()
    data = root / "data"
    log(f"building the toy once (cached for later runs): ShapesWorld under {data}, then the image stage")
    splits = (("train", spec.n_train_images, spec.n_train_videos), ("eval", spec.n_eval_images, spec.n_eval_videos),
              ("probe", spec.n_probe_images, spec.n_probe_videos))
    phase = "building the toy: data"
    progress.start(phase, sum(i + v for _, i, v in splits))
    for split, n_img, n_vid in splits:
        sw.generate(data, n_images=n_img, n_videos=n_vid, seed=spec.seed, split=split,
                    tick=lambda: progress.advance(phase))
    progress.finish(phase)
    init = root / "init"
    toy.create(init, sw.vocabulary(), seed=spec.seed)
    model, adapter = toy.ToyAdapter.load(init)
    from gradprobe.data.records import read_samples
    from gradprobe.train.collate import SampleCollator
    from gradprobe.train.evaluate import accuracy

    eval_images = read_samples(data / "eval_images.jsonl").samples
    init_acc = accuracy(model, SampleCollator(adapter, data), eval_images)
    result = train_image_stage(
        model,
        adapter,
        read_samples(data / "train_images.jsonl").samples,
        data,
        out_dir=root / "trainer",
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        seed=spec.seed,
        progress=progress,
    )
    model.save_pretrained(root / "model")
    adapter.processor.save_pretrained(root / "model")
    toy.mark(root / "model")
    shutil.rmtree(init)
    shutil.rmtree(root / "trainer", ignore_errors=True)
    # reload through from_pretrained, so the accuracy is that of the saved checkpoint
    model, adapter = toy.ToyAdapter.load(root / "model")
    acc_img = accuracy(model, SampleCollator(adapter, data), eval_images)
    return {
        "version": TOY_VERSION,
        "spec": spec.__dict__,
        "image_accuracy": _totals(acc_img),
        "initial_image_accuracy": _totals(init_acc),
        "final_train_loss": result["final_loss"],
        "train_seconds": result["seconds"],
        "build_seconds": time.time() - t0,
        "torch": torch.__version__,
    }


def _totals(acc: dict[str, Any]) -> dict[str, Any]:
    """An accuracy result without its per-record strings."""
    return {k: v for k, v in acc.items() if not k.endswith("_items")}
